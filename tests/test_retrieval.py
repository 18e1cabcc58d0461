"""Exact search against a float64 brute force, FAISS against exact, and the ANN choice."""

from __future__ import annotations

import numpy as np
import pytest

from dualenc.retrieval import knn
from dualenc.core.errors import DualEncError


def random_unit(rows: int, dimension: int, seed: int) -> np.ndarray:
    values = np.random.default_rng(seed).standard_normal((rows, dimension))
    return (values / np.linalg.norm(values, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("k", [1, 7, 300, 500])
def test_exact_search_matches_float64_argsort(monkeypatch, k):
    monkeypatch.setattr(knn, "QUERY_BATCH", 16)  # several query batches
    gallery = random_unit(300, 24, seed=1)
    queries = np.random.default_rng(2).standard_normal((50, 24)) * 3.0  # not unit: normalised inside
    scores, indices = knn.exact_search(queries, gallery, k)

    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    reference_scores = unit_queries @ gallery.astype(np.float64).T
    reference = np.argsort(-reference_scores, axis=1, kind="stable")[:, : min(k, 300)]
    assert scores.shape == indices.shape == (50, min(k, 300))
    np.testing.assert_array_equal(indices, reference)
    np.testing.assert_allclose(scores, np.take_along_axis(reference_scores, reference, axis=1), atol=1e-5)
    assert np.all(np.diff(scores, axis=1) <= 0)


def test_exact_search_ties_keep_gallery_order():
    gallery = np.repeat(random_unit(1, 8, seed=3), 6, axis=0)
    _, indices = knn.exact_search(gallery[:1], gallery, 4)
    np.testing.assert_array_equal(indices, [[0, 1, 2, 3]])


def grid_problem(queries: int, gallery: int, dimension: int, levels: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Queries of exactly unit norm and gallery rows on a coarse grid, so every score is a small
    multiple of 1/8 that float32 and float64 compute exactly, under any BLAS summation order:
    ties are exact, and with few `levels` there are many of them."""
    rng = np.random.default_rng(seed)
    gallery_rows = rng.integers(-levels, levels + 1, size=(gallery, dimension)) / 4
    query_rows = np.zeros((queries, dimension))
    for row in query_rows:  # four entries of ±1/2: norm exactly 1, unchanged by normalising
        row[rng.choice(dimension, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    return query_rows.astype(np.float32), gallery_rows.astype(np.float32)


def lexsort_top_k(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Reference: float64 scores, fully ordered by (-score, gallery index) with np.lexsort."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    positions = np.broadcast_to(np.arange(len(gallery)), scores.shape)
    order = np.lexsort((positions, -scores), axis=-1)[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


def assert_matches_lexsort(queries: np.ndarray, gallery: np.ndarray, k: int) -> None:
    scores, indices = knn.exact_search(queries, gallery, k)
    reference_scores, reference_indices = lexsort_top_k(queries, gallery, k)
    np.testing.assert_array_equal(indices, reference_indices)
    np.testing.assert_array_equal(scores, reference_scores)  # exact: grid scores have no rounding


@pytest.mark.parametrize("k", [1, 2, 5, 17, 39, 40, 41])
def test_exact_search_all_equal_scores_come_back_in_gallery_order(monkeypatch, k):
    monkeypatch.setattr(knn, "QUERY_BATCH", 3)
    queries, _ = grid_problem(7, 1, 8, levels=2, seed=6)
    gallery = np.tile(np.float32([0.25, -0.5, 0, 0.75, 0.25, 0, 0, -0.25]), (40, 1))
    orthogonal_query = np.float32([[0, 0, 0.5, 0, 0, 0.5, 0.5, -0.5]])  # scores 0 against every row
    queries = np.concatenate([queries, orthogonal_query])
    _, indices = knn.exact_search(queries, gallery, k)
    np.testing.assert_array_equal(indices, np.tile(np.arange(min(k, 40)), (len(queries), 1)))
    assert_matches_lexsort(queries, gallery, k)


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_exact_search_ties_straddling_the_kth_score_match_lexsort(monkeypatch, seed):
    monkeypatch.setattr(knn, "QUERY_BATCH", 16)  # 64 queries in four batches
    queries, gallery = grid_problem(64, 300, 6, levels=1, seed=seed)
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    straddled = 0
    for k in (1, 3, 10, 50, 149, 299):
        kth = -np.sort(-scores, axis=1)[:, k - 1 : k]
        # Ties at the k-th score that do not all fit in the top k: where argpartition may choose.
        straddled += np.count_nonzero(np.count_nonzero(scores >= kth, axis=1) > k)
        assert_matches_lexsort(queries, gallery, k)
    assert straddled > 100  # the problem really has ties across the cut


def test_exact_search_duplicate_gallery_rows_keep_ascending_order():
    rng = np.random.default_rng(10)
    queries, distinct = grid_problem(64, 25, 16, levels=3, seed=11)
    gallery = distinct[rng.integers(0, len(distinct), size=500)]  # each row about 20 times, shuffled
    for k in (1, 9, 20, 100):
        assert_matches_lexsort(queries, gallery, k)
        assert_matches_lexsort(queries[:1], gallery, k)


def test_exact_search_rejects_dimension_mismatch():
    with pytest.raises(DualEncError, match="rebuild the index"):
        knn.exact_search(random_unit(2, 8, 0), random_unit(5, 9, 1), 3)


@pytest.fixture(scope="module")
def ann_gallery() -> np.ndarray:
    return random_unit(5000, 64, seed=4)


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_faiss_agrees_with_exact(ann_gallery, kind, tmp_path):
    pytest.importorskip("faiss")
    queries = random_unit(200, 64, seed=5)
    index = knn.build_ann(ann_gallery, kind)
    assert knn.ann_recall(index, ann_gallery, queries, k=10) >= 0.95

    # Independent recall: overlap with a float64 brute-force top 10.
    reference = np.argsort(-(queries.astype(np.float64) @ ann_gallery.T.astype(np.float64)), axis=1)[:, :10]
    scores, indices = knn.ann_search(index, queries, 10)
    overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(reference, indices)])
    assert overlap >= 0.95
    np.testing.assert_allclose(scores, np.take_along_axis(queries @ ann_gallery.T, indices, axis=1), atol=1e-4)

    path = tmp_path / f"{kind}.faiss"
    knn.save_ann(index, path)
    _, reloaded = knn.ann_search(knn.load_ann(path), queries, 10)
    np.testing.assert_array_equal(reloaded, indices)


def test_resolve_ann():
    assert knn.resolve_ann("auto", knn.AUTO_ANN_THRESHOLD) == "exact"
    assert knn.resolve_ann("auto", knn.AUTO_ANN_THRESHOLD + 1) == "hnsw"
    assert knn.resolve_ann("ivf", 10) == "ivf"
    with pytest.raises(DualEncError, match="choose one of"):
        knn.resolve_ann("lsh", 10)
