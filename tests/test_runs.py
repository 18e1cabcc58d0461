"""Run directories: which directory a command trains into, when it resumes, what it refuses."""

from __future__ import annotations

import dataclasses
import datetime
import os
import subprocess
import sys

import pytest

from dualenc.core import config as configs
from dualenc.core import runs
from dualenc.core.errors import DualEncError
from dualenc.core.files import HOST_TAG
from dualenc.core.runs import RunPaths, choose_run_dir, point_latest

FIXED_NOW = datetime.datetime(2024, 5, 6, 7, 8, 9)


def _config(**changes) -> configs.TrainConfig:
    return dataclasses.replace(configs.TrainConfig(data="/data/demo", epochs=3), **changes)


def _resolved(config: configs.TrainConfig):
    """Like train.py's resolver: the saved config names the run's own vocabulary file."""

    def resolve(paths: RunPaths) -> configs.TrainConfig:
        text = dataclasses.replace(config.model.text, vocabulary=str(paths.vocabulary))
        return dataclasses.replace(config, model=dataclasses.replace(config.model, text=text))

    return resolve


def _make_run(root, config: configs.TrainConfig, finished: bool = False) -> RunPaths:
    paths = RunPaths(root.resolve())
    paths.root.mkdir(parents=True)
    configs.save(_resolved(config)(paths), paths.config)
    if finished:
        paths.metrics.write_text("{}\n")
    return paths


@pytest.fixture
def fixed_clock(monkeypatch):
    class FixedDatetime(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return FIXED_NOW

    monkeypatch.setattr(runs.datetime, "datetime", FixedDatetime)
    return FIXED_NOW.strftime("%Y%m%d-%H%M%S")


# --- with --out --------------------------------------------------------------------------


def test_out_that_does_not_exist_starts_a_new_run_without_creating_it(tmp_path):
    paths, resume = choose_run_dir(tmp_path / "new", tmp_path / "runs", _resolved(_config()))
    assert paths.root == (tmp_path / "new").resolve() and resume is False
    assert not paths.root.exists()


def test_empty_out_starts_a_new_run(tmp_path):
    (tmp_path / "empty").mkdir()
    paths, resume = choose_run_dir(tmp_path / "empty", tmp_path / "runs", _resolved(_config()))
    assert paths.root == (tmp_path / "empty").resolve() and resume is False


def test_unfinished_run_with_the_same_config_resumes(tmp_path):
    existing = _make_run(tmp_path / "run", _config())
    paths, resume = choose_run_dir(tmp_path / "run", tmp_path / "runs", _resolved(_config()))
    assert paths == existing and resume is True


def test_finished_run_is_refused(tmp_path):
    _make_run(tmp_path / "run", _config(), finished=True)
    with pytest.raises(DualEncError, match="finished run"):
        choose_run_dir(tmp_path / "run", tmp_path / "runs", _resolved(_config()))


def test_unfinished_run_with_another_config_is_refused(tmp_path):
    _make_run(tmp_path / "run", _config())
    with pytest.raises(DualEncError, match="different configuration"):
        choose_run_dir(tmp_path / "run", tmp_path / "runs", _resolved(_config(epochs=4)))


def test_foreign_non_empty_directory_is_refused(tmp_path):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"\xff\xd8")
    with pytest.raises(DualEncError, match="holds no dualenc run"):
        choose_run_dir(tmp_path / "photos", tmp_path / "runs", _resolved(_config()))


def test_out_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DualEncError, match="is a file"):
        choose_run_dir(tmp_path / "notes.txt", tmp_path / "runs", _resolved(_config()))


def test_errors_are_one_line(tmp_path):
    _make_run(tmp_path / "run", _config())
    with pytest.raises(DualEncError) as raised:
        choose_run_dir(tmp_path / "run", tmp_path / "runs", _resolved(_config(seed=7)))
    assert "\n" not in str(raised.value)


# --- without --out: runs/latest ------------------------------------------------------------


def test_first_run_gets_a_timestamped_directory(tmp_path, fixed_clock):
    paths, resume = choose_run_dir(None, tmp_path / "runs", _resolved(_config()))
    assert paths.root == (tmp_path / "runs" / fixed_clock).resolve() and resume is False


def test_timestamp_taken_gets_a_suffix(tmp_path, fixed_clock):
    (tmp_path / "runs" / fixed_clock).mkdir(parents=True)
    (tmp_path / "runs" / f"{fixed_clock}-2").mkdir()
    paths, resume = choose_run_dir(None, tmp_path / "runs", _resolved(_config()))
    assert paths.root.name == f"{fixed_clock}-3" and resume is False


def test_unfinished_latest_with_the_same_config_resumes(tmp_path, fixed_clock):
    existing = _make_run(tmp_path / "runs" / "20240101-000000", _config())
    point_latest(tmp_path / "runs", existing)
    paths, resume = choose_run_dir(None, tmp_path / "runs", _resolved(_config()))
    assert paths == existing and resume is True


@pytest.mark.parametrize("finished, config", [(True, _config()), (False, _config(batch_size=32))])
def test_finished_or_different_latest_starts_a_new_run(tmp_path, fixed_clock, finished, config):
    existing = _make_run(tmp_path / "runs" / "20240101-000000", _config(), finished=finished)
    point_latest(tmp_path / "runs", existing)
    before = sorted(path.name for path in existing.root.iterdir())
    paths, resume = choose_run_dir(None, tmp_path / "runs", _resolved(config))
    assert paths.root == (tmp_path / "runs" / fixed_clock).resolve() and resume is False
    assert sorted(path.name for path in existing.root.iterdir()) == before


def test_dangling_latest_starts_a_new_run(tmp_path, fixed_clock):
    (tmp_path / "runs").mkdir()
    os.symlink("gone", tmp_path / "runs" / "latest")
    paths, resume = choose_run_dir(None, tmp_path / "runs", _resolved(_config()))
    assert paths.root.name == fixed_clock and resume is False


# --- point_latest -----------------------------------------------------------------------------


def test_point_latest_makes_a_relative_link_and_replaces_an_old_one(tmp_path):
    runs_root = tmp_path / "runs"
    first = _make_run(runs_root / "a", _config())
    second = _make_run(runs_root / "b", _config())
    point_latest(runs_root, first)
    assert os.readlink(runs_root / "latest") == "a"
    # A staging link left by an interrupted call does not get in the way.
    killed = subprocess.Popen([sys.executable, "-c", "pass"])
    killed.wait()
    os.symlink("a", runs_root / f".latest.{killed.pid}-{HOST_TAG}-0123abcd.tmp")
    point_latest(runs_root, second)
    assert os.readlink(runs_root / "latest") == "b"
    assert (runs_root / "latest").resolve() == second.root
    assert sorted(os.listdir(runs_root)) == ["a", "b", "latest"]


def test_relative_link_survives_moving_the_runs_folder(tmp_path):
    run = _make_run(tmp_path / "runs" / "a", _config())
    point_latest(tmp_path / "runs", run)
    (tmp_path / "runs").rename(tmp_path / "moved")
    assert (tmp_path / "moved" / "latest" / "config.json").is_file()


def test_run_paths_lay_out_the_run_directory(tmp_path):
    paths = RunPaths(tmp_path)
    assert paths.config == tmp_path / "config.json" and paths.metrics == tmp_path / "metrics.json"
    assert paths.log_csv.parent == tmp_path and paths.best_weights.is_relative_to(tmp_path)
    assert not paths.finished and paths.saved_config() is None
    paths.metrics.write_text("{}")
    assert paths.finished
