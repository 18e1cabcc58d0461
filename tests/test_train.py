"""train.py end to end on the tiny packed demo: artifacts, resume after a kill, cached versus
uncached features, exported encoders in a fresh process, and one-line errors for bad input.

Training is the expensive part, so two in-process runs (frozen vision tower, with and without
the feature cache) are shared by most tests, and one killed and resumed pair of train.py
subprocesses serves both the resume test and the check of progress output sent to a file or pipe.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import train
from tests.support.training import (
    FROZEN_VISION_EPOCHS,
    TrainedRun,
    copy_dataset,
    csv_rows,
    file_stamps,
    frozen_vision_flags,
    subprocess_env,
    train_command,
    train_in_process,
    write_json,
)

EPOCHS = FROZEN_VISION_EPOCHS
METRIC_NAMES = [f"{direction}_{name}" for direction in ("t2i", "i2t") for name in ("r1", "r5", "r10", "map")]
# Longest wait for the killed run to log its second epoch (first epoch includes tracing).
KILL_WAIT_SECONDS = 240


@pytest.fixture(scope="module")
def cached_run(frozen_vision_run) -> TrainedRun:
    """Frozen small CNN (features cached), trained BiLSTM: the run most tests inspect, shared with test_service."""
    return frozen_vision_run


@pytest.fixture(scope="module")
def uncached_run(tmp_path_factory, demo_data) -> TrainedRun:
    """The same configuration as `cached_run`, running the frozen tower on every batch, on a copy
    of the demo scored on its training shards: the demo's test split holds one person, where any
    model scores 100 %, while ten people let a wrong metrics.json show. Training reads only the
    train and val splits, so the curves are still `cached_run`'s."""
    base = tmp_path_factory.mktemp("uncached")
    data = copy_dataset(demo_data, base / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["test"] = manifest["splits"]["train"]
    write_json(data / "manifest.json", manifest)
    flags = frozen_vision_flags(base, data) + ["--no-feature-cache"]
    return train_in_process(base / "work", base / "cache", flags)


@pytest.mark.slow
def test_demo_run_writes_config_encoders_curves_metrics_and_log(cached_run):
    assert cached_run.exit_code == 0
    run_dir = cached_run.run_dir
    latest = cached_run.workdir / "runs" / "latest"
    assert latest.is_symlink() and not os.path.isabs(os.readlink(latest))
    assert run_dir.parent == (cached_run.workdir / "runs").resolve()

    saved = json.loads((run_dir / "config.json").read_text())
    assert saved["epochs"] == EPOCHS and saved["batch_size"] == 8
    assert saved["model"]["vision"]["trainable"] is False and saved["model"]["text"]["trainable"] is True
    for encoder in ("vision_encoder", "text_encoder"):
        assert (run_dir / encoder / "saved_model.pb").is_file()

    curves = run_dir / "curves.png"
    assert curves.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    with Image.open(curves) as image:
        image.verify()

    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["split"] == "test" and metrics["epochs_trained"] == EPOCHS
    for direction in ("text_to_image", "image_to_text"):
        assert set(metrics[direction]) == {"R@1", "R@5", "R@10", "mAP"}
        for name, value in metrics[direction].items():
            assert 0.0 <= value <= 100.0, (direction, name)

    rows = csv_rows(run_dir / "training_log.csv")
    assert [row["epoch"] for row in rows] == [str(epoch) for epoch in range(EPOCHS)]
    for column in ["loss", "val_loss"] + [f"val_{name}" for name in METRIC_NAMES]:
        assert all(np.isfinite(float(row[column])) for row in rows), column
    # The backup goes once the run has finished.
    assert not (run_dir / "backup").exists()


@pytest.mark.slow
def test_finished_run_is_refused_and_left_untouched(cached_run, demo_data, capsys):
    runs = cached_run.workdir / "runs"
    before = file_stamps(runs)
    flags = cached_run.flags + ["--out", str(cached_run.run_dir)]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cached_run.workdir)
        patch.setenv("DUALENC_CACHE", str(cached_run.cache_dir))
        capsys.readouterr()
        exit_code = train.main(flags)
    captured = capsys.readouterr()
    assert exit_code == 2
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: ") and "finished run" in captured.err
    assert file_stamps(runs) == before


