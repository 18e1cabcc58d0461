"""The gallery index against stale, damaged and unlucky files: approximate indexes built for
other embeddings, cut FAISS files, an unwritable index folder, a full disk, NaN embeddings, an
export killed mid-swap, a split packed again under the service, an empty Beam work item."""

from __future__ import annotations

import errno
import io
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dualenc.core import files
from dualenc.core.errors import DualEncError
from dualenc.retrieval import knn
from dualenc.retrieval.gallery import NOT_FINITE, FolderGallery, embed_skipping_bad
from dualenc.retrieval.index import open_index
from tests.support.colour_run import COLOURS, encode_png, make_colour_run, solid_image, write_packed_dataset


@pytest.fixture(scope="module")
def colour_run(tmp_path_factory):
    return make_colour_run(tmp_path_factory.mktemp("colour"))


@pytest.fixture
def run_copy(colour_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(colour_run, copy, symlinks=True)
    return copy


@pytest.fixture
def folder(tmp_path):
    """A folder gallery of four images (the packed test split has many more)."""
    directory = tmp_path / "folder"
    directory.mkdir()
    for number, (word, rgb) in enumerate(list(COLOURS.items())[:4]):
        (directory / f"{word}.png").write_bytes(encode_png(solid_image(rgb, seed=number)))
    return FolderGallery(directory)


def rows_of(index, queries, ann):
    _, rows = index.search(queries, 3, ann=ann, log=io.StringIO())
    return rows


def test_an_approximate_index_built_for_other_embeddings_is_rebuilt(run_copy, folder):
    pytest.importorskip("faiss")
    small = open_index(run_copy, folder, log=io.StringIO())
    big_folder = FolderGallery(folder.directory.parent / "big")
    shutil.copytree(folder.directory, big_folder.directory)
    for number in range(12):
        (big_folder.directory / f"extra-{number}.png").write_bytes(encode_png(solid_image((9 * number, 80, 200), seed=number)))
    big = open_index(run_copy, big_folder, log=io.StringIO())
    rows_of(big, big.embeddings[:2], "hnsw")  # saves the big gallery's ann-hnsw.faiss
    # A process that loaded another index saves its approximate index into this folder.
    for name in ("ann-hnsw.faiss", "ann-hnsw.json"):
        if (big.directory / name).exists():
            shutil.copy2(big.directory / name, small.directory / name)
    reopened = open_index(run_copy, folder, log=io.StringIO())
    log = io.StringIO()
    _, rows = reopened.search(reopened.embeddings, 3, ann="hnsw", log=log)
    assert "was not built from this index's embeddings; rebuilding it" in log.getvalue()
    assert rows.max() < len(reopened)
    np.testing.assert_array_equal(rows[:, 0], np.arange(len(reopened)))  # each image finds itself first


def test_a_cut_faiss_file_is_rebuilt_not_a_traceback(run_copy, folder):
    pytest.importorskip("faiss")
    index = open_index(run_copy, folder, log=io.StringIO())
    expected = rows_of(index, index.embeddings, "hnsw")
    path = index.directory / "ann-hnsw.faiss"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DualEncError, match="cannot read the FAISS index"):
        knn.load_ann(path)
    reopened = open_index(run_copy, folder, log=io.StringIO())
    np.testing.assert_array_equal(rows_of(reopened, reopened.embeddings, "hnsw"), expected)


def test_an_unwritable_index_folder_searches_with_the_index_unsaved(run_copy, folder, monkeypatch):
    pytest.importorskip("faiss")
    index = open_index(run_copy, folder, log=io.StringIO())

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(index.directory))

    monkeypatch.setattr(knn, "save_ann", read_only)
    log = io.StringIO()
    _, rows = index.search(index.embeddings, 2, ann="hnsw", log=log)
    np.testing.assert_array_equal(rows[:, 0], np.arange(len(index)))
    assert "Read-only file system); searching with it unsaved" in log.getvalue()


