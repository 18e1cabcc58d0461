"""Packed directories for tests: written shard by shard, and read back as parsed records."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import tensorflow as tf

from dualenc.data.records import MANIFEST_NAME, parse_example, serialize_example, shard_name


def write_packed_shards(data_dir: Path, splits: dict[str, list[list[tuple[str, bytes, str, int]]]]) -> None:
    """A packed dataset whose splits are given shard by shard, each shard a list of
    (caption, image bytes, image_id, label) records; a split may have no shards."""
    data_dir.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for split, shards in splits.items():
        names = [shard_name(split, index, len(shards)) for index in range(len(shards))]
        for name, records in zip(names, shards):
            with tf.io.TFRecordWriter(str(data_dir / name)) as writer:
                for record in records:
                    writer.write(serialize_example(*record))
        records = [record for shard in shards for record in shard]
        summaries[split] = {
            "pairs": len(records), "images": len({record[2] for record in records}),
            "ids": len({record[3] for record in records}), "shards": names,
            "sha256": {name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest() for name in names},
        }
    (data_dir / MANIFEST_NAME).write_text(json.dumps({"format_version": 1, "splits": summaries}))


def read_records(out_dir: Path, split: str) -> list[dict]:
    """Every record of `split` in the packed directory `out_dir`, parsed to NumPy values."""
    manifest = json.loads((out_dir / "manifest.json").read_text())
    files = [str(out_dir / name) for name in manifest["splits"][split]["shards"]]
    return [{key: value.numpy() for key, value in parse_example(record).items()}
            for record in tf.data.TFRecordDataset(files)]
