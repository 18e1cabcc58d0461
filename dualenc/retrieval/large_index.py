"""Compressed FAISS indexes for galleries too large for memory: IVF + scalar or product quantisation.

Below `needs_compressed_index`'s limit the gallery's float32 embeddings and an HNSW graph fit the
memory budget and `dualenc.retrieval.index` searches them as they are. Above it (about 3.3 million images
at D = 256 with the default 4 GiB: float32 rows cost 4·D bytes, HNSW's graph another
2·M·4 = 256 bytes per image), the index stores each embedding as a short code instead:

- an inverted file (IVF) of `lists` k-means cells, ``lists = 2^round(log2 √N)``: the coarse
  step costs ``lists·D`` per query and each probed cell ``N/lists`` codes, balanced near √N;
- the most accurate code that fits the budget (`plan_index`): float32 ("Flat", 4·D bytes), 8-bit
  scalar quantisation ("SQ8", D bytes), 4-bit ("SQ4"), then product quantisation with D/4,
  D/8, D/16 one-byte sub-codes; each row also costs its 8-byte id in the inverted lists,
- as autofaiss chooses: the budget picks the codec, the gallery size the cell count.

It is built in three passes over the embedding shards (an iterable the caller can restart, e.g.
the ``embeddings-*.npy`` files the Beam path writes), never holding more than one shard of raw
embeddings: (1) a uniform random sample, ``40·lists`` rows (FAISS wants ≥ 39 per centroid),
trains the quantiser and codec; (2) every row is assigned to its cell and the cells' sizes
counted, so the inverted lists are allocated once at their final size (growing them shard by
shard would double-allocate up to 2× their size); (3) rows are encoded into their cells. Pass 3
also keeps the exact top-10 of a sample of queries, shard by shard, so the probe count
(``nprobe``) is calibrated to `TARGET_RECALL` on half the queries and recall@10 is reported on
the other half. The index is written atomically; `open_large_index` memory-maps it
(``faiss.IO_FLAG_MMAP``), so searching touches only the probed cells' pages.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TextIO

import numpy as np

from dualenc.core.errors import DualEncError
from dualenc.core.files import atomic_file
from dualenc.retrieval.knn import HNSW_NEIGHBOURS, import_faiss, neighbour_overlap
from dualenc.retrieval.ranking import top_k

DEFAULT_MEMORY_BUDGET = 4 * 2**30
# The filled inverted lists may use this share of the budget; the rest is for one shard of raw
# embeddings, the training sample, the cell assignments and the interpreter itself.
INDEX_SHARE_OF_BUDGET = 0.7
ID_BYTES = 8  # FAISS stores an int64 id beside every code
ASSIGNMENT_BYTES = 4  # pass 2 keeps each row's cell (int32) until pass 3
TRAINING_ROWS_PER_LIST = 40
MIN_TRAINING_ROWS = 10_000  # product quantisers train 256 centroids per sub-space
TARGET_RECALL = 0.95
RECALL_K = 10


@dataclasses.dataclass(frozen=True)
class IndexPlan:
    """What to build for `count` rows of `dimension`: ``IVF{lists},{codec}``, `code_bytes` per row."""

    count: int
    dimension: int
    lists: int
    codec: str
    code_bytes: int
    training_rows: int

    @property
    def factory(self) -> str:
        """The `faiss.index_factory` string."""
        return f"IVF{self.lists},{self.codec}"

    @property
    def index_bytes(self) -> int:
        """Memory of the filled index while it is built: codes, ids, assignments, centroids."""
        return self.count * (self.code_bytes + ID_BYTES + ASSIGNMENT_BYTES) + self.lists * self.dimension * 4


@dataclasses.dataclass(frozen=True)
class LargeIndexReport:
    """What `build_large_index` built and measured."""

    factory: str
    count: int
    nprobe: int
    recall_at_10: float
    recall_queries: int
    build_seconds: float
    file_bytes: int


def needs_compressed_index(count: int, dimension: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> bool:
    """Whether float32 rows plus an HNSW graph over them would exceed `memory_budget`."""
    return count * (4 * dimension + 2 * HNSW_NEIGHBOURS * 4) > memory_budget  # an HNSW graph: 2·M int32 links a row


def _codecs(dimension: int) -> list[tuple[str, int]]:
    """(codec, bytes per row), most accurate first."""
    codecs = [("Flat", 4 * dimension), ("SQ8", dimension), ("SQ4", math.ceil(dimension / 2))]
    codecs += [(f"PQ{dimension // divisor}", dimension // divisor) for divisor in (4, 8, 16)
               if dimension % divisor == 0 and dimension // divisor >= 1]
    return codecs


def plan_index(count: int, dimension: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> IndexPlan:
    """The IVF cell count from `count` and the most accurate codec whose filled index fits
    `INDEX_SHARE_OF_BUDGET` of `memory_budget`; `DualEncError` when even the smallest does not."""
    if count < 1 or dimension < 1:
        raise DualEncError(f"cannot index {count} embeddings of dimension {dimension}")
    lists = 2 ** round(math.log2(math.sqrt(count)))
    lists = max(1, min(lists, count // TRAINING_ROWS_PER_LIST))
    training_rows = min(count, max(TRAINING_ROWS_PER_LIST * lists, MIN_TRAINING_ROWS))
    for codec, code_bytes in _codecs(dimension):
        if codec.startswith("PQ") and training_rows < MIN_TRAINING_ROWS:
            continue  # too few rows to train 256 centroids per sub-space
        plan = IndexPlan(count, dimension, lists, codec, code_bytes, training_rows)
        if plan.index_bytes <= INDEX_SHARE_OF_BUDGET * memory_budget:
            return plan
    raise DualEncError(f"{count:,} embeddings of dimension {dimension} do not fit a {memory_budget / 2**30:.1f} GiB "
                       "memory budget even as 16-byte codes; give more memory")


def _training_sample(shards: Callable[[], Iterable[np.ndarray]], plan: IndexPlan, seed: int) -> np.ndarray:
    """About `plan.training_rows` rows drawn uniformly (each row kept with the same probability)."""
    rng = np.random.default_rng(seed)
    keep = plan.training_rows / plan.count
    picked = [np.asarray(shard[rng.random(len(shard)) < keep], np.float32) for shard in shards()]
    sample = np.concatenate(picked)
    return np.ascontiguousarray(sample[rng.permutation(len(sample))[:plan.training_rows]])


def _merge_top_k(best: tuple[np.ndarray, np.ndarray], scores: np.ndarray, offset: int,
                 k: int) -> tuple[np.ndarray, np.ndarray]:
    """Fold one shard's scores ``(Q, n)`` into the running top-k ``(scores, ids)``."""
    shard_scores, shard_rows = top_k(scores, min(k, scores.shape[1]))
    all_scores = np.concatenate([best[0], shard_scores], axis=1)
    all_ids = np.concatenate([best[1], shard_rows + offset], axis=1)
    merged_scores, columns = top_k(all_scores, min(k, all_scores.shape[1]))
    return merged_scores, np.take_along_axis(all_ids, columns, axis=1)


