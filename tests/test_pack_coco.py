"""Packing the MS-COCO caption layout: splits (plain, holdout, Karpathy), caption caps, labels."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.images import write_image
from tests.support.packed import read_records
from tfrecords_tools.__main__ import main

IMAGE_IDS = [391, 57, 8, 1024, 77, 5]  # COCO ids, deliberately unsorted


def make_coco(root: Path) -> None:
    """Six images (id 77 missing on disk) with three captions each, one of them empty."""
    images = [{"id": image_id, "file_name": f"COCO_train2014_{image_id:012d}.jpg", "height": 16, "width": 8}
              for image_id in IMAGE_IDS]
    for index, image in enumerate(images):
        if image["id"] != 77:
            write_image(root / "train2014" / image["file_name"], "jpeg", seed=index)
    annotations = [{"id": 1000 + number, "image_id": image_id, "caption": f" A photo  {image_id}-{caption} "}
                   for number, (caption, image_id) in enumerate((c, i) for c in range(3) for i in IMAGE_IDS)]
    annotations[0]["caption"] = "   "
    (root / "captions.json").write_text(json.dumps({"info": {}, "images": images, "annotations": annotations}))
    karpathy = [{"cocoid": image_id, "split": split, "filename": "x.jpg"}
                for image_id, split in zip(IMAGE_IDS[:5], ["train", "restval", "val", "test", "train"])]
    (root / "dataset_coco.json").write_text(json.dumps({"images": karpathy, "dataset": "coco"}))


def pack(root: Path, out: str, *extra: str) -> int:
    return main(["coco", "--annotations", str(root / "captions.json"), "--images", str(root / "train2014"),
                 "--out", str(root / out), "--workers", "1", *extra])


@pytest.fixture(scope="module")
def coco_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco")
    make_coco(root)
    return root


def _manifest(root: Path, out: str) -> dict:
    return json.loads((root / out / "manifest.json").read_text())


def test_plain_split_labels_are_image_indices_and_skips_are_listed(coco_root):
    assert pack(coco_root, "plain", "--split", "all") == 0
    manifest = _manifest(coco_root, "plain")
    assert manifest["splits"]["all"]["pairs"] == 17 - 3  # 18 captions, 1 empty, 3 of the missing image
    assert manifest["splits"]["all"]["images"] == 5
    reasons = sorted(entry["reason"].split(" (")[0] for entry in manifest["skipped"])
    assert reasons == ["empty caption", "file not found"]
    records = read_records(coco_root / "plain", "all")
    for record in records:
        image_id = int(record["image_id"].decode()[-16:-4])
        assert record["label"] == IMAGE_IDS.index(image_id)
        assert record["caption"].decode().startswith(f"A photo {image_id}-")
    first_image = [record["caption"].decode() for record in records if record["label"] == 0]
    assert first_image == ["A photo 391-1", "A photo 391-2"]


def test_captions_per_image_keeps_the_first_ones(coco_root):
    assert pack(coco_root, "capped", "--captions-per-image", "1") == 0
    records = read_records(coco_root / "capped", "train")
    assert len(records) == 5
    assert sorted(record["caption"].decode() for record in records)[0] == "A photo 1024-0"


def test_holdout_carves_a_valid_split_of_whole_images(coco_root):
    assert pack(coco_root, "holdout", "--holdout-images", "2") == 0
    manifest = _manifest(coco_root, "holdout")
    train_ids = {record["image_id"] for record in read_records(coco_root / "holdout", "train")}
    valid_ids = {record["image_id"] for record in read_records(coco_root / "holdout", "valid")}
    assert not train_ids & valid_ids
    assert len(train_ids | valid_ids) == 5
    assert manifest["splits"]["valid"]["images"] + manifest["splits"]["train"]["images"] == 5


def test_karpathy_splits_map_restval_to_train_and_report_unlisted_images(coco_root):
    assert pack(coco_root, "karpathy", "--karpathy", str(coco_root / "dataset_coco.json")) == 0
    manifest = _manifest(coco_root, "karpathy")
    assert {split: summary["images"] for split, summary in manifest["splits"].items()} == {
        "train": 2, "val": 1, "test": 1}  # 391 (train), 57 (restval); 77 missing on disk
    unlisted = [entry for entry in manifest["skipped"] if "Karpathy" in entry["reason"]]
    assert [Path(entry["path"]).name for entry in unlisted] == ["COCO_train2014_000000000005.jpg"]
    assert unlisted[0]["pairs"] == 3


@pytest.mark.parametrize("content, expected", [
    ('{"images": [], "annotations": {}}', ["captions.json", "'annotations'"]),
    ('{"images": [{"id": 1, "file_name": 5}], "annotations": []}', ["images[0]", "'file_name'"]),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "annotations": [{"image_id": 1, "caption": "x"}, '
     '{"image_id": 2, "caption": "y"}]}', ["annotations[1]", "'image_id'", "2"]),
])
def test_bad_annotations_give_one_line_naming_file_index_and_field(tmp_path, capsys, content, expected):
    (tmp_path / "train2014").mkdir()
    (tmp_path / "captions.json").write_text(content)
    assert pack(tmp_path, "out") == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    for fragment in expected:
        assert fragment in error


def test_conflicting_split_options_are_refused(coco_root, capsys):
    assert pack(coco_root, "both", "--holdout-images", "1", "--karpathy", str(coco_root / "dataset_coco.json")) == 2
    assert "--holdout-images and --karpathy" in capsys.readouterr().err
