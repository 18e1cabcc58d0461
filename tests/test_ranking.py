"""The ranking rule against np.lexsort on (-score, gallery index): top k and ranks agree with it."""

import numpy as np
import pytest

from dualenc.retrieval import ranking


def lexsort_order(scores: np.ndarray) -> np.ndarray:
    positions = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    return np.lexsort((positions, -scores), axis=-1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("levels", [1, 3, 1000])  # all equal, heavy ties, few ties
def test_top_k_and_ranks_follow_the_lexsort_order(dtype, levels):
    scores = np.random.default_rng(levels).integers(0, levels, size=(40, 90)).astype(dtype) / 7
    order = lexsort_order(scores.astype(np.float64))
    for k in (1, 2, 10, 45, 89, 90, 200):
        top_scores, top_indices = ranking.top_k(scores, k)
        np.testing.assert_array_equal(top_indices, order[:, :k])
        np.testing.assert_array_equal(top_scores, np.take_along_axis(scores, order[:, :k], axis=1))
    for position in (0, 1, 44, 89):
        np.testing.assert_array_equal(ranking.ranks_of(scores, order[:, position]), np.full(40, position))


def test_ahead_mask_counts_higher_scores_and_lower_indexed_ties():
    scores = np.array([[0.5, 0.9, 0.5, 0.1, 0.5]])
    np.testing.assert_array_equal(ranking.ahead_mask(scores, np.array([2])), [[True, True, False, False, False]])
    np.testing.assert_array_equal(ranking.ranks_of(scores, np.array([4])), [3])


def test_top_k_does_not_modify_the_scores():
    scores = np.tile(np.float32([3, 1, 3, 2, 3]), (2, 1))
    ranking.top_k(scores, 2)
    np.testing.assert_array_equal(scores, np.tile(np.float32([3, 1, 3, 2, 3]), (2, 1)))
