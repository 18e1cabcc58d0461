"""The one reader of packed splits (``manifest.json`` + TFRecord shards, see `dualenc.data.records`).

Everything that reads a packed split goes through here, in one of four shapes:

- `record_dataset`: the serialised records as a `tf.data` pipeline, optionally shuffled and
  repeated (training, the feature cache);
- `read_batches`: parsed records as NumPy batches in packing order, shard by shard, so a
  damaged shard is named in a one-line `DualEncError` (stats, captions, image look-ups);
- `distinct_records` / `distinct_images`: each distinct image (or caption) once, at its first
  record, in packing order — the one place that de-duplicates (index, feature cache);
- `split_captions`: every caption with its image_id and label (evaluation, vocabulary).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
import tensorflow as tf

from dualenc.core.errors import DualEncError, first_line
from dualenc.data.manifest import PACK_HINT, SplitSummary, load_manifest
from dualenc.data.records import CAPTION, FEATURE_SPEC, IMAGE, IMAGE_ID, LABEL

SHUFFLE_BUFFER_BYTES = 1 << 30
SHARDS_READ_AT_ONCE = 8
READ_BATCH = 1024
# Features other than the (large) image bytes: what most readers want.
METADATA = (CAPTION, IMAGE_ID, LABEL)


class SplitCaptions(NamedTuple):
    """Every caption of a split, in packing order, with its record's image_id and label."""

    captions: list[str]
    image_ids: list[str]
    labels: np.ndarray  # (C,) int64


def _shuffle_buffer_size(data_dir: Path, summary: SplitSummary) -> int:
    """Records in the buffer: the whole split if its bytes fit `SHUFFLE_BUFFER_BYTES`."""
    total_bytes = sum((data_dir / name).stat().st_size for name in summary.shards)
    mean_record_bytes = max(1, total_bytes // summary.pairs)
    return max(1, min(summary.pairs, SHUFFLE_BUFFER_BYTES // mean_record_bytes))


def record_dataset(data_dir: str | Path, split: str, *, shuffle: bool = False, seed: int | None = None,
                   repeat: bool = False) -> tf.data.Dataset:
    """The serialised records of the non-empty `split` (scalar strings), in packing order unless `shuffle`.

    With `shuffle`, shard order and records are shuffled anew each epoch; the same `seed` gives
    the same sequence. Records are shuffled *serialised*, so the buffer holds compressed bytes
    rather than decoded pixels; it covers the whole split when that fits `SHUFFLE_BUFFER_BYTES`.
    """
    data_dir = Path(data_dir)
    summary = load_manifest(data_dir).split(split, data_dir)
    files = tf.data.Dataset.from_tensor_slices([str(data_dir / name) for name in summary.shards])
    if shuffle:
        files = files.shuffle(len(summary.shards), seed=seed, reshuffle_each_iteration=True)
    records = files.interleave(
        tf.data.TFRecordDataset,
        cycle_length=min(len(summary.shards), SHARDS_READ_AT_ONCE) if shuffle else 1,
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if shuffle:
        records = records.shuffle(_shuffle_buffer_size(data_dir, summary), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        records = records.repeat()
    return records


def _parser(features: Sequence[str]):
    """A function parsing a batch of serialised records into the named `features`."""
    spec = {key: FEATURE_SPEC[key] for key in features}
    return lambda serialized: tf.io.parse_example(serialized, spec)


def read_batches(data_dir: str | Path, split: str, features: Sequence[str] = METADATA,
                 batch_size: int = READ_BATCH) -> Iterator[dict[str, np.ndarray]]:
    """Records of `split` in packing order as dicts of NumPy arrays holding `features` (strings as
    bytes), at most `batch_size` records each; an empty split yields nothing.

    Shards are read one after the other, so one that cannot be read is named in a `DualEncError`.
    Pass a small `batch_size` when `features` include the image bytes.
    """
    data_dir = Path(data_dir)
    summary = load_manifest(data_dir).split(split, data_dir, allow_empty=True)
    for name in summary.shards:
        shard = data_dir / name
        batches = tf.data.TFRecordDataset(str(shard)).batch(batch_size).map(_parser(features)).prefetch(tf.data.AUTOTUNE)
        try:
            yield from batches.as_numpy_iterator()
        except tf.errors.OpError as error:
            raise DualEncError(f"shard {shard} cannot be read ({first_line(error)}); {PACK_HINT}") from None


def first_occurrences(data_dir: str | Path, split: str, key: str = IMAGE_ID) -> tuple[np.ndarray, int]:
    """(positions in packing order of the first record of each distinct `key` value, ascending;
    number of records in the split)."""
    seen: set = set()
    positions, records = [], 0
    for batch in read_batches(data_dir, split, (key,)):
        for value in batch[key]:
            if value not in seen:
                seen.add(value)
                positions.append(records)
            records += 1
    return np.asarray(positions, np.int64), records


def distinct_records(data_dir: str | Path, split: str, key: str = IMAGE_ID) -> tf.data.Dataset:
    """Serialised records of the non-empty `split` whose `key` (``image_id``: each image once;
    ``caption``: each caption once) was not seen earlier in packing order.

    Two passes: the keys are read first (small), then the records are filtered by position, so
    the result is a plain `tf.data` pipeline that can be mapped, batched and iterated again.
    """
    positions, records = first_occurrences(data_dir, split, key)
    keep = np.zeros(records, bool)
    keep[positions] = True
    keep = tf.constant(keep)
    numbered = record_dataset(data_dir, split).enumerate()
    return numbered.filter(lambda position, _: keep[position]).map(lambda _, record: record)


def distinct_images(data_dir: str | Path, split: str, batch_size: int) -> tf.data.Dataset:
    """Each distinct image of the non-empty `split` once, in packing order, as batches of
    ``image`` (encoded bytes), ``image_id``, and the ``caption`` and ``label`` of its first record."""
    parse = _parser((IMAGE, *METADATA))
    batches = distinct_records(data_dir, split, IMAGE_ID).batch(batch_size)
    return batches.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)


def split_captions(data_dir: str | Path, split: str) -> SplitCaptions:
    """Every caption of `split` with its image_id and label, in packing order."""
    captions, image_ids, labels = [], [], []
    for batch in read_batches(data_dir, split):
        captions += [caption.decode("utf-8") for caption in batch[CAPTION]]
        image_ids += [image_id.decode("utf-8") for image_id in batch[IMAGE_ID]]
        labels.append(batch[LABEL])
    return SplitCaptions(captions, image_ids, np.concatenate(labels) if labels else np.zeros(0, np.int64))
