"""The image files an annotation file names: inside ``--images``, regular, and of bounded size.

Annotation files name images by paths relative to the image directory, and a careless or
hostile one can name ``../../home/me/.ssh/id_rsa``, ``/etc/shadow``, a symlink to ``/dev/zero``
(read forever) or a FIFO (whose open waits for a writer that never comes). Two checks:

- when the annotations are loaded, `ImageDirectory.path` resolves each path, symlinks included,
  and refuses (one line naming the entry) one that lands outside ``--images``, unless
  ``--allow-outside-images`` says such paths are meant;
- when an image is read (the local and the Beam packer alike, `dualenc.data.images.prepare_images`), `read_image_bytes` opens it
  without blocking, refuses anything but a regular file, and reads at most ``--max-image-bytes``;
  each refusal is the image's skip reason in the manifest.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from dualenc.core.errors import DualEncError

ALLOW_OUTSIDE_FLAG = "--allow-outside-images"


@dataclasses.dataclass(frozen=True)
class ImageDirectory:
    """The directory (``--images``) an annotation file's image paths are relative to, and
    whether a path may resolve outside it (`allow_outside`)."""

    root: Path
    allow_outside: bool = False
    resolved_root: str = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "resolved_root", os.path.realpath(self.root))

    def path(self, image_id: str, where: str) -> str:
        """The file to read for `image_id` (a path relative to the root, as the annotations give
        it); `where` names the entry in the `DualEncError` for a path that resolves outside."""
        candidate = self.root / image_id
        if not self.allow_outside:
            resolved = os.path.realpath(candidate)
            if os.path.commonpath([resolved, self.resolved_root]) != self.resolved_root:
                raise DualEncError(f"{where}: image {image_id!r} lies outside --images {self.root} (at {resolved}); "
                                   f"fix the path, or pass {ALLOW_OUTSIDE_FLAG} if such paths are meant")
        return str(candidate)
