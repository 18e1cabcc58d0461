"""train.py on bad input, before any epoch: one `error:` line and exit 2, no TensorFlow imported
for mistakes that need none, no stray run directory, runs/latest left where it was, and one
process at a time in a run directory.

Every case here stops before training, so they take seconds; the runs they guard are the
finished run each working directory starts with and the directories a failed start must not
leave behind.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import train
from dualenc.core import config as configs
from dualenc.core.locking import LOCK_NAME
from dualenc.core.runs import claim_run_dir
from tests.support.read_only import read_only
from tests.support.training import REPO_ROOT, TRAIN_SCRIPT, TINY_FLAGS, copy_dataset, file_stamps, write_json

FINISHED_RUN = "20240101-000000"


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The current directory, its runs/ holding a finished run that runs/latest points at."""
    work = tmp_path / "work"
    finished = work / "runs" / FINISHED_RUN
    finished.mkdir(parents=True)
    configs.save(configs.TrainConfig(), finished / "config.json")
    write_json(finished / "metrics.json", {"split": "test"})
    (work / "runs" / "latest").symlink_to(FINISHED_RUN)
    monkeypatch.chdir(work)
    monkeypatch.setenv("DUALENC_CACHE", str(tmp_path / "cache"))
    return work


def _config_file(tmp_path: Path, content: object) -> list[str]:
    return ["--config", str(write_json(tmp_path / "config.json", content))]


def _raw_file(tmp_path: Path, name: str, content: bytes) -> Path:
    (tmp_path / name).write_bytes(content)
    return tmp_path / name


def _split_not_an_object(tmp_path: Path, demo: Path) -> list[str]:
    data = copy_dataset(demo, tmp_path / "data")
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["test"] = ["test-00000-of-00001.tfrecord"]
    write_json(data / "manifest.json", manifest)
    return ["--data", str(data)]


# case: (flags given tmp_path and the packed demo, words the error line must hold)
BAD_STARTS = {
    "negative seed": (lambda tmp, demo: ["--seed", "-1"], "seed must be an integer in [0, 4294967295], got -1"),
    "seed a string": (lambda tmp, demo: _config_file(tmp, {"seed": "abc"}), 'seed must be an integer, got "abc"'),
    "data a number": (lambda tmp, demo: _config_file(tmp, {"data": 5}), "data must be a string or null, got 5"),
    "fractional batch size": (
        lambda tmp, demo: _config_file(tmp, {"batch_size": 2.5}), "batch_size must be an integer, got 2.5"
    ),
    "image size not numbers": (
        lambda tmp, demo: _config_file(tmp, {"model": {"vision": {"image_size": ["a", 64]}}}),
        'model.vision.image_size must be a list of 2 integers or null, got ["a", 64]',
    ),
    "epochs a string": (lambda tmp, demo: _config_file(tmp, {"epochs": "3"}), 'epochs must be an integer, got "3"'),
    "bool for a number": (
        lambda tmp, demo: _config_file(tmp, {"learning_rate": True}), "learning_rate must be a number, got true"
    ),
    "config not UTF-8": (
        lambda tmp, demo: ["--config", str(_raw_file(tmp, "latin1.json", b'{"data": "caf\xe9"}'))],
        "is not UTF-8 text (byte 0xe9 at offset 13)",
    ),
    "config a directory": (lambda tmp, demo: ["--config", str(tmp)], "is a directory; pass a JSON file"),
    "imagenet for the small CNN": (
        lambda tmp, demo: ["--vision-weights", "imagenet"], "'small_cnn' has no ImageNet weights"
    ),
    "missing weights file": (
        lambda tmp, demo: ["--vision-weights", str(tmp / "absent.weights.h5")], "absent.weights.h5 does not exist"
    ),
    "garbage weights file": (
        lambda tmp, demo: ["--vision-weights", str(_raw_file(tmp, "junk.weights.h5", b"not weights at all"))],
        "is not an HDF5 weights file",
    ),
    "manifest split not an object": (_split_not_an_object, "splits.test is not an object"),
}


@pytest.mark.parametrize("case", list(BAD_STARTS))
def test_bad_start_is_one_line_and_leaves_runs_as_they_were(case, workdir, demo_data, tmp_path, capsys):
    make_flags, expected = BAD_STARTS[case]
    before = file_stamps(workdir / "runs")
    flags = ["--data", str(demo_data), *make_flags(tmp_path, demo_data), "--epochs", "1", *TINY_FLAGS]
    capsys.readouterr()
    exit_code = train.main(flags)
    captured = capsys.readouterr()
    assert exit_code == 2, captured
    assert captured.err.startswith("error: ") and captured.err.count("\n") == 1, captured.err
    assert expected in captured.err
    assert captured.out == ""
    assert file_stamps(workdir / "runs") == before
    assert os.readlink(workdir / "runs" / "latest") == FINISHED_RUN


