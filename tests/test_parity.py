"""The same question on every path gets the same answer.

The same sentences and the same image files (an EXIF-rotated JPEG, a CMYK JPEG, a palette BMP,
a WebP and a 16-bit PNG) go through the Python API (`dualenc.load`), ``search.py --json`` and
the search service's HTTP API, for exact, HNSW, IVF and compressed indexes, over a folder
gallery and a packed split: identical ids, scores within 1e-5, and never a padding row (over
HTTP a folder image's path is relative to the folder, the one difference).

The run's vision encoder is a fixed random projection of the pixels (plus their mean colour),
so a wrongly rotated or wrongly decoded image gets another embedding: a path that skipped the
canonicaliser would rank differently.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import keras
import numpy as np
import pytest
from PIL import Image

import dualenc
import search
from dualenc.core import config as run_config
from dualenc.data.images import canonical_image_bytes
from dualenc.export.encoders import export_encoders
from dualenc.retrieval.gallery import FolderGallery, PackedGallery
from dualenc.retrieval.index import COMPRESSED_NAME, open_index
from dualenc.retrieval.knn import normalise_rows
from dualenc.retrieval.large_index import build_large_index
from tests.support.colour_run import COLOURS, IMAGE_SIZE, colour_word_encoder, solid_image, write_packed_dataset

TEXTS = ("red", "a blue square", "something green and noisy")
KINDS = ("exif_jpeg", "cmyk_jpeg", "palette_bmp", "webp", "png16")
SUFFIXES = {"exif_jpeg": ".jpg", "cmyk_jpeg": ".jpg", "palette_bmp": ".bmp", "webp": ".webp", "png16": ".png"}
K = 7


def spatial_encoder() -> keras.Model:
    """uint8 ``[N, H, W, 3]`` → mean colour − ½ plus a fixed random projection of every pixel."""
    pixels = keras.Input(shape=(*IMAGE_SIZE, 3), dtype="uint8")
    centred = keras.layers.Rescaling(1.0 / 255.0, offset=-0.5)(pixels)
    pooled = keras.layers.GlobalAveragePooling2D()(centred)
    projected = keras.layers.Dense(3, use_bias=False, kernel_initializer=keras.initializers.RandomNormal(0.0, 0.05, seed=7))(
        keras.layers.Flatten()(centred))
    return keras.Model(pixels, keras.layers.Add()([pooled, projected]), name="spatial")


def special_image(kind: str, seed: int) -> bytes:
    """An image file of `kind` whose naive decode differs from its canonical pixels."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(rng.integers(0, 256, (3, 6, 3))[np.repeat(np.arange(3), 8)][:, np.repeat(np.arange(6), 8)]
                     + rng.integers(-20, 21, (24, 48, 3)), 0, 255).astype(np.uint8)
    image, buffer = Image.fromarray(pixels), io.BytesIO()
    if kind == "exif_jpeg":
        exif = Image.Exif()
        exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
        image.save(buffer, "JPEG", quality=95, exif=exif)
    elif kind == "cmyk_jpeg":
        image.convert("CMYK").save(buffer, "JPEG", quality=95)
    elif kind == "palette_bmp":
        image.convert("P").save(buffer, "BMP")
    elif kind == "webp":
        image.save(buffer, "WEBP", lossless=True)
    elif kind == "png16":
        Image.fromarray((pixels[..., 0].astype(np.uint16) * 257)).save(buffer, "PNG")
    return buffer.getvalue()


