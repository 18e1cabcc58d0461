"""A tiny CUHK-PEDES tree (every image kind, a missing and a truncated file) and the packer CLI on it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.support.images import write_image
from tfrecords_tools.__main__ import main

# (file_path, kind, identity id, split): the id numbers have gaps on purpose.
ENTRIES = [
    ("VIPeR/a.bmp", "bmp", 7, "train"),
    ("CUHK01/b.png", "png", 7, "train"),
    ("CUHK01/c.jpg", "jpeg", 3, "train"),
    ("CUHK03/d.jpg", "png_named_jpg", 12, "train"),
    ("CUHK03/e.jpg", "grey_jpeg", 12, "train"),
    ("Market/f.jpg", "cmyk_jpeg", 40, "test"),
    ("Market/g.jpg", "truncated", 40, "test"),
    ("Market/h.jpg", None, 41, "test"),  # listed but missing
    ("train_query/i.png", "rgba_png", 41, "test"),
]


def make_cuhk_pedes(root: Path, with_split: bool = True) -> dict[str, np.ndarray]:
    """Write images and `reid_raw.json` under `root`; returns the expected pixels per file_path."""
    pixels, entries = {}, []
    for index, (file_path, kind, identity, split) in enumerate(ENTRIES):
        if kind is not None:
            pixels[file_path] = write_image(root / "imgs" / file_path, kind, seed=index)
        entry = {"id": identity, "file_path": file_path,
                 "captions": [f"  A person\twith {index}  bags. ", f"Walking {index}\n"],
                 "processed_tokens": [["a"], ["b"]]}
        if with_split:
            entry["split"] = split
        entries.append(entry)
    (root / "reid_raw.json").write_text(json.dumps(entries))
    return pixels


def pack(root: Path, out: Path, *extra: str) -> int:
    """Run the packer CLI on the tree at `root` into `out` (small shards, 2 workers); its exit code."""
    return main(["cuhk-pedes", "--annotations", str(root / "reid_raw.json"), "--images", str(root / "imgs"),
                 "--out", str(out), "--workers", "2", "--shard-size", "4", *extra])