def _calibrate_nprobe(index, queries: np.ndarray, exact: np.ndarray, lists: int) -> int:
    """The smallest probe count on a √2 grid (1, 2, 3, 4, 6, 8, 11, 16, …) reaching
    `TARGET_RECALL` on `queries`, or every cell. Search time grows linearly with it, so the grid
    is finer than powers of two."""
    candidates = sorted({min(lists, round(2 ** (step / 2))) for step in range(2 * math.ceil(math.log2(lists)) + 1)})
    for nprobe in candidates:
        index.nprobe = nprobe
        if neighbour_overlap(index.search(queries, RECALL_K)[1], exact) >= TARGET_RECALL:
            return nprobe
    return lists


def build_large_index(shards: Callable[[], Iterable[np.ndarray]], path: Path, *, count: int, dimension: int,
                      queries: np.ndarray, memory_budget: int = DEFAULT_MEMORY_BUDGET, seed: int = 0,
                      log: TextIO | None = None) -> LargeIndexReport:
    """Build the compressed index of the `count` unit-norm rows that `shards()` yields (in order,
    ``(n, dimension)`` float32 blocks; called three times) and write it to `path`.

    `queries` ``(Q, dimension)``, unit-norm, Q ≥ 2: the first half calibrates ``nprobe``, the
    second half measures recall@10 against exact search over every row. Each pass's end is
    noted on `log` (default: none), with the seconds since the start.
    """
    faiss = import_faiss("a compressed index")
    started = time.perf_counter()

    def note(step: str) -> None:
        if log is not None:
            print(f"{plan.factory}: {step} ({time.perf_counter() - started:.0f} s)", file=log, flush=True)

    plan = plan_index(count, dimension, memory_budget)
    queries = np.ascontiguousarray(queries, np.float32)
    index = faiss.index_factory(dimension, plan.factory, faiss.METRIC_INNER_PRODUCT)
    sample = _training_sample(shards, plan, seed)
    note(f"sampled {len(sample):,} training rows")
    index.train(sample)
    del sample
    note("trained")
    ivf = faiss.extract_index_ivf(index)

    assignments, sizes = [], np.zeros(plan.lists, np.int64)
    for shard in shards():
        _, cells = ivf.quantizer.search(np.ascontiguousarray(shard, np.float32), 1)
        assignments.append(cells[:, 0].astype(np.int32))
        sizes += np.bincount(assignments[-1], minlength=plan.lists)
    note(f"assigned {int(sizes.sum()):,} rows to cells")
    if int(sizes.sum()) != count:
        raise DualEncError(f"the embedding shards hold {int(sizes.sum())} rows, not the {count} expected")
    lists = faiss.downcast_InvertedLists(ivf.invlists)
    for cell, size in enumerate(sizes):  # allocate each list once; resizing down keeps the capacity
        lists.resize(cell, int(size))
        lists.resize(cell, 0)

    best = (np.full((len(queries), 0), -np.inf, np.float32), np.zeros((len(queries), 0), np.int64))
    offset = 0
    for shard, cells in zip(shards(), assignments):
        rows = np.ascontiguousarray(shard, np.float32)
        cells = cells.astype(np.int64)  # a named array: swig_ptr does not keep a temporary alive
        ivf.add_core(len(rows), faiss.swig_ptr(rows), None, faiss.swig_ptr(cells))
        best = _merge_top_k(best, queries @ rows.T, offset, RECALL_K)  # (Q, D) · (D, n) -> (Q, n)
        offset += len(rows)
    del assignments
    note("encoded every row")

    half = len(queries) // 2
    ivf.nprobe = _calibrate_nprobe(index, queries[:half], best[1][:half], plan.lists)
    recall = neighbour_overlap(index.search(queries[half:], RECALL_K)[1], best[1][half:])
    note(f"nprobe {ivf.nprobe}: recall@10 {recall:.3f}")
    with atomic_file(path) as temporary:
        faiss.write_index(index, str(temporary))
    return LargeIndexReport(plan.factory, count, int(ivf.nprobe), recall, len(queries) - half,
                            time.perf_counter() - started, Path(path).stat().st_size)


def open_large_index(path: Path):
    """The index at `path`, memory-mapped: its inverted lists stay on disk until probed."""
    faiss = import_faiss("a compressed index")
    try:
        return faiss.read_index(str(path), faiss.IO_FLAG_MMAP)
    except RuntimeError as error:
        raise DualEncError(f"cannot read the compressed index {path} ({str(error).splitlines()[0]}); "
                           "rebuild it with --build-index") from None
