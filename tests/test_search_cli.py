"""search.py end to end on the tiny colour run: ranking, JSON, grid, evaluation, bad input."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import search
from dualenc.core import config as run_config
from dualenc.retrieval import metrics
from dualenc.export.encoders import export_vision_encoder, load_encoder
from dualenc.data.records import parse_example
from tests.support.colour_run import (
    COLOURS,
    IMAGE_SIZE,
    colour_records,
    encode_png,
    make_colour_run,
    mean_colour_encoder,
    solid_image,
    write_packed_dataset,
)
from tests.support.read_only import read_only

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def colour_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cli")
    make_colour_run(root)
    return root


@pytest.fixture
def in_root(colour_root, monkeypatch) -> Path:
    monkeypatch.chdir(colour_root)
    return colour_root


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    status = search.main(list(argv))
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_default_run_and_split_rank_red_first(in_root, tmp_path, capsys):
    grid = tmp_path / "grid.png"
    status, out, _ = run_cli(capsys, "a woman in a RED coat", "--grid", str(grid))
    assert status == 0
    with Image.open(grid) as image:
        assert image.format == "PNG"
    lines = out.strip().splitlines()
    assert lines[0] == 'results for "a woman in a RED coat":'
    assert len(lines) == 1 + 9
    assert [line.split()[2].split("/")[0] for line in lines[1:4]] == ["red"] * 3
    assert all('"a red square"' in line for line in lines[1:4])


def test_json_schema_and_order(in_root, capsys):
    status, out, _ = run_cli(capsys, "blue", "-k", "5", "--json")
    assert status == 0
    results = json.loads(out)
    assert [result["rank"] for result in results] == [1, 2, 3, 4, 5]
    for result in results:
        assert set(result) == {"rank", "score", "image_id", "path", "caption", "label"}
        assert isinstance(result["score"], float) and result["path"] is None
    assert [result["label"] for result in results[:3]] == [2, 2, 2]
    assert results[0]["caption"] == "a blue square"
    scores = [result["score"] for result in results]
    assert scores == sorted(scores, reverse=True) and scores[0] > 0.99 > scores[3]


def test_folder_gallery_image_query_and_grid(in_root, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed, (word, rgb) in enumerate(COLOURS.items()):
        (folder / f"{word}.png").write_bytes(encode_png(solid_image(rgb, seed)))
    (folder / "corrupt.png").write_bytes(b"\x89PNG broken")
    query_image = tmp_path / "query.jpg"
    query_image.write_bytes(encode_png(solid_image(COLOURS["cyan"], 99), "JPEG"))
    grid = tmp_path / "grid.png"

    status, out, err = run_cli(capsys, "--image", str(query_image), "--gallery", str(folder), "-k", "4", "--json", "--grid", str(grid))
    assert status == 0
    assert "corrupt.png" in err  # listed, then skipped
    results = json.loads(out)
    assert results[0]["image_id"] == "cyan.png"
    assert results[0]["path"] == str(folder.resolve() / "cyan.png") and Path(results[0]["path"]).is_file()
    assert results[0]["caption"] is None and results[0]["label"] is None
    assert grid.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(grid) as image:
        assert image.size[0] > 100 and image.size[1] > 100


def test_query_image_that_is_not_an_image(in_root, tmp_path, capsys):
    query_image = tmp_path / "notes.jpg"
    query_image.write_text("just text")
    status, out, err = run_cli(capsys, "--image", str(query_image))
    assert (status, out) == (2, "")
    assert err == f"error: query image {query_image}: not an image (starts with b'just tex'); pass a JPEG, PNG, BMP, GIF, WebP or TIFF file\n"


def independent_split(data_dir: Path, split: str):
    """Captions, labels and first-seen images of a split, read with plain tf.data."""
    captions, labels, image_rows, image_blobs, image_labels, first_captions = [], [], {}, [], [], []
    for serialized in tf.data.TFRecordDataset([str(data_dir / f"{split}-00000-of-00001.tfrecord")]):
        features = {key: value.numpy() for key, value in parse_example(serialized).items()}
        captions.append(features["caption"].decode())
        labels.append(int(features["label"]))
        if features["image_id"] not in image_rows:
            image_rows[features["image_id"]] = len(image_blobs)
            image_blobs.append(features["image"])
            image_labels.append(int(features["label"]))
            first_captions.append(captions[-1])
    return captions, np.array(labels), image_blobs, np.array(image_labels), first_captions


def test_evaluate_matches_metrics(in_root, tmp_path, capsys):
    # Every third caption names the wrong colour, so the scores are neither 0 nor 100.
    records = [
        (caption.replace(word, "green") if index % 3 == 0 else caption, image, image_id, label)
        for index, (caption, image, image_id, label) in enumerate(colour_records(2, seed=7))
        for word in [image_id.split("/")[0]]
    ]
    data_dir = tmp_path / "noisy"
    write_packed_dataset(data_dir, {"val": records})

    status, out, _ = run_cli(capsys, "--evaluate", "--data", str(data_dir), "--json")
    assert status == 0
    reported = json.loads(out)

    captions, labels, blobs, image_labels, first_captions = independent_split(data_dir, "val")
    text = load_encoder(in_root / "runs/latest/text_encoder")
    image_embeddings = load_encoder(in_root / "runs/latest/vision_encoder")(blobs)
    caption_embeddings = text(captions)
    text_recall = metrics.recall_at_k(caption_embeddings, image_embeddings, labels, image_labels)
    image_recall = metrics.recall_at_k(image_embeddings, caption_embeddings, image_labels, labels)
    assert reported["images"] == 16 and reported["captions"] == 32 and reported["split"] == "val"
    for k in (1, 5, 10):
        assert reported["text_to_image"][f"R@{k}"] == pytest.approx(text_recall[k], abs=1e-9)
        assert reported["image_to_text"][f"R@{k}"] == pytest.approx(image_recall[k], abs=1e-9)
    assert reported["text_to_image"]["mAP"] == pytest.approx(
        metrics.mean_average_precision(caption_embeddings, image_embeddings, labels, image_labels), abs=1e-6
    )
    assert reported["image_to_text"]["mAP"] == pytest.approx(
        metrics.mean_average_precision(image_embeddings, caption_embeddings, image_labels, labels), abs=1e-6
    )
    first_caption_embeddings = text(first_captions)
    assert reported["top_k_accuracy"] == {
        "k": 16,
        "percent": pytest.approx(metrics.top_k_accuracy(first_caption_embeddings, image_embeddings, np.arange(16), k=16)),
    }
    accuracy = metrics.top_k_accuracy(first_caption_embeddings, image_embeddings, np.arange(16), k=1)
    assert 0 < reported["text_to_image"]["R@1"] < 100 and 0 < accuracy < 100

    status, out, err = run_cli(capsys, "--evaluate", "--data", str(data_dir))
    assert status == 0 and "text→image" in out and "image→text" in out and "top-16 accuracy" in out
    assert f"{reported['text_to_image']['R@1']:.2f}" in out
    assert "no 'test' split; searching 'val'" in err


def test_build_index_with_hnsw_reports_recall(in_root, capsys):
    pytest.importorskip("faiss")
    status, _, err = run_cli(capsys, "--build-index", "--ann", "hnsw")
    assert status == 0
    assert "recall@10 vs exact search" in err and "indexed 24 images (24 embedded now)" in err
    assert list((in_root / "runs/latest/index").glob("*/ann-hnsw.faiss"))
    status, out, _ = run_cli(capsys, "magenta", "--ann", "hnsw", "-k", "3", "--json")
    assert status == 0 and [result["label"] for result in json.loads(out)] == [5, 5, 5]


def test_index_of_another_encoder_is_rebuilt(colour_root, tmp_path, capsys):
    run_copy = tmp_path / "run"
    shutil.copytree(colour_root / "runs/latest", run_copy)
    status, out, _ = run_cli(capsys, "red", "--model", str(run_copy), "-k", "1", "--json")
    assert status == 0 and json.loads(out)[0]["image_id"].startswith("red/")

    negated = mean_colour_encoder()  # maps each colour to its opposite: red → cyan
    negated.layers[-1].kernel.assign(-np.eye(3, dtype=np.float32))
    export_vision_encoder(negated, IMAGE_SIZE, run_copy / "vision_encoder")
    status, out, err = run_cli(capsys, "red", "--model", str(run_copy), "-k", "1", "--json")
    assert status == 0 and "built by another encoder; rebuilding" in err
    assert json.loads(out)[0]["image_id"].startswith("cyan/")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["   "], "the query is empty"),
        ([""], "the query is empty"),
        (["x" * 10_001], "the limit is 10000"),
        (["caf\udce9"], "not valid UTF-8"),
        (["red", "--model", "no/such/run"], "run `python train.py` first or pass --model"),
        (["red", "--gallery", "no/such/folder"], "does not exist"),
        (["red", "--split", "nope"], "has no split 'nope'"),
        (["red", "-k", "0"], "-k must be at least 1"),
        (["red", "--image", "query.png"], "either a QUERY or --image"),
        (["--image", "no/such.png"], "query image no/such.png: file not found"),
        ([], "nothing to do"),
        (["--evaluate", "--gallery", "."], "--evaluate needs captions"),
        (["red", "--grid", "no/such/dir/grid.png"], "directory no/such/dir does not exist"),
    ],
)
def test_bad_input_is_one_line_exit_2(in_root, capsys, argv, message):
    status, out, err = run_cli(capsys, *argv)
    assert status == 2
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert out == ""


def test_run_without_encoders(tmp_path, capsys):
    (tmp_path / "run").mkdir()
    run_config.save(run_config.TrainConfig(), tmp_path / "run" / "config.json")
    status, _, err = run_cli(capsys, "red", "--model", str(tmp_path / "run"))
    assert status == 2 and "has no exported vision_encoder; run `python train.py` first" in err


def test_non_utf8_argv_in_a_real_process(colour_root):
    completed = subprocess.run(
        [sys.executable, str(REPO / "search.py"), b"caf\xe9 au lait"],
        cwd=colour_root,
        capture_output=True,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "LC_ALL": "C.UTF-8"},
        check=False,
    )
    assert completed.returncode == 2
    assert completed.stderr.decode().splitlines() == ["error: the query is not valid UTF-8 text; check your terminal's encoding"]


def test_help_has_examples(capsys):
    with pytest.raises(SystemExit) as exit_info:
        search.main(["--help"])
    assert exit_info.value.code == 0
    assert "examples:" in capsys.readouterr().out


# --- bad input found in the wild (issue 13) ----------------------------------------------------


def _plain_env() -> dict[str, str]:
    """The user's environment: TensorFlow's log level not lowered, the repository importable."""
    env = {key: value for key, value in os.environ.items() if key not in ("TF_CPP_MIN_LOG_LEVEL", "DUALENC_TF_LOG")}
    env["PYTHONPATH"] = str(REPO)
    return env


def test_error_after_tensorflow_starts_is_still_the_only_stderr_line(colour_root):
    quiet = subprocess.run(
        [sys.executable, str(REPO / "search.py"), "red", "--model", "no/such/run"],
        cwd=colour_root, env=_plain_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert quiet.returncode == 2
    assert quiet.stderr == (
        "error: run directory no/such/run does not exist; run `python train.py` first or pass --model RUN_DIR\n"
    )


def test_grid_onto_a_directory_is_one_line_and_leaves_nothing(in_root, tmp_path, capsys):
    target = tmp_path / "figures"
    target.mkdir()
    status, out, err = run_cli(capsys, "red", "--grid", str(target))
    assert (status, out) == (2, "")
    assert err == f"error: cannot write grid {target}: it is a directory; pass a file name such as {target / 'grid.png'}\n"
    assert list(tmp_path.iterdir()) == [target] and list(target.iterdir()) == []


def test_grid_in_a_read_only_directory_is_one_line_and_leaves_nothing(colour_root, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only(locked) as prefix:
        completed = subprocess.run(
            [*prefix, sys.executable, str(REPO / "search.py"), "red", "--grid", str(locked / "grid.png")],
            cwd=colour_root, env=_plain_env(), capture_output=True, text=True, timeout=120, check=False,
        )
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr == (
        f"error: cannot write grid {locked / 'grid.png'}: directory {locked} is read-only (or not yours); "
        "choose another place\n"
    )
    assert list(locked.iterdir()) == []


def _damaged_copy(colour_root: Path, destination: Path, damage) -> Path:
    data = destination / "data"
    shutil.copytree(colour_root / "data", data)
    shard = data / "test-00000-of-00001.tfrecord"
    shard.write_bytes(damage(shard.read_bytes()))
    return shard


def _flip_middle_byte(content: bytes) -> bytes:
    middle = len(content) // 2
    return content[:middle] + bytes([content[middle] ^ 0xFF]) + content[middle + 1:]


@pytest.mark.parametrize("damage", [_flip_middle_byte, lambda content: content[: len(content) // 2]], ids=["flipped", "cut"])
def test_damaged_shard_is_one_line_naming_it(in_root, tmp_path, capsys, damage):
    shard = _damaged_copy(in_root, tmp_path, damage)
    status, out, err = run_cli(capsys, "red", "--data", str(shard.parent), "-k", "1")
    assert (status, out) == (2, "")
    assert err.startswith(f"error: shard {shard} cannot be read (") and err.count("\n") == 1
    assert err.endswith("; re-pack the dataset\n")


def test_manifest_split_that_is_not_an_object_is_one_line(in_root, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(in_root / "data", data)
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["test"] = "test-00000-of-00001.tfrecord"
    (data / "manifest.json").write_text(json.dumps(manifest))
    status, out, err = run_cli(capsys, "red", "--data", str(data))
    assert (status, out) == (2, "")
    assert err == f"error: {data / 'manifest.json'}: splits.test is not an object (got a string); re-pack the dataset\n"


def test_embeddings_swapped_for_another_models_are_detected_and_rebuilt(colour_root, tmp_path, capsys):
    folder = tmp_path / "photos"
    folder.mkdir()
    for seed, (word, rgb) in enumerate(COLOURS.items()):
        (folder / f"{word}.png").write_bytes(encode_png(solid_image(rgb, seed)))
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    shutil.copytree(colour_root / "runs/latest", ours, ignore=shutil.ignore_patterns("index"))
    shutil.copytree(colour_root / "runs/latest", theirs, ignore=shutil.ignore_patterns("index"))
    negated = mean_colour_encoder()  # maps each colour to its opposite: red → cyan
    negated.layers[-1].kernel.assign(-np.eye(3, dtype=np.float32))
    export_vision_encoder(negated, IMAGE_SIZE, theirs / "vision_encoder")
    for run_dir in (ours, theirs):
        status, _, _ = run_cli(capsys, "red", "--model", str(run_dir), "--gallery", str(folder), "-k", "1")
        assert status == 0
    [our_file] = ours.glob("index/*/embeddings.npy")
    [their_file] = theirs.glob("index/*/embeddings.npy")
    assert np.load(our_file).shape == np.load(their_file).shape
    shutil.copyfile(their_file, our_file)

    status, out, err = run_cli(capsys, "red", "--model", str(ours), "--gallery", str(folder), "-k", "1", "--json")
    assert status == 0
    assert f"{our_file} is not the file this index wrote (its sha256 differs); rebuilding the index" in err
    assert json.loads(out)[0]["image_id"] == "red.png"
    # Rebuilt from our encoder: the file holds our embeddings again, and is reused from now on.
    expected = load_encoder(ours / "vision_encoder")([(folder / name).read_bytes() for name in json.loads(
        (our_file.parent / "meta.json").read_text())["image_ids"]])
    np.testing.assert_allclose(np.load(our_file), expected, atol=1e-6)
    status, _, err = run_cli(capsys, "red", "--model", str(ours), "--gallery", str(folder), "-k", "1")
    assert status == 0 and "rebuilding" not in err


def test_run_directory_that_is_read_only_is_one_line(colour_root, tmp_path):
    run_copy = tmp_path / "run"
    shutil.copytree(colour_root / "runs/latest", run_copy, ignore=shutil.ignore_patterns("index"))
    with read_only(run_copy) as prefix:
        completed = subprocess.run(
            [*prefix, sys.executable, str(REPO / "search.py"), "red", "--model", str(run_copy), "-k", "1"],
            cwd=colour_root, env=_plain_env(), capture_output=True, text=True, timeout=180, check=False,
        )
    assert completed.returncode == 2 and completed.stdout == ""
    assert completed.stderr.startswith(f"error: cannot write the gallery index {run_copy / 'index'}/")
    assert completed.stderr.count("\n") == 1 and "make the run directory writable" in completed.stderr
    assert not (run_copy / "index").exists()
