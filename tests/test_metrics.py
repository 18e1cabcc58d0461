"""Retrieval metrics against a brute-force float64 reference (full matrix, full argsort)."""

import numpy as np
import pytest

from dualenc.retrieval import metrics
from dualenc.core.errors import DualEncError

CHUNK_SIZES = [1, 7, 1024]  # one query at a time, a size not dividing Q, larger than Q


def _full_ranking(queries, gallery):
    """Gallery indices per query, most similar first; stable so ties keep index order."""
    unit_queries = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    unit_gallery = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    return np.argsort(-(unit_queries @ unit_gallery.T), axis=1, kind="stable")


def reference_recall(queries, gallery, query_labels, gallery_labels, ks):
    ranked_labels = gallery_labels[_full_ranking(queries, gallery)]
    return {k: 100.0 * np.mean([(ranked_labels[q, :k] == query_labels[q]).any() for q in range(len(queries))]) for k in ks}


def reference_map(queries, gallery, query_labels, gallery_labels):
    ranked_labels = gallery_labels[_full_ranking(queries, gallery)]
    average_precisions = []
    for q in range(len(queries)):
        relevant = ranked_labels[q] == query_labels[q]
        if not relevant.any():
            continue
        precision_at_rank = np.cumsum(relevant) / np.arange(1, len(relevant) + 1)
        average_precisions.append(precision_at_rank[relevant].mean())
    return 100.0 * np.mean(average_precisions)


def reference_top_k(queries, gallery, true_indices, k):
    ranking = _full_ranking(queries, gallery)
    return 100.0 * np.mean([true_indices[q] in ranking[q, :k] for q in range(len(queries))])


