"""Packing Karpathy's split files (Flickr30k, Flickr8k, COCO): splits as published, restval,
one label per image, skips, resume, and one-line errors for malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from tests.support.images import random_pixels, write_image
from tests.support.packed import read_records
from tests.support.packer_process import pack_in_fresh_process
from tests.support.interrupt import Interrupted, interrupt_after_shards
from tfrecords_tools.__main__ import main

# Flickr30k-style images: (filename, split, sentences); a test image has exactly five.
FLICKR = [
    ("1000092795.jpg", "train", 5), ("10002456.jpg", "train", 5), ("1000268201.jpg", "val", 5),
    ("1000344755.jpg", "test", 5), ("1000366164.jpg", "train", 5), ("1000523639.jpg", "test", 5),
    ("1000919630.jpg", "val", 5), ("10010052.jpg", "test", 5),
]
# COCO-style images: (filepath, cocoid, split, sentences); one test image has seven, as a few do.
COCO = [
    ("train2014", 9, "train", 5), ("val2014", 42, "restval", 5), ("train2014", 25, "train", 6),
    ("val2014", 73, "val", 5), ("val2014", 74, "restval", 5), ("val2014", 391895, "test", 7),
    ("val2014", 522418, "test", 5), ("val2014", 184613, "val", 5),
]


def sentences(image: int, count: int) -> list[dict]:
    """Karpathy's sentence objects: raw text (case and punctuation kept), tokens, ids."""
    return [{"tokens": ["a", "dog", str(image), str(number)], "raw": f"A  dog, image {image} sentence {number}.",
             "imgid": image, "sentid": 5 * image + number} for number in range(count)]


def make_flickr(root: Path, images: list[tuple[str, str, int]] = FLICKR, tiny: bool = False) -> Path:
    """`dataset_flickr30k.json` and `flickr30k-images/` under `root` (`tiny`: 4x4 JPEGs, which
    keep a thousand images fast); returns the JSON's path."""
    records = []
    (root / "flickr30k-images").mkdir(parents=True, exist_ok=True)
    for index, (filename, split, count) in enumerate(images):
        if tiny:
            Image.fromarray(random_pixels(index, 4, 4)).save(root / "flickr30k-images" / filename, "JPEG")
        else:
            write_image(root / "flickr30k-images" / filename, "jpeg", seed=index)
        records.append({"sentids": list(range(5 * index, 5 * index + count)), "imgid": index,
                        "sentences": sentences(index, count), "split": split, "filename": filename})
    path = root / "dataset_flickr30k.json"
    path.write_text(json.dumps({"images": records, "dataset": "flickr30k"}))
    return path


def make_coco(root: Path) -> Path:
    """`dataset_coco.json` and `coco/{train2014,val2014}/` under `root`; returns the JSON's path."""
    records = []
    for index, (filepath, cocoid, split, count) in enumerate(COCO):
        filename = f"COCO_{filepath}_{cocoid:012d}.jpg"
        write_image(root / "coco" / filepath / filename, "jpeg", seed=index)
        records.append({"filepath": filepath, "sentids": list(range(5 * index, 5 * index + count)),
                        "filename": filename, "imgid": index, "split": split,
                        "sentences": sentences(index, count), "cocoid": cocoid})
    path = root / "dataset_coco.json"
    path.write_text(json.dumps({"images": records, "dataset": "coco"}))
    return path


def pack(annotations: Path, images: Path, out: Path, *extra: str) -> int:
    return main(["karpathy", "--annotations", str(annotations), "--images", str(images), "--out", str(out),
                 "--workers", "1", *extra])


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def counts(out: Path) -> dict[str, tuple[int, int]]:
    return {split: (summary["images"], summary["pairs"]) for split, summary in manifest_of(out)["splits"].items()}


@pytest.fixture(scope="module")
def flickr(tmp_path_factory):
    root = tmp_path_factory.mktemp("flickr")
    annotations = make_flickr(root)
    assert pack(annotations, root / "flickr30k-images", root / "out", "--shard-size", "7") == 0
    return root


def test_flickr_splits_as_published_with_five_captions_per_test_image(flickr):
    assert counts(flickr / "out") == {"train": (3, 15), "val": (2, 10), "test": (3, 15)}
    manifest = manifest_of(flickr / "out")
    assert manifest["source"]["format"] == "karpathy" and manifest["source"]["dataset"] == "flickr30k"
    assert manifest["skipped"] == []
    test = read_records(flickr / "out", "test")
    assert [record["image_id"].decode() for record in test[::5]] == ["1000344755.jpg", "1000523639.jpg", "10010052.jpg"]


