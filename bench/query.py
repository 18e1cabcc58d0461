"""Query latency, one text-query embedding against N gallery embeddings (D = 256, float32).

``seed``: seed 003's `find_matches` minus the text encoder (identical for all variants):
``tf.math.l2_normalize`` of the whole gallery (a NumPy array, as `predict` returns it) and of
the query, ``tf.matmul(query, gallery, transpose_b=True)``, ``tf.math.top_k``, on every query.
``ours``: `dualenc.retrieval.knn.exact_search` over the gallery normalised once at index time.
``faiss``: `dualenc.retrieval.knn.build_ann(kind="hnsw")` + `ann_search`; build time and recall@10
against exact search are reported too (ours, with `--ann hnsw` or `auto` above 50k).
``bandwidth``: memory read bandwidth of this machine (all cores summing disjoint slices of a
large array), from which the lower bound of any exact search, N·D·4 bytes / bandwidth, follows,
and the float32 matrix-product speed (FLOP/s), which bounds a batch of many queries instead.
With ``batch`` B each search call takes B queries (latency per call); with ``float16`` ours
searches a half-precision copy of the gallery (the seed keeps float32).

The gallery is synthetic but clustered like real embeddings (uniform random unit vectors in
256-d have no neighbourhoods, which no approximate index can exploit): `CLUSTERS` unit centres,
each row a centre plus Gaussian noise, normalised. Queries are gallery rows plus noise,
normalised, the way a caption lands near its image.
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np

from bench.common import Stopwatch, percentile

CLUSTERS = 1000
ROW_NOISE = 0.8
QUERY_NOISE = 0.5
GENERATION_CHUNK = 100_000
BANDWIDTH_REPEATS = 5
SEED_QUERY_SECONDS = 20.0  # the seed is slow at 1M: stop after this long (at least MIN_QUERIES)
MIN_QUERIES = 5


def synthetic_gallery(count: int, dimension: int, seed: int = 0) -> np.ndarray:
    """(count, dimension) float32 unit rows around `CLUSTERS` random centres (see module docstring)."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((CLUSTERS, dimension), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    gallery = np.empty((count, dimension), np.float32)
    for start in range(0, count, GENERATION_CHUNK):
        stop = min(count, start + GENERATION_CHUNK)
        rows = centres[rng.integers(0, CLUSTERS, stop - start)]
        rows += ROW_NOISE / np.sqrt(dimension) * rng.standard_normal(rows.shape, dtype=np.float32)
        gallery[start:stop] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return gallery


def synthetic_queries(gallery: np.ndarray, count: int, seed: int = 1) -> np.ndarray:
    """(count, D) unit queries: random gallery rows plus noise."""
    rng = np.random.default_rng(seed)
    rows = gallery[rng.integers(0, len(gallery), count)]
    rows = rows + QUERY_NOISE / np.sqrt(gallery.shape[1]) * rng.standard_normal(rows.shape, dtype=np.float32)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def read_bandwidth(megabytes: int) -> float:
    """Bytes/s reading a `megabytes` float32 array, one thread per core each summing its slice
    (NumPy releases the GIL in reductions); best of `BANDWIDTH_REPEATS`."""
    array = np.ones(megabytes * 2**20 // 4, np.float32)
    slices = np.array_split(array, os.cpu_count() or 1)
    best = float("inf")
    for _ in range(BANDWIDTH_REPEATS):
        threads = [threading.Thread(target=np.sum, args=(part,)) for part in slices]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        best = min(best, time.perf_counter() - start)
    return array.nbytes / best


def matmul_flops(size: int = 2048, repeats: int = 3) -> float:
    """Float32 multiply-adds (counted as 2 FLOPs) per second of one large square matrix product,
    best of `repeats`: what the cores can compute, the bound of a search that is not memory-bound."""
    rng = np.random.default_rng(0)
    left, right = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        left @ right
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _latencies(search, queries: np.ndarray, time_limit: float | None = None, batch: int = 1) -> list[float]:
    latencies = []
    started = time.perf_counter()
    for first in range(0, len(queries) - batch + 1, batch):
        start = time.perf_counter()
        search(queries[first : first + batch])
        latencies.append(time.perf_counter() - start)
        if time_limit is not None and len(latencies) >= MIN_QUERIES and time.perf_counter() - started > time_limit:
            break
    return latencies


def _seed_search(gallery: np.ndarray, k: int):
    import tensorflow as tf

    def find_matches(query_embedding: np.ndarray) -> np.ndarray:
        image_embeddings = tf.math.l2_normalize(gallery, axis=1)
        query = tf.math.l2_normalize(tf.convert_to_tensor(query_embedding), axis=1)
        dot_similarity = tf.matmul(query, image_embeddings, transpose_b=True)
        return tf.math.top_k(dot_similarity, k).indices.numpy()

    return find_matches


def measure(variant: str, params: dict) -> dict:
    """Latency percentiles of `variant` for `params` (n, dim, k, queries; optional batch: queries
    per search call, and float16: the gallery stored in half precision); see the module docstring."""
    if variant == "bandwidth":
        return {"bytes_per_s": read_bandwidth(params["megabytes"]), "flops": matmul_flops()}
    from dualenc.retrieval import knn

    batch = params.get("batch", 1)
    gallery = synthetic_gallery(params["n"], params["dim"])
    queries = synthetic_queries(gallery, params["queries"] * batch)
    if params.get("float16") and variant == "ours":  # the seed keeps its float32 gallery
        gallery = gallery.astype(np.float16)
    k = params["k"]
    result: dict = {"n": params["n"]}
    if variant == "seed":
        search, time_limit = _seed_search(gallery, k), SEED_QUERY_SECONDS
        search(queries[:batch])  # warm-up: TF's first op runs start the runtime
    elif variant == "ours":
        search, time_limit = (lambda query: knn.exact_search(query, gallery, k)), None
    else:
        with Stopwatch() as build:
            index = knn.build_ann(gallery, "hnsw")
        search, time_limit = (lambda query: knn.ann_search(index, query, k)), None
        result["build_seconds"] = build.seconds
        result["recall_at_10"] = knn.ann_recall(index, gallery, queries, k=10)
    search(queries[:batch])
    latencies = _latencies(search, queries, time_limit, batch)
    result.update(
        batch=batch,
        queries=len(latencies),
        p50_ms=1000 * percentile(latencies, 0.5),
        p95_ms=1000 * percentile(latencies, 0.95),
    )
    return result
