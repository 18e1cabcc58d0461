"""dualenc.core.files: atomic file and directory writes keep the old content on failure, and sync
the new content (and the rename) before and after renaming it into place."""

from __future__ import annotations

import json
import os
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from dualenc.core import files  # noqa: E402


class Crash(Exception):
    """Stands in for a full disk or a kill in the middle of a write."""


@pytest.fixture
def journal(monkeypatch):
    """Records ("fsync", path), ("replace", source, target) and ("exchange", first, second) in the
    order they happen."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(descriptor):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{descriptor}")))
        real_fsync(descriptor)

    def replace(source, target):
        events.append(("replace", str(source), str(target)))
        real_replace(source, target)

    def exchange(first, second):
        events.append(("exchange", str(first), str(second)))
        return real_exchange(first, second)

    real_exchange = files.exchange
    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(files, "exchange", exchange)
    return events


def leftovers(directory) -> list[str]:
    return sorted(path.name for path in directory.iterdir() if path.name.startswith("."))


def test_json_is_synced_renamed_then_the_directory_synced(tmp_path, journal):
    target = tmp_path / "metrics.json"
    files.write_json_atomic(target, {"b": 1, "a": "é"}, sort_keys=True)
    assert target.read_text(encoding="utf-8") == '{\n  "a": "é",\n  "b": 1\n}\n'
    temporary = journal[0][1]  # a unique hidden sibling (see test_files_hostile)
    assert os.path.dirname(temporary) == str(tmp_path) and os.path.basename(temporary).startswith(".metrics.json.")
    assert journal == [("fsync", temporary), ("replace", temporary, str(target)), ("fsync", str(tmp_path))]
    assert leftovers(tmp_path) == []


def test_failure_mid_write_leaves_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "manifest.json"
    target.write_text('{"old": true}\n')

    def write_half_then_crash(self, data):
        with open(self, "wb") as stream:
            stream.write(data[: len(data) // 2])
        raise Crash

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_half_then_crash)
    with pytest.raises(Crash):
        files.write_json_atomic(target, {"new": list(range(100))})
    assert json.loads(target.read_text()) == {"old": True}
    assert leftovers(tmp_path) == []


def test_atomic_file_serves_writers_that_take_a_path(tmp_path):
    target = tmp_path / "log.csv"
    target.write_text("old\n")
    with pytest.raises(Crash):
        with files.atomic_file(target) as temporary:
            temporary.write_text("epoch\n0\n")
            raise Crash
    assert target.read_text() == "old\n" and leftovers(tmp_path) == []
    with files.atomic_file(target) as temporary:
        with open(temporary, "w", newline="") as stream:
            stream.write("epoch\n0\n")
    assert target.read_text() == "epoch\n0\n" and leftovers(tmp_path) == []


def test_figure_failure_leaves_the_old_chart_and_closes_the_figure(tmp_path, monkeypatch):
    target = tmp_path / "chart.png"
    target.write_bytes(b"old chart")
    figure = plt.figure()

    def crash(*args, **kwargs):
        raise Crash

    monkeypatch.setattr(figure, "savefig", crash)
    with pytest.raises(Crash):
        files.save_figure_atomic(figure, target)
    assert target.read_bytes() == b"old chart" and leftovers(tmp_path) == []
    assert not plt.fignum_exists(figure.number)


def test_directory_is_built_aside_synced_and_swapped_in(tmp_path, journal):
    target = tmp_path / "index"
    target.mkdir()
    (target / "stale.npy").write_bytes(b"old")
    with files.atomic_directory(target) as building:
        assert building.parent == tmp_path and building.name.startswith(".index.") and building.is_dir()
        (building / "sub").mkdir()
        (building / "meta.json").write_text("{}")
        (building / "sub" / "embeddings.npy").write_bytes(b"new")
        assert (target / "stale.npy").read_bytes() == b"old"  # untouched until the block ends
    assert sorted(str(path.relative_to(target)) for path in target.rglob("*")) == ["meta.json", "sub", "sub/embeddings.npy"]
    assert leftovers(tmp_path) == []
    synced = [event[1] for event in journal if event[0] == "fsync"]
    for name in ("meta.json", "sub/embeddings.npy", "sub", ""):
        assert os.path.normpath(str(building / name)) in synced
    swap = journal.index(("exchange", str(building), str(target)))
    assert all(journal.index(("fsync", str(building / name))) < swap for name in ("meta.json", "sub/embeddings.npy"))
    assert ("fsync", str(tmp_path)) in journal[swap:]  # the rename itself is made durable


def test_directory_failure_leaves_the_old_one(tmp_path):
    target = tmp_path / "vision_encoder"
    target.mkdir()
    (target / "saved_model.pb").write_bytes(b"old model")
    with pytest.raises(Crash):
        with files.atomic_directory(target) as building:
            (building / "saved_model.pb").write_bytes(b"half a mod")
            raise Crash
    assert (target / "saved_model.pb").read_bytes() == b"old model"
    assert leftovers(tmp_path) == []


def test_new_directory_is_created_with_its_parents(tmp_path):
    target = tmp_path / "features" / "abc"
    with files.atomic_directory(target) as building:
        (building / "keys.json").write_text("[]")
    assert (target / "keys.json").read_text() == "[]"
    assert oct(target.stat().st_mode & 0o777) == oct(files.DIRECTORY_MODE)


def test_move_into_place_syncs_a_file_written_elsewhere(tmp_path, journal):
    partial = tmp_path / ".train-00000.tfrecord.partial"
    partial.write_bytes(b"records")
    files.move_into_place(partial, tmp_path / "train-00000-of-00001.tfrecord")
    assert journal[0] == ("fsync", str(partial))
    assert journal[1][0] == "replace" and journal[2] == ("fsync", str(tmp_path))
    assert (tmp_path / "train-00000-of-00001.tfrecord").read_bytes() == b"records"
