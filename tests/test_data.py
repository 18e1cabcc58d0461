"""dualenc.data.pipeline: manifest validation, checksums, image decoding and the pair pipeline."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dualenc.data.pipeline import epoch_seed, pair_batches, verify_checksums
from dualenc.data.manifest import load_manifest
from dualenc.data.images import decode_image
from dualenc.core.errors import DualEncError
from tests.support.images import HEIGHT, WIDTH, write_image
from tfrecords_tools.writer import ImageEntry, pack

KINDS = ["png", "bmp", "palette_png", "rgba_png", "grey_jpeg", "jpeg", "png", "bmp", "png", "jpeg"]


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """Ten images with two captions each, train (8 images, 4 shards) and valid (2 images)."""
    root = tmp_path_factory.mktemp("data")
    pixels, entries = {}, {"train": [], "valid": []}
    for index, kind in enumerate(KINDS):
        image_id = f"img{index}.{kind}"
        pixels[image_id] = write_image(root / "images" / image_id, kind, seed=index)
        split = "train" if index < 8 else "valid"
        entries[split].append(ImageEntry(image_id, str(root / "images" / image_id),
                                         ((f"caption {index} a", index), (f"caption {index} b", index))))
    pack(entries, root / "out", {"format": "test"}, shard_size=4, workers=1)
    return root / "out", pixels


def test_batches_have_the_documented_shapes_and_dtypes(packed):
    out, _ = packed
    batch = next(iter(pair_batches(out, "train", image_size=(12, 6), batch_size=5, training=False)))
    assert batch["image"].shape == (5, 12, 6, 3) and batch["image"].dtype == tf.uint8
    assert batch["caption"].shape == (5,) and batch["caption"].dtype == tf.string
    assert batch["label"].shape == (5,) and batch["label"].dtype == tf.int64
    assert batch["image_id"].shape == (5,) and batch["image_id"].dtype == tf.string


def test_unshuffled_pairs_come_in_packing_order_with_source_pixels(packed):
    out, pixels = packed
    pairs = list(pair_batches(out, "train", image_size=(HEIGHT, WIDTH), batch_size=3, training=False).unbatch())
    assert len(pairs) == 16
    assert [pair["caption"].numpy().decode() for pair in pairs[:3]] == ["caption 0 a", "caption 0 b", "caption 1 a"]
    for pair in pairs:
        image_id = pair["image_id"].numpy().decode()
        assert pair["label"].numpy() == int(image_id[3:image_id.index(".")])
        expected = pixels[image_id].astype(int)
        error = np.abs(pair["image"].numpy().astype(int) - expected)
        assert error.max() <= (12 if "jpeg" in image_id else 0), image_id


def test_shuffle_is_a_seeded_permutation(packed):
    out, _ = packed

    def order(seed, epochs=1):
        dataset = pair_batches(out, "train", image_size=(4, 4), batch_size=16, training=True,
                               epoch_seeds=[epoch_seed(seed, epoch) for epoch in range(epochs)]).unbatch()
        return [pair["caption"].numpy().decode() for pair in dataset.take(16 * epochs)]

    plain = [pair["caption"].numpy().decode()
             for pair in pair_batches(out, "train", image_size=(4, 4), batch_size=16, training=False).unbatch()]
    first = order(seed=1)
    assert sorted(first) == sorted(plain) and first != plain
    assert order(seed=1) == first
    assert order(seed=2) != first
    two_epochs = order(seed=1, epochs=2)
    assert sorted(two_epochs[16:]) == sorted(plain) and two_epochs[16:] != two_epochs[:16]


def test_unbatched_and_drop_remainder(packed):
    out, _ = packed
    element = next(iter(pair_batches(out, "valid", image_size=(8, 8), batch_size=3, training=False).unbatch()))
    assert element["image"].shape == (8, 8, 3) and element["label"].shape == ()
    batches = list(pair_batches(out, "valid", image_size=(8, 8), batch_size=3, training=True))
    assert [batch["label"].shape[0] for batch in batches] == [3]


def test_unknown_split_names_the_valid_ones(packed):
    out, _ = packed
    with pytest.raises(DualEncError, match="'test'.*valid splits: train, valid"):
        pair_batches(out, "test", image_size=(8, 8), batch_size=1, training=False)


def test_checksum_mismatch_names_the_shard(packed, tmp_path):
    out, _ = packed
    verify_checksums(out, "train")
    copy = tmp_path / "copy"
    copy.mkdir()
    for path in out.iterdir():
        (copy / path.name).write_bytes(path.read_bytes())
    shard = copy / "train-00002-of-00004.tfrecord"
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0xFF
    shard.write_bytes(bytes(data))
    verify_checksums(copy, "valid")
    with pytest.raises(DualEncError, match="train-00002-of-00004.tfrecord"):
        verify_checksums(copy, "train")


@pytest.mark.parametrize("damage, message", [
    ("no_dir", "does not exist"),
    ("no_manifest", "manifest.json not found"),
    ("bad_json", "not valid JSON"),
    ("version", "format_version 7"),
    ("missing_shard", "valid-00000-of-00001.tfrecord"),
    ("empty_split", "'valid'.*is empty"),
])
def test_bad_datasets_raise_one_line(packed, tmp_path, damage, message):
    out, _ = packed
    copy = tmp_path / "copy"
    if damage != "no_dir":
        copy.mkdir()
        for path in out.iterdir():
            (copy / path.name).write_bytes(path.read_bytes())
    manifest = json.loads((out / "manifest.json").read_text())
    if damage == "no_manifest":
        (copy / "manifest.json").unlink()
    elif damage == "bad_json":
        (copy / "manifest.json").write_text("{")
    elif damage == "version":
        (copy / "manifest.json").write_text(json.dumps(manifest | {"format_version": 7}))
    elif damage == "missing_shard":
        (copy / "valid-00000-of-00001.tfrecord").unlink()
    elif damage == "empty_split":
        manifest["splits"]["valid"] = {"pairs": 0, "images": 0, "ids": 0, "shards": [], "sha256": {}}
        (copy / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DualEncError, match=message) as raised:
        load_manifest(copy)
        pair_batches(copy, "valid", image_size=(8, 8), batch_size=1, training=False)
    assert "\n" not in str(raised.value)


def test_decode_image_handles_every_stored_kind(tmp_path):
    for index, kind in enumerate(["jpeg", "grey_jpeg", "cmyk_jpeg", "png", "rgba_png", "palette_png", "bmp"]):
        expected = write_image(tmp_path / f"image.{kind}", kind, seed=index)
        decoded = decode_image(tf.constant((tmp_path / f"image.{kind}").read_bytes()), (HEIGHT, WIDTH)).numpy()
        assert decoded.dtype == np.uint8 and decoded.shape == (HEIGHT, WIDTH, 3)
        error = np.abs(decoded.astype(int) - expected)
        # JPEG decoders may upsample chroma differently; lossless formats must match exactly.
        assert (error.mean() < 6) if "jpeg" in kind else (error.max() == 0), kind


def test_decode_image_downsizes_with_antialiasing():
    """Shrinking a one-pixel checkerboard by 3 must blur it to grey: without antialiasing,
    bilinear resizing samples single pixels and keeps the full 20..220 contrast (aliasing)."""
    board = (np.indices((30, 30)).sum(axis=0) % 2 * 200 + 20).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(np.repeat(board[..., None], 3, axis=-1)).save(buffer, "PNG")
    decoded = decode_image(tf.constant(buffer.getvalue()), (10, 10)).numpy().astype(np.float64)
    assert np.abs(decoded - board.astype(np.float64).mean()).max() <= 5


# --- decoded pixels kept in memory ---------------------------------------------------------------


def test_decoded_pixels_hold_each_image_once_as_the_pipeline_decodes_it(packed):
    from dualenc.data.pipeline import decoded_pixels
    from dualenc.data.packed import first_records

    out, _ = packed
    ids, pixels = decoded_pixels(out, ["train", "valid"], (12, 6))
    assert len(ids) == len(set(ids)) == len(KINDS) and pixels.shape == (len(KINDS), 12, 6, 3)
    for split in ("train", "valid"):
        for record in first_records(out, split, ("image",)):
            image_id = record.features["image_id"].decode("utf-8")
            np.testing.assert_array_equal(pixels[ids.index(image_id)], decode_image(record.features["image"], (12, 6)).numpy())


def test_training_on_decoded_pixels_gives_the_batches_decoding_gives(packed):
    from dualenc.data.pipeline import decoded_pixels
    from dualenc.data.records import IMAGE, IMAGE_ID
    from dualenc.training.feature_cache import CachedFeatures

    out, _ = packed
    cache = CachedFeatures(*decoded_pixels(out, ["train"], (12, 6)))
    arguments = {"image_size": (12, 6), "batch_size": 4, "training": True, "epoch_seeds": [epoch_seed(1, 0), epoch_seed(1, 1)]}
    decoded = list(pair_batches(out, "train", **arguments).as_numpy_iterator())
    looked_up = list(pair_batches(out, "train", image_inputs=lambda features: {IMAGE: cache.lookup(features[IMAGE_ID])},
                                  **arguments).as_numpy_iterator())
    assert len(decoded) == len(looked_up) == 8
    for want, got in zip(decoded, looked_up):
        assert sorted(want) == sorted(got)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])


def test_pixels_over_the_memory_budget_are_not_kept(packed, monkeypatch):
    import dualenc.data.pipeline
    from dualenc.data.pipeline import decoded_pixels

    out, _ = packed
    monkeypatch.setattr(dualenc.data.pipeline, "PIXEL_CACHE_BYTES", 12 * 6 * 3 * len(KINDS) - 1)
    assert decoded_pixels(out, ["train", "valid"], (12, 6)) is None
    assert decoded_pixels(out, ["train"], (12, 6)) is not None
