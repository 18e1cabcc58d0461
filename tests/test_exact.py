"""`dualenc.retrieval.exact.exact_top_k` (blocked, threaded scan) against NumPy float64 references."""

import numpy as np
import pytest

from dualenc.retrieval import exact
from dualenc.retrieval.exact import exact_top_k


def unit_rows(count: int, dimension: int, seed: int) -> np.ndarray:
    rows = np.random.default_rng(seed).standard_normal((count, dimension))
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def reference_top_k(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """float64 scores, stable sort of the negated scores: equal scores in ascending gallery order."""
    scores = queries.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(scores, order, axis=1), order


@pytest.fixture
def small_blocks(monkeypatch):
    """Blocks of 64 rows and thresholds from 20-row samples, so a few thousand rows cross many
    blocks and the first threshold is only a lower bound."""
    monkeypatch.setattr(exact, "MIN_BLOCK_ROWS", 64)
    monkeypatch.setattr(exact, "SCORES_PER_BLOCK", 64)
    monkeypatch.setattr(exact, "FLOAT16_BLOCK_ROWS", 32)
    monkeypatch.setattr(exact, "THRESHOLD_SAMPLE", 20)


def integer_rows(count: int, dimension: int, seed: int) -> np.ndarray:
    """Small integers: every dot product is an integer that float32 holds exactly, whatever the
    summation order, and many are equal, so the tie rule is exercised too."""
    return np.random.default_rng(seed).integers(-4, 5, (count, dimension)).astype(np.float32)


@pytest.mark.parametrize(("queries", "k"), [(1, 10), (9, 5), (4, 1), (3, 700)])
def test_equals_float64_top_k(small_blocks, queries, k):
    gallery, query_rows = integer_rows(3000, 32, seed=0), integer_rows(queries, 32, seed=1)
    expected_scores, expected = reference_top_k(query_rows, gallery, k)
    scores, indices = exact_top_k(query_rows, gallery, k)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_array_equal(scores, expected_scores)


def test_equals_float64_top_k_on_unit_rows(small_blocks):
    gallery, query_rows = unit_rows(3000, 32, seed=0), unit_rows(5, 32, seed=1)
    expected_scores, expected = reference_top_k(query_rows, gallery, 10)
    # float32 rounding (~1e-7 here) must not be able to swap neighbours in the reference.
    assert np.diff(expected_scores, axis=1).max() < -1e-6
    scores, indices = exact_top_k(query_rows, gallery, 10)
    np.testing.assert_array_equal(indices, expected)
    np.testing.assert_allclose(scores, expected_scores, atol=1e-6)


def test_equal_scores_come_in_ascending_gallery_order(small_blocks):
    distinct = unit_rows(40, 16, seed=2)
    gallery = distinct[np.random.default_rng(3).integers(0, 40, 2000)]  # each row repeated ~50 times
    query_rows = unit_rows(3, 16, seed=4)
    _, indices = exact_top_k(query_rows, gallery, 120)
    np.testing.assert_array_equal(indices, reference_top_k(query_rows, gallery, 120)[1])


def test_float16_gallery_scores_its_stored_values_and_keeps_recall(small_blocks):
    gallery, query_rows = unit_rows(3000, 64, seed=5), unit_rows(50, 64, seed=6)
    half = gallery.astype(np.float16)
    scores, indices = exact_top_k(query_rows, half, 10)
    _, expected_half = reference_top_k(query_rows, half.astype(np.float32), 10)
    np.testing.assert_array_equal(indices, expected_half)
    _, expected = reference_top_k(query_rows, gallery, 10)
    recall = np.mean([len(set(found) & set(wanted)) / 10 for found, wanted in zip(indices, expected)])
    assert recall >= 0.95


def test_k_zero_and_k_equal_to_the_gallery():
    gallery, query_rows = unit_rows(50, 8, seed=7), unit_rows(2, 8, seed=8)
    assert exact_top_k(query_rows, gallery, 0)[1].shape == (2, 0)
    _, indices = exact_top_k(query_rows, gallery, 50)
    np.testing.assert_array_equal(indices, reference_top_k(query_rows, gallery, 50)[1])


def test_best_rows_all_in_the_first_block(small_blocks):
    """The threshold a query starts with from its first block must keep that block's k-th row."""
    query_rows = integer_rows(1, 32, seed=9)
    gallery = integer_rows(3000, 32, seed=10)
    gallery = gallery[np.argsort(-(gallery @ query_rows[0]), kind="stable")]
    _, indices = exact_top_k(query_rows, gallery, 10)
    np.testing.assert_array_equal(indices, reference_top_k(query_rows, gallery, 10)[1])
