"""dualenc.data.packed, the one reader of packed splits, against records parsed independently with
`tf.train.Example` straight from the shard files."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import tensorflow as tf

from dualenc.core.errors import DualEncError
from dualenc.data.packed import distinct_images, distinct_records, first_occurrences, read_batches, record_dataset, split_captions
from dualenc.data.records import CAPTION, IMAGE_ID, serialize_example, shard_name

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
    data_dir.mkdir()
    splits = {}
    for split, shards in (("train", TRAIN), ("empty", [])):
        names = [shard_name(split, index, len(shards)) for index in range(len(shards))]
        for name, rows in zip(names, shards):
            with tf.io.TFRecordWriter(str(data_dir / name)) as writer:
                for caption, image_id, label in rows:
                    writer.write(serialize_example(caption, _image_bytes(image_id, label), image_id, label))
        rows = [row for shard in shards for row in shard]
        splits[split] = {
            "pairs": len(rows), "images": len({row[1] for row in rows}), "ids": len({row[2] for row in rows}),
            "shards": names, "sha256": {name: hashlib.sha256((data_dir / name).read_bytes()).hexdigest() for name in names},
        }
    (data_dir / "manifest.json").write_text(json.dumps({"format_version": 1, "splits": splits}))
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


def test_distinct_records_by_caption_and_first_occurrences(packed):
    records = raw_records(packed, "train")
    expected = [record["caption"] for record in first_of_each(records, "caption")]
    got = [tf.io.parse_single_example(record, {CAPTION: tf.io.FixedLenFeature([], tf.string)})[CAPTION].numpy().decode()
           for record in distinct_records(packed, "train", key=CAPTION)]
    assert got == expected and got.count("a dog") == 1
    positions, count = first_occurrences(packed, "train", IMAGE_ID)
    assert count == len(records) == 7 and positions.tolist() == [0, 1, 3, 5]
    # The pipeline is reusable: a second pass gives the same records.
    again = distinct_records(packed, "train")
    assert list(again.as_numpy_iterator()) == list(again.as_numpy_iterator())


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
