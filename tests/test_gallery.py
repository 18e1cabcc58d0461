"""dualenc.retrieval.gallery: both Gallery implementations (key, fingerprint, description, embedding,
image bytes), with a stand-in encoder whose expected output is known from the pixels drawn."""

from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from dualenc.retrieval.gallery import FolderGallery, GalleryImage, PackedGallery, embed_skipping_bad, gallery_meta
from dualenc.data.records import serialize_example, shard_name

COLOURS = {"red": (200, 0, 0), "green": (0, 200, 0), "blue": (0, 0, 200), "grey": (90, 90, 90)}


def png(rgb) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (6, 4), rgb).save(buffer, "PNG")
    return buffer.getvalue()


class MeanColourEncoder:
    """Embeds an image as its mean RGB (decoded with Pillow); like `LoadedEncoder.embed_batch`,
    a batch with an undecodable image raises a TensorFlow error."""

    dimension = 3

    def __init__(self):
        self.batches: list[int] = []

    def embed_batch(self, blobs) -> np.ndarray:
        rows = []
        for blob in blobs:
            try:
                rows.append(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB"), np.float64).mean(axis=(0, 1)))
            except OSError:
                raise tf.errors.InvalidArgumentError(None, None, "not an image") from None
        self.batches.append(len(blobs))
        return np.asarray(rows, np.float32)


@pytest.fixture
def packed(tmp_path):
    """Split "test": red and green twice each (two captions), one broken image, blue; one shard."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    rows = [
        ("a red square", png(COLOURS["red"]), "red.png", 0),
        ("a green square", png(COLOURS["green"]), "green.png", 1),
        ("red again", png(COLOURS["red"]), "red.png", 0),
        ("broken", b"not an image", "broken.png", 2),
        ("a blue square", png(COLOURS["blue"]), "blue.png", 3),
        ("green again", png(COLOURS["green"]), "green.png", 1),
    ]
    name = shard_name("test", 0, 1)
    with tf.io.TFRecordWriter(str(data_dir / name)) as writer:
        for row in rows:
            writer.write(serialize_example(*row))
    digest = hashlib.sha256((data_dir / name).read_bytes()).hexdigest()
    split = {"pairs": 6, "images": 4, "ids": 4, "shards": [name], "sha256": {name: digest}}
    (data_dir / "manifest.json").write_text(json.dumps({"format_version": 1, "splits": {"test": split}}))
    return PackedGallery(data_dir, "test")


@pytest.fixture
def folder(tmp_path):
    directory = tmp_path / "photos"
    (directory / "nested").mkdir(parents=True)
    (directory / "red.png").write_bytes(png(COLOURS["red"]))
    (directory / "nested" / "blue.PNG").write_bytes(png(COLOURS["blue"]))
    (directory / "broken.jpg").write_bytes(b"not a jpeg")
    (directory / "notes.txt").write_text("not an image suffix")
    return FolderGallery(directory)


def test_keys_are_readable_and_unique_per_location(tmp_path, packed, folder):
    assert packed.key.startswith("data-test-") and folder.key.startswith("folder-photos-")
    elsewhere = tmp_path / "other" / "data"
    elsewhere.mkdir(parents=True)
    assert PackedGallery(elsewhere, "test").key != packed.key
    assert PackedGallery(packed.data_dir, "train").key != packed.key
    assert FolderGallery(folder.directory).key == folder.key


def test_descriptions_and_json(packed, folder):
    assert packed.description == f"split 'test' of {packed.data_dir}"
    assert folder.description == f"folder {folder.directory}"
    assert packed.to_json() == {"kind": "packed", "data_dir": str(packed.data_dir.resolve()), "split": "test"}
    assert folder.to_json() == {"kind": "folder", "directory": str(folder.directory.resolve())}


def test_packed_fingerprint_is_the_hash_of_its_shard_checksums(packed):
    manifest = json.loads((packed.data_dir / "manifest.json").read_text())
    checksums = manifest["splits"]["test"]["sha256"]
    # The rule indexes built before the Gallery protocol were keyed by, so they stay valid.
    before = packed.fingerprint()
    assert before == hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()
    checksums[shard_name("test", 0, 1)] = "0" * 64  # as after re-packing
    (packed.data_dir / "manifest.json").write_text(json.dumps(manifest))
    assert packed.fingerprint() != before
    assert packed.fingerprint() == hashlib.sha256(json.dumps(checksums, sort_keys=True).encode()).hexdigest()


def test_folder_fingerprint_follows_image_files_only(folder):
    before = folder.fingerprint()
    (folder.directory / "more-notes.md").write_text("still not an image")
    assert folder.fingerprint() == before
    red = folder.directory / "red.png"
    os.utime(red, ns=(red.stat().st_atime_ns, red.stat().st_mtime_ns + 10**9))
    touched = folder.fingerprint()
    assert touched != before
    (folder.directory / "green.gif").write_bytes(png(COLOURS["green"]))
    assert folder.fingerprint() != touched


def test_packed_embeds_each_readable_image_once_with_its_first_caption(packed):
    encoder, log = MeanColourEncoder(), io.StringIO()
    meta, embeddings, embedded = packed.embed(encoder, None, log)
    assert meta["image_ids"] == ["red.png", "green.png", "blue.png"]
    assert meta["captions"] == ["a red square", "a green square", "a blue square"]
    assert meta["labels"] == [0, 1, 3] and meta["paths"] is None
    assert meta["skipped"] == [{"image_id": "broken.png", "reason": "TensorFlow cannot decode the image: not an image"}]
    assert embedded == 3 and embeddings.dtype == np.float32
    np.testing.assert_allclose(embeddings, [COLOURS["red"], COLOURS["green"], COLOURS["blue"]])
    assert "skipping unreadable image broken.png: TensorFlow" in log.getvalue()
    assert f"(split 'test' of {packed.data_dir})" in log.getvalue()
    assert "changed since it was indexed" not in log.getvalue()

    log = io.StringIO()
    packed.embed(MeanColourEncoder(), (meta, embeddings), log)
    assert "changed since it was indexed; rebuilding" in log.getvalue()


def test_folder_embeds_and_then_reuses_unchanged_files(folder):
    encoder = MeanColourEncoder()
    meta, embeddings, embedded = folder.embed(encoder, None, io.StringIO())
    assert meta["image_ids"] == ["nested/blue.PNG", "red.png"] and embedded == 3  # the broken one was tried
    assert meta["paths"] == [str(folder.directory.resolve() / name) for name in meta["image_ids"]]
    assert meta["labels"] is None and meta["captions"] is None
    assert meta["skipped"] == [{"path": "broken.jpg", "reason": "not an image (starts with b'not a jp')",
                                "size": 10, "mtime_ns": (folder.directory / "broken.jpg").stat().st_mtime_ns}]
    np.testing.assert_allclose(embeddings, [COLOURS["blue"], COLOURS["red"]])

    (folder.directory / "grey.bmp").write_bytes(png(COLOURS["grey"]))  # any decodable bytes
    again = MeanColourEncoder()
    log = io.StringIO()
    meta, embeddings, embedded = folder.embed(again, (meta, embeddings), log)
    assert embedded == 1 and sum(again.batches) == 1  # only the new file went through the encoder
    assert meta["image_ids"] == ["grey.bmp", "nested/blue.PNG", "red.png"]
    np.testing.assert_allclose(embeddings, [COLOURS["grey"], COLOURS["blue"], COLOURS["red"]])
    assert "1 new or modified image(s), dropping 0" in log.getvalue()


def test_read_images_returns_the_stored_bytes(packed, folder):
    assert packed.read_images(["blue.png", "red.png"]) == {"blue.png": png(COLOURS["blue"]), "red.png": png(COLOURS["red"])}
    assert folder.read_images(["nested/blue.PNG"]) == {"nested/blue.PNG": png(COLOURS["blue"])}


class RefusingEncoder(MeanColourEncoder):
    """`MeanColourEncoder` that also refuses, as TensorFlow would, the `refused` bytes Pillow reads."""

    def __init__(self, refused: bytes):
        super().__init__()
        self.refused = refused

    def embed_batch(self, blobs) -> np.ndarray:
        if self.refused in blobs:
            raise tf.errors.InvalidArgumentError(None, None, "preamble\nUnsupported layout\n\t [[{{node DecodeImage}}]]")
        return super().embed_batch(blobs)


def test_embed_skipping_bad_gives_tensorflow_s_reason_or_pillow_s_where_it_refuses_too():
    odd = png(COLOURS["grey"])
    blobs = [png(COLOURS["red"]), b"junk", odd, png(COLOURS["blue"])]
    unsupported = "TensorFlow cannot decode the image: Unsupported layout"
    embeddings, reasons = embed_skipping_bad(RefusingEncoder(odd), blobs, pillow_reasons=True)
    assert reasons == [None, "not an image (starts with b'junk')", unsupported, None]
    np.testing.assert_allclose(embeddings, [COLOURS["red"], COLOURS["blue"]])
    _, reasons = embed_skipping_bad(RefusingEncoder(odd), blobs, pillow_reasons=False)
    assert reasons == [None, "TensorFlow cannot decode the image: not an image", unsupported, None]
    embeddings, reasons = embed_skipping_bad(MeanColourEncoder(), [png(COLOURS["red"])], pillow_reasons=True)
    assert reasons == [None] and embeddings.shape == (1, 3)


def test_gallery_meta_keys_skips_by_image_id_in_a_split_and_by_path_in_a_folder(tmp_path):
    rows = [(GalleryImage("b.png", 1, "bee", 10, 7), None), (GalleryImage("z.png", 2, "zed", 5, 8), "broken"),
            (GalleryImage("a.png", 0, "ay", 3, 9), "empty"), (GalleryImage("c.png", 3, "sea", 4, 6), None)]
    assert gallery_meta(rows, None) == {
        "image_ids": ["b.png", "c.png"], "paths": None, "labels": [1, 3], "captions": ["bee", "sea"],
        "skipped": [{"image_id": "z.png", "reason": "broken"}, {"image_id": "a.png", "reason": "empty"}],
    }
    assert gallery_meta(rows, tmp_path) == {
        "image_ids": ["b.png", "c.png"], "paths": [str(tmp_path / "b.png"), str(tmp_path / "c.png")],
        "labels": None, "captions": None, "files": [["b.png", 10, 7], ["c.png", 4, 6]],
        "skipped": [{"path": "a.png", "reason": "empty", "size": 3, "mtime_ns": 9},
                    {"path": "z.png", "reason": "broken", "size": 5, "mtime_ns": 8}],
    }
