"""tfrecords_tools.demo_cache: the packed demo is built once and then reused untouched."""

from __future__ import annotations

import json


from tfrecords_tools.__main__ import main
from dualenc.core.runs import cache_root
from tfrecords_tools.demo_cache import packed_demo


IDENTITIES = 10  # the generator's minimum: about 45 small images


def test_packed_demo_is_built_once_and_reused(tmp_path, capsys):
    packed = packed_demo(tmp_path, identities=IDENTITIES)
    assert packed == tmp_path / "demo-packed"
    manifest = json.loads((packed / "manifest.json").read_text())
    assert set(manifest["splits"]) == {"train", "val", "test"}
    assert manifest["skipped"] == []
    assert len(manifest["source"]["demo_marker_sha256"]) == 64
    reid_raw = json.loads((tmp_path / "demo-raw" / "reid_raw.json").read_text())
    assert sum(split["pairs"] for split in manifest["splits"].values()) == sum(
        len(entry["captions"]) for entry in reid_raw)
    shard_times = {path.name: path.stat().st_mtime_ns for path in packed.iterdir()}
    capsys.readouterr()
    assert packed_demo(tmp_path, identities=IDENTITIES) == packed
    assert "nothing to do" in capsys.readouterr().err
    assert {path.name: path.stat().st_mtime_ns for path in packed.iterdir()} == shard_times


def test_cache_root_prefers_argument_then_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("DUALENC_CACHE", str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"
    monkeypatch.delenv("DUALENC_CACHE")
    assert cache_root().name == "dualenc"


def test_make_demo_command_reports_what_it_made(tmp_path, capsys):
    assert main(["make-demo", "--out", str(tmp_path / "raw"), "--identities", str(IDENTITIES)]) == 0
    printed = capsys.readouterr().out
    assert "train:" in printed and str(tmp_path / "raw") in printed