def gallery_files() -> dict[str, bytes]:
    """Name → file bytes: noisy colour images plus two of every special kind."""
    files = {}
    for label, (word, rgb) in enumerate(COLOURS.items()):
        for copy in range(4):
            buffer = io.BytesIO()
            Image.fromarray(solid_image(rgb, seed=100 * label + copy)).save(buffer, "PNG" if copy % 2 else "JPEG")
            files[f"{word}-{copy}.{'png' if copy % 2 else 'jpg'}"] = buffer.getvalue()
    for number, kind in enumerate(KINDS):
        for copy in range(2):
            files[f"{kind}-{copy}{SUFFIXES[kind]}"] = special_image(kind, seed=10 * number + copy)
    return files


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A run, a folder gallery, a packed split of the same images and the query files."""
    root = tmp_path_factory.mktemp("parity")
    run_dir = root / "run"
    export_encoders(run_dir, encode_images=spatial_encoder(), encode_texts=colour_word_encoder(), image_size=IMAGE_SIZE)
    files = gallery_files()
    folder = root / "gallery"
    folder.mkdir()
    for name, data in files.items():
        (folder / name).write_bytes(data)
    data_dir = root / "data"
    # A packer stores each image canonicalised, as the folder gallery reads it.
    records = [(f"image {name}", canonical_image_bytes(data), name, number) for number, (name, data) in enumerate(files.items())]
    write_packed_dataset(data_dir, {"test": records})
    run_config.save(run_config.TrainConfig(data=str(data_dir)), run_dir / "config.json")
    queries = root / "queries"
    queries.mkdir()
    for number, kind in enumerate(KINDS):
        (queries / f"{kind}{SUFFIXES[kind]}").write_bytes(special_image(kind, seed=500 + number))
    return {"run": run_dir, "folder": folder, "data": data_dir, "queries": queries}


def add_compressed_index(run_dir: Path, gallery) -> None:
    """Give the gallery's index an ``ann-compressed.faiss``, as the Beam path does for a large gallery."""
    index = open_index(run_dir, gallery)
    rows = normalise_rows(index.embeddings)
    build_large_index(lambda: [rows], index.directory / COMPRESSED_NAME, count=len(rows), dimension=rows.shape[1],
                      queries=rows[:8])


def gallery_of(world: dict, kind: str):
    return FolderGallery(world["folder"]) if kind == "folder" else PackedGallery(world["data"], "test")


def cli_flags(world: dict, gallery_kind: str) -> list[str]:
    where = ["--gallery", str(world["folder"])] if gallery_kind == "folder" else ["--data", str(world["data"]), "--split", "test"]
    return ["--model", str(world["run"]), *where]


