"""Multi-worker training on one machine: one process against ``dualenc.distribute.launch --workers 2``.

Both variants run the same ``train.py`` command (the demo preset on a packed demo, the same
seed and epochs) from a fresh interpreter; ``two-workers`` adds ``--placement multi-worker``
under `python -m dualenc.launch`, which starts two workers on 127.0.0.1 that split every batch. The
seed has no multi-worker training, so there is no reference: the single process is the
baseline. `run_seconds` is the whole command's wall time (TensorFlow start-up, rendezvous,
vocabulary, the epochs, export and test scoring); `cpu_seconds` is the CPU time of it and its
worker processes. On one 2-core machine the two workers share the cores the single process
had, so this row measures what the collective all-reduce and the split batches cost, not a
speed-up: that needs a machine (or a core set, or a GPU) per worker.
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
from pathlib import Path

from bench import common

IDENTITIES = 300
EPOCHS = 3


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def measure(variant: str, params: dict) -> dict:
    """``prepare``: pack the demo under ``root``; ``one-process`` / ``two-workers``: train on it."""
    if variant == "prepare":
        from tfrecords_tools.demo_cache import packed_demo

        return {"data": str(packed_demo(cache_dir=Path(params["root"]), identities=params["identities"]))}
    train = ["train.py", "--data", params["data"], "--out", params["out"], "--epochs", str(params["epochs"]), "--quiet"]
    if variant == "one-process":
        command = [sys.executable, *train]
    else:
        command = [sys.executable, "-m", "dualenc.launch", "--workers", "2", "--", *train, "--placement", "multi-worker"]
    cpu_before = _children_cpu_seconds()
    with common.Stopwatch() as clock:
        completed = subprocess.run(command, capture_output=True, text=True, cwd=common.REPO_ROOT,
                                   env=common.child_environment())
    if completed.returncode != 0:
        raise RuntimeError(f"{variant} training failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}")
    # The largest training process's peak (two workers hold about twice it together).
    largest_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"run_seconds": clock.seconds, "cpu_seconds": _children_cpu_seconds() - cpu_before, "workers_mb": largest_mb}


def multiworker_rows(scratch: Path, identities: int = IDENTITIES, epochs: int = EPOCHS) -> tuple[dict, list[dict]]:
    """One process vs two workers on the demo of `identities` people, `epochs` epochs each."""
    data = common.run_isolated("multiworker", "prepare", {"root": str(scratch / "demo-mw"), "identities": identities})
    runs = {}
    for variant in ("one-process", "two-workers"):
        out = Path(tempfile.mkdtemp(prefix=f"train-{variant}-", dir=scratch)) / "run"
        runs[variant] = common.run_isolated("multiworker", variant,
                                            {"data": data["data"], "out": str(out), "epochs": epochs})
    one, two = runs["one-process"], runs["two-workers"]
    row = {"benchmark": f"multi-worker training (demo {identities} ids, {epochs} epochs)", "metric": "run_seconds",
           "ref": one["run_seconds"], "ours": two["run_seconds"], "ratio": one["run_seconds"] / two["run_seconds"],
           "ref_peak_mb": common.peak_of([one]), "ours_peak_mb": common.peak_of([two]),
           "note": (f"ref = 1 process; ours = 2 workers on 127.0.0.1 sharing the 2 cores; CPU s "
                    f"{one['cpu_seconds']:.0f} vs {two['cpu_seconds']:.0f}")}
    return runs, [row]


def main() -> int:
    """``python -m bench.multiworker``: print the row's table."""

    with tempfile.TemporaryDirectory(prefix="dualenc-bench-mw-") as scratch:
        _, rows = multiworker_rows(Path(scratch))
    print(common.format_table(rows, common.TABLE_COLUMNS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
