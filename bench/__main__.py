"""``python -m bench [--quick] [--json OUT]``: dualenc against seed 003's approach, side by side.

Five benchmarks (packing, input pipeline, frozen-backbone training, index build, query
latency) each run the reference approach (``ref``, a faithful re-implementation of the keras.io
example's code) and ours on the same data in the same run, interleaved, every measurement in
its own process (see `bench.common`; ``--quick``, a smoke run, takes them all in one). A sixth,
the search service under concurrent clients, has no reference (the seed has no service): its
rows leave ``ref`` and the ratio empty. So does a seventh, one epoch of ``train.py``'s demo recipe broken down into its parts
(`bench.demo_epoch`). The full run adds rows without a seed counterpart, ours against ours: a 10M-row compressed index,
Beam against the local packer and indexer (`bench.large_index`), and two training workers
against one process (`bench.multiworker`). Prints a table of medians, ratios (> 1: ours is
faster) and peak memory, and writes everything, with the machine's description, as JSON.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path

from bench import common, datasets, demo_epoch, large_index, multiworker
from dualenc.core.files import write_json_atomic
from tfrecords_tools.demo import DEFAULT_IDENTITIES

# A smoke run of every code path (the test suite runs it): the smallest demo (10 identities), two
# training epochs (the later-epoch median needs one after the first) and MobileNetV2's
# smallest input (32 x 32), and one demo-preset epoch on that demo (batch 16: it has about 70
# training pairs: the very run the service serves, so none is trained for the service alone). Its
# numbers are not for comparison: every measurement runs in one shared process (`run_all`).
QUICK = {
    "repeats": 1, "demo_identities": 10, "coco_images": 12, "captions_per_image": 2, "pack_coco": False,
    "pipeline_batch": 16, "pipeline_image_size": (299, 299),
    "training_batch": 16, "training_image_size": (32, 32), "training_epochs": 2, "training_repeats": 1,
    "index_batch": 16, "index_image_size": (32, 32), "index_repeats": 1,
    "query_sizes": (2_000,), "query_count": 10, "bandwidth_megabytes": 16, "query_batch": 64, "batch_count": 2,
    "service_clients": (1, 8, 32), "service_queries_per_client": 3,
    "demo_epoch_identities": 10, "demo_epoch_epochs": 1, "demo_epoch_batch": 16, "demo_epoch_repeats": 3,
}
FULL = {
    "repeats": 3, "demo_identities": 150, "coco_images": 800, "captions_per_image": 2, "pack_coco": True,
    "pipeline_batch": 64, "pipeline_image_size": (299, 299),
    "training_batch": 32, "training_image_size": (224, 224), "training_epochs": 3, "training_repeats": 1,
    "index_batch": 32, "index_image_size": (224, 224), "index_repeats": 2,
    "query_sizes": (10_000, 100_000, 1_000_000), "query_count": 200, "bandwidth_megabytes": 1024,
    "query_batch": 64, "batch_count": 10,
    "service_clients": (1, 8, 32), "service_queries_per_client": 25,
    # train.py's own demo (4,000 people) and batch (None: the preset's); the second epoch is the
    # one reported, the first also traces.
    "demo_epoch_identities": DEFAULT_IDENTITIES, "demo_epoch_epochs": 2, "demo_epoch_batch": None, "demo_epoch_repeats": 20,
}


def pair_summary(runs: dict[str, list[dict]], key: str, higher_is_better: bool) -> dict:
    """Medians of `key` for ref and ours, their ratio oriented so > 1 means ours is better, peaks."""
    ref, ours = common.median_of(runs["seed"], key), common.median_of(runs["ours"], key)
    return {
        "metric": key, "ref": ref, "ours": ours, "ratio": ours / ref if higher_is_better else ref / ours,
        "ref_peak_mb": common.peak_of(runs["seed"]), "ours_peak_mb": common.peak_of(runs["ours"]),
        "repeats": len(runs["seed"]), "runs": runs,
    }


def _row(name: str, summary: dict, note: str = "") -> dict:
    return {"benchmark": name, **{key: summary[key] for key in ("metric", "ref", "ours", "ratio",
                                                                 "ref_peak_mb", "ours_peak_mb")}, "note": note}


def bench_packing(sizes: dict, inputs: dict, scratch: Path, run: common.Runner) -> tuple[dict, list[dict]]:
    """Packing pairs/s per source (the demo, and COCO-like photos in the full run)."""
    sources = {"demo": inputs["demo"]} | ({"coco-like": inputs["coco"]} if sizes["pack_coco"] else {})
    results, rows = {}, []
    for name, source in sources.items():
        def params(variant: str, source=source, name=name) -> dict:
            out = Path(tempfile.mkdtemp(prefix=f"pack-{name}-{variant}-", dir=scratch))
            return {"format": source["format"], "annotations": source["annotations"], "images": source["images"],
                    "out": str(out)}

        runs = common.interleaved("packing", ["seed", "ours"], sizes["repeats"], params, run)
        results[name] = pair_summary(runs, "pairs_per_s", higher_is_better=True)
        floor = run("packing", "floor", params("floor"))
        results[name]["floor"] = floor
        ours_of_floor = results[name]["ours"] / floor["pairs_per_s"]
        rows.append(_row(f"packing ({name}, {source['pairs']} pairs)", results[name],
                         f"ours: 1 thread/core, validates every image; {ours_of_floor:.0%} of the floor "
                         f"({floor['pairs_per_s']:.3g} pairs/s: {floor['cores']} cores, one TF decode per image, "
                         f"{floor['decode_ms']:.3g} ms)"))
    return results, rows


def bench_pipeline(sizes: dict, inputs: dict, run: common.Runner) -> tuple[dict, list[dict]]:
    """TFRecords → batched decoded images, pairs/s."""
    params = {"data_dir": inputs["coco"]["packed"], "stored_dir": inputs["coco"]["stored"],
              "batch_size": sizes["pipeline_batch"], "image_size": list(sizes["pipeline_image_size"])}
    runs = common.interleaved("pipeline", ["seed", "ours", "stored"], sizes["repeats"], params, run)
    summary = pair_summary(runs, "pairs_per_s", higher_is_better=True)
    per_cpu = pair_summary(runs, "pairs_per_cpu_s", higher_is_better=True)
    stored_runs = {"seed": runs["seed"], "ours": runs["stored"]}
    stored = pair_summary(stored_runs, "pairs_per_s", higher_is_better=True)
    stored_per_cpu = pair_summary(stored_runs, "pairs_per_cpu_s", higher_is_better=True)
    pixel_error = common.median_of(runs["stored"], "pixel_error")
    height, width = sizes["pipeline_image_size"]
    note = (f"640x480 JPEG -> {height}x{width}, batch {sizes['pipeline_batch']}; ref float32, ours uint8: training's "
            "own pair_batches (1/2-scale DCT, no antialias under 2x, deterministic order, captions tokenised, "
            "not augmented)")
    name = f"input pipeline ({inputs['coco']['pairs']} pairs)"
    stored_name = f"input pipeline ({inputs['coco']['pairs']} pairs, stored at size)"
    stored_note = (f"ours over the same photos stored to cover {height}x{width} (ref: full size); training's pixels "
                   f"differ from the full-size decode's by {pixel_error:.2f} levels of 255 on average")
    per_cpu_note = "pairs per CPU second (all threads): the work, not the overlap"
    rows = [_row(name, summary, note), _row(name, per_cpu, per_cpu_note),
            _row(stored_name, stored, stored_note), _row(stored_name, stored_per_cpu, per_cpu_note)]
    return {**summary, "per_cpu": per_cpu, "stored": {**stored, "per_cpu": stored_per_cpu,
                                                       "pixel_error": pixel_error}}, rows


def bench_training(sizes: dict, inputs: dict, scratch: Path, run: common.Runner) -> tuple[dict, list[dict]]:
    """Frozen MobileNetV2 + frozen tiny BERT: first epoch, later epochs, 30-epoch extrapolation."""
    params = {"data_dir": inputs["demo"]["packed"], "batch_size": sizes["training_batch"],
              "image_size": list(sizes["training_image_size"]), "epochs": sizes["training_epochs"],
              "scratch": str(scratch), "preprocessor": inputs["bert"]["preprocessor"],
              "encoder": inputs["bert"]["encoder"]}
    runs = common.interleaved("training", ["seed", "ours"], sizes["training_repeats"], params, run)
    summaries = {key: pair_summary(runs, key, higher_is_better=False)
                 for key in ("first_epoch_seconds", "later_epoch_seconds", "run_30_seconds")}
    height, width = sizes["training_image_size"]
    name = f"training ({inputs['demo']['train_pairs']} pairs, {height}x{width})"
    notes = {"first_epoch_seconds": "ours includes computing the cache",
             "later_epoch_seconds": "median of epochs 2..",
             "run_30_seconds": "first + 29 x later"}
    return summaries, [_row(name, summary, notes[key]) for key, summary in summaries.items()]


def bench_index(sizes: dict, inputs: dict, run: common.Runner) -> tuple[dict, list[dict]]:
    """Index build images/s from a saved encoder, with and without the encoder's loading time:
    ours on the SavedModel and on TFLite + XNNPACK (what ``--engine auto`` picks without a GPU)."""
    params = {"images": inputs["coco"]["images"], "batch_size": sizes["index_batch"],
              "image_size": list(sizes["index_image_size"]), "run_dir": inputs["encoder"]["run_dir"],
              "keras_model": inputs["encoder"]["keras_model"]}
    runs = common.interleaved("index", ["seed", "ours", "tflite"], sizes["index_repeats"], params, run)
    summaries = {key: pair_summary(runs, key, higher_is_better=True)
                 for key in ("images_per_s", "embed_images_per_s", "images_per_cpu_s")}
    tflite_runs = {"seed": runs["seed"], "ours": runs["tflite"]}
    tflite = {key: pair_summary(tflite_runs, key, higher_is_better=True) for key in ("images_per_s", "images_per_cpu_s")}
    cosine = min(run["min_cosine_vs_savedmodel"] for run in runs["tflite"])
    name = f"index build ({len(list(Path(inputs['coco']['images']).glob('*.jpg')))} JPEGs)"
    notes = {"images_per_s": "SavedModel; includes loading the encoder", "embed_images_per_s": "SavedModel; encoder load excluded",
             "images_per_cpu_s": "SavedModel; images per CPU second (all threads)"}
    rows = [_row(name, summary, notes[key]) for key, summary in summaries.items()]
    rows += [{**_row(name, summary), "metric": f"tflite_{key}",
              "note": f"--engine tflite (XNNPACK); least cosine to the SavedModel's {cosine:.6f}"}
             for key, summary in tflite.items()]
    return {**summaries, "tflite": tflite, "tflite_min_cosine": cosine}, rows


def bench_query(sizes: dict, run: common.Runner) -> tuple[dict, list[dict]]:
    """Latency over N embeddings: one query (ref, exact, FAISS HNSW), a batch of queries, and a
    float16 gallery, each exact time against its bound. The seed keeps its float32 gallery, so
    the float16 row's ref is the seed's single-query run, not a second run of the same thing.

    Bounds: one query reads the gallery once, N·256·4 bytes / the measured read bandwidth (half
    that in float16); a batch of B queries also needs 2·N·256·B FLOPs, so its bound is the larger
    of the read time and that work at the measured matrix-product speed.
    """
    machine = run("query", "bandwidth", {"megabytes": sizes["bandwidth_megabytes"]})
    bandwidth, flops = machine["bytes_per_s"], machine["flops"]
    results: dict = {"read_bandwidth_gb_s": bandwidth / 1e9, "matmul_gflops": flops / 1e9, "sizes": {}}
    rows = []
    batch = sizes["query_batch"]
    for count in sizes["query_sizes"]:
        params = {"n": count, "dim": 256, "k": 10, "queries": sizes["query_count"]}
        runs = common.interleaved("query", ["seed", "ours", "faiss"], 1, params, run)
        bound_ms = 1000 * count * 256 * 4 / bandwidth
        exact = pair_summary(runs, "p50_ms", higher_is_better=False)
        exact_p95 = pair_summary(runs, "p95_ms", higher_is_better=False)
        faiss = runs["faiss"][0]
        batch_params = {**params, "queries": sizes["batch_count"], "batch": batch}
        batched = pair_summary(common.interleaved("query", ["seed", "ours"], 1, batch_params, run), "p50_ms",
                                higher_is_better=False)
        batch_bound_ms = max(bound_ms, 1000 * 2 * count * 256 * batch / flops)
        half_runs = {"seed": runs["seed"], **common.interleaved("query", ["ours"], 1, {**params, "float16": True},
                                                                run)}
        half = pair_summary(half_runs, "p50_ms", higher_is_better=False)
        results["sizes"][str(count)] = {
            "exact_p50": exact, "exact_p95": exact_p95, "bound_ms": bound_ms,
            "exact_p50_over_bound": exact["ours"] / bound_ms,
            "batch": {"queries": batch, "p50": batched, "bound_ms": batch_bound_ms,
                      "p50_over_bound": batched["ours"] / batch_bound_ms},
            "float16": {"p50": half, "bound_ms": bound_ms / 2, "p50_over_bound": half["ours"] / (bound_ms / 2)},
            "faiss": {key: faiss[key] for key in ("p50_ms", "p95_ms", "build_seconds", "recall_at_10")}
            | {"peak_mb": common.peak_of(runs["faiss"]), "p50_ratio_vs_ref": exact["ref"] / faiss["p50_ms"]},
        }
        name = f"query N={count:,}"
        rows.append(_row(name, exact, f"exact p50; bound {bound_ms:.3g} ms, ours/bound {exact['ours'] / bound_ms:.3g}"))
        rows.append(_row(name, exact_p95, "exact p95"))
        rows.append({**_row(name, batched), "metric": f"batch{batch}_p50_ms",
                     "note": f"{batch} queries per call; bound {batch_bound_ms:.3g} ms "
                             f"({'FLOPs' if batch_bound_ms > bound_ms else 'bandwidth'}), "
                             f"ours/bound {batched['ours'] / batch_bound_ms:.3g}"})
        rows.append({**_row(name, half), "metric": "float16_p50_ms",
                     "note": f"float16 gallery (ref: float32); bound {bound_ms / 2:.3g} ms, "
                             f"ours/bound {half['ours'] / (bound_ms / 2):.3g}"})
        rows.append({"benchmark": name, "metric": "faiss_p50_ms", "ref": exact["ref"], "ours": faiss["p50_ms"],
                     "ratio": exact["ref"] / faiss["p50_ms"], "ref_peak_mb": exact["ref_peak_mb"],
                     "ours_peak_mb": common.peak_of(runs["faiss"]),
                     "note": f"HNSW recall@10 {faiss['recall_at_10']:.3f}, p95 {faiss['p95_ms']:.3g} ms, "
                             f"build {faiss['build_seconds']:.3g} s"})
    return results, rows


def bench_service(sizes: dict, inputs: dict, scratch: Path, run: common.Runner,
                  run_dir: str) -> tuple[dict, list[dict]]:
    """The search service on loopback, serving the run in `run_dir`: queries/s and p50/p99 latency
    per number of concurrent clients."""
    params = {"run_dir": run_dir, "data_dir": inputs["demo"]["packed"], "scratch": str(scratch),
              "clients": list(sizes["service_clients"]), "queries_per_client": sizes["service_queries_per_client"]}
    result = run("service", "ours", params)
    rows = [{"benchmark": f"service ({result['images']} images, loopback)", "metric": f"qps_{level['clients']}_clients",
             "ref": None, "ours": level["qps"], "ratio": None, "ref_peak_mb": None,
             "ours_peak_mb": result["server_peak_mb"],
             "note": f"p50 {level['p50_ms']:.3g} ms, p99 {level['p99_ms']:.3g} ms, "
                     f"{level['requests']} requests, {level['errors']} errors; peak = server"}
            for level in result["levels"]]
    abuse = result["abuse"]
    rows.append({"benchmark": f"service ({result['images']} images, loopback)", "metric": "p99_ms_under_abuse",
                 "ref": None, "ours": abuse["p99_ms"], "ratio": None, "ref_peak_mb": None,
                 "ours_peak_mb": result["server_peak_mb"],
                 "note": f"{abuse['clients']} query clients (p50 {abuse['p50_ms']:.3g} ms, {abuse['errors']} errors) while "
                         f"4 clients upload 1600x1600 PNGs ({abuse['large_uploads_answered']} answered, HTTP "
                         f"{abuse['large_upload_statuses']}) and 40 hold stalled uploads; peak = server"})
    return result, rows


def bench_demo_epoch(sizes: dict, inputs: dict, scratch: Path, run: common.Runner) -> tuple[dict, list[dict]]:
    """One epoch of the demo preset through run_training: steps, validation, commit, decode, towers."""
    params = {"data_dir": inputs["demo_epoch"]["packed"], "epochs": sizes["demo_epoch_epochs"],
              "batch_size": sizes["demo_epoch_batch"], "repeats": sizes["demo_epoch_repeats"], "scratch": str(scratch)}
    return demo_epoch.demo_epoch_rows(params, inputs["demo_epoch"]["train_pairs"], run)


def serves_demo_epoch_run(sizes: dict) -> bool:
    """Whether the demo epoch trains the service's run: on the shared demo, for as many epochs and
    with the batch that `datasets.DEMO_RUN_FLAGS` give ``train.py`` (the quick sizes). Then the
    service serves that run and no other is trained for it."""
    same_demo = sizes["demo_epoch_identities"] == sizes["demo_identities"]
    recipe = (sizes["demo_epoch_epochs"], sizes["demo_epoch_batch"])
    return same_demo and recipe == (datasets.DEMO_RUN_EPOCHS, datasets.DEMO_RUN_BATCH)


def prepare_inputs(sizes: dict, scratch: Path, run: common.Runner) -> dict:
    """Build the shared datasets, tiny BERT, exported encoder (+ TFLite) and the service's trained
    demo run (unless the demo epoch trains it), all in one child process: one TensorFlow start-up
    for everything untimed. The demo epoch trains on the shared demo when the sizes give it as
    many people, else on its own."""
    own_demo = sizes["demo_epoch_identities"] != sizes["demo_identities"]
    inputs = run("datasets", datasets.ALL, {
        "demo": {"root": str(scratch / "demo"), "identities": sizes["demo_identities"]},
        "coco": {"root": str(scratch / "coco"), "images": sizes["coco_images"],
                 "captions_per_image": sizes["captions_per_image"], "cover": list(sizes["pipeline_image_size"])},
        "bert": {"root": str(scratch / "bert")},
        "encoder": {"root": str(scratch / "run"), "image_size": list(sizes["index_image_size"])},
        "tflite": {"run_dir": str(scratch / "run")},
        **({} if serves_demo_epoch_run(sizes) else
           {"demo_run": {"data_dir": str(scratch / "demo" / datasets.PACKED), "out": str(scratch / "demo-run")}}),
        **({"demo_epoch": {"root": str(scratch / "demo-epoch"), "identities": sizes["demo_epoch_identities"]}}
           if own_demo else {}),
    })
    return {"demo_epoch": inputs["demo"], **inputs}


def run_all(quick: bool, scratch: Path) -> dict:
    """Every benchmark; returns the report (machine, sizes, per-benchmark results, table rows).
    The quick run, a smoke run, takes every measurement in one `common.SharedWorker`."""
    if not quick:
        return run_benchmarks(FULL, common.run_isolated, quick, scratch)
    with common.SharedWorker() as worker:
        return run_benchmarks(QUICK, worker.run, quick, scratch)


def run_benchmarks(sizes: dict, run: common.Runner, quick: bool, scratch: Path) -> dict:
    """`run_all` with its sizes and the `run` that takes each measurement."""
    inputs = prepare_inputs(sizes, scratch, run)
    machine = common.machine_facts(inputs["demo"]["tensorflow"])
    report: dict = {"machine": machine, "quick": quick, "sizes": sizes, "benchmarks": {}, "table": []}
    shared_run = serves_demo_epoch_run(sizes)

    def service() -> tuple[dict, list[dict]]:
        run_dir = report["benchmarks"]["demo_epoch"]["run_dir"] if shared_run else inputs["demo_run"]["run_dir"]
        return bench_service(sizes, inputs, scratch, run, run_dir)

    # The demo epoch first when its run is the one the service serves.
    demo_steps = [("service", service), ("demo_epoch", lambda: bench_demo_epoch(sizes, inputs, scratch, run))]
    steps = [
        ("packing", lambda: bench_packing(sizes, inputs, scratch, run)),
        ("pipeline", lambda: bench_pipeline(sizes, inputs, run)),
        ("training", lambda: bench_training(sizes, inputs, scratch, run)),
        ("index", lambda: bench_index(sizes, inputs, run)),
        ("query", lambda: bench_query(sizes, run)),
        *(demo_steps[::-1] if shared_run else demo_steps),
        *large_index.full_run_steps(quick, scratch),  # 10M compressed index, Beam vs local (full run only)
        *([] if quick else [("multiworker", lambda: multiworker.multiworker_rows(scratch))]),
    ]
    for name, step in steps:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        report["benchmarks"][name], rows = step()
        report["table"] += rows
    report["machine"]["load_average_after"] = common.machine_facts("")["load_average_1_5_15"]
    return report


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print the table, write the JSON report."""
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat, all in one process: a smoke run")
    parser.add_argument("--json", metavar="OUT", help="write the full report as JSON to OUT")
    args = parser.parse_args(argv)
    scratch = Path(tempfile.mkdtemp(prefix="dualenc-bench-"))
    try:
        report = run_all(args.quick, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    machine = report["machine"]
    print(f"{machine['cores']} cores, {machine['cpu_model']}, {machine['memory_gib']} GiB, "
          f"TensorFlow {machine['tensorflow']}, {machine['date']}, load {machine['load_average_1_5_15']}")
    print(common.format_table(report["table"], common.TABLE_COLUMNS))
    if args.json:
        write_json_atomic(args.json, report, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