def cli_json(capsys, argv: list[str]) -> list[dict]:
    assert search.main([*argv, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


def over_http(results: list[dict], gallery) -> list[dict]:
    """What the service answers for `results`: a folder image's path relative to the folder (no
    server path leaves the machine)."""
    if not isinstance(gallery, FolderGallery):
        return results
    return [{**row, "path": Path(row["path"]).relative_to(gallery.directory.resolve()).as_posix()} for row in results]


def assert_same(expected: list[dict], actual: list[dict], what: str) -> None:
    assert [row["image_id"] for row in actual] == [row["image_id"] for row in expected], what
    assert [row["rank"] for row in actual] == list(range(1, len(actual) + 1)), what
    np.testing.assert_allclose([row["score"] for row in actual], [row["score"] for row in expected], atol=1e-5, err_msg=what)
    assert {key: [row[key] for row in actual] for key in ("path", "caption", "label")} == \
        {key: [row[key] for row in expected] for key in ("path", "caption", "label")}, what


@pytest.mark.parametrize("gallery_kind", ["folder", "packed"])
@pytest.mark.parametrize("ann", ["exact", "hnsw", "ivf", "compressed"])
def test_api_cli_and_service_agree(world, gallery_kind, ann, capsys):
    from fastapi.testclient import TestClient

    from dualenc.service.app import create_app

    gallery = gallery_of(world, gallery_kind)
    choice = "auto" if ann == "compressed" else ann
    if ann == "compressed":
        add_compressed_index(world["run"], gallery)
    api = dualenc.load(world["run"], ann=choice).index(gallery=gallery)
    assert api.search_kind == ann
    size = len(api.gallery_index)
    app = create_app(world["run"], gallery, ann=choice)
    with TestClient(app) as client:
        assert client.get("/api/health").json()["index"] == ann
        for text in TEXTS:
            expected = api.search(text, k=K)
            assert len(expected) == K and len({row["image_id"] for row in expected}) == K
            assert_same(expected, cli_json(capsys, [text, *cli_flags(world, gallery_kind), "--ann", choice, "-k", str(K)]),
                        f"CLI, {text!r}")
            response = client.get("/api/search", params={"q": text, "k": K})
            assert response.status_code == 200, response.text
            assert_same(over_http(expected, gallery), response.json(), f"service, {text!r}")
        for query in sorted(world["queries"].iterdir()):
            expected = api.search(query.read_bytes(), k=K)
            assert_same(expected, cli_json(capsys, ["--image", str(query), *cli_flags(world, gallery_kind), "--ann", choice,
                                                    "-k", str(K)]), f"CLI, {query.name}")
            response = client.post("/api/search", params={"k": K}, files={"image": (query.name, query.read_bytes())})
            assert response.status_code == 200, response.text
            assert_same(over_http(expected, gallery), response.json(), f"service, {query.name}")
        whole = api.search("red", k=size)  # every row once, no padding row however the index probes
        assert sorted(row["image_id"] for row in whole) == sorted(api.gallery_index.image_ids)
    if ann == "compressed":
        (api.gallery_index.directory / COMPRESSED_NAME).unlink()


def test_folder_and_packed_split_of_the_same_images_agree(world):
    """A folder and a packed split of the same (canonicalised) files embed every image alike."""
    folder = dualenc.load(world["run"], ann="exact").index(world["folder"])
    packed = dualenc.load(world["run"], ann="exact").index(data=world["data"], split="test")
    rows = {image_id: row for row, image_id in enumerate(packed.gallery_index.image_ids)}
    for row, path in enumerate(folder.gallery_index.paths):
        np.testing.assert_allclose(folder.gallery_index.embeddings[row],
                                   packed.gallery_index.embeddings[rows[Path(path).name]], atol=1e-6)


def test_encode_images_is_the_index_embedding_of_the_same_file(world):
    """`encode_images` canonicalises like the gallery index: a file's query embedding is its row."""
    retriever = dualenc.load(world["run"]).index(world["folder"])
    index = retriever.gallery_index
    names = [Path(path).name for path in index.paths]
    files = sorted(name for name in names if name.split("-")[0] in KINDS)
    embedded = retriever.encode_images([(world["folder"] / name).read_bytes() for name in files])
    np.testing.assert_allclose(embedded, index.embeddings[[names.index(name) for name in files]], atol=1e-6)


def test_ivf_probe_that_misses_rows_gives_fewer_or_wider_never_padding():
    """Clustered rows and one probed cell leave FAISS short of k: the search widens its probe."""
    from dualenc.retrieval import knn
    from dualenc.retrieval.query import result_dicts

    rng = np.random.default_rng(0)
    centres = normalise_rows(rng.standard_normal((40, 16)))
    rows = normalise_rows(np.repeat(centres, 100, axis=0) + 0.05 * rng.standard_normal((4000, 16)))
    index = knn.build_ann(rows, "ivf")
    index.nprobe = 1
    scores, ids = knn.ann_search(index, rows[:3], k=4000)
    assert (ids >= 0).all() and all(len(set(row)) == 4000 for row in ids)
    np.testing.assert_allclose(scores, knn.exact_search(rows[:3], rows, 4000)[0], atol=1e-5)

    class Rows:  # the fields result_dicts reads from an index
        image_ids = [f"id{row}" for row in range(4000)]
        paths = captions = labels = None

    truncated = result_dicts(Rows, [0.9, 0.8, -3.4e38], [5, 7, -1])
    assert [row["image_id"] for row in truncated] == ["id5", "id7"]
