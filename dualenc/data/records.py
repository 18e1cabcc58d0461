"""The on-disk record format shared by the packer (`tfrecords_tools`) and the reader (`dualenc.data.pipeline`).

One `tf.train.Example` per image-caption pair:

- ``caption``  bytes: UTF-8, whitespace-normalised, original case kept
- ``image``    bytes: the encoded image (JPEG, PNG or BMP)
- ``image_id`` bytes: the image's path relative to the source's image root
- ``label``    int64: the identity (0-based) for CUHK-PEDES, one per image otherwise; the
  packers number the ``train`` split's identities 0..n-1 first, as the CMPC classifier is sized

Shards are named ``{split}-{index:05d}-of-{count:05d}.tfrecord`` and described by
``manifest.json`` in the same directory (`dualenc.data.manifest`); `dualenc.data.packed` reads them.

Serialisation is deterministic (features in key order, written here), so equal input gives
byte-identical shards and manifest checksums in any process. TensorFlow is imported on first use, not with this
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
# Field numbers of tf.train.Feature's value kinds (tensorflow/core/example/feature.proto).
BYTES_LIST = 1
INT64_LIST = 3
UINT64_MASK = (1 << 64) - 1


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


def _varint(value: int) -> bytes:
    """`value` as a protobuf base-128 varint (a negative int64 as its 64-bit two's complement)."""
    value &= UINT64_MASK
    encoded = bytearray()
    while value > 0x7F:
        encoded.append(value & 0x7F | 0x80)
        value >>= 7
    encoded.append(value)
    return bytes(encoded)


def _head(number: int, length: int) -> bytes:
    """The tag and length of a length-delimited protobuf field (wire type 2) of `length` bytes."""
    return _varint(number << 3 | 2) + _varint(length)


def serialize_example(caption: str, image: bytes, image_id: str, label: int) -> bytes:
    """One pair as a serialised `tf.train.Example` in the format above.

    Written in protobuf's wire format here, with the features in key order: protobuf itself
    writes a map in a per-process hash order (or, asked to be deterministic, in an order of its
    implementation's choosing), so equal input gave different bytes and shard checksums. Fields:
    Example.features (1) → Features.feature (1), a map entry of key (1) and Feature (2) →
    Feature.bytes_list (1) or int64_list (3) → value (1; int64 packed). Each field's length is
    computed before its contents are joined, so the image's bytes are copied once, not once per
    level of nesting (packing copies every image once per caption).
    """
    values = {
        CAPTION: (BYTES_LIST, normalise_caption(caption).encode("utf-8")),
        IMAGE: (BYTES_LIST, image),
        IMAGE_ID: (BYTES_LIST, image_id.encode("utf-8")),
        LABEL: (INT64_LIST, _varint(int(label))),
    }
    pieces, features_length = [], 0
    for key, (kind, payload) in sorted(values.items()):
        key_bytes = key.encode("utf-8")
        key_field = _head(1, len(key_bytes)) + key_bytes
        value_head = _head(1, len(payload))
        kind_head = _head(kind, len(value_head) + len(payload))
        feature_length = len(kind_head) + len(value_head) + len(payload)
        feature_head = _head(2, feature_length)
        entry_head = _head(1, len(key_field) + len(feature_head) + feature_length)
        pieces += [entry_head, key_field, feature_head, kind_head, value_head, payload]
        features_length += len(entry_head) + len(key_field) + len(feature_head) + feature_length
    return b"".join([_head(1, features_length), *pieces])


def parse_example(serialized: tf.Tensor) -> dict:
    """Parse one serialised Example (a scalar string tensor) into the four features."""
    import tensorflow as tf

    return tf.io.parse_single_example(serialized, _feature_spec())