def _retrieval_problem(seed, queries=23, gallery=40, identities=9, dim=6, noise=0.8):
    """Queries and gallery items near per-identity centres, so rankings are informative."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(identities, dim))
    gallery_labels = rng.integers(0, identities, size=gallery)
    query_labels = rng.integers(0, identities + 2, size=queries)  # some labels absent from the gallery
    gallery_embeddings = centres[gallery_labels] + noise * rng.normal(size=(gallery, dim))
    query_centres = centres[np.minimum(query_labels, identities - 1)]
    query_embeddings = query_centres + noise * rng.normal(size=(queries, dim))
    return query_embeddings, gallery_embeddings, query_labels, gallery_labels


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("seed", [0, 1])
def test_recall_matches_reference(chunk_size, seed):
    queries, gallery, query_labels, gallery_labels = _retrieval_problem(seed)
    ks = (1, 3, 5, 10, 40)
    got = metrics.recall_at_k(queries, gallery, query_labels, gallery_labels, ks=ks, chunk_size=chunk_size)
    expected = reference_recall(queries, gallery, query_labels, gallery_labels, ks)
    assert set(got) == set(ks)
    for k in ks:
        assert isinstance(got[k], float)
        np.testing.assert_allclose(got[k], expected[k], rtol=1e-12)
    assert 0 < got[1] < got[10] < 100  # informative data: neither trivial nor hopeless


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("seed", [0, 1])
def test_mean_average_precision_matches_reference(chunk_size, seed):
    queries, gallery, query_labels, gallery_labels = _retrieval_problem(seed)
    got = metrics.mean_average_precision(queries, gallery, query_labels, gallery_labels, chunk_size=chunk_size)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, reference_map(queries, gallery, query_labels, gallery_labels), rtol=1e-12)


@pytest.mark.parametrize("chunk_size", CHUNK_SIZES)
@pytest.mark.parametrize("k", [1, 5, 40])
def test_top_k_accuracy_matches_reference(chunk_size, k):
    rng = np.random.default_rng(k)
    gallery = rng.normal(size=(40, 6))
    true_indices = rng.integers(0, 40, size=23)
    queries = gallery[true_indices] + 1.2 * rng.normal(size=(23, 6))
    got = metrics.top_k_accuracy(queries, gallery, true_indices, k=k, chunk_size=chunk_size)
    assert isinstance(got, float)
    np.testing.assert_allclose(got, reference_top_k(queries, gallery, true_indices, k), rtol=1e-12)


def test_query_equals_gallery_gives_perfect_scores():
    rng = np.random.default_rng(2)
    embeddings = rng.normal(size=(30, 8))
    labels = np.arange(30) // 3
    assert metrics.recall_at_k(embeddings, embeddings, labels, labels, ks=(1,), chunk_size=4) == {1: 100.0}
    assert metrics.top_k_accuracy(embeddings, embeddings, np.arange(30), k=1, chunk_size=4) == 100.0


def test_random_embeddings_score_near_chance():
    rng = np.random.default_rng(3)
    queries = rng.normal(size=(2000, 16))
    gallery = rng.normal(size=(500, 16))
    gallery_labels = np.arange(500)
    query_labels = rng.integers(0, 500, size=2000)
    recall = metrics.recall_at_k(queries, gallery, query_labels, gallery_labels, ks=(50,), chunk_size=300)[50]
    top_k = metrics.top_k_accuracy(queries, gallery, query_labels, k=50, chunk_size=300)
    # chance is 50/500 = 10%; the binomial standard deviation over 2000 queries is 0.67 points
    assert abs(recall - 10.0) < 3.0
    assert abs(top_k - 10.0) < 3.0


def test_ties_go_to_the_lower_gallery_index():
    gallery = np.array([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    queries = np.array([[2.0, 0.0]])
    assert metrics.top_k_accuracy(queries, gallery, [0], k=1) == 100.0
    assert metrics.top_k_accuracy(queries, gallery, [1], k=1) == 0.0
    assert metrics.recall_at_k(queries, gallery, [7], [3, 7, 7], ks=(1, 2)) == {1: 0.0, 2: 100.0}
    # relevant item at rank 1 (0-based) of 3: AP = 1/2
    assert metrics.mean_average_precision(queries, gallery, [7], [3, 7, 5]) == 50.0


def test_queries_without_relevant_items_miss_in_recall_and_are_excluded_from_map():
    gallery = np.eye(3)
    queries = np.eye(3)[:2]
    assert metrics.recall_at_k(queries, gallery, [0, 9], [0, 1, 2], ks=(3,)) == {3: 50.0}
    assert metrics.mean_average_precision(queries, gallery, [0, 9], [0, 1, 2]) == 100.0
    assert np.isnan(metrics.mean_average_precision(queries, gallery, [8, 9], [0, 1, 2]))


@pytest.mark.parametrize(
    "call",
    [
        lambda q, g: metrics.recall_at_k(q, g, [0, 1], [0, 1, 2], ks=(1, 4)),
        lambda q, g: metrics.recall_at_k(q, g, [0, 1], [0, 1, 2], ks=(0,)),
        lambda q, g: metrics.top_k_accuracy(q, g, [0, 1], k=4),
    ],
)
def test_k_outside_the_gallery_is_a_clear_error(call):
    with pytest.raises(DualEncError, match="k must be between 1 and the gallery size \\(3\\)"):
        call(np.eye(3)[:2], np.eye(3))


def test_bad_inputs_are_clear_errors():
    with pytest.raises(DualEncError, match="same dim"):
        metrics.recall_at_k(np.ones((2, 3)), np.ones((3, 4)), [0, 1], [0, 1, 2])
    with pytest.raises(DualEncError, match="gallery_labels must have one entry per embedding \\(3\\)"):
        metrics.mean_average_precision(np.ones((2, 3)), np.ones((3, 3)), [0, 1], [0, 1])
    with pytest.raises(DualEncError, match="true_indices must index the gallery"):
        metrics.top_k_accuracy(np.ones((2, 3)), np.ones((3, 3)), [0, 3], k=1)
    with pytest.raises(DualEncError, match="chunk_size"):
        metrics.top_k_accuracy(np.ones((2, 3)), np.ones((3, 3)), [0, 1], k=1, chunk_size=0)
