"""TensorBoard's embedding projector for a gallery, read back with TensorBoard's own plugin code:
its config proto (`projector_config_pb2`, parsed with protobuf's text format) and the
`ProjectorPlugin` serving the tensor, metadata and sprite as ``tensorboard --logdir`` would."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
from PIL import Image

from dualenc.core.errors import DualEncError
from dualenc.retrieval import projector
from dualenc.retrieval.projector import thumbnail_size, write_projector

# Solid colours of distinct images, some not square (a wide and a tall one), one palette PNG.
IMAGES = {
    "red.png": ((255, 0, 0), (40, 40)),
    "green.png": ((0, 255, 0), (90, 30)),
    "blue.png": ((0, 0, 255), (20, 70)),
    "sub/yellow.png": ((255, 255, 0), (64, 64)),
    "sub/magenta.png": ((255, 0, 255), (33, 17)),
}


class NoRuns:
    """A data provider that lists no runs: the plugin then looks at the logdir itself (run ".")."""

    def list_runs(self, ctx=None, *, experiment_id):
        return []


def plugin_client(logdir):
    """A werkzeug test client of TensorBoard's projector plugin over `logdir`."""
    from tensorboard.plugins import base_plugin
    from tensorboard.plugins.projector.projector_plugin import ProjectorPlugin
    from werkzeug import Client

    plugin = ProjectorPlugin(base_plugin.TBContext(data_provider=NoRuns(), logdir=str(logdir)))
    routes = plugin.get_plugin_apps()  # path -> WSGI application, as TensorBoard mounts them

    def app(environ, start_response):
        return routes[environ["PATH_INFO"]](environ, start_response)

    return Client(app)


def read_config(directory):
    from google.protobuf import text_format
    from tensorboard.plugins.projector import projector_config_pb2

    return text_format.Parse((directory / "projector_config.pbtxt").read_text(), projector_config_pb2.ProjectorConfig())


@pytest.fixture
def folder_index(tmp_path):
    """(FolderGallery, GalleryIndex) over `IMAGES`: random unit embeddings, captions with tabs
    and line breaks, labels (as a packed gallery's index holds them)."""
    from dualenc.retrieval.gallery import FolderGallery
    from dualenc.retrieval.index import GalleryIndex

    folder = tmp_path / "photos"
    for name, (colour, size) in IMAGES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        image = Image.new("RGB", size, colour)
        (image.convert("P") if name == "sub/magenta.png" else image).save(folder / name)
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(len(IMAGES), 6)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    image_ids = list(IMAGES)[::-1]  # the index's own order, not the folder's
    index = GalleryIndex(
        directory=tmp_path / "index", embeddings=embeddings, image_ids=image_ids, paths=None,
        labels=list(range(10, 10 + len(IMAGES))), captions=[f"a {name}\twith\ntabs" for name in image_ids],
        skipped=[], embeddings_sha256="",
    )
    return FolderGallery(folder), index


