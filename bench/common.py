"""Shared helpers for the benchmarks: isolated runs, medians, peak memory, machine facts, tables.

Every measured variant runs in its own Python process (`run_isolated`), so each reports its
own peak resident memory (``ru_maxrss`` of the process, and separately of the worker processes
it waited for) and no variant inherits another's warm caches, threads or allocations. A smoke
run, whose numbers are not for comparison, may run them all in one `SharedWorker` instead.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import queue
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

# The columns of every benchmark table, in order: (key in a row, heading).
TABLE_COLUMNS = [
    ("benchmark", "benchmark"), ("metric", "metric"), ("ref", "ref (seed 003)"), ("ours", "ours"),
    ("ratio", "ours vs ref (>1 better)"), ("ref_peak_mb", "ref peak MiB"), ("ours_peak_mb", "ours peak MiB"),
    ("note", "note"),
]

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULT_MARKER = "BENCH-RESULT "
CHILD_TIMEOUT_S = 1200

# How a benchmark runs one measurement, ``(benchmark, variant, params) -> result``: `run_isolated`,
# or a `SharedWorker`'s `run`.
Runner = Callable[[str, str, dict], dict]


class Stopwatch:
    """Wall-clock seconds of a ``with`` block (`time.perf_counter`), and the CPU seconds this
    process spent in it, all threads (`time.process_time`): on a machine shared with other work,
    CPU time per item moves far less than wall time, so ratios of it are the steadier check."""

    def __enter__(self) -> "Stopwatch":
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()
        self.seconds = self.cpu_seconds = 0.0
        return self

    def __exit__(self, *exc_info) -> None:
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


def peak_rss_mb() -> float:
    """Peak resident memory of this process in MiB (``ru_maxrss``, KiB on Linux).

    ``RUSAGE_CHILDREN`` is not used for worker processes: a library that forks a helper
    (``ldconfig`` lookups during imports) leaves a child whose peak is the parent's size.
    """
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class ChildMemoryMonitor:
    """Peak memory of this process's worker processes, sampled from /proc while a block runs.

    Every `interval_s` the children of every thread of this process are listed and each
    child's VmHWM (its own peak RSS) recorded; `peak_mb` sums the last value seen per child:
    the packer's workers live through the whole run, so their peaks add up.
    """

    def __init__(self, interval_s: float = 0.05):
        self.interval_s = interval_s
        self.peaks_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _children(self) -> list[int]:
        pids = []
        for children in Path("/proc/self/task").glob("*/children"):
            try:
                pids += [int(pid) for pid in children.read_text().split()]
            except OSError:
                continue
        return pids

    def _sample(self) -> None:
        while not self._stop.is_set():
            for pid in self._children():
                try:
                    status = Path(f"/proc/{pid}/status").read_text()
                except OSError:
                    continue
                match = re.search(r"VmHWM:\s+(\d+)", status)
                if match:
                    self.peaks_kib[pid] = max(self.peaks_kib.get(pid, 0), int(match.group(1)))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "ChildMemoryMonitor":
        self._thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def peak_mb(self) -> float:
        return sum(self.peaks_kib.values()) / 1024


def child_environment() -> dict[str, str]:
    """The environment for a measured child: quiet TensorFlow, the repository importable."""
    environment = dict(os.environ)
    environment["TF_CPP_MIN_LOG_LEVEL"] = "2"
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), environment.get("PYTHONPATH")]))
    return environment


def run_isolated(benchmark: str, variant: str, params: dict) -> dict:
    """Run ``bench.<benchmark>.measure(variant, params)`` in a fresh interpreter; its result dict
    plus ``rss_mb``: peak MiB of the child (``self``) and of its worker processes (``workers``,
    when the benchmark reports them as ``workers_mb``)."""
    command = [sys.executable, "-m", "bench.worker", benchmark, variant, json.dumps(params)]
    completed = subprocess.run(command, capture_output=True, text=True, env=child_environment(),
                               cwd=REPO_ROOT, timeout=CHILD_TIMEOUT_S)
    for line in completed.stdout.splitlines():
        if line.startswith(RESULT_MARKER):
            return json.loads(line[len(RESULT_MARKER):])
    raise RuntimeError(
        f"bench {benchmark}/{variant} failed (exit {completed.returncode}):\n{completed.stderr[-4000:]}"
    )


class SharedWorker:
    """One ``python -m bench.worker --serve`` child that runs every measurement given to `run`,
    one after another: the smoke run's stand-in for `run_isolated`, which pays TensorFlow's
    start-up (about 4 s of CPU on 2 cores) once instead of once per measurement.

    Its measurements are not isolated: each sees what the ones before it imported, traced and
    allocated, and its ``rss_mb["self"]`` is the shared process's peak so far. The child's
    stderr goes to a file, read back when a measurement fails; a reader thread hands result
    lines over, so a stuck measurement times out as in `run_isolated`.
    """

    def __enter__(self) -> "SharedWorker":
        self._stderr = tempfile.TemporaryFile(mode="w+")
        self._process = subprocess.Popen([sys.executable, "-m", "bench.worker", "--serve"], stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, stderr=self._stderr, text=True,
                                         env=child_environment(), cwd=REPO_ROOT)
        self._results: queue.Queue = queue.Queue()
        threading.Thread(target=self._read_results, daemon=True).start()
        return self

    def _read_results(self) -> None:
        for line in self._process.stdout:
            if line.startswith(RESULT_MARKER):
                self._results.put(json.loads(line[len(RESULT_MARKER):]))
        self._results.put(None)  # the child exited

    def run(self, benchmark: str, variant: str, params: dict) -> dict:
        """``bench.<benchmark>.measure(variant, params)`` in the shared child; its result dict."""
        self._process.stdin.write(json.dumps([benchmark, variant, params]) + "\n")
        self._process.stdin.flush()
        try:
            result = self._results.get(timeout=CHILD_TIMEOUT_S)
        except queue.Empty:
            result = None
        if result is None:
            self._process.kill()
            self._stderr.seek(0)
            raise RuntimeError(f"bench {benchmark}/{variant} failed in the shared worker "
                               f"(exit {self._process.wait()}):\n{self._stderr.read()[-4000:]}")
        return result

    def __exit__(self, *exc_info) -> None:
        self._process.stdin.close()  # the child's loop ends
        try:
            self._process.wait(60)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
        self._stderr.close()


def interleaved(benchmark: str, variants: Sequence[str], repeats: int,
                params: dict | Callable[[str], dict], run: Runner) -> dict[str, list[dict]]:
    """`repeats` rounds of every variant in turn (ref, ours, ref, ours …), each run by `run`
    (isolated, unless a smoke run shares one process), so slow drift in machine load hits all
    variants alike. `params` may depend on the variant."""
    results: dict[str, list[dict]] = {variant: [] for variant in variants}
    for _ in range(repeats):
        for variant in variants:
            variant_params = params(variant) if callable(params) else params
            results[variant].append(run(benchmark, variant, variant_params))
    return results


def median_of(runs: list[dict], key: str) -> float:
    """Median of `key` over runs."""
    return float(statistics.median(run[key] for run in runs))


def peak_of(runs: list[dict]) -> float:
    """Largest peak memory (MiB) over runs: the measured process plus its worker processes."""
    return max(run["rss_mb"]["self"] + run["rss_mb"]["workers"] for run in runs)


def percentile(values: Sequence[float], fraction: float) -> float:
    """The `fraction` quantile (0..1) of `values`, linear interpolation between order statistics."""
    ordered = sorted(values)
    position = fraction * (len(ordered) - 1)
    lower = int(position)
    upper = min(lower + 1, len(ordered) - 1)
    return ordered[lower] + (ordered[upper] - ordered[lower]) * (position - lower)


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or `platform.processor()` elsewhere)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts(tensorflow_version: str) -> dict:
    """Cores, CPU, memory, load and versions: what a reader needs to compare numbers."""
    try:
        memory_kib = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                          if line.startswith("MemTotal"))
    except (OSError, StopIteration):
        memory_kib = 0
    return {
        "cores": os.cpu_count(),
        "cpu_model": cpu_model(),
        "memory_gib": round(memory_kib / 2**20, 1),
        "load_average_1_5_15": [round(value, 2) for value in os.getloadavg()],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "tensorflow": tensorflow_version,
        "platform": platform.platform(),
    }


def format_table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """A plain-text table of `rows` with (key, heading) `columns`; floats to 3 significant digits."""

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1e4 else f"{value:,.0f}"
        return str(value)

    cells = [[heading for _, heading in columns]] + [[cell(row.get(key)) for key, _ in columns] for row in rows]
    widths = [max(len(line[column]) for line in cells) for column in range(len(columns))]
    lines = ["  ".join(text.ljust(width) for text, width in zip(line, widths)).rstrip() for line in cells]
    lines.insert(1, "  ".join("-" * width for width in widths))
    return "\n".join(lines)
