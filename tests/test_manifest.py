"""dualenc.data.manifest: the one validation of manifest.json, its JSON round trip and stable bytes."""

from __future__ import annotations

import hashlib
import json

import pytest
import tensorflow as tf

from dualenc.core.errors import DualEncError
from dualenc.data.manifest import Manifest, SplitSummary, load_manifest, read_manifest_file
from dualenc.data.records import serialize_example, shard_name


def _write_dataset(data_dir) -> dict:
    """Two splits of one shard each, and the manifest dict written for them (by hand)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    splits = {}
    for split, count in (("train", 3), ("test", 2)):
        name = shard_name(split, 0, 1)
        with tf.io.TFRecordWriter(str(data_dir / name)) as writer:
            for index in range(count):
                writer.write(serialize_example(f"caption {index}", b"bytes", f"img{index}.png", index))
        digest = hashlib.sha256((data_dir / name).read_bytes()).hexdigest()
        splits[split] = {"pairs": count, "images": count, "ids": count, "shards": [name], "sha256": {name: digest}}
    content = {
        "format_version": 1,
        "source": {"format": "test", "fingerprint": "abc"},
        "splits": splits,
        "skipped": [{"path": "/x/broken.png", "reason": "truncated", "pairs": 2}],
        "image_size": None,
        "created": "2025-01-01T00:00:00+00:00",
    }
    (data_dir / "manifest.json").write_text(json.dumps(content))
    return content


def test_loaded_manifest_holds_the_file_content(tmp_path):
    content = _write_dataset(tmp_path)
    manifest = load_manifest(tmp_path)
    assert list(manifest.splits) == ["train", "test"]
    train = manifest.splits["train"]
    assert (train.pairs, train.images, train.ids) == (3, 3, 3)
    assert train.shards == ("train-00000-of-00001.tfrecord",)
    assert dict(train.sha256) == content["splits"]["train"]["sha256"]
    assert manifest.source["fingerprint"] == "abc" and manifest.image_size is None
    assert manifest.skipped[0]["reason"] == "truncated"
    assert manifest.to_json() == content


def test_written_manifest_has_sorted_keys_and_the_same_bytes_each_time(tmp_path):
    content = _write_dataset(tmp_path)
    manifest = load_manifest(tmp_path)
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
    first = manifest.write(tmp_path / "a").read_bytes()
    reread = read_manifest_file(tmp_path / "a" / "manifest.json")
    second = reread.write(tmp_path / "b").read_bytes()
    assert first == second
    assert first.decode() == json.dumps(content, indent=2, sort_keys=True, ensure_ascii=False) + "\n"
    assert reread == manifest


def test_created_manifest_is_stamped_and_valid(tmp_path):
    summary = SplitSummary(pairs=1, images=1, ids=1, shards=("a.tfrecord",), sha256={"a.tfrecord": "00"})
    manifest = Manifest.create({"format": "test"}, {"train": summary}, [], image_size=64)
    assert manifest.created is not None and manifest.created.endswith("+00:00")
    assert Manifest.from_json(json.loads(json.dumps(manifest.to_json())), tmp_path / "m.json") == manifest
    assert "cover_size" not in manifest.to_json()  # written only by a packer given --preset
    covered = Manifest.create({"format": "test"}, {"train": summary}, [], image_size=None, cover_size=(64, 32))
    assert covered.to_json()["cover_size"] == [64, 32]
    assert Manifest.from_json(json.loads(json.dumps(covered.to_json())), tmp_path / "m.json") == covered


def _damage(content: dict, case: str) -> dict:
    if case == "split_not_object":
        content["splits"]["train"] = ["train-00000-of-00001.tfrecord"]
    elif case == "pairs_wrong_type":
        content["splits"]["train"]["pairs"] = "3"
    elif case == "pairs_bool":
        content["splits"]["test"]["pairs"] = True
    elif case == "images_negative":
        content["splits"]["train"]["images"] = -1
    elif case == "shards_not_strings":
        content["splits"]["train"]["shards"] = [1]
    elif case == "sha256_missing_shard":
        content["splits"]["test"]["sha256"] = {}
    elif case == "splits_missing":
        del content["splits"]
    elif case == "source_not_object":
        content["source"] = "coco"
    elif case == "skipped_not_list":
        content["skipped"] = {"path": "x"}
    elif case == "image_size_text":
        content["image_size"] = "64"
    elif case == "cover_size_one_side":
        content["cover_size"] = [64]
    elif case == "cover_size_zero":
        content["cover_size"] = [64, 0]
    elif case == "not_an_object":
        content = [content]
    return content


@pytest.mark.parametrize("case, fragments", [
    ("split_not_object", ["splits.train", "is not an object", "a list"]),
    ("pairs_wrong_type", ["splits.train.pairs", "non-negative integer", "'3'"]),
    ("pairs_bool", ["splits.test.pairs", "True"]),
    ("images_negative", ["splits.train.images", "-1"]),
    ("shards_not_strings", ["splits.train.shards", "list of strings"]),
    ("sha256_missing_shard", ["splits.test.sha256", "test-00000-of-00001.tfrecord"]),
    ("splits_missing", ["'splits'"]),
    ("source_not_object", ["source", "'coco'"]),
    ("skipped_not_list", ["skipped"]),
    ("image_size_text", ["image_size", "'64'"]),
    ("cover_size_one_side", ["cover_size", "[64]"]),
    ("cover_size_zero", ["cover_size", "[64, 0]"]),
    ("not_an_object", ["format_version"]),
])
def test_bad_fields_are_one_line_naming_file_and_field(tmp_path, case, fragments):
    content = _damage(_write_dataset(tmp_path), case)
    (tmp_path / "manifest.json").write_text(json.dumps(content))
    with pytest.raises(DualEncError) as raised:
        load_manifest(tmp_path)
    message = str(raised.value)
    assert "\n" not in message and str(tmp_path / "manifest.json") in message
    for fragment in fragments:
        assert fragment in message


def test_missing_shard_is_one_line_naming_it(tmp_path):
    _write_dataset(tmp_path)
    (tmp_path / "test-00000-of-00001.tfrecord").unlink()
    read_manifest_file(tmp_path / "manifest.json")  # the file alone is still well formed
    with pytest.raises(DualEncError, match="test-00000-of-00001.tfrecord of split 'test'.*is missing") as raised:
        load_manifest(tmp_path)
    assert "\n" not in str(raised.value)


def test_split_lookup_names_the_valid_splits(tmp_path):
    content = _write_dataset(tmp_path)
    content["splits"]["test"].update(pairs=0)
    (tmp_path / "manifest.json").write_text(json.dumps(content))
    manifest = load_manifest(tmp_path)
    assert manifest.split("train", tmp_path).pairs == 3
    assert manifest.split("test", tmp_path, allow_empty=True).pairs == 0
    with pytest.raises(DualEncError, match="'test' in .* is empty; valid splits: train"):
        manifest.split("test", tmp_path)
    with pytest.raises(DualEncError, match="no split 'val'; valid splits: train"):
        manifest.split("val", tmp_path)
