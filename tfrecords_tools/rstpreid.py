"""RSTPReid (`data_captions.json`) → `ImageEntry` lists per split.

Each entry is ``{"id": int, "img_path": "3903_c14_0007.jpg", "captions": [str, str], "split":
"train"|"val"|"test"}`` with `img_path` relative to the `imgs/` directory: 20,505 images of
4,101 people, five images per person and two captions per image; 3,701 people in "train", 200 in
"val" and 200 in "test". Identities are the labels, read as for ICFG-PEDES
(`tfrecords_tools.person_sets`).
"""

from __future__ import annotations

from pathlib import Path

from tfrecords_tools.person_sets import load_identity_list
from tfrecords_tools.writer import ImageEntry

PATH_FIELD = "img_path"


def load(annotations: Path, images: Path,
         allow_outside_images: bool = False) -> tuple[dict[str, list[ImageEntry]], list[dict]]:
    """The splits of `data_captions.json` and the captions skipped as empty (`load_identity_list`)."""
    return load_identity_list(annotations, images, PATH_FIELD, allow_outside_images)
