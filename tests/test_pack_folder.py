"""Packing a folder with a CSV or JSON Lines caption table, with and without label/split."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.support.images import write_image
from tests.support.packed import read_records
from tfrecords_tools.__main__ import main

ROWS = [  # image, caption, label, split
    ("cats/one.jpg", "a  cat", 5, "train"),
    ("dogs/two.png", "a dog\n on grass", 9, "valid"),
    ("cats/one.jpg", "the same cat", 5, "train"),
    ("birds/three.bmp", "a bird", 2, ""),
]


def make_folder(root: Path) -> None:
    for index, kind in enumerate(["jpeg", "png", "bmp"]):
        write_image(root / "images" / ROWS[[0, 1, 3][index]][0], kind, seed=index)


def write_table(path: Path, columns: list[str]) -> None:
    rows = [dict(zip(["image", "caption", "label", "split"], row)) for row in ROWS]
    if path.suffix == ".csv":
        with open(path, "w", newline="", encoding="utf-8") as stream:
            table = csv.DictWriter(stream, fieldnames=columns, extrasaction="ignore")
            table.writeheader()
            table.writerows(rows)
    else:
        path.write_text("".join(json.dumps({key: row[key] for key in columns}) + "\n\n" for row in rows))


def pack(root: Path, table: Path, out: str = "out") -> int:
    return main(["folder", "--captions", str(table), "--images", str(root / "images"),
                 "--out", str(root / out), "--workers", "2"])


@pytest.fixture(scope="module")
def folder_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("folder")
    make_folder(root)
    return root


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_labels_and_splits_from_the_table(folder_root, suffix):
    table = folder_root / f"full{suffix}"
    write_table(table, ["image", "caption", "label", "split"])
    assert pack(folder_root, table, f"out-full{suffix}") == 0
    train = read_records(folder_root / f"out-full{suffix}", "train")
    valid = read_records(folder_root / f"out-full{suffix}", "valid")
    assert [(r["image_id"].decode(), r["caption"].decode(), r["label"]) for r in train] == [
        ("cats/one.jpg", "a cat", 5), ("cats/one.jpg", "the same cat", 5), ("birds/three.bmp", "a bird", 2)]
    assert [(r["caption"].decode(), r["label"]) for r in valid] == [("a dog on grass", 9)]


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_without_label_or_split_labels_are_image_indices(folder_root, suffix):
    table = folder_root / f"bare{suffix}"
    write_table(table, ["image", "caption"])
    assert pack(folder_root, table, f"out-bare{suffix}") == 0
    manifest = json.loads((folder_root / f"out-bare{suffix}" / "manifest.json").read_text())
    assert list(manifest["splits"]) == ["train"]
    assert manifest["splits"]["train"] | {"shards": None, "sha256": None} == {
        "pairs": 4, "images": 3, "ids": 3, "shards": None, "sha256": None}
    labels = [(r["image_id"].decode(), r["label"]) for r in read_records(folder_root / f"out-bare{suffix}", "train")]
    assert labels == [("cats/one.jpg", 0), ("cats/one.jpg", 0), ("dogs/two.png", 1), ("birds/three.bmp", 2)]


@pytest.mark.parametrize("name, text, expected", [
    ("t.csv", "img,caption\na.jpg,x\n", ["t.csv", "line 1", "'image'"]),
    ("t.csv", "image,caption,lable\na.jpg,x,1\n", ["t.csv", "'lable'"]),
    ("t.csv", "image,caption,label\na.jpg,x,1\nb.jpg,y,two\n", ["t.csv", "line 3", "'label'", "'two'"]),
    ("t.jsonl", '{"image": "a.jpg", "caption": "x"}\n{"image": "b.jpg"}\n', ["t.jsonl", "line 2", "'caption'"]),
    ("t.jsonl", '{"image": "a.jpg", "caption": "x", "label": 1}\n{"image": "b.jpg", "caption": "y"}\n',
     ["t.jsonl", "line 2", "'label'"]),
    ("t.jsonl", '{"image": "a.jpg", "caption": "x"}\n[1]\n', ["t.jsonl", "line 2", "object"]),
    ("t.jsonl", '{"image": "a.jpg", "caption": "x"\n', ["t.jsonl", "line 1", "not valid JSON"]),
    ("t.txt", "a.jpg x\n", ["t.txt", ".csv or .jsonl"]),
])
def test_bad_tables_give_one_line_naming_file_line_and_field(tmp_path, capsys, name, text, expected):
    (tmp_path / "images").mkdir()
    (tmp_path / name).write_text(text)
    assert pack(tmp_path, tmp_path / name) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1
    for fragment in expected:
        assert fragment in error


def test_stats_command_counts_a_packed_folder(folder_root, capsys):
    table = folder_root / "stats.csv"
    write_table(table, ["image", "caption"])
    assert pack(folder_root, table, "out-stats") == 0
    assert main(["stats", str(folder_root / "out-stats")]) == 0
    stats = json.loads((folder_root / "out-stats" / "stats" / "stats.json").read_text())
    assert stats["splits"]["train"]["pairs"] == 4
