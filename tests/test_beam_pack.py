"""Beam packing (DirectRunner, 2 worker processes) against the local packer on the same input."""

from __future__ import annotations

import csv
import functools
import hashlib
import json
from pathlib import Path

import pytest

from tests.support.beam import DIRECT_OPTIONS, direct_options, fail_once_writer
from tests.support.images import write_image
from tests.support.packed import read_records
from tfrecords_tools import cuhk_pedes, folder
from tfrecords_tools.__main__ import main
from tfrecords_tools.beam_pack import pack_with_beam, shard_starts
from tfrecords_tools.writer import pack

pytestmark = pytest.mark.slow  # each pipeline starts two worker processes with TensorFlow (~15 s)

BROKEN_FOLDER = [  # image, kind written (None: the file is missing), captions
    ("a/one.jpg", "jpeg", ["one", "the first"]),
    ("a/two.png", "truncated", ["two"]),
    ("b/three.png", "png", ["three", "3", "iii"]),
    ("b/four.jpg", "text", ["four"]),
    ("c/five.bmp", "bmp", ["five"]),
    ("c/six.jpg", None, ["six"]),
    ("c/seven.jpg", "cmyk_jpeg", ["seven", "7"]),
    ("d/eight.png", "palette_png", ["eight"]),
]


def packed_state(out_dir: Path) -> dict:
    """Everything a pack produced: file names, manifest and every record.

    Left out: the manifest's time, and its shard checksums once checked against the files (an
    Example's feature map is serialised in a hash order that differs between processes, so equal
    records need not give equal bytes).
    """
    manifest = json.loads((out_dir / "manifest.json").read_text())
    manifest.pop("created")
    for summary in manifest["splits"].values():
        for name, digest in summary.pop("sha256").items():
            assert hashlib.sha256((out_dir / name).read_bytes()).hexdigest() == digest
    records = {split: read_records(out_dir, split) for split in manifest["splits"]}
    records = {split: [{key: (value.tolist() if hasattr(value, "tolist") else value) for key, value in record.items()}
                       for record in split_records] for split, split_records in records.items()}
    return {"files": sorted(path.name for path in out_dir.iterdir()), "manifest": manifest, "records": records}


@pytest.fixture(scope="module")
def broken_folder(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("broken")
    with open(root / "captions.csv", "w", newline="") as stream:
        table = csv.writer(stream)
        table.writerow(["image", "caption", "split"])
        for position, (name, kind, captions) in enumerate(BROKEN_FOLDER):
            if kind is not None:
                write_image(root / "images" / name, kind, seed=position)
            for caption in captions:
                table.writerow([name, caption, "valid" if name.startswith("d/") else "train"])
    return root / "captions.csv", root / "images"


def test_shard_starts_close_a_shard_before_an_image_that_would_overflow_it():
    assert shard_starts([(0, 2), (1, 1), (2, 3), (4, 1), (5, 5), (6, 1)], shard_size=3) == [0, 2, 4, 5, 6]
    assert shard_starts([(3, 1), (0, 1)], shard_size=2) == [0]
    assert shard_starts([], shard_size=2) == []


def test_beam_packs_the_demo_exactly_as_the_local_packer(demo_data, tmp_path):
    raw = demo_data.parent / "demo-raw"
    splits, skipped = cuhk_pedes.load(raw / "reid_raw.json", raw / "imgs")
    source = {"format": "cuhk-pedes", "annotations": str(raw / "reid_raw.json"), "images": str(raw / "imgs")}
    pack(splits, tmp_path / "local", source, skipped=skipped, shard_size=40, workers=1)
    pack_with_beam(splits, tmp_path / "beam", source, direct_options(), skipped=skipped, shard_size=40)
    local, beam = packed_state(tmp_path / "local"), packed_state(tmp_path / "beam")
    assert len(local["manifest"]["splits"]["train"]["shards"]) > 1
    assert beam == local


def test_beam_cli_skips_broken_images_as_the_local_packer_does(broken_folder, tmp_path, capsys):
    captions, images = broken_folder
    common = ["folder", "--captions", str(captions), "--images", str(images), "--shard-size", "3"]
    assert main([*common, "--out", str(tmp_path / "local"), "--workers", "1"]) == 0
    assert main([*common, "--out", str(tmp_path / "beam"), "--runner", "DirectRunner", "--", *DIRECT_OPTIONS]) == 0
    local, beam = packed_state(tmp_path / "local"), packed_state(tmp_path / "beam")
    reasons = {Path(skip["path"]).name: skip["reason"] for skip in beam["manifest"]["skipped"]}
    assert sorted(reasons) == ["four.jpg", "six.jpg", "two.png"]
    assert "not found" in reasons["six.jpg"] and "not an image" in reasons["four.jpg"]
    assert beam == local
    assert "skipped 3 image(s)" in capsys.readouterr().err


def test_a_bundle_failing_once_then_retried_leaves_no_half_shard_or_duplicate(broken_folder, tmp_path):
    captions, images = broken_folder
    splits, skipped = folder.load(captions, images)
    source = {"format": "folder", "annotations": str(captions), "images": str(images)}
    pack(splits, tmp_path / "local", source, skipped=skipped, shard_size=3, workers=1)
    writer = functools.partial(fail_once_writer, str(tmp_path / "failed-once"))
    with pytest.raises(Exception, match="bundle forced to fail once"):
        pack_with_beam(splits, tmp_path / "beam", source, direct_options(), skipped=skipped, shard_size=3,
                       shard_writer=writer)
    assert not (tmp_path / "beam" / "manifest.json").exists()
    # The retry: the same command again, in the same directory, without --overwrite.
    pack_with_beam(splits, tmp_path / "beam", source, direct_options(), skipped=skipped, shard_size=3,
                   shard_writer=writer)
    assert packed_state(tmp_path / "beam") == packed_state(tmp_path / "local")


def test_bad_runner_options_and_output_are_one_line_errors(broken_folder, tmp_path, capsys):
    captions, images = broken_folder
    common = ["folder", "--captions", str(captions), "--images", str(images)]
    cases = [
        ([*common, "--out", str(tmp_path / "a"), "--runner", "NoSuchRunner"], "unknown runner"),
        ([*common, "--out", str(tmp_path / "b"), "--runner", "DirectRunner", "--", "--direct_num_wrkers=2"],
         "--direct_num_wrkers"),
        ([*common, "--out", str(tmp_path / "c"), "--runner", "DirectRunner", "--", "--direct_num_workers=two"],
         "invalid int value"),
        ([*common, "--out", str(tmp_path / "d"), "--", "--direct_num_workers=2"], "need --runner"),
        ([*common, "--out", "/proc/no-such-dir/out", "--runner", "DirectRunner"], "not writable"),
    ]
    for argv, message in cases:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
