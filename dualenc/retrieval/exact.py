"""Exact top-k by inner product over a large gallery, at close to the speed of reading it once.

For one query the work is a matrix-vector product, so time is bound by memory bandwidth: the
gallery (N·D·4 bytes, 1 GiB at 1M × 256) must stream through the cores once (OpenBLAS's threads
share it out). A partition of all N scores per query costs several further passes; here only
scores above each query's running k-th best become candidates (a comparison per score, then a
handful of rows), the first threshold coming from a sample of the leading rows. With many
queries the gallery is scored in blocks of rows (a (block, Q) score buffer reused, never a
(N, Q) matrix: 1M × 64 scores are 256 MB), each block large enough for OpenBLAS to use every core.

A float16 gallery (half the bytes to read) is converted block by block into a float32 buffer
that stays in cache, then scored the same way: scores are exact for the stored float16 values.

Ranking rule (as `dualenc.retrieval.ranking`): higher score first, equal scores in ascending gallery order.
Blocks are scanned in gallery order and candidates chosen with a stable sort, so equal scores
stay in ascending gallery order; once a query has k candidates a later row needs a strictly
higher score than the k-th (on a tie the earlier row wins). The result equals
`dualenc.retrieval.ranking.top_k` of the full score matrix.
"""

from __future__ import annotations

import numpy as np

# Scores computed per matrix product (64 MiB, plus a 16 MiB mask): one product over a 1M gallery
# for a single query, 256k rows for 64 queries. OpenBLAS runs a (16k, 256)·(256, 64) product on one
# core only, and each product wakes its threads (milliseconds on a busy machine): 64 queries over
# 1M × 256 took 0.41 s of wall time (0.82 s CPU) in 16k-row blocks, 0.37 s (0.70 s) in 256k-row
# ones (2 shared cores, medians of 3 x 2 runs; bench/query.py).
SCORES_PER_BLOCK = 1 << 24
MIN_BLOCK_ROWS = 16384
# A float16 gallery is converted to float32 this many rows at a time (a 2 MiB buffer in cache).
FLOAT16_BLOCK_ROWS = 2048
# A query's first threshold is its k-th best among this many leading rows of its first block:
# a lower bound of its final k-th best, found without partitioning the whole block.
THRESHOLD_SAMPLE = 8192
# A query's candidates are cut back to k once they pass this many (keeps the merges small).
PRUNE_FACTOR = 8


