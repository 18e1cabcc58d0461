"""Retrieval metrics over embeddings: recall@k, mean average precision, mINP, top-k accuracy.

Inputs are NumPy arrays: queries (Q, D), gallery (G, D), labels (Q,) and (G,). Similarity is
cosine: both sides are L2-normalised here (a zero row stays zero and scores 0 against all).
Queries are processed `chunk_size` at a time, so peak memory is a (chunk_size, G) block, never
the (Q, G) matrix: a 100k × 100k evaluation with chunks of 1024 holds a few 0.4 GB blocks
(float32) at a time.

Ranking and ties follow `dualenc.retrieval.ranking`, the rule exact search also uses: gallery items are
ordered by descending similarity, and equal similarities by ascending gallery index (the order
a stable sort of ``-similarity`` gives). Ranks are counted directly — item r's 0-based rank is
``#{g: s_g > s_r} + #{g < r: s_g = s_r}`` — which costs O(G) per query like
``np.argpartition`` but, unlike it, gives the same answer whatever the ties. Results are
percentages (0–100) as plain python floats.

A `k` larger than the gallery is an error rather than clamped: recall "at 100" on a gallery of
50 would be a trivial 100 and easy to misread.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

from dualenc.core.errors import DualEncError
from dualenc.retrieval.ranking import ahead_mask, ranks_of


def _unit_rows(embeddings: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, np.finfo(embeddings.dtype).tiny)


def _prepare(query_embeddings: np.ndarray, gallery_embeddings: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Validate shapes and return unit-norm float copies (float64 stays float64, else float32)."""
    queries = np.asarray(query_embeddings)
    gallery = np.asarray(gallery_embeddings)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise DualEncError(
            f"embeddings must be (queries, dim) and (gallery, dim) with the same dim; got {queries.shape} and {gallery.shape}"
        )
    if len(gallery) == 0 or len(queries) == 0:
        raise DualEncError(f"need at least one query and one gallery item; got {len(queries)} and {len(gallery)}")
    dtype = np.float64 if np.float64 in (queries.dtype, gallery.dtype) else np.float32
    return _unit_rows(queries.astype(dtype)), _unit_rows(gallery.astype(dtype))


def _check_length(name: str, values: np.ndarray, expected: int) -> np.ndarray:
    values = np.asarray(values).reshape(-1)
    if len(values) != expected:
        raise DualEncError(f"{name} must have one entry per embedding ({expected}); got {len(values)}")
    return values


def _check_k(k: int, gallery_size: int) -> int:
    if not 1 <= int(k) <= gallery_size:
        raise DualEncError(f"k must be between 1 and the gallery size ({gallery_size}); got {k}")
    return int(k)


def _chunks(count: int, chunk_size: int) -> Iterator[slice]:
    if chunk_size < 1:
        raise DualEncError(f"chunk_size must be >= 1; got {chunk_size}")
    for start in range(0, count, chunk_size):
        yield slice(start, min(start + chunk_size, count))


def recall_at_k(
    query_embeddings: np.ndarray,
    gallery_embeddings: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    ks: Sequence[int] = (1, 5, 10),
    chunk_size: int = 1024,
) -> dict[int, float]:
    """Percent of queries with at least one same-label gallery item among their top k (seed 000).

    recall@k = 100 · mean_q [rank_q < k], where rank_q is the 0-based rank of the best-ranked
    gallery item with label == query_labels[q]. Queries with no such item count as misses (the
    denominator is all Q queries, as in the seed's `compute_topk`). Returns {k: percent}.
    """
    queries, gallery = _prepare(query_embeddings, gallery_embeddings)
    query_labels = _check_length("query_labels", query_labels, len(queries))
    gallery_labels = _check_length("gallery_labels", gallery_labels, len(gallery))
    ks = [_check_k(k, len(gallery)) for k in ks]
    best_ranks = np.empty(len(queries), dtype=np.int64)
    for rows in _chunks(len(queries), chunk_size):
        similarities = queries[rows] @ gallery.T
        relevant = gallery_labels[None, :] == query_labels[rows, None]
        # argmax returns the first maximum, so among equally similar relevant items it picks the
        # lowest index: the one that comes first under the tie rule.
        best_relevant = np.argmax(np.where(relevant, similarities, -np.inf), axis=1)
        ranks = ranks_of(similarities, best_relevant)
        best_ranks[rows] = np.where(relevant.any(axis=1), ranks, len(gallery))
    return {k: 100.0 * float(np.mean(best_ranks < k)) for k in ks}


