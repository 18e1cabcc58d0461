"""Frozen-backbone feature cache: compute a frozen tower's pooled features once, train heads on them.

With a frozen backbone (seed 003's default) every epoch would push every image through
Xception again for the same numbers. Here the features of each distinct image (by image_id)
and, for a frozen text tower, each distinct caption are computed once and stored under
``CACHE/features/<key>/``; epochs then look them up by image_id / caption string inside the
same shuffled record pipeline as the uncached path, so batches, order and losses match.

The key hashes the split's shard checksums (so a re-packed dataset gets new features) and
the tower's weights and input shape (so another backbone, weights file or image size does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from dualenc.core.files import atomic_directory
from dualenc.data.images import decode_image
from dualenc.data.manifest import load_manifest
from dualenc.data.packed import distinct_records
from dualenc.data.records import CAPTION, IMAGE, IMAGE_ID, parse_example
from dualenc.core import jsonfiles
from dualenc.core.errors import DualEncError

FEATURES_FILE = "features.npy"
KEYS_FILE = "keys.json"
BATCH_SIZE = 64


@dataclasses.dataclass(frozen=True)
class CachedFeatures:
    """Tower features (N, F) float32 and the N keys (image_id or caption) they belong to."""

    keys: list[str]
    features: np.ndarray

    def lookup(self, keys: tf.Tensor) -> tf.Tensor:
        """Features (B, F) of a batch of keys (B,); a traced function, usable in tf.data maps."""
        table = self._table()
        return tf.gather(self._values(), table.lookup(keys))

    def _table(self) -> tf.lookup.StaticHashTable:
        # Built lazily and kept: tf.data captures the table by reference. Built eagerly (init_scope)
        # even when first asked for inside a traced map, so a second pipeline can use it too.
        if "_lookup_table" not in self.__dict__:
            with tf.init_scope():
                initializer = tf.lookup.KeyValueTensorInitializer(
                    tf.constant(self.keys, tf.string), tf.range(len(self.keys), dtype=tf.int64)
                )
                object.__setattr__(self, "_lookup_table", tf.lookup.StaticHashTable(initializer, default_value=-1))
        return self.__dict__["_lookup_table"]

    def _values(self) -> tf.Tensor:
        if "_values_tensor" not in self.__dict__:
            with tf.init_scope():
                object.__setattr__(self, "_values_tensor", tf.constant(self.features))
        return self.__dict__["_values_tensor"]


def tower_fingerprint(tower: keras.Model) -> str:
    """sha256 of the tower's input shapes and every weight's name, shape and values."""
    digest = hashlib.sha256(repr([tuple(spec.shape) for spec in tower.inputs]).encode())
    for weight in tower.weights:
        value = np.ascontiguousarray(keras.ops.convert_to_numpy(weight))
        digest.update(f"{weight.path}:{value.shape}:{value.dtype}".encode())
        digest.update(value.tobytes())
    return digest.hexdigest()


def _cache_key(data_dir: Path, split: str, kind: str, fingerprint: str) -> str:
    sha256 = dict(load_manifest(data_dir).split(split, data_dir).sha256)
    material = json.dumps({"split": split, "kind": kind, "sha256": sha256, "tower": fingerprint}, sort_keys=True)
    return hashlib.sha256(material.encode()).hexdigest()[:24]


def _compute(
    embed: Callable[[tf.Tensor], tf.Tensor], data_dir: Path, split: str, kind: str, image_size: tuple[int, int] | None
) -> CachedFeatures:
    key_feature = IMAGE_ID if kind == "image" else CAPTION

    def tower_input(record: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        features = parse_example(record)
        value = decode_image(features[IMAGE], image_size) if kind == "image" else features[CAPTION]
        return features[key_feature], value

    batches = distinct_records(data_dir, split, key_feature).map(tower_input, num_parallel_calls=tf.data.AUTOTUNE)
    batches = batches.batch(BATCH_SIZE).prefetch(tf.data.AUTOTUNE)
    # One traced graph: calling a backbone eagerly batch after batch held several GiB of
    # intermediate buffers (6.5 GiB peak for MobileNetV2 at 224 px, batch 64).
    embed = tf.function(embed, reduce_retracing=True)
    keys, parts = [], []
    for key_batch, input_batch in batches:
        keys.extend(value.decode("utf-8") for value in key_batch.numpy())
        parts.append(keras.ops.convert_to_numpy(embed(input_batch)).astype(np.float32))
    return CachedFeatures(keys=keys, features=np.concatenate(parts))


def cached_features(
    embed: Callable[[tf.Tensor], tf.Tensor],
    fingerprint: str,
    data_dir: str | Path,
    split: str,
    kind: str,
    cache_dir: str | Path,
    image_size: tuple[int, int] | None = None,
) -> CachedFeatures:
    """Features of every distinct image (`kind="image"`) or caption (`kind="caption"`) of `split`.

    `embed` maps a batch of decoded images (B, H, W, 3) or caption strings (B,) to the frozen
    tower's features (B, F) in inference mode; `fingerprint` identifies that tower
    (`tower_fingerprint`), so other weights never reuse these features.

    Loaded from `cache_dir/features/<key>/` when present, else computed and stored there
    atomically (a temporary directory renamed into place).
    """
    data_dir = Path(data_dir)
    entry = Path(cache_dir) / "features" / _cache_key(data_dir, split, kind, fingerprint)
    if (entry / FEATURES_FILE).is_file() and (entry / KEYS_FILE).is_file():
        with contextlib.suppress(DualEncError):  # an unreadable cache entry is computed again
            keys = jsonfiles.load_file(entry / KEYS_FILE, "feature cache keys")
            return CachedFeatures(keys=keys, features=np.load(entry / FEATURES_FILE))
    computed = _compute(embed, data_dir, split, kind, image_size)
    with atomic_directory(entry) as staging:
        np.save(staging / FEATURES_FILE, computed.features)
        (staging / KEYS_FILE).write_text(json.dumps(computed.keys))
    return computed
