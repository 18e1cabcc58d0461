"""dualenc.data.packed, the one reader of packed splits, against records parsed independently with
`tf.train.Example` straight from the shard files."""

from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf

from dualenc.core.errors import DualEncError
from dualenc.data.packed import (
    distinct_images,
    distinct_records,
    first_positions,
    first_records,
    read_batches,
    record_dataset,
    split_captions,
)
from dualenc.data.records import CAPTION, IMAGE_ID, shard_name
from tests.support.packed import write_packed_shards

# (caption, image_id, label) per shard of "train"; images repeat within and across shards, and
# one caption ("a dog") belongs to two images.
TRAIN = [
    [("a dog", "a.png", 0), ("a cat", "b.png", 1), ("the same dog", "a.png", 0)],
    [("a bird", "c.png", 2), ("the cat again", "b.png", 1), ("a dog", "d.png", 3), ("a bird again", "c.png", 2)],
]


def _image_bytes(image_id: str, label: int) -> bytes:
    return f"pixels of {image_id} ({label})".encode()


@pytest.fixture
def packed(tmp_path):
    data_dir = tmp_path / "packed"
    train = [[(caption, _image_bytes(image_id, label), image_id, label) for caption, image_id, label in shard]
             for shard in TRAIN]
    write_packed_shards(data_dir, {"train": train, "empty": []})
    return data_dir


def raw_records(data_dir, split) -> list[dict]:
    """Every record of `split`, shard files in name order, parsed with the protobuf class."""
    records = []
    for path in sorted(data_dir.glob(f"{split}-*.tfrecord")):
        for serialized in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
            feature = tf.train.Example.FromString(serialized).features.feature
            records.append({
                "caption": feature["caption"].bytes_list.value[0].decode(),
                "image_id": feature["image_id"].bytes_list.value[0].decode(),
                "label": feature["label"].int64_list.value[0],
                "image": feature["image"].bytes_list.value[0],
            })
    return records


def first_of_each(records: list[dict], key: str) -> list[dict]:
    firsts = {}
    for record in records:
        firsts.setdefault(record[key], record)
    return list(firsts.values())


def test_distinct_images_are_each_image_once_with_its_first_caption_and_label(packed):
    expected = first_of_each(raw_records(packed, "train"), "image_id")
    assert [record["image_id"] for record in expected] == ["a.png", "b.png", "c.png", "d.png"]
    batches = list(distinct_images(packed, "train", batch_size=3).as_numpy_iterator())
    assert [len(batch["image_id"]) for batch in batches] == [3, 1]
    got = {key: np.concatenate([batch[key] for batch in batches]) for key in ("image_id", "caption", "label", "image")}
    assert [value.decode() for value in got["image_id"]] == [record["image_id"] for record in expected]
    assert [value.decode() for value in got["caption"]] == [record["caption"] for record in expected]
    assert got["label"].tolist() == [record["label"] for record in expected]
    assert got["image"].tolist() == [record["image"] for record in expected]


def test_distinct_records_by_caption(packed):
    records = raw_records(packed, "train")
    expected = [record["caption"] for record in first_of_each(records, "caption")]
    got = [tf.io.parse_single_example(record, {CAPTION: tf.io.FixedLenFeature([], tf.string)})[CAPTION].numpy().decode()
           for record in distinct_records(packed, "train", key=CAPTION)]
    assert got == expected and got.count("a dog") == 1
    # The pipeline is reusable: a second pass gives the same records.
    again = distinct_records(packed, "train")
    assert list(again.as_numpy_iterator()) == list(again.as_numpy_iterator())


@pytest.mark.parametrize("batch_size", [1, 2, 1024])
def test_first_records_locate_each_image_s_first_record(packed, batch_size):
    expected = first_of_each(raw_records(packed, "train"), "image_id")
    found = list(first_records(packed, "train", (CAPTION,), batch_size=batch_size))
    # Shard 0 holds a, b, a; shard 1 holds c, b, d, c: b's first record is in shard 0.
    assert [(record.shard, record.ordinal) for record in found] == [(0, 0), (0, 1), (1, 0), (1, 2)]
    assert [record.features[IMAGE_ID].decode() for record in found] == [record["image_id"] for record in expected]
    assert [record.features[CAPTION].decode() for record in found] == [record["caption"] for record in expected]
    for record, reference in zip(found, expected):
        serialized = record.path.read_bytes()[record.offset:record.offset + record.length]
        assert tf.train.Example.FromString(serialized).features.feature["image"].bytes_list.value[0] == reference["image"]


def test_first_records_of_one_shard_keep_its_own_firsts(packed):
    found = list(first_records(packed, "train", shards=[1]))
    assert [(record.shard, record.ordinal, record.features[IMAGE_ID]) for record in found] == [
        (1, 0, b"c.png"), (1, 1, b"b.png"), (1, 2, b"d.png")]


def test_first_positions_remember_what_earlier_batches_held():
    seen: set = set()
    assert first_positions(["a", "b", "a"], seen) == [0, 1]
    assert first_positions(["c", "b", "c", "d"], seen) == [0, 3]
    assert seen == {"a", "b", "c", "d"}


def test_split_captions_are_every_record_in_packing_order(packed):
    records = raw_records(packed, "train")
    captions = split_captions(packed, "train")
    assert captions.captions == [record["caption"] for record in records]
    assert captions.image_ids == [record["image_id"] for record in records]
    assert captions.labels.dtype == np.int64 and captions.labels.tolist() == [record["label"] for record in records]


def test_read_batches_respects_batch_size_and_shards(packed):
    batches = list(read_batches(packed, "train", (IMAGE_ID,), batch_size=2))
    # Batches never span shards: 3 records -> 2 + 1, 4 records -> 2 + 2.
    assert [len(batch[IMAGE_ID]) for batch in batches] == [2, 1, 2, 2]
    assert set(batches[0]) == {IMAGE_ID}
    assert list(read_batches(packed, "empty")) == []


def test_record_dataset_is_packing_order_and_refuses_an_empty_split(packed):
    serialized = list(record_dataset(packed, "train").as_numpy_iterator())
    ids = [tf.train.Example.FromString(record).features.feature["image_id"].bytes_list.value[0].decode() for record in serialized]
    assert ids == [record["image_id"] for record in raw_records(packed, "train")]
    with pytest.raises(DualEncError, match="'empty' .* is empty; valid splits: train"):
        record_dataset(packed, "empty")
    with pytest.raises(DualEncError, match="no split 'val'"):
        list(read_batches(packed, "val"))


def test_a_corrupt_shard_is_named_in_one_line(packed):
    shard = packed / shard_name("train", 1, 2)
    shard.write_bytes(shard.read_bytes()[:-9] + b"garbage!!")
    with pytest.raises(DualEncError, match="train-00001-of-00002.tfrecord cannot be read") as raised:
        split_captions(packed, "train")
    assert "\n" not in str(raised.value)
