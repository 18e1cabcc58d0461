"""Galleries that outgrow one machine: the 10M compressed index, and Beam vs local packing/embedding.

``python -m bench.large_index [--count N] [--json OUT]`` runs the large-index rows alone (the
10M × 256 build takes about ten minutes on 2 cores); ``python -m bench`` (full run) adds all
rows through `full_run_steps`.

Large index (`dualenc.retrieval.large_index`): ``build`` indexes `count` synthetic unit embeddings of
dimension 256, generated shard by shard (never all in memory) from a fixed seed; ``query`` opens
the written index memory-mapped and times single queries. Synthetic embeddings are clustered in
two levels, like a photo collection's topics and the near-duplicate groups within them (uniform
noise on the sphere has no neighbours worth finding and would make any approximate index look
broken): `TOPICS` topics of `SUBTOPICS` groups each; a row is its group's centre plus its own
isotropic offset. Queries are fresh draws from the same distribution, not gallery rows. Targets (issue 17): ≤ 4 GiB peak memory,
p50 ≤ 10 ms at recall@10 ≥ 0.90.

Beam vs local: the demo packed by `tfrecords_tools.writer.pack` (one process per core) and by
the Beam pipeline on the DirectRunner with 2 worker processes; a folder embedded by
`dualenc.retrieval.index.open_index` and by `dualenc.beam.index` (RunInference). Beam's numbers include
starting its worker processes, which is most of the time at this size.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from bench import common

DIMENSION = 256
SHARD_ROWS = 100_000
TOPICS = 2_000
SUBTOPICS = 100  # per topic: 200,000 groups, 50 rows each at 10M
SUBTOPIC_SPREAD = 0.6  # distance of a subtopic's centre from its topic's (topic centres are unit vectors)
ROW_SPREAD = 0.45  # distance of a row from its subtopic's centre
QUERIES = 400  # half calibrate nprobe, half measure recall@10
TIMED_QUERIES = 1_000
FULL_COUNT = 10_000_000
MEMORY_BUDGET = 4 * 2**30
DIRECT_OPTIONS = ["--direct_num_workers=2", "--direct_running_mode=multi_processing"]


def _generator_parts(seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Topic centres (unit rows) and the two factor tables subtopic directions are made of."""
    rng = np.random.default_rng(seed)
    topics = rng.standard_normal((TOPICS, DIMENSION)).astype(np.float32)
    topics /= np.linalg.norm(topics, axis=1, keepdims=True)
    return (topics, rng.standard_normal((TOPICS, DIMENSION)).astype(np.float32),
            rng.standard_normal((SUBTOPICS, DIMENSION)).astype(np.float32))


