"""The one reader of packed splits (``manifest.json`` + TFRecord shards, see `dualenc.data.records`).

Everything that reads a packed split goes through here, in one of four shapes:

- `record_dataset`: the serialised records as a `tf.data` pipeline, optionally shuffled and
  repeated (training, the feature cache);
- `read_batches`: parsed records as NumPy batches in packing order, shard by shard, so a
  damaged shard is named in a one-line `DualEncError` (stats, captions, image look-ups);
- `first_records`: the first record of each distinct image (or caption) in packing order, with
  where it lies in its shard — the one place that de-duplicates; `distinct_records` /
  `distinct_images` (index, feature cache), the Beam index, the service's image reader and
  `first_positions` (for batches already read) all keep what it keeps;
- `split_captions`: every caption with its image_id and label (evaluation, vocabulary).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

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
# A TFRecord is framed as uint64 length, uint32 CRC of the length, the data, uint32 CRC of the data.
RECORD_HEADER_BYTES = 12
RECORD_FOOTER_BYTES = 4


class FirstRecord(NamedTuple):
    """The first record of one distinct key value: where it lies, and its parsed features."""

    shard: int  # index of its shard in the split's shard list, i.e. in packing order
    ordinal: int  # its index within that shard
    path: Path  # the shard file
    offset: int  # where the serialised record starts in the file
    length: int  # its length in bytes
    features: dict[str, Any]  # the key and the requested features (strings as bytes)


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


def _shard_batches(data_dir: str | Path, split: str, features: Sequence[str], batch_size: int,
                   shards: Sequence[int] | None = None) -> Iterator[tuple[int, Path, dict[str, np.ndarray], np.ndarray]]:
    """``(shard index, shard file, parsed batch, lengths of its serialised records)`` for the
    records of `split` (or of its `shards` only), in packing order; an unreadable shard is named
    in a one-line `DualEncError`."""
    data_dir = Path(data_dir)
    summary = load_manifest(data_dir).split(split, data_dir, allow_empty=True)
    parse = _parser(features)
    for index in range(len(summary.shards)) if shards is None else shards:
        shard = data_dir / summary.shards[index]
        batches = (tf.data.TFRecordDataset(str(shard)).batch(batch_size)
                   .map(lambda serialized: (parse(serialized), tf.strings.length(serialized)))
                   .prefetch(tf.data.AUTOTUNE))
        try:
            for batch, lengths in batches.as_numpy_iterator():
                yield index, shard, batch, lengths
        except tf.errors.OpError as error:
            raise DualEncError(f"shard {shard} cannot be read ({first_line(error)}); {PACK_HINT}") from None


def read_batches(data_dir: str | Path, split: str, features: Sequence[str] = METADATA,
                 batch_size: int = READ_BATCH) -> Iterator[dict[str, np.ndarray]]:
    """Records of `split` in packing order as dicts of NumPy arrays holding `features` (strings as
    bytes), at most `batch_size` records each; an empty split yields nothing.

    Shards are read one after the other, so one that cannot be read is named in a `DualEncError`.
    Pass a small `batch_size` when `features` include the image bytes.
    """
    for _, _, batch, _ in _shard_batches(data_dir, split, features, batch_size):
        yield batch


def first_positions(keys: Sequence, seen: set) -> list[int]:
    """Positions in `keys` of the values met for the first time (not in `seen`, not earlier in
    `keys`), which are added to `seen`: the rule that keeps each image at its first record, for
    batches read in packing order (`first_records`, and evaluation's embedding of a split)."""
    positions = []
    for position, value in enumerate(keys):
        if value not in seen:
            seen.add(value)
            positions.append(position)
    return positions


def first_records(data_dir: str | Path, split: str, features: Sequence[str] = (), *, key: str = IMAGE_ID,
                  shards: Sequence[int] | None = None, batch_size: int = READ_BATCH) -> Iterator[FirstRecord]:
    """The first record of each distinct `key` value (``image_id``: each image once; ``caption``:
    each caption once) of `split`, in packing order, with `features` parsed.

    With `shards` (indices into the split's shard list) only those shards are read and a value's
    first record among them is kept; the Beam index reads each shard alone and then keeps, per
    value, the record with the least ``(shard, ordinal)``, which is this rule over the split.
    `offset` and `length` let a reader fetch one record later without scanning the shard again.
    Pass a small `batch_size` when `features` include the image bytes.
    """
    seen: set = set()
    shard_index, ordinal, end = None, 0, 0  # `end`: byte just past the previous record's footer
    for index, shard, batch, lengths in _shard_batches(data_dir, split, (key, *features), batch_size, shards):
        if index != shard_index:
            shard_index, ordinal, end = index, 0, 0
        offsets = end + RECORD_HEADER_BYTES + np.concatenate(
            [[0], np.cumsum(lengths[:-1] + RECORD_HEADER_BYTES + RECORD_FOOTER_BYTES)])
        for position in first_positions(batch[key].tolist(), seen):
            yield FirstRecord(index, ordinal + position, shard, int(offsets[position]), int(lengths[position]),
                              {name: values[position] for name, values in batch.items()})
        ordinal += len(lengths)
        end = int(offsets[-1] + lengths[-1] + RECORD_FOOTER_BYTES)


def distinct_records(data_dir: str | Path, split: str, key: str = IMAGE_ID) -> tf.data.Dataset:
    """Serialised records of the non-empty `split` that `first_records` keeps for `key`, in
    packing order.

    Two passes: the keys are read first (small), then each shard's records are filtered by
    ordinal, so the result is a plain `tf.data` pipeline that can be mapped, batched and iterated
    again. A shard is read only up to its last kept record.
    """
    data_dir = Path(data_dir)
    summary = load_manifest(data_dir).split(split, data_dir)
    kept: list[list[int]] = [[] for _ in summary.shards]
    for record in first_records(data_dir, split, key=key):
        kept[record.shard].append(record.ordinal)
    masks = [np.isin(np.arange(ordinals[-1] + 1 if ordinals else 0), ordinals) for ordinals in kept]
    keep = tf.RaggedTensor.from_row_lengths(np.concatenate(masks), [len(mask) for mask in masks])

    def kept_records(path: tf.Tensor, mask: tf.Tensor) -> tf.data.Dataset:
        records = tf.data.TFRecordDataset(path).take(tf.size(mask, out_type=tf.int64)).enumerate()
        return records.filter(lambda ordinal, _: mask[ordinal]).map(lambda _, record: record)

    files = tf.data.Dataset.from_tensor_slices(([str(data_dir / name) for name in summary.shards], keep))
    return files.interleave(kept_records, cycle_length=1, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


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