def mean_average_precision(
    query_embeddings: np.ndarray,
    gallery_embeddings: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    chunk_size: int = 1024,
) -> float:
    """Mean over queries of average precision over the full gallery ranking, in percent.

    For a query with relevant (same-label) items r₁ … r_n at 0-based ranks ρ₁ < … < ρ_n::

        AP = (1/n) Σ_j j / (ρ_j + 1)        (precision at the rank of each relevant item)

    Queries with no relevant gallery item have no defined AP and are excluded from the mean;
    when no query has one the result is NaN. Ranks are counted only for (query, relevant item)
    pairs, in blocks of `chunk_size` pairs, so memory stays O(chunk_size · G).
    """
    queries, gallery = _prepare(query_embeddings, gallery_embeddings)
    query_labels = _check_length("query_labels", query_labels, len(queries))
    gallery_labels = _check_length("gallery_labels", gallery_labels, len(gallery))
    precision_sum = np.zeros(len(queries))
    relevant_count = np.zeros(len(queries))
    for rows in _chunks(len(queries), chunk_size):
        similarities = queries[rows] @ gallery.T
        relevant = gallery_labels[None, :] == query_labels[rows, None]
        pair_rows, pair_items = np.nonzero(relevant)
        for pairs in _chunks(len(pair_rows), chunk_size):
            ahead = ahead_mask(similarities[pair_rows[pairs]], pair_items[pairs])
            rank = np.count_nonzero(ahead, axis=1)
            relevant_ahead = np.count_nonzero(ahead & relevant[pair_rows[pairs]], axis=1)
            query_index = pair_rows[pairs] + rows.start
            np.add.at(precision_sum, query_index, (relevant_ahead + 1) / (rank + 1))
        relevant_count[rows] = relevant.sum(axis=1)
    answered = relevant_count > 0
    if not answered.any():
        return float("nan")
    return 100.0 * float(np.mean(precision_sum[answered] / relevant_count[answered]))


def mean_inverse_negative_penalty(
    query_embeddings: np.ndarray,
    gallery_embeddings: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    chunk_size: int = 1024,
) -> float:
    """mINP: how far down the ranking a query's hardest relevant item lies, in percent.

    For a query with n relevant (same-label) gallery items, the last of which is at 0-based
    rank ρ_last::

        INP = n / (ρ_last + 1)        (the share of true matches in the ranking down to the last)

    mINP is its mean over queries (Ye et al., "Deep Learning for Person Re-identification: A
    Survey and Outlook", TPAMI 2021), what person-search papers (IRRA and its followers) print
    beside mAP: 100 when every match precedes every non-match, small when one match is buried.
    Queries with no relevant item are excluded, NaN when none has one (as in
    `mean_average_precision`). Only the last relevant item of each query is ranked, so this
    costs O(G) per query.
    """
    queries, gallery = _prepare(query_embeddings, gallery_embeddings)
    query_labels = _check_length("query_labels", query_labels, len(queries))
    gallery_labels = _check_length("gallery_labels", gallery_labels, len(gallery))
    penalties = []
    for rows in _chunks(len(queries), chunk_size):
        similarities = queries[rows] @ gallery.T
        relevant = gallery_labels[None, :] == query_labels[rows, None]
        answered = relevant.any(axis=1)
        # The last relevant item has the lowest similarity and, among equal ones, the highest
        # index: argmin over the reversed row finds that last minimum first.
        reversed_scores = np.where(relevant, similarities, np.inf)[:, ::-1]
        last_relevant = len(gallery) - 1 - np.argmin(reversed_scores, axis=1)
        ranks = ranks_of(similarities, last_relevant)
        penalties.append((relevant.sum(axis=1) / (ranks + 1))[answered])
    answered_penalties = np.concatenate(penalties)
    if not answered_penalties.size:
        return float("nan")
    return 100.0 * float(np.mean(answered_penalties))


def top_k_accuracy(
    query_embeddings: np.ndarray,
    gallery_embeddings: np.ndarray,
    true_indices: np.ndarray,
    k: int = 100,
    chunk_size: int = 1024,
) -> float:
    """Percent of queries whose own gallery item (gallery row true_indices[q]) ranks in the top k.

    Seed 003's evaluation: each image's first caption queries the whole image gallery;
    top-k accuracy = 100 · mean_q [rank(true_indices[q]) < k].
    """
    queries, gallery = _prepare(query_embeddings, gallery_embeddings)
    true_indices = _check_length("true_indices", true_indices, len(queries)).astype(np.int64)
    if true_indices.size and (true_indices.min() < 0 or true_indices.max() >= len(gallery)):
        raise DualEncError(f"true_indices must index the gallery (0 to {len(gallery) - 1}); got {true_indices.min()} to {true_indices.max()}")
    k = _check_k(k, len(gallery))
    hits = 0
    for rows in _chunks(len(queries), chunk_size):
        hits += int(np.count_nonzero(ranks_of(queries[rows] @ gallery.T, true_indices[rows]) < k))
    return 100.0 * hits / len(queries)
