"""Training input: a packed split as decoded image-caption pairs, plus the checks a run makes first.

Pipeline: `dualenc.data.packed.record_dataset` (shard names shuffled → interleaved reading →
shuffle of the *serialised* records → repeat) → parse + decode (parallel) → batch → prefetch,
last. Shuffling before decoding keeps the buffer holding compressed bytes rather than decoded
pixels (a 299×299 image is ~268 kB decoded, ~30 kB as JPEG).
"""

from __future__ import annotations

from pathlib import Path

import tensorflow as tf

from dualenc.core.errors import DualEncError
from dualenc.core.files import sha256_of_file
from dualenc.data.images import decode_image
from dualenc.data.manifest import load_manifest, manifest_path
from dualenc.data.packed import record_dataset
from dualenc.data.records import CAPTION, IMAGE, IMAGE_ID, LABEL, parse_example

# Split names in order of preference: the held-out split a run validates on, and the one it is
# finally scored (and searched by default) on.
VALIDATION_SPLITS = ("val", "valid", "validation", "test")
TEST_SPLITS = ("test", "val", "valid", "validation")


def verify_checksums(data_dir: str | Path, split: str) -> None:
    """Check every shard of `split` against the manifest's sha256; `DualEncError` names the
    first shard whose content differs."""
    data_dir = Path(data_dir)
    summary = load_manifest(data_dir).split(split, data_dir)
    for name in summary.shards:
        if sha256_of_file(data_dir / name) != summary.sha256[name]:
            raise DualEncError(
                f"shard {data_dir / name} does not match its sha256 in {manifest_path(data_dir)} "
                "(corrupted or modified); re-pack the dataset"
            )


def pair_dataset(data_dir: str | Path, split: str, *, image_size: tuple[int, int],
                 batch_size: int | None = None, shuffle: bool = False, seed: int | None = None,
                 drop_remainder: bool = False, repeat: bool = False, deterministic: bool = True) -> tf.data.Dataset:
    """Image-caption pairs of `split` as dicts of ``image`` uint8 [B, H, W, 3], ``caption``
    string [B], ``label`` int64 [B] and ``image_id`` string [B] (no batch axis when
    `batch_size` is None), from `record_dataset` (same order and shuffling).

    ``deterministic=False`` lets a pair that decodes quickly overtake a slow one (faster; the
    order then varies from run to run within the parallel decode's reach).
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

    pairs = records.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=deterministic)
    if batch_size is not None:
        pairs = pairs.batch(batch_size, drop_remainder=drop_remainder)
    return pairs.prefetch(tf.data.AUTOTUNE)
