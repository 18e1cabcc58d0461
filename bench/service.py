"""The search service on loopback: queries per second and latency at 1, 8 and 32 concurrent clients.

A demo-like model (the default demo preset: small CNN + WordPiece BiLSTM, trained for one epoch
on the benchmark's demo data; speed does not depend on how well it learnt) is served over the
demo's train split by ``search.py --serve --port 0`` in its own process. Each client is a thread
with one keep-alive `http.client` connection sending ``GET /api/search?q=…&k=9`` for demo-like
captions, one after the other; every request's latency is recorded, and the throughput is the
requests completed over the wall time of the whole level. Only ``ours``: the seed has no service.
The reported peak memory is the server process's (VmHWM), not the clients'.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from pathlib import Path

from bench.common import REPO_ROOT, Stopwatch, child_environment, percentile

SPLIT = "train"
K = 9
WARMUP_QUERIES = 20
STARTUP_SECONDS = 300
COLOURS = ("red", "blue", "green", "black", "white", "grey", "yellow", "pink")
GARMENTS = ("coat", "jacket", "shirt", "sweater", "pants", "shorts", "skirt")


def demo_queries() -> list[str]:
    """Distinct demo-like captions, so no two consecutive requests are the same text."""
    return [f"a person in a {colour} {garment}" for colour in COLOURS for garment in GARMENTS]


def _train(data_dir: str, out: Path) -> None:
    command = [sys.executable, str(REPO_ROOT / "train.py"), "--data", data_dir, "--epochs", "1", "--batch-size", "16",
               "--quiet", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, env=child_environment(), cwd=out.parent)


def _start_server(run_dir: Path, data_dir: str, log_path: Path) -> tuple[subprocess.Popen, tuple[str, int]]:
    command = [sys.executable, str(REPO_ROOT / "search.py"), "--serve", "--port", "0", "--model", str(run_dir),
               "--data", data_dir, "--split", SPLIT]
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=child_environment())
    deadline = time.monotonic() + STARTUP_SECONDS
    while server.poll() is None and time.monotonic() < deadline:
        match = re.search(r"at http://127\.0\.0\.1:(\d+)/", log_path.read_text())
        if match:
            return server, ("127.0.0.1", int(match.group(1)))
        time.sleep(0.2)
    server.kill()
    raise RuntimeError(f"the search service did not start:\n{log_path.read_text()[-3000:]}")


def _client(address: tuple[str, int], queries: list[str], latencies: list[float], errors: list[str]) -> None:
    connection = http.client.HTTPConnection(*address, timeout=120)
    try:
        for query in queries:
            start = time.perf_counter()
            connection.request("GET", f"/api/search?{urllib.parse.urlencode({'q': query, 'k': K})}")
            response = connection.getresponse()
            body = response.read()
            latencies.append(time.perf_counter() - start)
            if response.status != 200 or len(json.loads(body)) != K:
                errors.append(f"HTTP {response.status}: {body[:200]!r}")
    finally:
        connection.close()


def load_level(address: tuple[str, int], clients: int, per_client: int) -> dict:
    """`clients` threads × `per_client` queries: qps, p50/p99 latency in ms, and errors."""
    texts = demo_queries()
    latencies: list[float] = []
    errors: list[str] = []
    threads = [
        threading.Thread(target=_client, args=(address, [texts[(number * 7 + index) % len(texts)] for index in range(per_client)],
                                               latencies, errors))
        for number in range(clients)
    ]
    with Stopwatch() as clock:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    return {"clients": clients, "requests": len(latencies), "qps": len(latencies) / clock.seconds,
            "p50_ms": 1000 * percentile(latencies, 0.5), "p99_ms": 1000 * percentile(latencies, 0.99),
            "errors": len(errors), "first_error": errors[0] if errors else None}


def _peak_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def measure(variant: str, params: dict) -> dict:
    """Train, serve, load the server at each concurrency in `params["clients"]`."""
    if variant != "ours":
        raise ValueError(f"the service benchmark has only the 'ours' variant, not {variant!r}")
    scratch = Path(tempfile.mkdtemp(prefix="service-", dir=params["scratch"]))
    run_dir = scratch / "run"
    _train(params["data_dir"], run_dir)
    server, address = _start_server(run_dir, params["data_dir"], scratch / "server.log")
    try:
        _client(address, demo_queries()[:WARMUP_QUERIES], [], [])
        levels = [load_level(address, clients, params["queries_per_client"]) for clients in params["clients"]]
        health = json.loads(_get(address, "/api/health"))
        server_peak = _peak_mb(server.pid)
    finally:
        server.terminate()
        server.wait(60)
    return {"levels": levels, "images": health["images"], "server_peak_mb": server_peak,
            "cores": os.cpu_count()}


def _get(address: tuple[str, int], path: str) -> bytes:
    connection = http.client.HTTPConnection(*address, timeout=60)
    try:
        connection.request("GET", path)
        return connection.getresponse().read()
    finally:
        connection.close()