@pytest.mark.slow
def test_cached_and_uncached_features_give_the_same_training_curves(cached_run, uncached_run):
    assert cached_run.exit_code == 0 and uncached_run.exit_code == 0
    # Only the cached run stored features (train and validation splits).
    assert len(list((cached_run.cache_dir / "features").iterdir())) == 2
    assert not (uncached_run.cache_dir / "features").exists()
    cached_rows = csv_rows(cached_run.run_dir / "training_log.csv")
    uncached_rows = csv_rows(uncached_run.run_dir / "training_log.csv")
    assert [row["epoch"] for row in cached_rows] == [row["epoch"] for row in uncached_rows]
    for column in ["loss", "val_loss", "r1_t2i", "r1_i2t"] + [f"val_{name}" for name in METRIC_NAMES]:
        cached = np.array([float(row[column]) for row in cached_rows])
        uncached = np.array([float(row[column]) for row in uncached_rows])
        np.testing.assert_allclose(cached, uncached, rtol=1e-4, atol=1e-4, err_msg=column)


FRESH_PROCESS_SCRIPT = """
import json, sys
from pathlib import Path
import numpy as np
import tensorflow as tf
import tensorflow_text  # noqa: F401  text ops the tower may use

run_dir, io_dir = Path(sys.argv[1]), Path(sys.argv[2])
images = [path.read_bytes() for path in sorted(io_dir.glob("image-*.bin"))]
captions = json.loads((io_dir / "captions.json").read_text())
vision = tf.saved_model.load(str(run_dir / "vision_encoder"))
text = tf.saved_model.load(str(run_dir / "text_encoder"))
image_out = vision.signatures["serving_default"](images=tf.constant(images))["embeddings"]
caption_out = text.signatures["serving_default"](captions=tf.constant(captions))["embeddings"]
np.save(io_dir / "image_embeddings.npy", image_out.numpy())
np.save(io_dir / "caption_embeddings.npy", caption_out.numpy())
print("project modules:", sorted(name for name in sys.modules if name.split(".")[0] in ("dualenc", "tfrecords_tools")))
"""


def _test_pairs(data_dir: Path) -> tuple[list[bytes], list[str]]:
    from dualenc.data.pipeline import record_dataset
    from dualenc.data.records import CAPTION, IMAGE, parse_example

    images, captions = [], []
    for record in record_dataset(data_dir, "test"):
        features = parse_example(record)
        images.append(features[IMAGE].numpy())
        captions.append(features[CAPTION].numpy().decode("utf-8"))
    return images, captions


@pytest.mark.slow
def test_exported_encoders_match_the_trained_towers_in_a_fresh_process(cached_run, demo_data, tmp_path):
    import tensorflow as tf

    from dualenc.data.images import decode_image
    from dualenc.models.preprocessing import build_text_preprocessor

    model = cached_run.model
    images, captions = _test_pairs(demo_data)
    # A different decode (the raw images) from the cached features training used.
    image_size = model.config.vision.image_size
    pixels = tf.stack([decode_image(tf.constant(image), image_size) for image in images])
    expected_images = np.asarray(model.encode_images(pixels))
    expected_captions = np.asarray(model.encode_texts(build_text_preprocessor(model.config.text)(tf.constant(captions))))

    for index, image in enumerate(images):
        (tmp_path / f"image-{index:03d}.bin").write_bytes(image)
    (tmp_path / "captions.json").write_text(json.dumps(captions))
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    completed = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_SCRIPT, str(cached_run.run_dir), str(tmp_path)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert "project modules: []" in completed.stdout
    served_images = np.load(tmp_path / "image_embeddings.npy")
    served_captions = np.load(tmp_path / "caption_embeddings.npy")
    assert served_images.shape == expected_images.shape == (len(images), model.config.projection_dim)
    np.testing.assert_allclose(served_images, expected_images, atol=1e-5)
    np.testing.assert_allclose(served_captions, expected_captions, atol=1e-5)
    # Not trivially equal: the test images are not all embedded alike.
    assert np.ptp(served_images, axis=0).max() > 1e-3


