"""Frozen-tower feature cache: computed once, looked up by key, invalidated by new weights or data."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf

from dualenc.training import feature_cache
from dualenc.data.pipeline import record_dataset, sha256_of_file
from dualenc.data.images import decode_image
from dualenc.training.feature_cache import CachedFeatures, cached_features, tower_fingerprint
from dualenc.data.records import CAPTION, IMAGE, IMAGE_ID, parse_example
from tests.support.training import copy_dataset

IMAGE_SIZE = (128, 64)


@pytest.fixture(scope="module")
def train_records(demo_data) -> list[dict]:
    return [
        {key: value.numpy() for key, value in parse_example(record).items()}
        for record in record_dataset(demo_data, "train")
    ]


def _image_tower() -> keras.Model:
    """Pixels (B, 128, 64, 3) -> (B, 4): pooled colours through a random dense layer."""
    pixels = keras.Input(IMAGE_SIZE + (3,))
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.Rescaling(1 / 255)(pixels))
    return keras.Model(pixels, keras.layers.Dense(4, name="dense")(pooled))


def _caption_tower(captions: list[str]) -> keras.Model:
    """Captions (B,) -> (B, 3): a lookup of the whole caption, then an embedding row."""
    text = keras.Input(shape=(), dtype="string")
    ids = keras.layers.StringLookup(vocabulary=sorted(set(captions)))(text)
    return keras.Model(text, keras.layers.Embedding(len(set(captions)) + 1, 3)(ids))


def frozen(tower: keras.Model) -> tuple:
    """(embed, fingerprint) of a frozen tower, as `cached_features` takes them."""
    return (lambda inputs: tower(inputs, training=False)), tower_fingerprint(tower)


@pytest.fixture
def compute_calls(monkeypatch) -> list[tuple]:
    """Records each real computation of features (cache misses)."""
    calls = []
    compute = feature_cache._compute

    def counting(tower, data_dir, split, kind, image_size):
        calls.append((split, kind))
        return compute(tower, data_dir, split, kind, image_size)

    monkeypatch.setattr(feature_cache, "_compute", counting)
    return calls


def _first_by(records: list[dict], key: str) -> dict[str, dict]:
    first = {}
    for record in records:
        first.setdefault(record[key].decode(), record)
    return first


def test_image_features_are_one_row_per_image_id_equal_to_the_tower(demo_data, train_records, tmp_path, compute_calls):
    tower = _image_tower()
    cached = cached_features(*frozen(tower), demo_data, "train", "image", tmp_path, image_size=IMAGE_SIZE)
    first = _first_by(train_records, IMAGE_ID)
    assert cached.keys == list(first)  # packing order, no repeats
    assert cached.features.shape == (len(first), 4) and cached.features.dtype == np.float32
    pixels = tf.stack([decode_image(tf.constant(first[key][IMAGE]), IMAGE_SIZE) for key in cached.keys])
    np.testing.assert_allclose(cached.features, np.asarray(tower(pixels)), rtol=1e-5, atol=1e-6)
    assert compute_calls == [("train", "image")]


def test_second_call_loads_from_disk_without_computing(demo_data, tmp_path, compute_calls):
    tower = _image_tower()
    first = cached_features(*frozen(tower), demo_data, "train", "image", tmp_path, image_size=IMAGE_SIZE)
    again = cached_features(*frozen(tower), demo_data, "train", "image", tmp_path, image_size=IMAGE_SIZE)
    assert compute_calls == [("train", "image")]
    assert again.keys == first.keys
    np.testing.assert_array_equal(again.features, first.features)
    entries = sorted(path.name for path in (tmp_path / "features").iterdir())
    assert len(entries) == 1 and not entries[0].endswith(".tmp")
    assert sorted(path.name for path in (tmp_path / "features" / entries[0]).iterdir()) == ["features.npy", "keys.json"]


def test_new_tower_weights_get_a_new_cache_entry(demo_data, tmp_path, compute_calls):
    tower = _image_tower()
    before = cached_features(*frozen(tower), demo_data, "train", "image", tmp_path, image_size=IMAGE_SIZE)
    kernel = tower.get_layer("dense").kernel
    kernel.assign(kernel.numpy() + 1.0)
    after = cached_features(*frozen(tower), demo_data, "train", "image", tmp_path, image_size=IMAGE_SIZE)
    assert compute_calls == [("train", "image"), ("train", "image")]
    assert len(list((tmp_path / "features").iterdir())) == 2
    assert not np.allclose(before.features, after.features)


def test_splits_and_kinds_do_not_share_entries(demo_data, tmp_path, compute_calls):
    tower = _image_tower()
    train = cached_features(*frozen(tower), demo_data, "train", "image", tmp_path, image_size=IMAGE_SIZE)
    validation = cached_features(*frozen(tower), demo_data, "val", "image", tmp_path, image_size=IMAGE_SIZE)
    assert compute_calls == [("train", "image"), ("val", "image")]
    assert not set(train.keys) & set(validation.keys)


def test_repacked_data_is_recomputed(demo_data, train_records, tmp_path, compute_calls):
    tower = _image_tower()
    original = cached_features(*frozen(tower), demo_data, "train", "image", tmp_path / "cache", image_size=IMAGE_SIZE)
    # Re-pack the training split with its records in reverse order.
    repacked = copy_dataset(demo_data, tmp_path / "repacked")
    shard = next(repacked.glob("train-*.tfrecord"))
    serialized = [record.numpy() for record in record_dataset(demo_data, "train")]
    with tf.io.TFRecordWriter(str(shard)) as writer:
        for record in reversed(serialized):
            writer.write(record)
    manifest = json.loads((repacked / "manifest.json").read_text())
    manifest["splits"]["train"]["sha256"][shard.name] = sha256_of_file(shard)
    (repacked / "manifest.json").write_text(json.dumps(manifest))

    reordered = cached_features(*frozen(tower), repacked, "train", "image", tmp_path / "cache", image_size=IMAGE_SIZE)
    assert compute_calls == [("train", "image"), ("train", "image")]
    assert reordered.keys == list(_first_by(list(reversed(train_records)), IMAGE_ID))
    # The same images get the same features, wherever they now sit.
    by_key = dict(zip(original.keys, original.features))
    np.testing.assert_allclose(reordered.features, np.stack([by_key[key] for key in reordered.keys]), atol=1e-6)


def test_caption_features_are_keyed_by_caption(demo_data, train_records, tmp_path, compute_calls):
    captions = [record[CAPTION].decode() for record in train_records]
    tower = _caption_tower(captions)
    cached = cached_features(*frozen(tower), demo_data, "train", "caption", tmp_path)
    assert cached.keys == list(dict.fromkeys(captions))
    np.testing.assert_allclose(cached.features, np.asarray(tower(tf.constant(cached.keys))), atol=1e-6)
    cached_features(*frozen(tower), demo_data, "train", "caption", tmp_path)
    assert compute_calls == [("train", "caption")]


def test_lookup_gathers_rows_by_key_in_several_pipelines():
    features = np.arange(12, dtype=np.float32).reshape(4, 3)
    cached = CachedFeatures(keys=["a", "b", "c", "d"], features=features)
    # First used inside two tf.data maps, as the training and validation pipelines do.
    for keys, rows in ((["d", "b"], [3, 1]), (["a", "a", "b"], [0, 0, 1])):
        batches = tf.data.Dataset.from_tensor_slices(keys).batch(8).map(cached.lookup)
        np.testing.assert_array_equal(next(iter(batches)), features[rows])
    np.testing.assert_array_equal(cached.lookup(tf.constant(["c", "a", "c"])), features[[2, 0, 2]])


def test_training_caches_merge_splits_that_share_captions(demo_data, train_records, tmp_path):
    """A caption in both train and val (common on COCO) gets one row in the training lookup."""
    import dataclasses
    import types

    from dualenc.core import config as configs
    from dualenc.training.loop import feature_caches

    # The validation split becomes a copy of the training split: every caption is shared.
    shared = copy_dataset(demo_data, tmp_path / "shared")
    manifest = json.loads((shared / "manifest.json").read_text())
    train_shard, val_shard = (next(shared.glob(f"{split}-*.tfrecord")) for split in ("train", "val"))
    val_shard.write_bytes(train_shard.read_bytes())
    manifest["splits"]["val"].update(pairs=manifest["splits"]["train"]["pairs"])
    manifest["splits"]["val"]["sha256"][val_shard.name] = sha256_of_file(val_shard)
    (shared / "manifest.json").write_text(json.dumps(manifest))

    captions = [record[CAPTION].decode() for record in train_records]
    tower = _caption_tower(captions)
    model = types.SimpleNamespace(vision_tower=_image_tower(), text_tower=tower)
    base = configs.TrainConfig()
    frozen_text = dataclasses.replace(base.model.text, trainable=False)
    config = dataclasses.replace(base, model=dataclasses.replace(base.model, text=frozen_text))

    # The stand-in caption tower takes the strings themselves: an identity "preprocessor".
    caches = feature_caches(model, config, lambda captions: captions, shared, ["train", "val"], tmp_path / "cache")
    assert list(caches) == ["caption"]
    distinct = list(dict.fromkeys(captions))
    assert caches["caption"].keys == distinct
    np.testing.assert_allclose(
        caches["caption"].lookup(tf.constant(distinct[::-1])), np.asarray(tower(tf.constant(distinct[::-1]))), atol=1e-6
    )
