"""Image paths in annotations stay inside --images, and only regular files of bounded size are read."""

from __future__ import annotations

import csv
import json
import os
import threading
from pathlib import Path

import pytest

from dualenc.core.errors import DualEncError
from dualenc.core.locking import directory_lock
from tests.support.images import write_image
from dualenc.data import images
from tfrecords_tools import image_files
from tfrecords_tools.__main__ import main


def _folder(root: Path, rows: list[str]) -> Path:
    """An image folder with `kept.png` and a caption table naming `rows` (and kept.png)."""
    write_image(root / "images" / "kept.png", "png", seed=0)
    table = root / "captions.csv"
    with open(table, "w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["image", "caption"])
        writer.writerows([[row, f"caption of {row}"] for row in ["kept.png", *rows]])
    return table


def _pack(root: Path, *flags: str) -> int:
    return main(["folder", "--captions", str(root / "captions.csv"), "--images", str(root / "images"),
                 "--out", str(root / "out"), "--workers", "1", *flags])


def _skips(root: Path) -> dict[str, str]:
    manifest = json.loads((root / "out" / "manifest.json").read_text())
    return {Path(skip["path"]).name: skip["reason"] for skip in manifest["skipped"]}


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "link-out.png"])
def test_a_path_outside_the_images_is_refused_in_one_line(tmp_path, capsys, name):
    write_image(tmp_path / "outside.png", "png", seed=1)
    _folder(tmp_path, [name])
    (tmp_path / "images" / "link-out.png").symlink_to(tmp_path / "outside.png")
    assert _pack(tmp_path) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {tmp_path / 'captions.csv'} line 3: image {name!r} lies outside --images")
    assert err.count("\n") == 1 and "--allow-outside-images" in err
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_outside_paths_are_read_when_allowed(tmp_path):
    write_image(tmp_path / "outside.png", "png", seed=1)
    _folder(tmp_path, ["../outside.png"])
    assert _pack(tmp_path, "--allow-outside-images") == 0
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["splits"]["train"]["images"] == 2


def test_devices_fifos_and_oversized_files_are_skipped_without_blocking(tmp_path):
    _folder(tmp_path, ["zero.png", "fifo.png", "big.png"])
    (tmp_path / "images" / "zero.png").symlink_to("/dev/zero")
    os.mkfifo(tmp_path / "images" / "fifo.png")
    write_image(tmp_path / "images" / "big.png", "png", seed=2)
    limit = (tmp_path / "images" / "big.png").stat().st_size - 1
    outcome = []
    packer = threading.Thread(daemon=True, target=lambda: outcome.append(
        _pack(tmp_path, "--allow-outside-images", "--max-image-bytes", str(limit))))
    packer.start()
    packer.join(timeout=120)
    assert outcome == [0]
    skips = _skips(tmp_path)
    assert skips["zero.png"] == skips["fifo.png"] == "not a regular file (a directory, device, FIFO or socket)"
    assert skips["big.png"] == f"{limit + 1:,} bytes, more than --max-image-bytes {limit:,}"


def test_read_image_bytes_stops_at_the_cap_for_a_file_that_grows(tmp_path, monkeypatch):
    path = tmp_path / "growing.png"
    path.write_bytes(b"x" * 10)
    monkeypatch.setattr(os, "fstat", lambda descriptor: os.stat(tmp_path / "small"))  # a size that lies
    (tmp_path / "small").write_bytes(b"")
    with pytest.raises(images.ImageProblem, match="more than --max-image-bytes 5 bytes"):
        images.read_image_bytes(str(path), 5)


def test_the_beam_packer_refuses_an_out_dir_a_local_packer_holds(tmp_path, capsys):
    pytest.importorskip("apache_beam")
    _folder(tmp_path, [])
    (tmp_path / "out").mkdir()
    with directory_lock(tmp_path / "out", "packer"):
        assert _pack(tmp_path, "--overwrite", "--runner", "DirectRunner") == 2
    err = capsys.readouterr().err
    assert err == (f"error: {tmp_path / 'out'} is in use by another packer (process {os.getpid()} on "
                   f"{os.uname().nodename}); wait for it to finish or choose another directory\n")


def test_image_directory_allows_symlinks_that_stay_inside(tmp_path):
    write_image(tmp_path / "images" / "real.png", "png", seed=0)
    (tmp_path / "images" / "alias.png").symlink_to("real.png")
    directory = image_files.ImageDirectory(tmp_path / "images")
    assert directory.path("alias.png", "row 1") == str(tmp_path / "images" / "alias.png")
    with pytest.raises(DualEncError, match="row 2: image 'sub/../../x.png' lies outside"):
        directory.path("sub/../../x.png", "row 2")
