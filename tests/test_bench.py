"""bench/: the helpers' arithmetic, the reference re-implementations, and a whole quick run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import common, demo_epoch, packing, query
from dualenc.retrieval import knn

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("packing", "pipeline", "training", "index", "query", "service", "demo_epoch")
# Rows with no seed counterpart: `ref`, the ratio and the ref peak are empty.
WITHOUT_REFERENCE = ("service", "demo epoch")
EPOCH_PARTS = ("steps_seconds", "validation_seconds", "commit_seconds")


def test_percentile_matches_numpy_linear_interpolation():
    values = np.random.default_rng(0).exponential(size=37).tolist()
    for fraction in (0.0, 0.05, 0.5, 0.95, 1.0):
        assert common.percentile(values, fraction) == pytest.approx(np.percentile(values, 100 * fraction))


def test_pair_ratio_is_oriented_so_above_one_means_ours_is_better():
    from bench.__main__ import pair_summary

    def runs(values):
        return [{"seconds": value, "rss_mb": {"self": 10.0, "workers": 5.0}} for value in values]

    summary = pair_summary({"seed": runs([4.0, 6.0, 5.0]), "ours": runs([1.0, 2.0, 3.0])}, "seconds",
                            higher_is_better=False)
    assert (summary["ref"], summary["ours"], summary["ratio"]) == (5.0, 2.0, 2.5)
    assert summary["ref_peak_mb"] == 15.0
    faster = pair_summary({"seed": runs([10.0]), "ours": runs([30.0])}, "seconds", higher_is_better=True)
    assert faster["ratio"] == 3.0


def test_format_table_aligns_columns_and_marks_missing_values():
    table = common.format_table([{"name": "a", "value": 1234.5678}, {"name": "longer", "value": None}],
                                [("name", "Name"), ("value", "Value")])
    lines = table.splitlines()
    assert lines[0].split() == ["Name", "Value"]
    assert lines[2].split() == ["a", "1.23e+03"]
    assert lines[3].split() == ["longer", "-"]
    offset = lines[0].index("Value")
    assert lines[2][offset:] == "1.23e+03" and lines[3][offset:] == "-"


def test_demo_epoch_timeline_splits_an_epoch_between_its_callbacks():
    ticks = iter([10.0, 12.0, 13.5, 13.75, 14.0])
    timeline = demo_epoch.Timeline(clock=lambda: next(ticks))

    class Selection:
        params = {"steps": 4}

        def on_epoch_begin(self, epoch, logs=None):
            pass

    timeline.epoch_begin(Selection.on_epoch_begin)(Selection(), 0)
    with pytest.raises(ValueError):  # a failing call is timed too
        timeline.timed(demo_epoch.VALIDATION, lambda: int("x"))()
    timeline.timed(demo_epoch.COMMIT, lambda: None)()
    assert timeline.epoch(0) == {"epoch_seconds": 4.0, "steps_seconds": 2.0, "validation_seconds": 1.5,
                                 "commit_seconds": 0.25, "other_seconds": 0.25, "steps": 4, "step_ms": 500.0}
    assert timeline.seconds(demo_epoch.VALIDATION) == 1.5 and timeline.seconds(demo_epoch.DECODE) == 0


def test_shared_worker_runs_measurements_in_turn_and_names_the_one_that_fails():
    with common.SharedWorker() as worker:
        machine = worker.run("query", "bandwidth", {"megabytes": 4})
        assert machine["bytes_per_s"] > 0 and machine["flops"] > 0 and machine["rss_mb"]["self"] > 0
        with pytest.raises(RuntimeError, match=r"bench service/seed failed in the shared worker(.|\n)*only the 'ours'"):
            worker.run("service", "seed", {})


def test_synthetic_gallery_rows_are_unit_and_clustered():
    gallery = query.synthetic_gallery(2000, 32)
    assert gallery.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(gallery.astype(np.float64), axis=1), 1.0, atol=1e-5)
    # Nearest other row is much closer than a random row: the data has neighbourhoods.
    similarities = gallery[:50].astype(np.float64) @ gallery.T.astype(np.float64)
    np.fill_diagonal(similarities[:, :50], -np.inf)
    assert similarities.max(axis=1).mean() > similarities[:, 100:200].mean() + 0.3


def test_reference_find_matches_returns_what_exact_search_returns():
    gallery = query.synthetic_gallery(3000, 16)
    # The reference normalises on every query, ours once: feed it unnormalised rows.
    scales = np.random.default_rng(2).uniform(0.5, 3.0, (len(gallery), 1)).astype(np.float32)
    queries = query.synthetic_queries(gallery, 5)
    find_matches = query._seed_search(gallery * scales, k=10)
    for row in queries:
        _, ours = knn.exact_search(row[None, :], gallery, 10)
        np.testing.assert_array_equal(find_matches(row[None, :])[0], ours[0])


def test_reference_packer_writes_one_record_per_pair(tmp_path):
    import tensorflow as tf

    image_dir = tmp_path / "images"
    image_dir.mkdir()
    (image_dir / "a.jpg").write_bytes(b"first image bytes")
    (image_dir / "b.jpg").write_bytes(b"second")
    annotations = tmp_path / "captions.jsonl"
    rows = [("a.jpg", "one"), ("a.jpg", "two"), ("b.jpg", "three")]
    annotations.write_text("".join(json.dumps({"image": image, "caption": caption}) + "\n" for image, caption in rows))
    pairs = packing.seed_pairs("folder", annotations, image_dir)
    assert packing.seed_pack(pairs, tmp_path / "out") == 3
    records = list(tf.data.TFRecordDataset(str(tmp_path / "out" / "train-00.tfrecord")).as_numpy_iterator())
    parsed = [tf.train.Example.FromString(record).features.feature for record in records]
    assert [(f["caption"].bytes_list.value[0], f["raw_image"].bytes_list.value[0]) for f in parsed] == [
        (b"one", b"first image bytes"), (b"two", b"first image bytes"), (b"three", b"second")]


@pytest.mark.slow
def test_quick_run_reports_positive_numbers_for_every_benchmark(tmp_path):
    output = tmp_path / "report.json"
    completed = subprocess.run([sys.executable, "-m", "bench", "--quick", "--json", str(output)],
                               capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(output.read_text())
    machine = report["machine"]
    assert machine["cores"] >= 1 and machine["cpu_model"] and machine["date"] and machine["tensorflow"]
    assert report["quick"] is True
    assert set(report["benchmarks"]) == set(BENCHMARKS)
    covered = {row["benchmark"].split(" (")[0].split(" N=")[0] for row in report["table"]}
    assert covered == {"packing", "input pipeline", "training", "index build", "query", "service", "demo epoch"}
    for row in report["table"]:
        reference = not row["benchmark"].startswith(WITHOUT_REFERENCE)
        keys = ("ref", "ours", "ratio", "ref_peak_mb", "ours_peak_mb") if reference else ("ours", "ours_peak_mb")
        for key in keys:
            assert row[key] > 0, (row["benchmark"], key, row[key])
        if not reference:
            assert row["ref"] is None and row["ratio"] is None, row
    levels = report["benchmarks"]["service"]["levels"]
    assert [level["clients"] for level in levels] == [1, 8, 32]
    for level in levels:
        assert level["errors"] == 0 and level["requests"] == 3 * level["clients"]
        assert 0 < level["p50_ms"] <= level["p99_ms"]
    assert report["benchmarks"]["query"]["read_bandwidth_gb_s"] > 0
    for size in report["benchmarks"]["query"]["sizes"].values():
        assert size["bound_ms"] > 0 and 0 <= size["faiss"]["recall_at_10"] <= 1
        assert size["batch"]["bound_ms"] >= size["bound_ms"] and size["float16"]["bound_ms"] == size["bound_ms"] / 2
    assert "ours vs ref" in completed.stdout
    assert "demo epoch" in completed.stdout
    _check_demo_epoch(report["benchmarks"]["demo_epoch"])


def _check_demo_epoch(epoch: dict) -> None:
    """One epoch whose parts are positive and add up to no more than it, within a whole run."""
    assert len(epoch["epochs"]) == 1 and epoch["steps"] > 0
    assert epoch["step_ms"] == pytest.approx(1000 * epoch["steps_seconds"] / epoch["steps"])
    parts = [epoch[key] for key in EPOCH_PARTS]
    assert min(parts) > 0 and epoch["other_seconds"] >= 0
    assert sum(parts) + epoch["other_seconds"] == pytest.approx(epoch["epoch_seconds"])
    assert sum(parts) <= epoch["epoch_seconds"] + 1e-6
    assert epoch["first_epoch_seconds"] == epoch["epoch_seconds"]
    # The run holds the decode, the epoch and more (vocabulary, model, export, scoring).
    assert 0 < epoch["decode_seconds"] and epoch["decode_seconds"] + epoch["epoch_seconds"] < epoch["run_seconds"]
    assert set(epoch["tower_step_ms"]) == {"vision", "text", "both"}
    assert min(epoch["tower_step_ms"].values()) > 0
    assert epoch["batch_size"] == 16 and epoch["image_size"] == [64, 32] and epoch["cpu_model"]
