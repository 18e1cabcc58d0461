"""The on-disk record format shared by the packer (`tfrecords_tools`) and the reader (`dualenc.data`).

One `tf.train.Example` per image-caption pair:

- ``caption``  bytes: UTF-8, whitespace-normalised, original case kept
- ``image``    bytes: the encoded image (JPEG, PNG or BMP)
- ``image_id`` bytes: the image's path relative to the source's image root
- ``label``    int64: the identity (0-based) for CUHK-PEDES, the image's index otherwise

Shards are named ``{split}-{index:05d}-of-{count:05d}.tfrecord`` and described by
``manifest.json`` in the same directory (`dualenc.manifest`); `dualenc.packed` reads them.

Serialisation is deterministic (features in key order), so equal input gives byte-identical
shards and manifest checksums in any process. TensorFlow is imported on first use, not with this
module, so the packers can check annotation files and flags before paying for that import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import tensorflow as tf

CAPTION = "caption"
IMAGE = "image"
IMAGE_ID = "image_id"
LABEL = "label"

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 1


def _feature_spec() -> dict:
    import tensorflow as tf

    return {
        CAPTION: tf.io.FixedLenFeature([], tf.string),
        IMAGE: tf.io.FixedLenFeature([], tf.string),
        IMAGE_ID: tf.io.FixedLenFeature([], tf.string),
        LABEL: tf.io.FixedLenFeature([], tf.int64),
    }


def __getattr__(name: str) -> Any:
    """``FEATURE_SPEC`` (the `tf.io.parse_example` spec of the four features), built on first
    access so importing this module does not import TensorFlow (PEP 562)."""
    if name == "FEATURE_SPEC":
        return _feature_spec()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def shard_name(split: str, index: int, count: int) -> str:
    """File name of shard `index` (0-based) of `count` for `split`."""
    return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def normalise_caption(caption: str) -> str:
    """Collapse runs of whitespace to one space and strip the ends; case is kept."""
    return " ".join(caption.split())


def serialize_example(caption: str, image: bytes, image_id: str, label: int) -> bytes:
    """One pair as a serialised `tf.train.Example` in the format above, its features in key
    order: protobuf writes a map in hash order, which differs between processes."""
    import tensorflow as tf

    def _bytes(value: bytes) -> tf.train.Feature:
        return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))

    features = {
        CAPTION: _bytes(normalise_caption(caption).encode("utf-8")),
        IMAGE: _bytes(image),
        IMAGE_ID: _bytes(image_id.encode("utf-8")),
        LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[int(label)])),
    }
    example = tf.train.Example(features=tf.train.Features(feature=features))
    return example.SerializeToString(deterministic=True)


def parse_example(serialized: tf.Tensor) -> dict:
    """Parse one serialised Example (a scalar string tensor) into the four features."""
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, _feature_spec())