def test_each_image_is_its_own_label_train_first(flickr):
    labels = {}
    for split in ("train", "val", "test"):
        for record in read_records(flickr / "out", split):
            labels.setdefault(split, {}).setdefault(record["image_id"].decode(), set()).add(int(record["label"]))
    assert all(len(image_labels) == 1 for split in labels.values() for image_labels in split.values())
    assert sorted(label for (label,) in labels["train"].values()) == [0, 1, 2]
    held_out = [label for split in ("val", "test") for (label,) in labels[split].values()]
    assert sorted(held_out) == [3, 4, 5, 6, 7]
    assert labels["train"]["1000092795.jpg"] == {0} and labels["train"]["1000366164.jpg"] == {2}


def test_captions_are_the_raw_sentences_in_file_order_whitespace_normalised(flickr):
    records = read_records(flickr / "out", "test")
    assert [record["caption"].decode() for record in records[:5]] == [
        f"A dog, image 3 sentence {number}." for number in range(5)]


def test_re_running_finds_the_dataset_packed(flickr, capsys):
    annotations, images = flickr / "dataset_flickr30k.json", flickr / "flickr30k-images"
    assert pack(annotations, images, flickr / "out", "--shard-size", "7") == 0
    assert "nothing to do" in capsys.readouterr().err


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = tmp_path_factory.mktemp("coco-karpathy")
    return root, make_coco(root)


@pytest.mark.parametrize("restval, expected", [
    ("train", {"train": (4, 21), "val": (2, 10), "test": (2, 12)}),
    ("val", {"train": (2, 11), "val": (4, 20), "test": (2, 12)}),
    ("drop", {"train": (2, 11), "val": (2, 10), "test": (2, 12)}),
])
def test_restval_goes_where_the_flag_says(coco, restval, expected):
    root, annotations = coco
    out = root / f"restval-{restval}"
    flags = () if restval == "train" else ("--restval", restval)  # train is the default
    assert pack(annotations, root / "coco", out, *flags) == 0
    assert counts(out) == expected
    manifest = manifest_of(out)
    assert manifest["source"]["restval"] == restval and manifest["source"]["dataset"] == "coco"
    assert manifest["skipped"] == []
    restval_ids = {"val2014/COCO_val2014_000000000042.jpg", "val2014/COCO_val2014_000000000074.jpg"}
    for split in expected:
        image_ids = {record["image_id"].decode() for record in read_records(out, split)}
        assert restval_ids & image_ids == (restval_ids if split == restval else set())
    test_ids = [record["image_id"].decode() for record in read_records(out, "test")]
    assert list(dict.fromkeys(test_ids)) == ["val2014/COCO_val2014_000000391895.jpg",
                                             "val2014/COCO_val2014_000000522418.jpg"]


def test_test_split_alone_and_captions_per_image(coco):
    root, annotations = coco
    assert pack(annotations, root / "coco", root / "test-only", "--splits", "test", "--captions-per-image", "5") == 0
    assert counts(root / "test-only") == {"test": (2, 10)}
    labels = [int(record["label"]) for record in read_records(root / "test-only", "test")]
    assert labels == [0] * 5 + [1] * 5


def test_flickr30k_1k_test_split_packs_to_1000_images_and_5000_captions(tmp_path):
    images = [(f"{number}.jpg", "test", 5) for number in range(1000)]
    images += [("train.jpg", "train", 5), ("val.jpg", "val", 5)]
    annotations = make_flickr(tmp_path, images, tiny=True)
    assert pack(annotations, tmp_path / "flickr30k-images", tmp_path / "out", "--workers", "2") == 0
    manifest = manifest_of(tmp_path / "out")
    assert manifest["splits"]["test"]["images"] == 1000
    assert manifest["splits"]["test"]["pairs"] == 5000
    assert manifest["splits"]["test"]["ids"] == 1000
    assert counts(tmp_path / "out") == {"train": (1, 5), "val": (1, 5), "test": (1000, 5000)}


@pytest.mark.slow
def test_coco_5k_test_split_packs_to_5000_images_and_25000_captions(tmp_path):
    """COCO's Karpathy test split: 5,000 val2014 images; a few carry six or seven sentences, and
    ``--captions-per-image 5`` keeps five of each, the 25,000 captions the retrieval tables use."""
    records = []
    folder = tmp_path / "coco" / "val2014"
    folder.mkdir(parents=True)
    for index in range(5000):
        filename = f"COCO_val2014_{index:012d}.jpg"
        Image.fromarray(random_pixels(index, 4, 4)).save(folder / filename, "JPEG")
        count = 7 if index % 997 == 0 else 6 if index % 499 == 0 else 5
        records.append({"filepath": "val2014", "filename": filename, "imgid": index, "cocoid": index,
                        "split": "test", "sentids": list(range(count)), "sentences": sentences(index, count)})
    annotations = tmp_path / "dataset_coco.json"
    annotations.write_text(json.dumps({"images": records, "dataset": "coco"}))
    assert pack(annotations, tmp_path / "coco", tmp_path / "out", "--splits", "test", "--captions-per-image", "5",
                "--workers", "2") == 0
    assert counts(tmp_path / "out") == {"test": (5000, 25000)}
    assert manifest_of(tmp_path / "out")["splits"]["test"]["ids"] == 5000


