"""The packer's bookkeeping files: `manifest.json` (what a finished directory holds) and the
resume journal (what an unfinished run has completed so far).

`manifest.json` is written last, atomically, and looks like::

    {"format_version": 1,
     "source": {"format": "cuhk-pedes", "annotations": "/abs/reid_raw.json",
                "images": "/abs/imgs", "fingerprint": "<sha256>", ...},
     "splits": {"train": {"pairs": 3, "images": 2, "ids": 1,
                          "shards": ["train-00000-of-00001.tfrecord"],
                          "sha256": {"train-00000-of-00001.tfrecord": "<hex>"}}},
     "skipped": [{"path": "/abs/imgs/a.jpg", "reason": "file not found", "pairs": 2}],
     "image_size": null,
     "created": "2025-01-01T00:00:00+00:00"}

`source.fingerprint` identifies the packed content (pairs, labels, options); a re-run with the
same fingerprint resumes or reuses the directory, a different one is refused unless
`--overwrite` is given.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from dualenc.errors import DualEncError
from dualenc.records import FORMAT_VERSION, MANIFEST_NAME

JOURNAL_NAME = ".pack-journal.json"


def read_bookkeeping(path: Path) -> dict | None:
    """The manifest or journal at `path`, or None when there is none.

    A file that is not a JSON object was not written by this packer (it writes atomically), so it
    is reported rather than silently replaced.
    """
    if not path.exists():
        return None
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DualEncError(
            f"{path} is not a packer file ({error}); remove it or pass --overwrite"
        ) from None
    if not isinstance(content, dict):
        raise DualEncError(f"{path} is not a packer file (not a JSON object); remove it or pass --overwrite")
    return content


def build_manifest(source: dict, splits: dict, skipped: list[dict], image_size: int | None) -> dict:
    """The manifest dict in the schema above; `splits` maps split name to its summary."""
    return {
        "format_version": FORMAT_VERSION,
        "source": source,
        "splits": splits,
        "skipped": skipped,
        "image_size": image_size,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def manifest_path(out_dir: Path) -> Path:
    """Where the manifest of `out_dir` lives."""
    return out_dir / MANIFEST_NAME