def test_written_files_are_what_the_projector_plugin_serves(folder_index, tmp_path):
    gallery, index = folder_index
    logdir = tmp_path / "logs" / "projector"  # created, parents too
    assert write_projector(logdir, gallery, index) == logdir / "projector_config.pbtxt"

    config = read_config(logdir)
    (embedding,) = config.embeddings
    assert embedding.tensor_name == gallery.description and list(embedding.tensor_shape) == [5, 6]
    assert (embedding.tensor_path, embedding.metadata_path, embedding.sprite.image_path) == (
        "embeddings.tsv", "metadata.tsv", "sprite.png")
    assert list(embedding.sprite.single_image_dim) == [64, 64]

    client = plugin_client(logdir)
    assert json.loads(client.get("/runs").get_data()) == ["."]
    query = {"run": ".", "name": embedding.tensor_name}
    tensor = client.get("/tensor", query_string=query)
    assert tensor.status_code == 200, tensor.get_data(as_text=True)
    np.testing.assert_allclose(np.frombuffer(tensor.get_data(), np.float32).reshape(5, 6), index.embeddings, atol=1e-6)

    metadata = client.get("/metadata", query_string=query).get_data(as_text=True).splitlines()
    assert metadata[0] == "id\tcaption\tlabel"
    assert [row.split("\t") for row in metadata[1:]] == [
        [image_id, f"a {image_id} with tabs", str(label)] for image_id, label in zip(index.image_ids, index.labels)
    ]

    sprite_response = client.get("/sprite_image", query_string=query)
    assert sprite_response.status_code == 200 and sprite_response.mimetype == "image/png"
    sprite = np.asarray(Image.open(io.BytesIO(sprite_response.get_data())).convert("RGB"))
    assert sprite.shape == (2 * 64, 3 * 64, 3)  # 5 images: 3 columns, 2 rows, as the projector tiles them
    for position, image_id in enumerate(index.image_ids):
        colour, (width, height) = IMAGES[image_id]
        top, left = (position // 3) * 64, (position % 3) * 64
        cell = sprite[top : top + 64, left : left + 64]
        assert tuple(cell[32, 32]) == colour, image_id
        # Aspect kept: a wide image leaves white above and below, a tall one beside.
        assert (tuple(cell[0, 32]) == (255, 255, 255)) == (width > height * 1.1), image_id
        assert (tuple(cell[32, 0]) == (255, 255, 255)) == (height > width * 1.1), image_id
    assert (sprite[64:, 128:] == 255).all()  # the sixth cell, empty


def test_folder_gallery_without_captions_or_labels(folder_index, tmp_path):
    gallery, index = folder_index
    index.captions, index.labels = None, None
    write_projector(tmp_path / "out", gallery, index)
    rows = (tmp_path / "out" / "metadata.tsv").read_text().splitlines()
    assert rows[1:] == [f"{image_id}\t\t" for image_id in index.image_ids]


@pytest.mark.parametrize("count, size", [(1, 64), (5, 64), (16_384, 64), (16_385, 63), (1_000_000, 8)])
def test_thumbnails_shrink_so_the_sprite_fits_the_projectors_limit(count, size):
    assert thumbnail_size(count) == size
    columns = math.ceil(math.sqrt(count))
    assert columns * size <= 8192 and math.ceil(count / columns) * size <= 8192


def test_a_gallery_beyond_one_pixel_per_image_is_one_line():
    with pytest.raises(DualEncError, match=r"^a gallery of 67108865 images is too large for the projector's sprite"):
        thumbnail_size(8192**2 + 1)


def test_an_image_gone_since_indexing_is_one_line(folder_index, tmp_path):
    gallery, index = folder_index
    (gallery.directory / "red.png").unlink()
    with pytest.raises(DualEncError, match=r"^cannot draw the projector's sprite from folder .*; re-index the gallery"):
        write_projector(tmp_path / "out", gallery, index)


def test_cli_refuses_a_file_as_the_projector_directory(tmp_path, capsys):
    import search

    target = tmp_path / "taken.txt"
    target.write_text("")
    assert search.main(["--projector", str(target)]) == 2
    assert capsys.readouterr().err == f"error: --projector {target} is a file; pass a directory (it is created if missing)\n"


@pytest.mark.slow
def test_cli_writes_the_projector_of_a_packed_split(keras_hub_presets, demo_data, tmp_path, capsys, monkeypatch):
    import search
    from dualenc.retrieval.gallery import PackedGallery
    from dualenc.retrieval.index import open_index

    monkeypatch.chdir(tmp_path)
    command = ["--model", str(keras_hub_presets["clip"]), "--data", str(demo_data), "--split", "test"]
    assert search.main([*command, "--projector", "projector"]) == 0
    assert "view: tensorboard --logdir projector" in capsys.readouterr().err
    (run_dir,) = (tmp_path / "runs" / "zero-shot").iterdir()
    index = open_index(run_dir, PackedGallery(demo_data, "test"))

    config = read_config(tmp_path / "projector")
    (embedding,) = config.embeddings
    size = embedding.sprite.single_image_dim[0]
    assert list(embedding.tensor_shape) == [len(index), index.embeddings.shape[1]] and size == thumbnail_size(len(index))
    client = plugin_client(tmp_path / "projector")
    query = {"run": ".", "name": embedding.tensor_name}
    tensor = np.frombuffer(client.get("/tensor", query_string=query).get_data(), np.float32)
    np.testing.assert_allclose(tensor.reshape(index.embeddings.shape), index.embeddings, atol=1e-6)
    metadata = client.get("/metadata", query_string=query).get_data(as_text=True).splitlines()
    assert [row.split("\t")[0] for row in metadata[1:]] == list(index.image_ids)
    assert [int(row.split("\t")[2]) for row in metadata[1:]] == list(index.labels)
    with Image.open(io.BytesIO(client.get("/sprite_image", query_string=query).get_data())) as sprite:
        columns = math.ceil(math.sqrt(len(index)))
        assert sprite.size == (columns * size, math.ceil(len(index) / columns) * size)
        assert max(sprite.size) <= projector.SPRITE_LIMIT
