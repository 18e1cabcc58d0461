"""Packing ICFG-PEDES and RSTPReid: splits as released, identities as labels (test people never
trained on), skips, resume, and one-line errors for malformed annotation lists."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.support.images import write_image
from tests.support.packed import read_records
from tests.support.packer_process import pack_in_fresh_process
from tests.support.interrupt import Interrupted, interrupt_after_shards
from tfrecords_tools.__main__ import main

# (image path, identity, split, captions), in the released layouts, identities out of order.
ICFG = [
    ("test/0004/0004_c3_0012.jpg", 4, "test", 1), ("train/0001/0001_c1_0003.jpg", 1, "train", 1),
    ("train/0000/0000_c2_0001.jpg", 0, "train", 1), ("test/0003/0003_c5_0007.jpg", 3, "test", 1),
    ("train/0002/0002_c1_0004.jpg", 2, "train", 1), ("train/0000/0000_c4_0002.jpg", 0, "train", 1),
    ("test/0004/0004_c6_0013.jpg", 4, "test", 1), ("train/0001/0001_c2_0005.jpg", 1, "train", 1),
]
RSTPREID = [
    ("0005_c7_0021.jpg", 5, "test", 2), ("0000_c14_0001.jpg", 0, "train", 2), ("0003_c1_0011.jpg", 3, "val", 2),
    ("0001_c3_0004.jpg", 1, "train", 2), ("0004_c2_0015.jpg", 4, "test", 2), ("0002_c8_0009.jpg", 2, "train", 2),
    ("0000_c5_0002.jpg", 0, "train", 2), ("0005_c9_0022.jpg", 5, "test", 2),
]
# command: (annotation file, image path field, entries, (images, pairs, identities) per split)
SETS = {
    "icfg-pedes": ("ICFG-PEDES.json", "file_path", ICFG, {"train": (5, 5, 3), "test": (3, 3, 2)}),
    "rstpreid": ("data_captions.json", "img_path", RSTPREID,
                 {"train": (4, 8, 3), "val": (1, 2, 1), "test": (3, 6, 2)}),
}


def entry(command: str, path: str, identity: int, split: str, captions: int) -> dict:
    """One annotation entry as the set releases it (ICFG-PEDES also carries processed_tokens)."""
    _, path_field, _, _ = SETS[command]
    texts = [f"The  person {identity} wears a coat, view {path[-8:-4]} caption {number}." for number in range(captions)]
    made = {"id": identity, path_field: path, "captions": texts, "split": split}
    if command == "icfg-pedes":
        made["processed_tokens"] = [text.lower().split() for text in texts]
    return made


def make_set(root: Path, command: str) -> Path:
    """The set's images under `root/imgs` and its annotation file; returns the file's path."""
    file_name, _, entries, _ = SETS[command]
    for index, (path, *_) in enumerate(entries):
        write_image(root / "imgs" / path, "jpeg", seed=index)
    annotations = root / file_name
    annotations.write_text(json.dumps([entry(command, *fields) for fields in entries]))
    return annotations


def pack(command: str, annotations: Path, images: Path, out: Path, *extra: str) -> int:
    return main([command, "--annotations", str(annotations), "--images", str(images), "--out", str(out),
                 "--workers", "1", *extra])


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


@pytest.fixture(scope="module", params=list(SETS))
def packed(request, tmp_path_factory):
    command = request.param
    root = tmp_path_factory.mktemp(command)
    assert pack(command, make_set(root, command), root / "imgs", root / "out", "--shard-size", "3") == 0
    return command, root


def test_splits_as_released_with_exact_counts(packed):
    command, root = packed
    manifest = manifest_of(root / "out")
    expected = SETS[command][3]
    assert {split: (summary["images"], summary["pairs"], summary["ids"])
            for split, summary in manifest["splits"].items()} == expected
    assert manifest["source"]["format"] == command and manifest["skipped"] == []


def test_identities_are_the_labels_and_test_people_are_not_trained_on(packed):
    command, root = packed
    _, _, entries, expected = SETS[command]
    identity_of = {path: identity for path, identity, _, _ in entries}
    labels = {}
    for split in expected:
        for record in read_records(root / "out", split):
            identity = identity_of[record["image_id"].decode()]
            assert int(record["label"]) == identity  # the released train ids are 0..n-1, IRRA's labels
            labels.setdefault(split, set()).add(identity)
    assert labels["train"] == {0, 1, 2}
    people = list(labels.values())
    assert len(set().union(*people)) == sum(len(split_people) for split_people in people)  # splits disjoint


def test_captions_keep_entry_order_whitespace_normalised(packed):
    command, root = packed
    records = read_records(root / "out", "test")
    path, identity, _, captions = SETS[command][2][0]
    assert records[0]["image_id"].decode() == path
    assert [record["caption"].decode() for record in records[:captions]] == [
        f"The person {identity} wears a coat, view {path[-8:-4]} caption {number}." for number in range(captions)]


@pytest.mark.parametrize("command", list(SETS))
def test_one_unreadable_image_is_skipped_and_a_crash_resumes_to_the_clean_result(tmp_path, monkeypatch, command):
    annotations = make_set(tmp_path, command)
    bad_path, _, bad_split, bad_captions = SETS[command][2][1]
    write_image(tmp_path / "imgs" / bad_path, "truncated", seed=1)
    assert pack(command, annotations, tmp_path / "imgs", tmp_path / "clean", "--shard-size", "2") == 0
    manifest = manifest_of(tmp_path / "clean")
    assert [(skip["path"], skip["pairs"]) for skip in manifest["skipped"]] == [
        (str(tmp_path / "imgs" / bad_path), bad_captions)]
    images, pairs, _ = SETS[command][3][bad_split]
    assert (manifest["splits"][bad_split]["images"], manifest["splits"][bad_split]["pairs"]) == (
        images - 1, pairs - bad_captions)

    with monkeypatch.context() as patch:
        interrupt_after_shards(patch, 3)
        with pytest.raises(Interrupted):
            pack(command, annotations, tmp_path / "imgs", tmp_path / "resumed", "--shard-size", "2")
    assert not (tmp_path / "resumed" / "manifest.json").exists()
    assert pack(command, annotations, tmp_path / "imgs", tmp_path / "resumed", "--shard-size", "2") == 0
    resumed = manifest_of(tmp_path / "resumed")
    assert {key: value for key, value in resumed.items() if key != "created"} == {
        key: value for key, value in manifest.items() if key != "created"}


def test_an_image_listed_twice_for_one_person_is_one_image_with_both_entries_captions(tmp_path):
    annotations = make_set(tmp_path, "rstpreid")
    content = json.loads(annotations.read_text())
    content.append({**content[1], "captions": ["A third caption."]})
    annotations.write_text(json.dumps(content))
    assert pack("rstpreid", annotations, tmp_path / "imgs", tmp_path / "out") == 0
    assert manifest_of(tmp_path / "out")["splits"]["train"]["images"] == 4
    captions = [record["caption"].decode() for record in read_records(tmp_path / "out", "train")
                if record["image_id"] == b"0000_c14_0001.jpg"]
    assert len(captions) == 3 and captions[-1] == "A third caption."


ICFG_ENTRY = {"id": 1, "file_path": "train/0001/a.jpg", "captions": ["a man"], "split": "train",
              "processed_tokens": [["a", "man"]]}
RSTPREID_ENTRY = {"id": 1, "img_path": "a.jpg", "captions": ["a man", "a tall man"], "split": "train"}


@pytest.mark.parametrize("command, content, expected", [
    ("icfg-pedes", {"images": [ICFG_ENTRY]}, ["expected a JSON list of entries, got dict"]),
    ("icfg-pedes", [ICFG_ENTRY, "b.jpg"], ["entry 1", "expected an object"]),
    ("icfg-pedes", [{**ICFG_ENTRY, "id": "1"}], ["entry 0", "field 'id' must be an integer", "'1'"]),
    ("icfg-pedes", [{**ICFG_ENTRY, "id": True}], ["entry 0", "field 'id'"]),
    ("rstpreid", [ICFG_ENTRY], ["entry 0", "field 'img_path' must be a non-empty string", "None"]),
    ("icfg-pedes", [RSTPREID_ENTRY], ["entry 0", "field 'file_path'"]),
    ("rstpreid", [{**RSTPREID_ENTRY, "captions": "a man"}], ["entry 0", "field 'captions'"]),
    ("rstpreid", [{**RSTPREID_ENTRY, "captions": []}], ["entry 0", "field 'captions'"]),
    ("rstpreid", [{**RSTPREID_ENTRY, "captions": ["a man", 7]}], ["entry 0", "field 'captions'"]),
    ("rstpreid", [{key: value for key, value in RSTPREID_ENTRY.items() if key != "split"}],
     ["entry 0", "field 'split' must be one of train, val, test", "None"]),
    ("icfg-pedes", [{**ICFG_ENTRY, "split": "query"}], ["entry 0", "field 'split'", "'query'"]),
    ("rstpreid", [RSTPREID_ENTRY, {**RSTPREID_ENTRY, "img_path": "b.jpg", "split": "test"}],
     ["entry 1", "identity 1 is in split 'test' but in 'train' at entry 0"]),
    ("icfg-pedes", [ICFG_ENTRY, {**ICFG_ENTRY, "id": 2}],
     ["entry 1", "'train/0001/a.jpg' is listed as identity 2 here and 1 at entry 0"]),
    ("rstpreid", [{**RSTPREID_ENTRY, "img_path": "../a.jpg"}], ["entry 0", "lies outside --images"]),
])
def test_a_malformed_list_is_one_line_naming_the_entry_and_field(tmp_path, capsys, command, content, expected):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "annotations.json").write_text(json.dumps(content))
    assert pack(command, tmp_path / "annotations.json", tmp_path / "imgs", tmp_path / "out") == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {tmp_path / 'annotations.json'}") and error.count("\n") == 1, error
    for fragment in expected:
        assert fragment in error
    assert not (tmp_path / "out").exists()


def test_a_malformed_list_is_reported_before_tensorflow_is_imported(tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "data_captions.json").write_text(json.dumps([{"id": 1, "img_path": "a.jpg", "captions": ["x"]}]))
    arguments = ["rstpreid", "--annotations", str(tmp_path / "data_captions.json"), "--images", str(tmp_path / "imgs"),
                 "--out", str(tmp_path / "out")]
    completed = pack_in_fresh_process(arguments)
    assert completed.stdout == "2 False\n", completed.stderr
    assert "field 'split'" in completed.stderr