def _plain_env() -> dict[str, str]:
    """The user's environment: TensorFlow's log level not lowered, the repository importable."""
    env = {key: value for key, value in os.environ.items() if key not in ("TF_CPP_MIN_LOG_LEVEL", "DUALENC_TF_LOG")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    return env


def test_config_error_is_the_only_stderr_line_and_tensorflow_is_not_imported(demo_data, tmp_path):
    config = write_json(tmp_path / "config.json", {"epochs": "3"})
    script = (
        "import sys, train\n"
        "code = train.main(sys.argv[1:])\n"
        "print('tensorflow imported' if 'tensorflow' in sys.modules else 'tensorflow not imported')\n"
        "sys.exit(code)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script, "--data", str(demo_data), "--config", str(config)],
        cwd=tmp_path, env=_plain_env(), capture_output=True, text=True, timeout=120, check=False,
    )
    assert completed.returncode == 2
    assert completed.stderr == f'error: {config}: epochs must be an integer, got "3"\n'
    assert completed.stdout == "tensorflow not imported\n"
    assert not (tmp_path / "runs").exists()


def _valid_hdf5_of_the_wrong_model(path: Path) -> Path:
    import h5py

    with h5py.File(path, "w") as weights:
        weights.create_dataset("not_a_layer", data=[1.0, 2.0])
    return path


@pytest.mark.filterwarnings("ignore:Skipping nested container")
@pytest.mark.parametrize("out", [None, "new", "empty"])
def test_start_failing_after_the_vocabulary_leaves_no_directory_behind(out, workdir, demo_data, tmp_path, capsys):
    # An HDF5 file passes the early check; loading it into the backbone fails only once the
    # BiLSTM's vocabulary has been learned into the run directory.
    weights = _valid_hdf5_of_the_wrong_model(tmp_path / "other.weights.h5")
    flags = ["--data", str(demo_data), "--vision-weights", str(weights), "--epochs", "1", *TINY_FLAGS]
    if out == "empty":
        (tmp_path / "empty").mkdir()
    if out is not None:
        flags += ["--out", str(tmp_path / out)]
    before = file_stamps(workdir / "runs")
    capsys.readouterr()
    exit_code = train.main(flags)
    err = capsys.readouterr().err
    assert exit_code == 2 and err.count("\n") == 1 and "cannot load vision weights" in err, err
    assert file_stamps(workdir / "runs") == before
    assert sorted(os.listdir(workdir / "runs")) == [FINISHED_RUN, "latest"]
    assert not (tmp_path / "new").exists()
    if out == "empty":
        assert list((tmp_path / "empty").iterdir()) == []


HOLD_LOCK = """
import sys, time
from pathlib import Path
from dualenc.core.runs import claim_run_dir
with claim_run_dir(Path(sys.argv[1])):
    print("held", flush=True)
    time.sleep(300)
"""


def _lock_holder(run_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK, str(run_dir)], env=_plain_env(), stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline() == "held\n"
    return holder


def test_second_training_into_a_held_directory_names_the_holder(workdir, demo_data, tmp_path, capsys):
    out = tmp_path / "shared-run"
    holder = _lock_holder(out)
    try:
        capsys.readouterr()
        exit_code = train.main(["--data", str(demo_data), "--out", str(out), "--epochs", "1", *TINY_FLAGS])
        err = capsys.readouterr().err
        # Nothing but the holder's lock file: no config, no log, no vocabulary from the refused run.
        assert sorted(os.listdir(out)) == [LOCK_NAME]
    finally:
        holder.kill()
        holder.wait()
    assert exit_code == 2 and err.count("\n") == 1, err
    assert err == (f"error: {out} is in use by another training process (process {holder.pid} on "
                   f"{socket.gethostname()}); wait for it to finish or choose another directory\n")


def test_lock_of_a_dead_process_does_not_block(tmp_path):
    run_dir = tmp_path / "run"
    holder = _lock_holder(run_dir)
    holder.kill()
    holder.wait()
    assert (run_dir / LOCK_NAME).read_text().split()[0] == str(holder.pid)
    with claim_run_dir(run_dir) as claim:
        assert claim.fresh
        assert (run_dir / LOCK_NAME).read_text().split()[0] == str(os.getpid())
    assert list(run_dir.iterdir()) == []


@pytest.mark.parametrize("target", ["--out", "runs folder"])
def test_read_only_destination_is_one_line_before_tensorflow(target, demo_data, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    flags = ["--data", str(demo_data), "--epochs", "1", *TINY_FLAGS]
    flags += ["--out", str(locked / "run")] if target == "--out" else []
    with read_only(locked) as prefix:
        completed = subprocess.run(
            [*prefix, sys.executable, str(TRAIN_SCRIPT), *flags],
            cwd=locked, env=_plain_env(), capture_output=True, text=True, timeout=120, check=False,
        )
    assert completed.returncode == 2, completed.stderr[-2000:]
    assert completed.stderr.count("\n") == 1 and completed.stderr.startswith("error: cannot write "), completed.stderr
    assert "is read-only" in completed.stderr and target in completed.stderr
    assert list(locked.iterdir()) == []
