"""Exact search against a float64 brute force, FAISS against exact, and the ANN choice."""

from __future__ import annotations

import numpy as np
import pytest

from dualenc import retrieval
from dualenc.errors import DualEncError


def random_unit(rows: int, dimension: int, seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal((rows, dimension))
    return (values / np.linalg.norm(values, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 7, 300, 500])
def test_exact_search_matches_float64_argsort(monkeypatch, k):
    monkeypatch.setattr(retrieval, "QUERY_BATCH", 16)  # several query batches
    gallery = random_unit(300, 24, seed=1)
    queries = np.random.default_rng(2).standard_normal((50, 24)) * 3.0  # not unit: normalised inside
    scores, indices = retrieval.exact_search(queries, gallery, k)

    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    reference_scores = unit_queries @ gallery.astype(np.float64).T
    reference = np.argsort(-reference_scores, axis=1, kind="stable")[:, : min(k, 300)]
    assert scores.shape == indices.shape == (50, min(k, 300))
    np.testing.assert_array_equal(indices, reference)
    np.testing.assert_allclose(scores, np.take_along_axis(reference_scores, reference, axis=1), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_exact_search_ties_keep_gallery_order():
    gallery = np.repeat(random_unit(1, 8, seed=3), 6, axis=0)
    _, indices = retrieval.exact_search(gallery[:1], gallery, 4)
    np.testing.assert_array_equal(indices, [[0, 1, 2, 3]])


def test_exact_search_rejects_dimension_mismatch():
    with pytest.raises(DualEncError, match="rebuild the index"):
        retrieval.exact_search(random_unit(2, 8, 0), random_unit(5, 9, 1), 3)


@pytest.fixture(scope="module")
def ann_gallery() -> np.ndarray:
    return random_unit(5000, 64, seed=4)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_faiss_agrees_with_exact(ann_gallery, kind, tmp_path):
    pytest.importorskip("faiss")
    queries = random_unit(200, 64, seed=5)
    index = retrieval.build_ann(ann_gallery, kind)
    assert retrieval.ann_recall(index, ann_gallery, queries, k=10) >= 0.95

    # Independent recall: overlap with a float64 brute-force top 10.
    reference = np.argsort(-(queries.astype(np.float64) @ ann_gallery.T.astype(np.float64)), axis=1)[:, :10]
    scores, indices = retrieval.ann_search(index, queries, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(reference, indices)])
    assert overlap >= 0.95
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ ann_gallery.T, indices, axis=1), atol=1e-4)

    path = tmp_path / f"{kind}.faiss"
    retrieval.save_ann(index, path)
    _, reloaded = retrieval.ann_search(retrieval.load_ann(path), queries, 10)
    np.testing.assert_array_equal(reloaded, indices)


def test_resolve_ann():
    assert retrieval.resolve_ann("auto", retrieval.AUTO_ANN_THRESHOLD) == "exact"
    assert retrieval.resolve_ann("auto", retrieval.AUTO_ANN_THRESHOLD + 1) == "hnsw"
    assert retrieval.resolve_ann("ivf", 10) == "ivf"
    with pytest.raises(DualEncError, match="choose one of"):
        retrieval.resolve_ann("lsh", 10)
