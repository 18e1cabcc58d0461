"""The one ranking rule: higher score first, equal scores in ascending gallery order.

Every ordering of gallery items in dualenc — the ranks behind recall, mAP and top-k accuracy,
and the results of exact search — comes from this module, so they agree with each other and
with a stable sort of ``-scores``, whatever NumPy version or BLAS computed the scores. In a row
of scores ``s`` (one query against ``G`` gallery items), item ``g`` is ahead of item ``r`` when::

    s_g > s_r   or   (s_g == s_r and g < r)

Nothing here sorts a whole row: ranks are counts (O(G) per item) and the top k comes from a
partition (O(G)) plus a sort of only the k chosen items (O(k log k)).
"""

from __future__ import annotations

import numpy as np


def ahead_mask(scores: np.ndarray, item_indices: np.ndarray) -> np.ndarray:
    """``(Q, G)`` bool: True where gallery item g is ranked ahead of item ``item_indices[q]`` in row q.

    `scores` is ``(Q, G)``, `item_indices` ``(Q,)`` integer gallery indices.
    """
    item_scores = scores[np.arange(len(item_indices)), item_indices][:, None]
    gallery_positions = np.arange(scores.shape[1])[None, :]
    return (scores > item_scores) | ((scores == item_scores) & (gallery_positions < item_indices[:, None]))


def ranks_of(scores: np.ndarray, item_indices: np.ndarray) -> np.ndarray:
    """``(Q,)`` 0-based rank of gallery item ``item_indices[q]`` in row q of `scores` ``(Q, G)``.

    rank = #{g: s_g > s_item} + #{g < item: s_g = s_item}.
    """
    return np.count_nonzero(ahead_mask(scores, item_indices), axis=1)


def top_k(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first `k` items of each row of `scores` ``(Q, G)`` under the rule, best first.

    Returns ``(top_scores, top_indices)``, each ``(Q, min(k, G))``. ``np.argpartition`` finds the
    k best in O(G) but takes an arbitrary subset of the items tied with the k-th score, so
    rows where it left some of those out are mended to hold the lowest-indexed ones instead.
    """
    gallery_size = scores.shape[1]
    k = min(int(k), gallery_size)
    if k < gallery_size:
        # Partitioning at G - k puts the k largest last, the k-th largest first among them:
        # no negated (Q, G) copy is needed.
        candidates = np.argpartition(scores, gallery_size - k, axis=1)[:, gallery_size - k :]
        _keep_lowest_ties(scores, candidates)
        candidates.sort(axis=1)
    else:
        candidates = np.broadcast_to(np.arange(gallery_size), scores.shape)
    candidate_scores = np.take_along_axis(scores, candidates, axis=1)
    # Candidates are in ascending gallery order, so a stable sort leaves equal scores in it.
    order = np.argsort(-candidate_scores, axis=1, kind="stable")
    return np.take_along_axis(candidate_scores, order, axis=1), np.take_along_axis(candidates, order, axis=1)


def _keep_lowest_ties(scores: np.ndarray, candidates: np.ndarray) -> None:
    """In place: each row of `candidates` ``(Q, k)``, whose first column holds the k-th best
    item, keeps its items scoring above the k-th score and takes the lowest-indexed items tied
    with it. Only rows with more tied items than places are rewritten (none, without ties)."""
    for row_scores, row_candidates in zip(scores, candidates):
        kth_score = row_scores[row_candidates[0]]
        candidate_scores = row_scores[row_candidates]
        tied_places = np.count_nonzero(candidate_scores == kth_score)
        # Row by row: count_nonzero over a 1-d mask is several times faster than with `axis`.
        if np.count_nonzero(row_scores == kth_score) > tied_places:
            above = row_candidates[candidate_scores > kth_score]
            row_candidates[:] = np.concatenate([above, np.flatnonzero(row_scores == kth_score)[:tied_places]])
