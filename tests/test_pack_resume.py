"""Interrupted packing resumes to exactly what a clean run writes; leftovers never count."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.cuhk_pedes import make_cuhk_pedes, pack
from tests.support.interrupt import Interrupted, interrupt_after_shards
from tfrecords_tools import writer


def _contents(out_dir: Path) -> dict[str, object]:
    """Every file in `out_dir` (hidden ones too), the manifest without its timestamp."""
    contents = {}
    for path in sorted(out_dir.iterdir()):
        if path.name == "manifest.json":
            manifest = json.loads(path.read_text())
            del manifest["created"]
            contents[path.name] = manifest
        else:
            contents[path.name] = path.read_bytes()
    return contents


@pytest.fixture(scope="module")
def clean(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    make_cuhk_pedes(root)
    assert pack(root, root / "clean", "--shard-size", "2", "--workers", "1") == 0
    return root, _contents(root / "clean")


@pytest.mark.parametrize("closed_before_crash", [1, 4])
def test_resume_after_a_crash_equals_a_clean_run(clean, monkeypatch, closed_before_crash):
    root, expected = clean
    out = root / f"crash{closed_before_crash}"
    with monkeypatch.context() as patch:
        interrupt_after_shards(patch, closed_before_crash)
        with pytest.raises(Interrupted):
            pack(root, out, "--shard-size", "2", "--workers", "1")
    assert not (out / "manifest.json").exists()
    assert (out / writer.JOURNAL_NAME).exists()
    assert pack(root, out, "--shard-size", "2", "--workers", "2") == 0
    assert _contents(out) == expected


def test_stale_partial_files_and_corrupt_shards_are_redone(clean, monkeypatch):
    root, expected = clean
    out = root / "stale"
    with monkeypatch.context() as patch:
        interrupt_after_shards(patch, 2)
        with pytest.raises(Interrupted):
            pack(root, out, "--shard-size", "2", "--workers", "1")
    done = sorted(out.glob(".*.done"))
    assert len(done) == 2
    done[1].write_bytes(b"garbage")  # a journalled shard whose bytes no longer match
    (out / ".train-00002.tfrecord.partial").write_bytes(b"half a shard")
    (out / "train-00009-of-00010.tfrecord").write_bytes(b"left from an older run")
    assert pack(root, out, "--shard-size", "2", "--workers", "1") == 0
    assert _contents(out) == expected


def test_unfinished_run_over_other_input_is_refused(clean, monkeypatch, capsys):
    root, _ = clean
    out = root / "other"
    with monkeypatch.context() as patch:
        interrupt_after_shards(patch, 1)
        with pytest.raises(Interrupted):
            pack(root, out, "--shard-size", "2", "--workers", "1")
    assert pack(root, out, "--shard-size", "3", "--workers", "1") == 2
    assert "unfinished run" in capsys.readouterr().err


def test_tfrecords_without_manifest_are_not_overwritten_silently(clean, capsys):
    root, _ = clean
    out = root / "foreign"
    out.mkdir()
    (out / "mine-00000-of-00001.tfrecord").write_bytes(b"someone else's")
    assert pack(root, out, "--workers", "1") == 2
    assert "without a manifest.json" in capsys.readouterr().err
    assert (out / "mine-00000-of-00001.tfrecord").exists()