def test_a_full_disk_while_writing_the_index_is_one_line_and_keeps_the_old_one(run_copy, folder, monkeypatch):
    index = open_index(run_copy, folder, log=io.StringIO())
    before = (index.directory / "embeddings.npy").read_bytes()

    def disk_full(descriptor, offset, length):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    # The memory-mapped write would die of SIGBUS on a full disk: the space is reserved first.
    monkeypatch.setattr(os, "posix_fallocate", disk_full)
    with pytest.raises(DualEncError, match="No space left on device") as caught:
        open_index(run_copy, folder, rebuild=True, log=io.StringIO())
    assert "\n" not in str(caught.value)
    assert (index.directory / "embeddings.npy").read_bytes() == before
    assert sorted(path.name for path in index.directory.parent.iterdir()) == [index.directory.name]


def test_an_export_killed_mid_swap_is_put_back_when_the_index_opens(run_copy, folder):
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    encoder = run_copy / "vision_encoder"
    retired = run_copy / f".vision_encoder.{child.pid}-{files.HOST_TAG}-killed.old"
    retired.mkdir()
    encoder.rename(retired / "vision_encoder")
    index = open_index(run_copy, folder, log=io.StringIO())
    assert len(index) == 4 and (encoder / "saved_model.pb").is_file() and not retired.exists()


class NaNEncoder:
    """Stands in for a broken encoder: every other image's embedding is NaN."""

    dimension = 3

    def embed_batch(self, blobs):
        rows = np.ones((len(blobs), 3), np.float32)
        rows[1::2] = np.nan
        return rows


def test_images_whose_embedding_is_not_finite_are_skipped_with_a_reason():
    embeddings, reasons = embed_skipping_bad(NaNEncoder(), [b"a", b"b", b"c"], pillow_reasons=False)
    assert embeddings.shape == (2, 3) and np.isfinite(embeddings).all()
    assert reasons == [None, NOT_FINITE, None]


@pytest.mark.parametrize("ann", ["exact", "hnsw"])
def test_a_query_embedding_that_is_not_finite_is_one_line(run_copy, folder, ann):
    if ann == "hnsw":
        pytest.importorskip("faiss")
    index = open_index(run_copy, folder, log=io.StringIO())
    query = np.full((1, 3), np.nan, np.float32)
    with pytest.raises(DualEncError, match="not finite"):
        index.search(query, 2, ann=ann, log=io.StringIO())


def test_thumbnails_of_a_split_packed_again_under_the_service_are_refused(tmp_path):
    from dualenc.service.images import ImageUnavailable, PackedImages

    data_dir = tmp_path / "data"
    first = [("a cat", b"image of a", "a.png", 0), ("a dog", b"image of b", "b.png", 1)]
    write_packed_dataset(data_dir, {"test": first})
    images = PackedImages(data_dir, "test", ["a.png", "b.png"])
    assert images.read("a.png") == b"image of a"
    # Packed again: the same offsets now hold the other image.
    write_packed_dataset(data_dir, {"test": [("a cat", b"image of b", "a.png", 0), ("a dog", b"image of a", "b.png", 1)]})
    with pytest.raises(ImageUnavailable, match="packed again after the service started"):
        images.read("a.png")


def test_a_beam_work_item_without_a_readable_image_adds_no_rows(tmp_path):
    from dualenc.beam.index import copy_shards

    shards = []
    for number, block in enumerate([np.ones((2, 3)), np.zeros((0, 0)), np.full((1, 3), 2.0)]):
        shards.append(tmp_path / f"embeddings-{number:05d}.npy")
        np.save(shards[-1], block.astype(np.float32))
    target = np.zeros((3, 3), np.float32)
    copy_shards(target, shards)
    np.testing.assert_array_equal(target, [[1, 1, 1], [1, 1, 1], [2, 2, 2]])
