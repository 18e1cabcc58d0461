"""Packing CUHK-PEDES: every image kind, skipped files, labels, manifest, bad annotations, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from dualenc.data.images import decode_image
from dualenc.data.pipeline import sha256_of_file
from tests.support.cuhk_pedes import ENTRIES, make_cuhk_pedes, pack
from tests.support.packed import read_records
from tfrecords_tools.__main__ import main

# Mean absolute difference (levels of 255) between the training decode of an image stored at
# its preset's input size and of the full-size original: Lanczos against bilinear, and JPEG at
# 95. Measured on 110 demo renders: 3.0 on average, 4.1 at most.
STORED_MEAN_ERROR = 6.0


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    root = tmp_path_factory.mktemp("cuhk")
    pixels = make_cuhk_pedes(root)
    assert pack(root, root / "out") == 0
    return root, pixels, json.loads((root / "out" / "manifest.json").read_text())


def test_manifest_counts_equal_the_records_in_the_shards(packed):
    root, _, manifest = packed
    assert set(manifest["splits"]) == {"train", "test"}
    for split, summary in manifest["splits"].items():
        records = read_records(root / "out", split)
        assert summary["pairs"] == len(records)
        assert summary["images"] == len({record["image_id"] for record in records})
        assert summary["ids"] == len({record["label"] for record in records})
        for name in summary["shards"]:
            assert summary["sha256"][name] == sha256_of_file(root / "out" / name)
    assert manifest["splits"]["train"]["pairs"] == 10 and manifest["splits"]["test"]["pairs"] == 4
    assert manifest["splits"]["train"]["shards"] == [f"train-0000{index}-of-00003.tfrecord" for index in range(3)]
    assert sorted(path.name for path in (root / "out").iterdir()) == sorted(
        ["manifest.json"] + [name for summary in manifest["splits"].values() for name in summary["shards"]])


def test_manifest_schema(packed):
    root, _, manifest = packed
    assert manifest["format_version"] == 1
    assert manifest["source"]["format"] == "cuhk-pedes"
    assert manifest["source"]["annotations"] == str(root / "reid_raw.json")
    assert manifest["source"]["images"] == str(root / "imgs")
    assert manifest["image_size"] is None
    assert isinstance(manifest["created"], str)


def test_missing_and_truncated_images_are_skipped_and_listed(packed, capsys):
    root, _, manifest = packed
    skipped = {Path(entry["path"]).name: entry for entry in manifest["skipped"]}
    assert set(skipped) == {"g.jpg", "h.jpg"}
    assert skipped["h.jpg"]["reason"] == "file not found"
    assert "truncated" in skipped["g.jpg"]["reason"]
    assert all(entry["pairs"] == 2 for entry in skipped.values())
    assert skipped["h.jpg"]["path"] == str(root / "imgs" / "Market" / "h.jpg")


def test_labels_are_sorted_ids_numbered_from_zero(packed):
    root, _, _ = packed
    label_of = {3: 0, 7: 1, 12: 2, 40: 3, 41: 4}
    for split in ("train", "test"):
        for record in read_records(root / "out", split):
            identity = next(entry[2] for entry in ENTRIES if entry[0] == record["image_id"].decode())
            assert record["label"] == label_of[identity]


def test_captions_are_whitespace_normalised_in_annotation_order(packed):
    root, _, _ = packed
    records = read_records(root / "out", "train")
    assert [record["caption"].decode() for record in records[:2]] == ["A person with 0 bags.", "Walking 0"]


def test_every_stored_image_decodes_in_tensorflow_to_the_source_pixels(packed):
    root, pixels, _ = packed
    for split in ("train", "test"):
        for record in read_records(root / "out", split):
            decoded = tf.io.decode_image(record["image"], channels=3, expand_animations=False).numpy()
            expected = pixels[record["image_id"].decode()]
            assert decoded.shape == expected.shape
            assert np.abs(decoded.astype(int) - expected).mean() < 3


def test_re_run_reuses_the_finished_directory(packed, capsys):
    root, _, manifest = packed
    assert pack(root, root / "out") == 0
    assert "nothing to do" in capsys.readouterr().err
    assert json.loads((root / "out" / "manifest.json").read_text()) == manifest


def test_caption_all_without_split_goes_to_the_default_split(tmp_path):
    make_cuhk_pedes(tmp_path, with_split=False)
    assert pack(tmp_path, tmp_path / "out", "--default-split", "all") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["all"] and manifest["splits"]["all"]["pairs"] == 14


def test_a_different_dataset_in_out_is_refused_unless_overwrite(tmp_path, capsys):
    make_cuhk_pedes(tmp_path)
    assert pack(tmp_path, tmp_path / "out", "--workers", "1") == 0
    assert pack(tmp_path, tmp_path / "out", "--resize", "8") == 2
    assert "different packed dataset" in capsys.readouterr().err
    assert pack(tmp_path, tmp_path / "out", "--resize", "8", "--overwrite") == 0
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["image_size"] == 8
    image = read_records(tmp_path / "out", "train")[0]["image"]
    assert tf.io.decode_image(image).shape[:2] == (8, 4)


@pytest.mark.parametrize("content, expected", [
    ("{not json", ["reid_raw.json", "not valid JSON", "line 1"]),
    ('{"id": 1}', ["reid_raw.json", "JSON list"]),
    ('[{"id": 1, "file_path": "a.jpg", "captions": ["x"], "split": "train"}, '
     '{"id": "2", "file_path": "b.jpg", "captions": ["y"], "split": "train"}]', ["entry 1", "'id'", "'2'"]),
    ('[{"id": 1, "file_path": "a.jpg", "captions": "x", "split": "train"}]', ["entry 0", "'captions'"]),
    ('[{"id": 1, "captions": ["x"], "split": "train"}]', ["entry 0", "'file_path'"]),
    ('[{"id": 1, "file_path": "a.jpg", "captions": ["x"], "split": "train"}, '
     '{"id": 2, "file_path": "b.jpg", "captions": ["y"]}]', ["entry 1", "'split'"]),
    ('[{"id": 1, "file_path": "a.jpg", "captions": ["x"], "split": "tr/ain"}]', ["entry 0", "'split'"]),
])
def test_bad_annotations_give_one_line_naming_file_entry_and_field(tmp_path, capsys, content, expected):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "reid_raw.json").write_text(content)
    assert pack(tmp_path, tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    for fragment in expected:
        assert fragment in error
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_missing_images_directory_is_a_one_line_error(tmp_path, capsys):
    make_cuhk_pedes(tmp_path)
    assert main(["cuhk-pedes", "--annotations", str(tmp_path / "reid_raw.json"),
                 "--images", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "--images" in capsys.readouterr().err


def test_preset_stores_the_demo_at_its_training_size_on_both_packers(tmp_path, capsys):
    from tfrecords_tools.demo import IMAGES_DIR, MIN_IDENTITIES, REID_RAW_NAME, make_demo
    from tfrecords_tools.demo_render import IMAGE_HEIGHT, IMAGE_WIDTH

    demo = make_demo(tmp_path / "demo", identities=MIN_IDENTITIES)
    flags = ["cuhk-pedes", "--annotations", str(demo / REID_RAW_NAME), "--images", str(demo / IMAGES_DIR)]
    assert main([*flags, "--out", str(tmp_path / "local"), "--preset", "demo"]) == 0
    assert main([*flags, "--out", str(tmp_path / "beam"), "--preset", "demo", "--runner", "DirectRunner"]) == 0
    local, beam = (json.loads((tmp_path / name / "manifest.json").read_text()) for name in ("local", "beam"))
    assert local["cover_size"] == beam["cover_size"] == [64, 32] and local["image_size"] is None
    stored = read_records(tmp_path / "local", "train")
    assert [record["image"] for record in stored] == [record["image"] for record in read_records(tmp_path / "beam", "train")]
    assert {tuple(tf.io.decode_image(record["image"]).shape[:2]) for record in stored} == {(64, 32)}
    # Training sees nearly the pixels it would decode from the full-size render (twice the input).
    assert (IMAGE_HEIGHT, IMAGE_WIDTH) == (128, 64)
    for record in stored[:20]:
        full = decode_image(tf.io.read_file(str(demo / IMAGES_DIR / record["image_id"].decode())), (64, 32))
        small = decode_image(tf.constant(record["image"]), (64, 32))
        assert np.abs(full.numpy().astype(int) - small.numpy().astype(int)).mean() < STORED_MEAN_ERROR
    # --max-side caps below the cover; the preset's input stays the cover.
    assert main([*flags, "--out", str(tmp_path / "capped"), "--preset", "demo", "--max-side", "40"]) == 0
    assert {tuple(tf.io.decode_image(record["image"]).shape[:2])
            for record in read_records(tmp_path / "capped", "train")} == {(40, 20)}


@pytest.mark.parametrize("preset, message", [
    ("coco-clip", "takes its image size from the keras-hub preset"),
    ("nope", "unknown preset 'nope'"),
])
def test_a_preset_the_packer_cannot_size_is_one_line_before_anything_is_read(tmp_path, capsys, preset, message):
    assert main(["cuhk-pedes", "--annotations", str(tmp_path / "missing.json"), "--images", str(tmp_path),
                 "--out", str(tmp_path / "out"), "--preset", preset]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: ") and message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()