def test_one_unreadable_image_is_skipped_and_listed_and_a_crash_resumes_to_the_clean_result(tmp_path, monkeypatch):
    annotations = make_flickr(tmp_path)
    write_image(tmp_path / "flickr30k-images" / "1000523639.jpg", "truncated", seed=0)
    assert pack(annotations, tmp_path / "flickr30k-images", tmp_path / "clean", "--shard-size", "5") == 0
    manifest = manifest_of(tmp_path / "clean")
    assert [(Path(skip["path"]).name, skip["pairs"]) for skip in manifest["skipped"]] == [("1000523639.jpg", 5)]
    assert counts(tmp_path / "clean")["test"] == (2, 10)

    with monkeypatch.context() as patch:
        interrupt_after_shards(patch, 2)
        with pytest.raises(Interrupted):
            pack(annotations, tmp_path / "flickr30k-images", tmp_path / "resumed", "--shard-size", "5")
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    assert pack(annotations, tmp_path / "flickr30k-images", tmp_path / "resumed", "--shard-size", "5") == 0
    resumed = manifest_of(tmp_path / "resumed")
    assert {key: value for key, value in resumed.items() if key != "created"} == {
        key: value for key, value in manifest.items() if key != "created"}


def test_an_empty_sentence_is_skipped_and_listed(tmp_path):
    annotations = make_flickr(tmp_path)
    content = json.loads(annotations.read_text())
    content["images"][3]["sentences"][1]["raw"] = " \n "
    annotations.write_text(json.dumps(content))
    assert pack(annotations, tmp_path / "flickr30k-images", tmp_path / "out") == 0
    assert counts(tmp_path / "out")["test"] == (3, 14)
    [skip] = manifest_of(tmp_path / "out")["skipped"]
    assert skip["reason"].startswith("empty caption") and "images[3] sentence 1" in skip["reason"]


GOOD = {"filename": "a.jpg", "split": "test", "sentences": [{"raw": "a dog", "tokens": ["a", "dog"]}]}


@pytest.mark.parametrize("content, expected", [
    ([GOOD], ["expected a JSON object with a list 'images'", "list"]),
    ({"images": {}, "dataset": "flickr30k"}, ["'images'"]),
    ({"images": [GOOD], "dataset": 30}, ["field 'dataset'", "30"]),
    ({"images": [GOOD, "b.jpg"]}, ["images[1]", "str"]),
    ({"images": [{**GOOD, "filename": None}]}, ["images[0]", "'filename'", "None"]),
    ({"images": [{key: value for key, value in GOOD.items() if key != "sentences"}]}, ["images[0]", "'sentences'"]),
    ({"images": [{**GOOD, "sentences": ["a dog"]}]}, ["images[0]", "'sentences'[0]", "'raw'"]),
    ({"images": [{**GOOD, "sentences": [{"raw": 5}]}]}, ["images[0]", "'sentences'[0]", "'raw'"]),
    ({"images": [{**GOOD, "split": "testing"}]}, ["images[0]", "'split'", "'testing'", "restval"]),
    ({"images": [{**GOOD, "filepath": 2014}]}, ["images[0]", "'filepath'"]),
    ({"images": [GOOD, {**GOOD, "split": "train"}]}, ["images[1]", "repeats image 'a.jpg' of images[0]"]),
    ({"images": [{**GOOD, "filename": "../a.jpg"}]}, ["images[0]", "lies outside --images"]),
])
def test_a_malformed_file_is_one_line_naming_the_record_and_field(tmp_path, capsys, content, expected):
    (tmp_path / "images").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps(content))
    assert pack(tmp_path / "dataset.json", tmp_path / "images", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {tmp_path / 'dataset.json'}") and error.count("\n") == 1, error
    for fragment in expected:
        assert fragment in error
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, expected", [
    (["--splits", "test,dev"], "--splits must name some of train, val, test, got 'test,dev'"),
    (["--captions-per-image", "0"], "--captions-per-image must be at least 1"),
])
def test_bad_flags_are_one_line(tmp_path, capsys, flags, expected):
    annotations = make_flickr(tmp_path, FLICKR[:1])
    assert pack(annotations, tmp_path / "flickr30k-images", tmp_path / "out", *flags) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {expected}") and error.count("\n") == 1


def test_a_malformed_file_is_reported_before_tensorflow_is_imported(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "dataset.json").write_text(json.dumps({"images": [{"filename": "a.jpg", "split": "test"}]}))
    arguments = ["karpathy", "--annotations", str(tmp_path / "dataset.json"), "--images", str(tmp_path / "images"),
                 "--out", str(tmp_path / "out")]
    completed = pack_in_fresh_process(arguments)
    assert completed.stdout == "2 False\n", completed.stderr
    assert "'sentences'" in completed.stderr
