"""What the demo model learns: retrieval and attribute search far above chance.

One small demo run (the demo preset on 80 identities, 12 epochs of 15 steps) is trained
through `train.main` and then judged only by what it retrieves: in-batch and held-out recall
against their chance levels, and the public attribute queries of `dualenc.retrieval.attributes` (as
`search.py --evaluate` reports them) against the ground truth of unseen people.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path

import pytest

import search
import train
from dualenc.retrieval import attributes
from tfrecords_tools.demo_cache import packed_demo

IDENTITIES = 80
BATCH_SIZE = 32
EPOCHS = 12
# The attribute gallery of unseen people, smaller than the public one so the test stays quick.
GALLERY_IDENTITIES = 120

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("demo-learning")
    cache = root / "cache"
    data_dir = packed_demo(cache_dir=cache, identities=IDENTITIES)
    run_dir = root / "run"
    previous, os.environ["DUALENC_CACHE"] = os.environ.get("DUALENC_CACHE"), str(cache)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        status = train.main(["--data", str(data_dir), "--out", str(run_dir),
                             "--epochs", str(EPOCHS), "--batch-size", str(BATCH_SIZE), "--quiet"])
    finally:
        os.chdir(cwd)
        if previous is None:
            os.environ.pop("DUALENC_CACHE")
        else:
            os.environ["DUALENC_CACHE"] = previous
    assert status == 0
    return {"data": data_dir, "raw": cache / "demo-raw", "run": run_dir}


def _split_labels(raw: Path, split: str) -> list[tuple[int, str, int]]:
    """(identity, file_path, captions) of every image in `split`, from reid_raw.json."""
    entries = json.loads((raw / "reid_raw.json").read_text())
    return [(entry["id"], entry["file_path"], len(entry["captions"])) for entry in entries if entry["split"] == split]


def test_in_batch_recall_rises_far_above_chance(demo_run):
    with open(demo_run["run"] / "training_log.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    assert len(rows) >= 5
    chance = 100.0 / BATCH_SIZE
    first, last = float(rows[0]["r1_t2i"]), float(rows[-1]["r1_t2i"])
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    assert last > first
    assert last > 4 * chance, f"in-batch text->image R@1 {last:.1f}% vs chance {chance:.1f}%"


def test_held_out_recall_rises_far_above_chance(demo_run):
    images = _split_labels(demo_run["raw"], "test")
    per_identity = Counter(identity for identity, _, _ in images)
    # A caption's chance of a same-identity image at rank 1: its identity's share of the gallery.
    captions = [(identity, count) for identity, _, count in images]
    chance = 100.0 * sum(count * per_identity[identity] for identity, count in captions) / (
        len(images) * sum(count for _, count in captions)
    )
    metrics = json.loads((demo_run["run"] / "metrics.json").read_text())
    assert metrics["split"] == "test"
    # 2.5x, not 3x: since demo captions sometimes leave colours out (to teach garments and bags,
    # issue 18), fewer captions single out one person, and this small run reached 2.7x.
    t2i_r1, i2t_r1 = metrics["text_to_image"]["R@1"], metrics["image_to_text"]["R@1"]
    assert t2i_r1 > 2.5 * chance, f"held-out R@1 {t2i_r1:.1f}% vs chance {chance:.1f}%"
    assert i2t_r1 > 2.5 * chance


def test_attribute_queries_find_people_with_those_attributes(demo_run, monkeypatch, capsys):
    """The public attribute queries (`dualenc.retrieval.attributes`) over unseen people, as `search.py --evaluate` reports them."""
    monkeypatch.setattr(attributes, "GALLERY_IDENTITIES", GALLERY_IDENTITIES)
    assert search.main(["--evaluate", "--model", str(demo_run["run"]), "--json"]) == 0
    scores = json.loads(capsys.readouterr().out)["attributes"]
    assert scores["k"] == 9 and scores["queries"] >= 200 and scores["images"] >= 3 * GALLERY_IDENTITIES
    # This small model reached 0.21 against a chance of 0.12 (the full demo: see README); with
    # over 200 queries the standard error of the mean is about 0.02.
    assert scores["precision"] > 1.5 * scores["chance"], scores