@pytest.mark.slow
def test_metrics_json_holds_what_search_evaluate_computes(uncached_run):
    from dualenc.data.manifest import default_split, load_manifest
    from dualenc.export.encoders import TEXT_ENCODER_DIR, load_encoder
    from dualenc.retrieval.evaluation import evaluate_split
    from dualenc.retrieval.gallery import PackedGallery
    from dualenc.retrieval.index import open_index

    assert uncached_run.exit_code == 0
    run_dir = uncached_run.run_dir
    metrics = json.loads((run_dir / "metrics.json").read_text())
    data = Path(json.loads((run_dir / "config.json").read_text())["data"])

    split = default_split(load_manifest(data), data)
    # search.py --evaluate's question: the split's images embedded anew by the exported vision
    # encoder (not the index training kept), the captions by the exported text encoder.
    index = open_index(run_dir, PackedGallery(data, split), rebuild=True)
    text_encoder = load_encoder(run_dir / TEXT_ENCODER_DIR)
    report = evaluate_split(text_encoder, data, split, index.embeddings, index.labels, index.image_ids)
    assert report["split"] == metrics["split"] == "test"
    assert {key: metrics[key] for key in report} == report
    assert report["captions"] > report["images"] > 10
    assert report["text_to_image"]["mAP"] < 100.0 and report["image_to_text"]["mAP"] < 100.0


# --- kill and resume --------------------------------------------------------------------------

RESUME_EPOCHS = 4
EPOCH_LINE = re.compile(rf"epoch (\d+)/{RESUME_EPOCHS} \|")


