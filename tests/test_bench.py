"""bench/: the helpers' arithmetic, the reference re-implementations, and a whole quick run."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bench import common, packing, query
from dualenc.retrieval import knn

REPO_ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ("packing", "pipeline", "training", "index", "query", "service")


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
    assert covered == {"packing", "input pipeline", "training", "index build", "query", "service"}
    for row in report["table"]:
        # The service has no reference: the seed has no server.
        keys = ("ours", "ours_peak_mb") if row["benchmark"].startswith("service") else (
            "ref", "ours", "ratio", "ref_peak_mb", "ours_peak_mb")
        for key in keys:
            assert row[key] > 0, (row["benchmark"], key, row[key])
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
