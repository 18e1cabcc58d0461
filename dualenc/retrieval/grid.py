"""A grid of result images (seed 003's 3×3 figure), written as a PNG.

Images are decoded with `dualenc.data.images.decode_rgb`: the pixels the vision encoder saw.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np

from dualenc.core.errors import DualEncError
from dualenc.core.files import save_figure_atomic


def grid_shape(count: int) -> tuple[int, int]:
    """(rows, columns) for `count` images: as square as possible, columns ≥ rows (9 → 3×3, 5 → 2×3)."""
    columns = max(1, math.ceil(math.sqrt(count)))
    return max(1, math.ceil(count / columns)), columns


def check_grid_path(path: Path) -> None:
    """`DualEncError` unless a PNG can be written at `path`: not a directory, in an existing
    directory this process may write in. Cheap, so a CLI checks it before any work."""
    path = Path(path)
    if path.is_dir():
        raise DualEncError(f"cannot write grid {path}: it is a directory; pass a file name such as {path / 'grid.png'}")
    if not path.parent.is_dir():
        raise DualEncError(f"cannot write grid {path}: directory {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise DualEncError(
            f"cannot write grid {path}: directory {path.parent} is read-only (or not yours); choose another place"
        )


def save_result_grid(path: Path, images: list[np.ndarray], titles: list[str], suptitle: str) -> None:
    """Draw `images` with their `titles` (e.g. scores) in a grid under `suptitle`; write a PNG.

    Written to a temporary sibling and renamed, so a crash never leaves a truncated PNG, and a
    failed write (disk full, read-only) leaves no temporary file either.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: never needs a display
    import matplotlib.pyplot as plt

    path = Path(path)
    check_grid_path(path)
    rows, columns = grid_shape(len(images))
    figure, axes = plt.subplots(rows, columns, figsize=(3 * columns, 3 * rows + 0.6), squeeze=False)
    for position, axis in enumerate(axes.flat):
        axis.axis("off")
        if position < len(images):
            axis.imshow(images[position])
            axis.set_title(titles[position], fontsize=9)
    figure.suptitle(suptitle if len(suptitle) <= 120 else suptitle[:117] + "...")
    figure.tight_layout()
    try:
        save_figure_atomic(figure, path, dpi=80)
    except OSError as error:
        raise DualEncError(f"cannot write grid {path} ({error.strerror or error}); choose another place") from None