def synthetic_rows(count: int, seed: int, parts: tuple[np.ndarray, np.ndarray, np.ndarray]) -> np.ndarray:
    """`count` unit rows ``(count, DIMENSION)`` float32 drawn with `seed`.

    A row is a topic, a subtopic of it (its direction the product of a per-topic and a
    per-subtopic random vector: nearly orthogonal for every pair, and nothing of size
    TOPICS × SUBTOPICS × DIMENSION to store) and its own isotropic offset.
    """
    topics, topic_factors, subtopic_factors = parts
    rng = np.random.default_rng(seed)
    topic = rng.integers(0, TOPICS, count)
    direction = topic_factors[topic] * subtopic_factors[rng.integers(0, SUBTOPICS, count)]
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    rows = topics[topic] + SUBTOPIC_SPREAD * direction
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    rows += (ROW_SPREAD / np.sqrt(DIMENSION)) * rng.standard_normal((count, DIMENSION), dtype=np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def synthetic_shards(count: int, parts: tuple[np.ndarray, np.ndarray, np.ndarray]) -> Iterator[np.ndarray]:
    """The gallery, shard by shard; shard i always holds the same rows."""
    for shard, start in enumerate(range(0, count, SHARD_ROWS)):
        yield synthetic_rows(min(SHARD_ROWS, count - start), seed=1_000 + shard, parts=parts)


def _measure_build(params: dict) -> dict:
    from dualenc.retrieval.large_index import build_large_index

    parts = _generator_parts(seed=0)
    queries = synthetic_rows(QUERIES, seed=7, parts=parts)
    report = build_large_index(lambda: synthetic_shards(params["count"], parts), Path(params["path"]),
                               count=params["count"], dimension=DIMENSION, queries=queries,
                               memory_budget=params["memory_budget"], log=sys.stderr)
    return {"factory": report.factory, "nprobe": report.nprobe, "recall_at_10": report.recall_at_10,
            "recall_queries": report.recall_queries, "build_seconds": report.build_seconds,
            "file_mb": report.file_bytes / 2**20}


def _measure_query(params: dict) -> dict:
    from dualenc.retrieval.large_index import open_large_index

    with common.Stopwatch() as load_clock:
        index = open_large_index(Path(params["path"]))
    queries = synthetic_rows(TIMED_QUERIES, seed=8, parts=_generator_parts(seed=0))
    index.search(queries[:10], 10)  # first touches of the coarse quantiser
    latencies = []
    for query in queries:
        started = time.perf_counter()
        index.search(query[None, :], 10)
        latencies.append(1000 * (time.perf_counter() - started))
    return {"open_seconds": load_clock.seconds, "p50_ms": common.percentile(latencies, 0.5),
            "p95_ms": common.percentile(latencies, 0.95), "queries": len(latencies), "nprobe": index.nprobe}


def _measure_packing(variant: str, params: dict) -> dict:
    from tfrecords_tools import cuhk_pedes
    from tfrecords_tools.writer import pack

    splits, skipped = cuhk_pedes.load(Path(params["annotations"]), Path(params["images"]))
    source = {"format": "cuhk-pedes", "annotations": params["annotations"], "images": params["images"]}
    with common.ChildMemoryMonitor() as workers, common.Stopwatch() as clock:
        if variant == "local":
            manifest = pack(splits, Path(params["out"]), source, skipped=skipped)
        else:
            from dualenc.beam.options import pipeline_options
            from tfrecords_tools.beam_pack import pack_with_beam

            options = pipeline_options("DirectRunner", DIRECT_OPTIONS)
            manifest = pack_with_beam(splits, Path(params["out"]), source, options, skipped=skipped)
    pairs = sum(summary.pairs for summary in manifest.splits.values())
    return {"seconds": clock.seconds, "pairs": pairs, "pairs_per_s": pairs / clock.seconds,
            "workers_mb": workers.peak_mb}


def _measure_embedding(variant: str, params: dict) -> dict:
    from dualenc.retrieval.gallery import FolderGallery
    from dualenc.retrieval.index import open_index

    gallery = FolderGallery(Path(params["images"]))
    with common.ChildMemoryMonitor() as workers, common.Stopwatch() as clock:
        if variant == "local":
            index = open_index(Path(params["run_dir"]), gallery, rebuild=True, log=io.StringIO())
        else:
            from dualenc.beam.index import build_index_with_beam
            from dualenc.beam.options import pipeline_options

            options = pipeline_options("DirectRunner", DIRECT_OPTIONS)
            index = build_index_with_beam(Path(params["run_dir"]), gallery, options, log=io.StringIO())
    return {"seconds": clock.seconds, "images": len(index), "images_per_s": len(index) / clock.seconds,
            "workers_mb": workers.peak_mb}


def measure(variant: str, params: dict) -> dict:
    """One measurement in this (child) process: build, query, or a Beam/local packing or embedding."""
    if variant == "build":
        return _measure_build(params)
    if variant == "query":
        return _measure_query(params)
    if params["kind"] == "packing":
        return _measure_packing(variant, params)
    return _measure_embedding(variant, params)


def _run_unlimited(variant: str, params: dict) -> dict:
    """`common.run_isolated` without its time limit, which a 10M build on a loaded 2-core
    machine exceeds (it took over 20 minutes while other jobs held most of the CPU)."""
    command = [sys.executable, "-m", "bench.worker", "large_index", variant, json.dumps(params)]
    completed = subprocess.run(command, capture_output=True, text=True, env=common.child_environment(),
                               cwd=common.REPO_ROOT)
    for line in completed.stdout.splitlines():
        if line.startswith(common.RESULT_MARKER):
            return json.loads(line[len(common.RESULT_MARKER):])
    raise RuntimeError(f"bench large_index/{variant} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")


def large_index_rows(count: int, scratch: Path) -> tuple[dict, list[dict]]:
    """Build then query a `count`-row index, each in its own process; results and table rows."""
    path = scratch / "large.faiss"
    build = _run_unlimited("build", {"count": count, "path": str(path), "memory_budget": MEMORY_BUDGET})
    query = _run_unlimited("query", {"path": str(path)})
    name = f"large index ({count:,} x {DIMENSION}, {build['factory']})"
    build_peak, query_peak = build["rss_mb"]["self"], query["rss_mb"]["self"]

    def row(metric: str, value: float, peak: float, note: str) -> dict:
        return {"benchmark": name, "metric": metric, "ref": None, "ours": value, "ratio": None,
                "ref_peak_mb": None, "ours_peak_mb": peak, "note": note}

    rows = [
        row("build_seconds", build["build_seconds"], build_peak,
            f"3 passes over {SHARD_ROWS:,}-row shards; file {build['file_mb']:,.0f} MiB; budget {MEMORY_BUDGET / 2**30:.0f} GiB"),
        row("recall_at_10", build["recall_at_10"], build_peak,
            f"vs exact search, {build['recall_queries']} held-out queries, nprobe {build['nprobe']}"),
        row("p50_ms", query["p50_ms"], query_peak,
            f"one query at a time, index memory-mapped; p95 {query['p95_ms']:.3g} ms, {query['queries']} queries"),
    ]
    return {"build": build, "query": query}, rows


def beam_rows(scratch: Path) -> tuple[dict, list[dict]]:
    """Beam (DirectRunner, 2 workers) vs local packing of the demo and embedding of a folder."""

    demo = common.run_isolated("datasets", "demo", {"root": str(scratch / "demo"), "identities": 150})
    coco = common.run_isolated("datasets", "coco", {"root": str(scratch / "coco"), "images": 400,
                                                   "captions_per_image": 1})
    encoder = common.run_isolated("datasets", "encoder", {"root": str(scratch / "run"), "image_size": [224, 224]})
    results, rows = {}, []
    for kind, key, name in (("packing", "pairs_per_s", f"packing (demo, {demo['pairs']} pairs)"),
                            ("embedding", "images_per_s", "embedding (400 JPEGs, 224x224)")):
        runs = {}
        for variant in ("local", "beam"):
            if kind == "packing":
                params = {"kind": kind, "annotations": demo["annotations"], "images": demo["images"],
                          "out": tempfile.mkdtemp(prefix=f"pack-{variant}-", dir=scratch)}
            else:
                params = {"kind": kind, "images": coco["images"], "run_dir": encoder["run_dir"]}
            runs[variant] = common.run_isolated("large_index", variant, params)
        results[kind] = runs
        local, beam = runs["local"], runs["beam"]
        rows.append({"benchmark": f"beam vs local {name}", "metric": key, "ref": local[key], "ours": beam[key],
                     "ratio": beam[key] / local[key], "ref_peak_mb": common.peak_of([local]),
                     "ours_peak_mb": common.peak_of([beam]),
                     "note": "ref = local path; ours = Beam DirectRunner, 2 worker processes, 2 cores"})
    return results, rows


def full_run_steps(quick: bool, scratch: Path) -> list:
    """The (name, step) pairs `python -m bench` adds to a full run (none to --quick)."""
    if quick:
        return []
    return [("large_index", lambda: large_index_rows(FULL_COUNT, scratch)), ("beam", lambda: beam_rows(scratch))]


def main(argv: list[str] | None = None) -> int:
    """Run the large-index rows (and, with --beam, the Beam vs local rows); print and save them."""
    from dualenc.core.files import write_json_atomic

    parser = argparse.ArgumentParser(prog="python -m bench.large_index", description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=FULL_COUNT, help="gallery rows (default %(default)s)")
    parser.add_argument("--beam", action="store_true", help="also the Beam vs local packing and embedding rows")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON to OUT")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="dualenc-bench-large-") as scratch:
        report = {"machine": common.machine_facts(""), "benchmarks": {}, "table": []}
        steps = [("large_index", lambda: large_index_rows(args.count, Path(scratch)))]
        if args.beam:
            steps.append(("beam", lambda: beam_rows(Path(scratch))))
        for name, step in steps:
            print(f"running {name} ...", file=sys.stderr, flush=True)
            report["benchmarks"][name], rows = step()
            report["table"] += rows
    print(common.format_table(report["table"], common.TABLE_COLUMNS))
    if args.json:
        write_json_atomic(args.json, report, indent=1)
    else:
        print(json.dumps(report["benchmarks"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
