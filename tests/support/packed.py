"""Reading a packed directory back: the parsed records of one split, in shard order."""

from __future__ import annotations

import json
from pathlib import Path

import tensorflow as tf

from dualenc.data.records import parse_example


def read_records(out_dir: Path, split: str) -> list[dict]:
    """Every record of `split` in the packed directory `out_dir`, parsed to NumPy values."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    files = [str(out_dir / name) for name in manifest["splits"][split]["shards"]]
    return [{key: value.numpy() for key, value in parse_example(record).items()}
            for record in tf.data.TFRecordDataset(files)]
