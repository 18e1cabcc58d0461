"""ICFG-PEDES (`ICFG-PEDES.json`) → `ImageEntry` lists per split.

Each entry is ``{"id": int, "file_path": "test/0027/0027_....jpg",
"captions": [str], "split": "train"|"test", "processed_tokens": [[str, ...]]}`` with
`file_path` relative to the `imgs/` directory: 54,522 images of 4,102 people, one caption each;
3,102 people (34,674 images) in "train", 1,000 (19,848 images) in "test", no validation split
(training then holds out a tenth of the train identities). Identities are the labels, read as
for RSTPReid (`tfrecords_tools.person_sets`).
"""

from __future__ import annotations

from pathlib import Path

from tfrecords_tools.person_sets import load_identity_list
from tfrecords_tools.writer import ImageEntry

PATH_FIELD = "file_path"


def load(annotations: Path, images: Path,
         allow_outside_images: bool = False) -> tuple[dict[str, list[ImageEntry]], list[dict]]:
    """The splits of `ICFG-PEDES.json` and the captions skipped as empty (`load_identity_list`)."""
    return load_identity_list(annotations, images, PATH_FIELD, allow_outside_images)
