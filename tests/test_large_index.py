"""Compressed FAISS index: the plan from size and budget, recall against float64 exact search, mmap."""

from __future__ import annotations

import numpy as np
import pytest

from dualenc.core.errors import DualEncError
from dualenc.retrieval.large_index import (
    build_large_index,
    needs_compressed_index,
    open_large_index,
    plan_index,
)

faiss = pytest.importorskip("faiss")

COUNT, DIMENSION, SHARD_ROWS = 12_000, 32, 2_500


def clustered(count: int, seed: int) -> np.ndarray:
    """Unit rows around 60 cluster centres (real embeddings cluster; uniform noise would not)."""
    centres = np.random.default_rng(1).standard_normal((60, DIMENSION))
    rng = np.random.default_rng(seed)
    rows = centres[rng.integers(0, len(centres), count)] + 0.6 * rng.standard_normal((count, DIMENSION))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def test_plan_picks_the_most_accurate_codec_that_fits_the_budget():
    ten_million = plan_index(10_000_000, 256, memory_budget=4 * 2**30)
    assert (ten_million.lists, ten_million.codec) == (4096, "SQ8")  # float32 would need 10 GB
    assert ten_million.index_bytes < 0.7 * 4 * 2**30
    assert plan_index(10_000_000, 256, memory_budget=2 * 2**30).codec == "SQ4"  # 1.4 GB of 1.5
    assert plan_index(10_000_000, 256, memory_budget=2**30).codec == "PQ32"  # PQ64 needs 760 MB of 752
    assert plan_index(100_000, 256).codec == "Flat"
    assert plan_index(1_000, 256).lists == 1_000 // 40  # at least 40 training rows per cell
    with pytest.raises(DualEncError, match="do not fit"):
        plan_index(10**9, 256, memory_budget=2**30)
    assert not needs_compressed_index(1_000_000, 256) and needs_compressed_index(5_000_000, 256)


def test_index_built_shard_by_shard_meets_its_recall_and_searches_memory_mapped(tmp_path):
    gallery = clustered(COUNT, seed=0)
    calls = []

    def shards():
        calls.append(1)
        for start in range(0, COUNT, SHARD_ROWS):
            yield gallery[start:start + SHARD_ROWS]

    queries = clustered(100, seed=2)
    # A budget that leaves room for 8-bit codes but not float32 rows.
    report = build_large_index(shards, tmp_path / "gallery.faiss", count=COUNT, dimension=DIMENSION,
                               queries=queries, memory_budget=int(COUNT * 60 / 0.7))
    assert report.factory.endswith(",SQ8") and len(calls) == 3
    index = open_large_index(tmp_path / "gallery.faiss")
    assert index.ntotal == COUNT and index.nprobe == report.nprobe

    exact = np.argsort(-(queries[50:].astype(np.float64) @ gallery.T.astype(np.float64)), axis=1)[:, :10]
    found = index.search(queries[50:], 10)[1]
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(exact, found)])
    assert recall == pytest.approx(report.recall_at_10, abs=0.02)
    assert recall >= 0.9
    in_memory = faiss.read_index(str(tmp_path / "gallery.faiss"))
    np.testing.assert_array_equal(in_memory.search(queries, 10)[1], index.search(queries, 10)[1])


def test_shards_that_disagree_with_the_count_are_refused(tmp_path):
    rows = clustered(11_000, seed=3)
    with pytest.raises(DualEncError, match="hold 11000 rows, not the 12000"):
        build_large_index(lambda: [rows], tmp_path / "x.faiss", count=12_000, dimension=DIMENSION,
                          queries=rows[:10])