@dataclasses.dataclass
class KilledAndResumed:
    """The demo trained by train.py in a subprocess, killed after its second epoch, then the same
    command again: what was on disk between the two, and what each printed."""

    workdir: Path
    run_dir: Path
    logged_before: int
    backed_up: int
    finished_before: bool
    config_stamp: int
    first_output: bytes
    resumed: subprocess.CompletedProcess


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory, demo_data) -> KilledAndResumed:
    workdir = tmp_path_factory.mktemp("killed")
    env = subprocess_env(workdir / "cache")
    command = train_command("--data", str(demo_data), "--epochs", str(RESUME_EPOCHS), "--batch-size", "8")
    log_csv = workdir / "runs" / "latest" / "training_log.csv"
    with open(workdir / "first.log", "w") as first_log:
        first = subprocess.Popen(command, cwd=workdir, env=env, stdout=first_log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + KILL_WAIT_SECONDS
        try:
            while not (log_csv.is_file() and len(csv_rows(log_csv)) >= 2):
                assert first.poll() is None, "the first run ended before it could be killed"
                assert time.monotonic() < deadline, "the first run logged no second epoch in time"
                time.sleep(0.05)
            first.send_signal(signal.SIGKILL)
        finally:
            first.kill()
            first.wait()
    run_dir = (workdir / "runs" / "latest").resolve()
    logged_before = len(csv_rows(log_csv))
    backed_up = max(int(backup.name.removeprefix("epoch-")) for backup in (run_dir / "backup").glob("epoch-*"))
    finished_before = (run_dir / "metrics.json").exists()
    config_stamp = (run_dir / "config.json").stat().st_mtime_ns
    resumed = subprocess.run(command, cwd=workdir, env=env, capture_output=True, timeout=300)
    return KilledAndResumed(workdir, run_dir, logged_before, backed_up, finished_before, config_stamp,
                            (workdir / "first.log").read_bytes(), resumed)


@pytest.mark.slow
def test_killed_run_resumes_without_redoing_finished_epochs(killed_and_resumed):
    run_dir = killed_and_resumed.run_dir
    backed_up = killed_and_resumed.backed_up
    # The log is rewritten just after each backup is committed.
    assert 2 <= killed_and_resumed.logged_before < RESUME_EPOCHS
    assert backed_up in (killed_and_resumed.logged_before, killed_and_resumed.logged_before + 1)
    assert not killed_and_resumed.finished_before

    resumed = killed_and_resumed.resumed
    stdout = resumed.stdout.decode()
    assert resumed.returncode == 0, stdout[-2000:] + resumed.stderr.decode()[-3000:]
    assert f"resuming into {run_dir}" in stdout
    # The resumed process trained only the epochs its backup lacked.
    trained = [int(epoch) for epoch in EPOCH_LINE.findall(stdout)]
    assert trained == list(range(backed_up + 1, RESUME_EPOCHS + 1))
    log_csv = run_dir / "training_log.csv"
    assert [row["epoch"] for row in csv_rows(log_csv)] == [str(epoch) for epoch in range(RESUME_EPOCHS)]
    assert json.loads((run_dir / "metrics.json").read_text())["epochs_trained"] == RESUME_EPOCHS
    assert (run_dir / "config.json").stat().st_mtime_ns == killed_and_resumed.config_stamp
    runs = killed_and_resumed.workdir / "runs"
    assert sorted(os.listdir(runs)) == sorted(["latest", run_dir.name])


# --- progress output --------------------------------------------------------------------------


def test_keras_progress_bar_only_on_a_terminal():
    from dualenc.training.loop import keras_verbosity

    class Stream:
        def __init__(self, terminal: bool):
            self.terminal = terminal

        def isatty(self) -> bool:
            return self.terminal

    assert keras_verbosity(1, Stream(terminal=True)) == 1
    assert keras_verbosity(1, Stream(terminal=False)) == 2
    assert keras_verbosity(0, Stream(terminal=True)) == keras_verbosity(0, Stream(terminal=False)) == 0


@pytest.mark.slow
def test_progress_piped_to_a_file_is_plain_lines(killed_and_resumed):
    # Both runs of the demo report progress away from a terminal: the killed one into a file,
    # the resumed one into pipes, read as bytes (text=True would turn "\r" into "\n").
    first_output = killed_and_resumed.first_output.decode()
    stdout, stderr = killed_and_resumed.resumed.stdout.decode(), killed_and_resumed.resumed.stderr.decode()
    assert killed_and_resumed.resumed.returncode == 0, stdout[-2000:] + stderr[-3000:]
    # Progress is still reported: Keras' epoch lines and our summaries, one per epoch trained.
    assert re.search(rf"^epoch 2/{RESUME_EPOCHS} \| loss ", first_output, re.MULTILINE)
    resumed_epochs = RESUME_EPOCHS - killed_and_resumed.backed_up
    assert f"Epoch {RESUME_EPOCHS}/{RESUME_EPOCHS}" in stdout
    assert len(re.findall(r"^\d+/\d+ - .* - loss: ", stdout, re.MULTILINE)) == resumed_epochs
    assert re.search(rf"^epoch {RESUME_EPOCHS}/{RESUME_EPOCHS} \| loss ", stdout, re.MULTILINE)
    for name, output in (("the killed run's file", first_output), ("stdout", stdout), ("stderr", stderr)):
        assert "\x1b[" not in output, f"ANSI escape codes in {name}"
        assert "\r" not in output, f"carriage returns in {name}"


# --- bad input: exit 2, one line, nothing written -------------------------------------------


def _missing_dir(tmp_path, demo):
    return ["--data", str(tmp_path / "nowhere")]


def _no_manifest(tmp_path, demo):
    (tmp_path / "empty").mkdir()
    return ["--data", str(tmp_path / "empty")]


def _corrupt_manifest(tmp_path, demo):
    data = copy_dataset(demo, tmp_path / "data")
    (data / "manifest.json").write_text('{"format_version": 1, "splits": {')
    return ["--data", str(data)]


def _flip_a_byte(tmp_path, demo, split: str):
    data = copy_dataset(demo, tmp_path / "data")
    shard = next(data.glob(f"{split}-*.tfrecord"))
    content = bytearray(shard.read_bytes())
    content[len(content) // 2] ^= 0xFF
    shard.write_bytes(bytes(content))
    return ["--data", str(data)]


def _flipped_train_byte(tmp_path, demo):
    return _flip_a_byte(tmp_path, demo, "train")


def _flipped_test_byte(tmp_path, demo):
    # Used only after the last epoch, so it must be checked before the first.
    return _flip_a_byte(tmp_path, demo, "test")


def _edit_manifest(tmp_path, demo, drop: tuple[str, ...]):
    data = copy_dataset(demo, tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    for split in drop:
        del manifest["splits"][split]
    write_json(data / "manifest.json", manifest)
    return ["--data", str(data)]


def _no_train_split(tmp_path, demo):
    return _edit_manifest(tmp_path, demo, ("train",))


def _no_validation_split(tmp_path, demo):
    return _edit_manifest(tmp_path, demo, ("val", "test"))


def _empty_train_split(tmp_path, demo):
    data = copy_dataset(demo, tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"].update(pairs=0, images=0, ids=0)
    write_json(data / "manifest.json", manifest)
    return ["--data", str(data)]


def _unreachable_hub_handle(tmp_path, demo):
    return ["--data", str(demo), "--text", "bert", "--text-encoder", "https://tfhub.dev/nonexistent/x/1"]


def _batch_larger_than_split(tmp_path, demo):
    return ["--data", str(demo), "--batch-size", "500"]


def _missing_config(tmp_path, demo):
    return ["--data", str(demo), "--config", str(tmp_path / "absent.json")]


def _invalid_json_config(tmp_path, demo):
    (tmp_path / "bad.json").write_text("{epochs: 3")
    return ["--data", str(demo), "--config", str(tmp_path / "bad.json")]


def _unknown_field_config(tmp_path, demo):
    return ["--data", str(demo), "--config", str(write_json(tmp_path / "typo.json", {"epoch": 3}))]


def _unknown_nested_field_config(tmp_path, demo):
    return ["--data", str(demo), "--config", str(write_json(tmp_path / "typo.json", {"model": {"visoin": {}}}))]


BAD_INPUTS = {
    "missing data dir": (_missing_dir, "does not exist"),
    "dir without manifest": (_no_manifest, "manifest.json not found"),
    "corrupt manifest": (_corrupt_manifest, "not valid JSON"),
    "train shard sha256 mismatch": (_flipped_train_byte, "sha256"),
    "test shard sha256 mismatch": (_flipped_test_byte, "sha256"),
    "no train split": (_no_train_split, "'train'"),
    "empty train split": (_empty_train_split, "'train'"),
    "no validation split": (_no_validation_split, "no non-empty split"),
    "unreachable hub handle": (_unreachable_hub_handle, "tfhub.dev"),
    "batch larger than split": (_batch_larger_than_split, "--batch-size 500"),
    "missing config file": (_missing_config, "does not exist"),
    "invalid config json": (_invalid_json_config, "not valid JSON"),
    "unknown config field": (_unknown_field_config, "unknown field(s) epoch"),
    "unknown nested config field": (_unknown_nested_field_config, "unknown field(s) visoin"),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_and_writes_nothing(case, cached_run, demo_data, tmp_path, capsys):
    make_flags, expected = BAD_INPUTS[case]
    flags = make_flags(tmp_path, demo_data) + ["--epochs", "1", "--quiet"]
    runs = cached_run.workdir / "runs"
    before, entries = file_stamps(runs), sorted(os.listdir(runs))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(cached_run.workdir)
        patch.setenv("DUALENC_CACHE", str(cached_run.cache_dir))
        patch.setenv("TFHUB_CACHE_DIR", str(tmp_path / "hub-cache"))
        capsys.readouterr()
        started = time.monotonic()
        exit_code = train.main(flags)
        elapsed = time.monotonic() - started
    captured = capsys.readouterr()
    assert exit_code == 2, captured
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert "Traceback" not in captured.err
    assert expected in captured.err
    assert captured.out == ""
    assert elapsed < 60
    # The finished run, runs/latest and the runs folder are exactly as before.
    assert file_stamps(runs) == before
    assert sorted(os.listdir(runs)) == entries


def test_a_search_on_the_trained_model_writes_nothing_to_stderr(cached_run, demo_data):
    # TensorFlow logs some run-time notices at its error level (oneDNN falling back to Eigen for
    # int64 ops on CPUs without AVX-512, while the BiLSTM's tokens flow), which would land among
    # the user's results.
    env = {key: value for key, value in os.environ.items() if key not in ("TF_CPP_MIN_LOG_LEVEL", "DUALENC_TF_LOG")}
    env["PYTHONPATH"] = str(Path(train.__file__).resolve().parent)
    completed = subprocess.run(
        [sys.executable, str(Path(train.__file__).resolve().parent / "search.py"), "a woman in a red coat",
         "--model", str(cached_run.run_dir), "--data", str(demo_data), "-k", "2"],
        cwd=cached_run.workdir, env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stderr == ""
    assert completed.stdout.startswith('results for "a woman in a red coat":')
