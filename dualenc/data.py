"""Read a packed dataset (`manifest.json` + TFRecord shards) as a `tf.data` pipeline.

Pipeline: shard names (shuffled) → interleaved TFRecord reading → shuffle of the *serialised*
records → repeat → parse + decode (parallel) → batch → prefetch, last. Shuffling before decoding
keeps the buffer holding compressed bytes rather than decoded pixels (a 299×299 image is ~268 kB
decoded, ~30 kB as JPEG); the buffer covers the whole split when it fits in
`SHUFFLE_BUFFER_BYTES`, otherwise as many records as fit, with shard order shuffled as well.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import tensorflow as tf

from dualenc.errors import DualEncError
from dualenc.images import decode_image
from dualenc.records import CAPTION, FORMAT_VERSION, IMAGE, IMAGE_ID, LABEL, MANIFEST_NAME, parse_example

# Split names in order of preference: the held-out split a run validates on, and the one it is
# finally scored (and searched by default) on.
VALIDATION_SPLITS = ("val", "valid", "validation", "test")
TEST_SPLITS = ("test", "val", "valid", "validation")

SHUFFLE_BUFFER_BYTES = 1 << 30
SHARDS_READ_AT_ONCE = 8
HASH_BLOCK_BYTES = 1 << 20


def sha256_of_file(path: Path) -> str:
    """Hex sha256 of the file at `path`, read in blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(HASH_BLOCK_BYTES), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(data_dir: str | Path) -> dict:
    """The validated manifest of the packed dataset in `data_dir`.

    Raises `DualEncError` when the directory or manifest is missing, the manifest is not JSON
    or has another format version, or a shard it lists is missing.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DualEncError(f"data directory {data_dir} does not exist; pack one with `python -m tfrecords_tools`")
    path = data_dir / MANIFEST_NAME
    if not path.is_file():
        raise DualEncError(
            f"{path} not found: {data_dir} is not a packed dataset (or its packing did not finish); "
            "pack it with `python -m tfrecords_tools`"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise DualEncError(f"{path} is not valid JSON ({error}); re-pack the dataset") from None
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        found = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise DualEncError(f"{path} has format_version {found!r}, expected {FORMAT_VERSION}; re-pack the dataset")
    splits = manifest.get("splits")
    if not isinstance(splits, dict):
        raise DualEncError(f"{path} has no 'splits' object; re-pack the dataset")
    for split, summary in splits.items():
        for name in summary.get("shards", []):
            if not (data_dir / name).is_file():
                raise DualEncError(f"shard {data_dir / name} of split {split!r} listed in {path} is missing")
    return manifest


def _split_summary(manifest: dict, data_dir: Path, split: str) -> dict:
    """The manifest entry of a non-empty `split`, or a `DualEncError` listing the valid splits."""
    splits = manifest["splits"]
    valid = ", ".join(name for name, summary in sorted(splits.items()) if summary.get("pairs"))
    if split not in splits:
        raise DualEncError(f"{data_dir} has no split {split!r}; valid splits: {valid or 'none'}")
    if not splits[split].get("pairs"):
        raise DualEncError(f"split {split!r} in {data_dir} is empty; valid splits: {valid or 'none'}")
    return splits[split]


def split_summary(data_dir: str | Path, split: str) -> dict:
    """The manifest entry (pairs, images, ids, shards, sha256) of the non-empty `split` in `data_dir`."""
    data_dir = Path(data_dir)
    return _split_summary(read_manifest(data_dir), data_dir, split)


def verify_checksums(data_dir: str | Path, split: str) -> None:
    """Check every shard of `split` against the manifest's sha256; `DualEncError` names the
    first shard whose content differs."""
    data_dir = Path(data_dir)
    summary = _split_summary(read_manifest(data_dir), data_dir, split)
    for name in summary["shards"]:
        expected = summary["sha256"].get(name)
        if sha256_of_file(data_dir / name) != expected:
            raise DualEncError(
                f"shard {data_dir / name} does not match its sha256 in {data_dir / MANIFEST_NAME} "
                "(corrupted or modified); re-pack the dataset"
            )


def _shuffle_buffer_size(data_dir: Path, summary: dict) -> int:
    """Records in the buffer: the whole split if its bytes fit `SHUFFLE_BUFFER_BYTES`."""
    total_bytes = sum((data_dir / name).stat().st_size for name in summary["shards"])
    mean_record_bytes = max(1, total_bytes // summary["pairs"])
    return max(1, min(summary["pairs"], SHUFFLE_BUFFER_BYTES // mean_record_bytes))


def record_dataset(data_dir: str | Path, split: str, *, shuffle: bool = False, seed: int | None = None,
                   repeat: bool = False) -> tf.data.Dataset:
    """The serialised records of `split` (scalar strings), in packing order unless `shuffle`.

    With `shuffle`, shard order and records are shuffled anew each epoch; the same `seed` gives
    the same sequence. `pair_dataset` decodes these; the feature cache maps the very same
    sequence to cached features, so both see identical batches.
    """
    data_dir = Path(data_dir)
    summary = _split_summary(read_manifest(data_dir), data_dir, split)
    files = tf.data.Dataset.from_tensor_slices([str(data_dir / name) for name in summary["shards"]])
    if shuffle:
        files = files.shuffle(len(summary["shards"]), seed=seed, reshuffle_each_iteration=True)
    records = files.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(summary["shards"]), SHARDS_READ_AT_ONCE) if shuffle else 1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if shuffle:
        records = records.shuffle(_shuffle_buffer_size(data_dir, summary), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        records = records.repeat()
    return records


def pair_dataset(data_dir: str | Path, split: str, *, image_size: tuple[int, int],
                 batch_size: int | None = None, shuffle: bool = False, seed: int | None = None,
                 drop_remainder: bool = False, repeat: bool = False) -> tf.data.Dataset:
    """Image-caption pairs of `split` as dicts of ``image`` uint8 [B, H, W, 3], ``caption``
    string [B], ``label`` int64 [B] and ``image_id`` string [B] (no batch axis when
    `batch_size` is None), from `record_dataset` (same order and shuffling).
    """
    records = record_dataset(data_dir, split, shuffle=shuffle, seed=seed, repeat=repeat)

    def decode(serialized: tf.Tensor) -> dict:
        features = parse_example(serialized)
        return {
            "image": decode_image(features[IMAGE], image_size),
            "caption": features[CAPTION],
            "label": features[LABEL],
            "image_id": features[IMAGE_ID],
        }

    pairs = records.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if batch_size is not None:
        pairs = pairs.batch(batch_size, drop_remainder=drop_remainder)
    return pairs.prefetch(tf.data.AUTOTUNE)
