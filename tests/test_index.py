"""Gallery index: build, reuse, rebuild on a new encoder, incremental folder updates, skips."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from dualenc.export.encoders import export_vision_encoder, load_encoder
from dualenc.retrieval.gallery import FolderGallery, PackedGallery
from dualenc.retrieval.index import open_index
from dualenc.data.records import parse_example
from tests.support.colour_run import (
    COLOURS,
    IMAGE_SIZE,
    encode_png,
    make_colour_run,
    mean_colour_encoder,
    solid_image,
    write_packed_dataset,
)


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    return make_colour_run(tmp_path_factory.mktemp("colour"))


def split_images(data_dir, split) -> tuple[list[str], dict[str, bytes], list[str]]:
    """Image ids in first-seen order, their bytes and all ids, read with plain tf.data."""
    order, blobs, all_ids = [], {}, []
    for serialized in tf.data.TFRecordDataset(sorted(str(path) for path in data_dir.glob(f"{split}-*.tfrecord"))):
        features = parse_example(serialized)
        image_id = features["image_id"].numpy().decode()
        all_ids.append(image_id)
        if image_id not in blobs:
            order.append(image_id)
            blobs[image_id] = features["image"].numpy()
    return order, blobs, all_ids


def test_packed_index_built_once_per_image_then_reused(colour_run):
    data_dir = colour_run.parent.parent / "data"
    gallery = PackedGallery(data_dir, "test")
    index = open_index(colour_run, gallery, log=io.StringIO())

    order, blobs, all_ids = split_images(data_dir, "test")
    assert len(all_ids) == 2 * len(order)  # two captions per image...
    assert index.image_ids == order  # ...but each image indexed once, in packing order
    assert index.embedded == len(order) == 3 * len(COLOURS)
    assert index.captions[0] == "a red square" and index.labels[:4] == [0, 0, 0, 1]
    expected = load_encoder(colour_run / "vision_encoder")([blobs[image_id] for image_id in order])
    np.testing.assert_allclose(index.embeddings, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(index.embeddings, axis=1), 1.0, atol=1e-6)

    embeddings_file = index.directory / "embeddings.npy"
    written = embeddings_file.stat().st_mtime_ns
    again = open_index(colour_run, gallery, log=io.StringIO())
    assert again.embedded == 0 and embeddings_file.stat().st_mtime_ns == written
    np.testing.assert_array_equal(again.embeddings, index.embeddings)

    assert gallery.read_images(["blue/001.png"]) == {"blue/001.png": blobs["blue/001.png"]}


def test_new_encoder_rebuilds(colour_run, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(colour_run, run_copy)
    gallery = PackedGallery(colour_run.parent.parent / "data", "test")
    original = open_index(run_copy, gallery, log=io.StringIO())

    negated = mean_colour_encoder()
    negated.layers[-1].kernel.assign(-np.eye(3, dtype=np.float32))
    export_vision_encoder(negated, IMAGE_SIZE, run_copy / "vision_encoder")
    log = io.StringIO()
    rebuilt = open_index(run_copy, gallery, log=log)
    assert "built by another encoder; rebuilding" in log.getvalue()
    assert rebuilt.embedded == len(original)
    np.testing.assert_allclose(rebuilt.embeddings, -original.embeddings, atol=1e-6)


def write_image(path, rgb, seed):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(encode_png(solid_image(rgb, seed)))


def test_folder_gallery_incremental_and_unreadable(colour_run, tmp_path):
    folder = tmp_path / "photos"
    write_image(folder / "red.png", COLOURS["red"], 1)
    write_image(folder / "nested" / "blue.PNG", COLOURS["blue"], 2)
    write_image(folder / "green.png", COLOURS["green"], 3)
    (folder / "broken.jpg").write_bytes(b"this is not a jpeg")
    (folder / "notes.txt").write_text("ignored: not an image suffix")
    os.symlink(folder / "missing.png", folder / "ghost.png")
    gallery = FolderGallery(folder)

    log = io.StringIO()
    index = open_index(colour_run, gallery, log=log)
    assert index.image_ids == ["green.png", "nested/blue.PNG", "red.png"]
    assert index.paths == [str(folder.resolve() / name) for name in index.image_ids]
    assert index.captions is None and index.labels is None
    assert {entry["path"]: entry["reason"] for entry in index.skipped} == {
        "broken.jpg": "not an image (starts with b'this is ')", "ghost.png": "file not found"}
    messages = log.getvalue()
    assert "broken.jpg" in messages and "ghost.png" in messages

    (folder / "green.png").unlink()
    write_image(folder / "yellow.png", COLOURS["yellow"], 4)
    write_image(folder / "white.bmp", COLOURS["white"], 5)
    log = io.StringIO()
    updated = open_index(colour_run, gallery, log=log)
    assert updated.embedded == 2  # only the new files; red, blue and the skipped two are kept
    assert "2 new or modified image(s), dropping 1" in log.getvalue()
    assert updated.image_ids == ["nested/blue.PNG", "red.png", "white.bmp", "yellow.png"]

    from_scratch = open_index(colour_run, gallery, rebuild=True, log=io.StringIO())
    assert from_scratch.embedded == 6  # four images, the two unreadable ones tried again
    assert from_scratch.image_ids == updated.image_ids
    np.testing.assert_allclose(updated.embeddings, from_scratch.embeddings, atol=1e-6)


def test_packed_image_tensorflow_cannot_decode_is_skipped_with_the_kernel_reason(colour_run, tmp_path):
    records = [("a red square", encode_png(solid_image(COLOURS["red"], 1)), "red.png", 0),
               ("junk", b"not an image", "junk.png", 1)]
    write_packed_dataset(tmp_path / "data", {"test": records})
    index = open_index(colour_run, PackedGallery(tmp_path / "data", "test"), log=io.StringIO())
    assert index.image_ids == ["red.png"]
    [skipped] = index.skipped
    assert skipped["image_id"] == "junk.png"
    assert skipped["reason"].startswith("TensorFlow cannot decode the image: Unknown image file format")


def test_float16_storage_and_ann_file(colour_run, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(colour_run, run_copy)
    gallery = PackedGallery(colour_run.parent.parent / "data", "test")
    full = open_index(run_copy, gallery, log=io.StringIO())
    half = open_index(run_copy, gallery, float16=True, log=io.StringIO())
    assert np.load(half.directory / "embeddings.npy").dtype == np.float16
    np.testing.assert_allclose(half.embeddings, full.embeddings, atol=2e-3)

    pytest.importorskip("faiss")
    log = io.StringIO()
    queries = full.embeddings[:5]
    _, approximate = half.search(queries, 3, ann="hnsw", log=log)
    assert "recall@10 vs exact search" in log.getvalue()
    assert (half.directory / "ann-hnsw.faiss").is_file()
    _, exact = half.search(queries, 3, ann="exact")
    scores_exact = np.take_along_axis(queries @ half.embeddings.T, exact, axis=1)
    scores_ann = np.take_along_axis(queries @ half.embeddings.T, approximate, axis=1)
    np.testing.assert_allclose(scores_ann, scores_exact, atol=1e-5)  # same-colour ties may swap