def _best(scores: np.ndarray, indices: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k best candidates, best first; equal scores keep their given (ascending index) order."""
    if len(scores) > 4 * k:
        # Keep every candidate at or above the k-th largest score (all of its ties, in order),
        # so the sort below is over about k items, not all of them.
        keep = scores >= np.partition(scores, len(scores) - k)[len(scores) - k]
        scores, indices = scores[keep], indices[keep]
    order = np.argsort(-scores, kind="stable")[:k]
    return scores[order], indices[order]


class _Candidates:
    """Per query: candidate scores and gallery indices, equal scores always in ascending index
    order, and the score a new row must beat (-inf until the query has k candidates)."""

    def __init__(self, queries: int, k: int):
        self.k = k
        self.scores: list[list[np.ndarray]] = [[] for _ in range(queries)]
        self.indices: list[list[np.ndarray]] = [[] for _ in range(queries)]
        self.counts = np.zeros(queries, np.int64)
        self.threshold = np.full(queries, -np.inf, np.float32)
        self._above = np.zeros(0, bool)

    def _mask(self, shape: tuple[int, int]) -> np.ndarray:
        """A reused boolean buffer of `shape`: a fresh one per block costs page faults each time."""
        if self._above.size < shape[0] * shape[1]:
            self._above = np.empty(shape[0] * shape[1], bool)
        return self._above[: shape[0] * shape[1]].reshape(shape)

    def add(self, block_scores: np.ndarray, first_row: int) -> None:
        """Take the rows of `block_scores` ``(n, Q)`` (gallery rows from `first_row`) that beat
        each query's threshold."""
        unset = self.threshold == -np.inf
        sample = block_scores[:THRESHOLD_SAMPLE, unset]
        if unset.any() and len(sample) > self.k:
            # A query's first block: start just below the k-th best score of its first rows (ties
            # kept), so a few rows become candidates rather than all of them.
            kth = np.partition(sample, len(sample) - self.k, axis=0)[len(sample) - self.k]
            self.threshold[unset] = np.nextafter(kth, np.float32(-np.inf))
        above = np.greater(block_scores, self.threshold, out=self._mask(block_scores.shape))
        # Few scores beat a threshold: find their rows first (one pass), then where they are in
        # those rows. A 2-d `nonzero` over the whole block cost 4x the comparison itself.
        rows = np.flatnonzero(above.any(axis=1))
        if not len(rows):
            return
        in_rows, query_of = np.nonzero(above[rows])
        row = rows[in_rows]
        by_query = np.argsort(query_of, kind="stable")  # rows stay ascending within a query
        row, query_of = row[by_query], query_of[by_query]
        values = block_scores[row, query_of]
        bounds = np.searchsorted(query_of, np.arange(len(self.counts) + 1))
        for query in np.flatnonzero(np.diff(bounds)):
            start, stop = bounds[query], bounds[query + 1]
            self.scores[query].append(values[start:stop])
            self.indices[query].append(row[start:stop] + first_row)
            self.counts[query] += stop - start
            if self.counts[query] >= self.k and (unset[query] or self.counts[query] > PRUNE_FACTOR * self.k):
                self._prune(query)

    def _prune(self, query: int) -> None:
        scores, indices = self.result(query)
        self.scores[query], self.indices[query] = [scores], [indices]
        self.counts[query] = len(scores)
        self.threshold[query] = scores[-1]

    def result(self, query: int) -> tuple[np.ndarray, np.ndarray]:
        """The query's k best so far, best first."""
        if not self.scores[query]:
            return np.zeros(0, np.float32), np.zeros(0, np.int64)
        return _best(np.concatenate(self.scores[query]), np.concatenate(self.indices[query]), self.k)


def _scan(queries: np.ndarray, gallery: np.ndarray, k: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per query, the k best gallery rows: (scores, indices) best first. No threads of its own:
    OpenBLAS's threads already share each matrix product among the cores."""
    if gallery.dtype == np.float16:
        block_rows = FLOAT16_BLOCK_ROWS
    else:
        block_rows = min(max(MIN_BLOCK_ROWS, SCORES_PER_BLOCK // len(queries)), max(1, len(gallery)))
    candidates = _Candidates(len(queries), k)
    block_scores = np.empty((block_rows, len(queries)), np.float32)
    converted = np.empty((block_rows, gallery.shape[1]), np.float32) if gallery.dtype != np.float32 else None
    # A contiguous (D, Q) copy: OpenBLAS takes a slow path for the strided view ``queries.T``.
    queries_t = np.ascontiguousarray(queries.T)
    for first in range(0, len(gallery), block_rows):
        block = gallery[first : first + block_rows]
        if converted is not None:
            np.copyto(converted[: len(block)], block)
            block = converted[: len(block)]
        scores = block_scores[: len(block)]
        # (n, D) · (D, Q) -> (n, Q): a matrix-vector product for one query, where Q · Bᵀ is
        # many times slower in OpenBLAS.
        np.matmul(block, queries_t, out=scores)
        candidates.add(scores, first)
    return [candidates.result(query) for query in range(len(queries))]


def exact_top_k(queries: np.ndarray, gallery: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery rows per query by inner product, best first, equal scores in ascending order.

    `queries` ``(Q, D)`` float32; `gallery` ``(N, D)`` float32 or float16; ``0 ≤ k ≤ N``.
    Returns ``(scores, indices)``, float32 and int64, each ``(Q, k)``.
    """
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    gallery = np.ascontiguousarray(gallery)
    if gallery.dtype != np.float16:
        gallery = gallery.astype(np.float32, copy=False)
    if k == 0 or not len(queries):
        return np.zeros((len(queries), 0), np.float32), np.zeros((len(queries), 0), np.int64)
    scores = np.empty((len(queries), k), np.float32)
    indices = np.empty((len(queries), k), np.int64)
    for query, (query_scores, query_indices) in enumerate(_scan(queries, gallery, k)):
        scores[query], indices[query] = query_scores, query_indices
    return scores, indices
