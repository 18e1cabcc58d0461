"""Nearest-neighbour search over a unit-norm gallery: exact (NumPy) or approximate (FAISS).

Gallery rows are L2-normalised once, when the index is built, so a query's cosine similarity
to every image is one matrix product, ``scores = Q · Gᵀ`` with ``Q: (q, D)``, ``G: (N, D)``;
nothing about the gallery is recomputed per query (seed 003 re-normalised it every time).

Exact search scans the gallery block by block (`dualenc.retrieval.exact`), keeping per query only the
scores above its running k-th best, so it runs near the speed of reading the gallery once; equal
scores come in ascending gallery order (the rule `dualenc.retrieval.ranking` gives the metrics). Approximate search uses FAISS (imported only when asked for): HNSW
graphs or an inverted file (IVF), both with inner-product metric.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from dualenc.core.errors import DualEncError, first_line
from dualenc.core.files import atomic_file
from dualenc.retrieval.exact import exact_top_k

ANN_CHOICES = ("auto", "exact", "hnsw", "ivf")

# Above this many gallery images `--ann auto` switches from exact search to HNSW. Measured with
# D = 256, k = 9, one query at a time on a 2-core CPU: exact search took 0.4 ms at 10k images,
# 3.5 ms at 50k, 7.8 ms at 100k and 21 ms at 200k (it reads the whole N × D gallery per query,
# so it grows linearly), while HNSW stays well under a millisecond at recall@10 ≥ 0.95. Up to
# here exact search costs a few milliseconds and is exact, so approximation buys nothing.
AUTO_ANN_THRESHOLD = 50_000

# Queries scanned together: bounds the per-block score buffer (batch × block rows × 4 bytes).
QUERY_BATCH = 256

HNSW_NEIGHBOURS = 32
HNSW_EF_CONSTRUCTION = 80
HNSW_EF_SEARCH = 128
IVF_TARGET_RECALL = 0.95
IVF_CALIBRATION_QUERIES = 200


def normalise_rows(embeddings: np.ndarray) -> np.ndarray:
    """``(N, D)`` → float32 rows of unit L2 norm; an all-zero row stays zero."""
    embeddings = np.asarray(embeddings, dtype=np.float32)
    norms = np.linalg.norm(embeddings, axis=1, keepdims=True)
    return embeddings / np.maximum(norms, np.finfo(np.float32).tiny)


def finite_queries(query_embeddings: np.ndarray) -> np.ndarray:
    """``(Q, D)`` (or one ``(D,)``) query embeddings as unit float32 rows; `DualEncError` when one
    is not finite: a NaN scores no image, and the top-k scan would fail on it."""
    queries = normalise_rows(np.atleast_2d(query_embeddings))
    if not np.isfinite(queries).all():
        raise DualEncError("the query's embedding is not finite (NaN or inf): the encoder is broken; "
                           "re-export it, or retrain the run")
    return queries


def exact_search(
    query_embeddings: np.ndarray, gallery_embeddings: np.ndarray, k: int
) -> tuple[np.ndarray, np.ndarray]:
    """Top-k gallery rows per query by inner product, best first.

    `gallery_embeddings` ``(N, D)`` must already be unit-norm (the index stores it so), float32
    or float16 (read as stored: half the memory traffic); queries ``(Q, D)`` are normalised here.
    Returns ``(scores, indices)``, each ``(Q, min(k, N))``, scores float32 in descending order per
    row, equal scores in ascending gallery order (`dualenc.retrieval.exact.exact_top_k` scans the gallery).
    """
    queries = finite_queries(query_embeddings)
    gallery = np.asarray(gallery_embeddings)
    if gallery.dtype != np.float16:
        gallery = gallery.astype(np.float32, copy=False)
    if queries.shape[1] != gallery.shape[1]:
        raise DualEncError(
            f"query embeddings have {queries.shape[1]} dimensions but the gallery has {gallery.shape[1]}; "
            "rebuild the index with this model (--build-index)"
        )
    k = min(int(k), len(gallery))
    all_scores = np.empty((len(queries), k), np.float32)
    all_indices = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), QUERY_BATCH):
        rows = slice(start, start + QUERY_BATCH)
        all_scores[rows], all_indices[rows] = exact_top_k(queries[rows], gallery, k)
    return all_scores, all_indices


def import_faiss(purpose: str = "approximate search"):
    """The `faiss` module, or a `DualEncError` saying how to install it (`purpose` needs it)."""
    try:
        import faiss
    except ImportError:
        raise DualEncError(f"{purpose} needs faiss: pip install faiss-cpu, or pass --ann exact") from None
    return faiss


def resolve_ann(choice: str, gallery_size: int) -> str:
    """The search kind to use: `choice` itself, or for "auto" exact below `AUTO_ANN_THRESHOLD`, else HNSW."""
    if choice not in ANN_CHOICES:
        raise DualEncError(f"unknown --ann {choice!r}; choose one of: {', '.join(ANN_CHOICES)}")
    if choice == "auto":
        return "hnsw" if gallery_size > AUTO_ANN_THRESHOLD else "exact"
    return choice


def ivf_lists(gallery_size: int) -> int:
    """Inverted lists for IVF: ~4·√N (FAISS's guideline), at most N/39 so each list trains on ≥ 39 points."""
    return int(max(1, min(4 * np.sqrt(gallery_size), gallery_size // 39)))


def build_ann(gallery_embeddings: np.ndarray, kind: str):
    """A FAISS inner-product index of kind "hnsw" or "ivf" over unit-norm ``(N, D)`` rows.

    IVF's probe count is calibrated: doubled from 1/16 of its lists until recall@10 against
    exact search reaches `IVF_TARGET_RECALL` on a sample of gallery rows used as queries (how
    many lists are needed depends on how clustered the embeddings are).
    """
    faiss = import_faiss()
    gallery = np.ascontiguousarray(gallery_embeddings, dtype=np.float32)
    dimension = gallery.shape[1]
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(dimension, HNSW_NEIGHBOURS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = HNSW_EF_CONSTRUCTION
        index.hnsw.efSearch = HNSW_EF_SEARCH
    elif kind == "ivf":
        lists = ivf_lists(len(gallery))
        quantizer = faiss.IndexFlatIP(dimension)
        index = faiss.IndexIVFFlat(quantizer, dimension, lists, faiss.METRIC_INNER_PRODUCT)
        index.train(gallery)
    else:
        raise DualEncError(f"no approximate index of kind {kind!r}; choose hnsw or ivf")
    index.add(gallery)
    if kind == "ivf":
        _calibrate_probes(index, gallery, lists)
    return index


def _calibrate_probes(index, gallery: np.ndarray, lists: int) -> None:
    # Perturbed gallery rows stand in for queries: near the data, but not exactly on a point.
    rng = np.random.default_rng(0)
    sample = gallery[rng.permutation(len(gallery))[:IVF_CALIBRATION_QUERIES]]
    queries = normalise_rows(sample + 0.5 * rng.standard_normal(sample.shape).astype(np.float32) / np.sqrt(gallery.shape[1]))
    index.nprobe = max(1, lists // 16)
    while index.nprobe < lists and ann_recall(index, gallery, queries, k=10) < IVF_TARGET_RECALL:
        index.nprobe = min(lists, 2 * index.nprobe)


def ann_search(index, query_embeddings: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by a FAISS index, like `exact_search`: ``(scores, indices)``, each ``(Q, min(k, N))``.

    FAISS pads a row with id -1 when its probe (IVF cells, HNSW beam) reached fewer than k
    rows; such queries are searched again with every cell probed (IVF, compressed included) or
    a beam of k (HNSW). An id that is still -1 means "no more results": callers stop there
    (`dualenc.retrieval.query.result_dicts` does), never show it as a gallery row.
    """
    queries = np.ascontiguousarray(finite_queries(query_embeddings))
    k = min(int(k), index.ntotal)
    scores, indices = index.search(queries, k)
    short = (indices < 0).any(axis=1)
    if short.any():
        scores[short], indices[short] = index.search(queries[short], k, params=_widest_probe(index, k))
    return scores.astype(np.float32), indices.astype(np.int64)


def _widest_probe(index, k: int):
    """Search parameters that reach every row an IVF index holds, or a beam of `k` for HNSW."""
    faiss = import_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        params = faiss.SearchParametersIVF()
        params.nprobe = ivf.nlist
        return params
    params = faiss.SearchParametersHNSW()
    params.efSearch = max(k, HNSW_EF_SEARCH)
    return params


def neighbour_overlap(approximate: np.ndarray, exact: np.ndarray) -> float:
    """Recall of an approximate search against exact search: the mean fraction of each row of
    `exact` ids (``(Q, k)``) found in the same row of `approximate`, in [0, 1]. (Not
    `dualenc.retrieval.metrics.recall_at_k`, which asks whether a query's matching label is found.)"""
    found = [len(set(row_exact) & set(row_approximate)) for row_exact, row_approximate in zip(exact, approximate)]
    return float(np.sum(found) / exact.size) if exact.size else 1.0


def ann_recall(index, gallery_embeddings: np.ndarray, query_embeddings: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top-k that the approximate index also returns, in [0, 1]."""
    _, exact = exact_search(query_embeddings, gallery_embeddings, k)
    _, approximate = ann_search(index, query_embeddings, k)
    return neighbour_overlap(approximate, exact)


def save_ann(index, path: Path) -> None:
    """Write a FAISS index to `path` atomically (temporary sibling, synced, then renamed)."""
    faiss = import_faiss()
    try:
        with atomic_file(path) as temporary:
            faiss.write_index(index, str(temporary))
    except RuntimeError as error:  # FAISS's own I/O failure (full disk, say)
        raise DualEncError(f"cannot write {path} ({first_line(error)})") from None


def load_ann(path: Path):
    """Read a FAISS index written by `save_ann`, restoring its search-time settings; a cut or
    damaged file is a `DualEncError`."""
    faiss = import_faiss()
    try:
        index = faiss.read_index(str(path))
    except RuntimeError as error:
        raise DualEncError(f"cannot read the FAISS index {path} ({first_line(error)})") from None
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = HNSW_EF_SEARCH
    return index
