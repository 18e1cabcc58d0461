"""The packed synthetic demo dataset that `train.py` uses when given no `--data`.

The raw demo (CUHK-PEDES layout) lives in ``CACHE/demo-raw`` and its packed form in
``CACHE/demo-packed``; CACHE is `cache_dir`, else ``$DUALENC_CACHE``, else ``~/.cache/dualenc``.
Both are reused when complete: `make_demo` is idempotent, and the packer's fingerprint includes
the sha256 of the demo's marker file, so the packed copy is rebuilt only when the raw demo changed.
"""

from __future__ import annotations

from pathlib import Path

from dualenc.data.pipeline import sha256_of_file
from dualenc.core.runs import cache_root



def packed_demo(cache_dir: str | Path | None = None, identities: int | None = None, seed: int = 0) -> Path:
    """Make (or reuse) the raw demo and its packed TFRecords; return the packed directory."""
    from tfrecords_tools import cuhk_pedes
    from tfrecords_tools.demo import IMAGES_DIR, MARKER_NAME, REID_RAW_NAME, make_demo
    from tfrecords_tools.writer import pack

    root = cache_root(cache_dir)
    options = {"seed": seed} if identities is None else {"seed": seed, "identities": identities}
    raw = Path(make_demo(root / "demo-raw", **options))
    annotations, images = raw / REID_RAW_NAME, raw / IMAGES_DIR
    source = {
        "format": "cuhk-pedes",
        "annotations": str(annotations),
        "images": str(images),
        "demo_marker_sha256": sha256_of_file(raw / MARKER_NAME),
    }
    splits, skipped = cuhk_pedes.load(annotations, images)
    packed = root / "demo-packed"
    # The packed copy is a cache: a stale one (different demo) is replaced, not refused.
    pack(splits, packed, source, skipped=skipped, overwrite=True)
    return packed
