"""Beam indexing (RunInference, DirectRunner with 2 worker processes) against the local index."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pytest
from PIL import Image

import search
from dualenc.retrieval.gallery import FolderGallery, PackedGallery
from dualenc.retrieval.index import load_index, open_index
from tests.support.beam import DIRECT_OPTIONS
from tests.support.colour_run import COLOURS, colour_records, encode_png, make_colour_run, solid_image
from tests.support.packed import write_packed_shards

pytestmark = pytest.mark.slow  # each pipeline starts two worker processes that load the SavedModel


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    return make_colour_run(tmp_path_factory.mktemp("colour"))


def local_then_beam(run_dir, gallery, flags: list[str], monkeypatch):
    """(meta, embeddings) of the local index, then of the Beam-built one, same gallery. The
    embeddings' sha256 is left out of each meta: the two paths agree within 1e-5, not bit for bit,
    and each index's own check of its hash is tested in test_index."""
    local = open_index(run_dir, gallery, rebuild=True, log=io.StringIO())
    local_meta = json.loads((local.directory / "meta.json").read_text())
    local_meta.pop("embeddings_sha256")
    local_embeddings = np.load(local.directory / "embeddings.npy")
    shutil.rmtree(local.directory)
    monkeypatch.setattr("dualenc.retrieval.index.open_index", None)  # the Beam path must not fall back to it
    argv = ["--build-index", "--model", str(run_dir), *flags, "--ann", "exact", "--runner", "DirectRunner", "--",
            *DIRECT_OPTIONS]
    assert search.main(argv) == 0
    beam = load_index(local.directory)
    beam_meta = json.loads((beam.directory / "meta.json").read_text())
    beam_meta.pop("embeddings_sha256")
    return (local_meta, local_embeddings), (beam_meta, np.load(beam.directory / "embeddings.npy"))


def test_beam_index_of_a_packed_split_equals_the_local_one(colour_run, tmp_path, monkeypatch):
    data_dir = tmp_path / "data"
    records = colour_records(2, seed=7)
    green = records[4]
    assert green[2] == "green/000.png"
    # Every image repeated under two captions, one TensorFlow cannot decode, and green/000.png
    # again first in the second shard: its first record (shard 0, record 4) must win over
    # (shard 1, record 0), as `first_records` decides on the local path.
    shards = [records[:6] + [("junk", b"not an image", "junk.png", 0)],
              [("late green", *green[1:])] + records[6:]]
    write_packed_shards(data_dir, {"test": shards})
    (local_meta, local_embeddings), (beam_meta, beam_embeddings) = local_then_beam(
        colour_run, PackedGallery(data_dir, "test"), ["--data", str(data_dir), "--split", "test"], monkeypatch)
    assert len(local_meta["image_ids"]) == len(set(local_meta["image_ids"])) == 2 * len(COLOURS)
    assert local_meta["captions"][local_meta["image_ids"].index("green/000.png")] == "a green square"
    [junk] = local_meta["skipped"]
    assert junk["image_id"] == "junk.png" and junk["reason"].startswith("TensorFlow cannot decode the image: Unknown image")
    assert beam_meta["skipped"] == local_meta["skipped"]
    assert beam_meta == local_meta
    np.testing.assert_allclose(beam_embeddings, local_embeddings, atol=1e-6)


def exif_rotated_jpeg(seed: int) -> bytes:
    """A 40x24 JPEG, red on the left and blue on the right, tagged to be shown turned 90° (orientation 6)."""
    pixels = solid_image((0, 0, 0), seed=seed)
    pixels[:, :20, 0] = 230
    pixels[:, 20:, 2] = 230
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90, exif=exif)
    return buffer.getvalue()


def test_beam_index_of_a_folder_with_broken_images_equals_the_local_one(colour_run, tmp_path, monkeypatch):
    folder = tmp_path / "photos"
    for position, (word, rgb) in enumerate(COLOURS.items()):
        (folder / word[0]).mkdir(parents=True, exist_ok=True)
        (folder / word[0] / f"{word}.png").write_bytes(encode_png(solid_image(rgb, seed=position)))
    (folder / "broken.png").write_bytes(encode_png(solid_image((1, 2, 3), seed=9))[:60])
    (folder / "notes.jpg").write_text("not an image")
    (folder / "rotated.jpg").write_bytes(exif_rotated_jpeg(seed=11))
    (local_meta, local_embeddings), (beam_meta, beam_embeddings) = local_then_beam(
        colour_run, FolderGallery(folder), ["--gallery", str(folder)], monkeypatch)
    assert {entry["path"]: entry["reason"].split(" (")[0] for entry in local_meta["skipped"]} == {
        "broken.png": "truncated or corrupt PNG", "notes.jpg": "not an image"}
    assert len(local_meta["image_ids"]) == len(COLOURS) + 1 and "rotated.jpg" in local_meta["image_ids"]
    assert beam_meta["skipped"] == local_meta["skipped"]
    assert beam_meta == local_meta
    np.testing.assert_allclose(beam_embeddings, local_embeddings, atol=1e-6)


def test_runner_mistakes_are_one_line_errors(colour_run, capsys):
    cases = [
        (["--model", str(colour_run), "--runner", "DirectRunner", "red"], "add --build-index"),
        (["--build-index", "--model", str(colour_run), "--runner", "Nope"], "unknown runner"),
        (["--build-index", "--model", str(colour_run), "--runner", "DirectRunner", "--", "--no_such_option=1"],
         "--no_such_option"),
    ]
    for argv, message in cases:
        assert search.main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


def test_a_gallery_over_the_memory_budget_gets_a_compressed_index_that_search_uses(colour_run, tmp_path):
    from dualenc.beam.index import build_index_with_beam
    from dualenc.retrieval.knn import exact_search
    from tests.support.beam import direct_options

    folder = tmp_path / "photos"
    folder.mkdir()
    for position, (word, rgb) in enumerate(COLOURS.items()):
        for copy in range(3):
            (folder / f"{word}-{copy}.png").write_bytes(encode_png(solid_image(rgb, seed=10 * position + copy)))
    log = io.StringIO()
    # 24 rows of dimension 3 cost 24 · (12 + 256) bytes as float32 plus HNSW: over a 4 kB budget.
    index = build_index_with_beam(colour_run, FolderGallery(folder), direct_options(), memory_budget=4_000, log=log)
    assert (index.directory / "ann-compressed.faiss").is_file() and index.compressed is not None
    assert "compressed index IVF1,Flat over 24 images: recall@10 vs exact search = 1.000" in log.getvalue()
    queries = np.eye(3, dtype=np.float32)
    _, expected = exact_search(queries, np.load(index.directory / "embeddings.npy"), 3)
    _, found = index.search(queries, 3)
    assert [set(row) for row in found] == [set(row) for row in expected]
    reopened = load_index(index.directory)
    assert reopened.compressed is not None and reopened.compressed.ntotal == 24
