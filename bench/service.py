"""The search service on loopback: queries per second and latency at 1, 8 and 32 concurrent clients.

A demo-like model (the default demo preset: small CNN + WordPiece BiLSTM, trained for one epoch
on the benchmark's demo data by ``train.py``, among the shared inputs of `bench.datasets`; speed
does not depend on how well it learnt) is served over the demo's train split by
``search.py --serve --port 0`` in its own process. Each client is a thread
with one keep-alive `http.client` connection sending ``GET /api/search?q=…&k=9`` for demo-like
captions, one after the other; every request's latency is recorded, and the throughput is the
requests completed over the wall time of the whole level. Only ``ours``: the seed has no service.
The reported peak memory is the server process's (VmHWM), not the clients'.

The last level is under abuse: the same 8 query clients while 4 clients upload large images
(a 1600 x 1600 noise PNG, about 7.7 MB, decoded in full, over and over) and 40 clients hold uploads
stalled (headers and the first bytes of a body, then nothing; reconnecting when the server's
request deadline cuts them), so it shows what hostile uploads cost everyone else's p99.
"""

from __future__ import annotations

import http.client
import io
import json
import os
import re
import socket
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
ABUSE_QUERY_CLIENTS = 8
LARGE_UPLOADERS = 4
STALLED_UPLOADS = 40
LARGE_UPLOAD_SIDE = 1600  # a noise PNG of about 7.7 MB: under the 10 MiB upload limit
COLOURS = ("red", "blue", "green", "black", "white", "grey", "yellow", "pink")
GARMENTS = ("coat", "jacket", "shirt", "sweater", "pants", "shorts", "skirt")


def demo_queries() -> list[str]:
    """Distinct demo-like captions, so no two consecutive requests are the same text."""
    return [f"a person in a {colour} {garment}" for colour in COLOURS for garment in GARMENTS]


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


def _large_png() -> bytes:
    import numpy as np
    from PIL import Image

    buffer = io.BytesIO()
    pixels = np.random.default_rng(0).integers(0, 256, (LARGE_UPLOAD_SIDE, LARGE_UPLOAD_SIDE, 3), np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _uploader(address: tuple[str, int], image: bytes, stop: threading.Event, statuses: list[int]) -> None:
    boundary = "bench"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n\r\n".encode()
            + image + f"\r\n--{boundary}--\r\n".encode())
    while not stop.is_set():
        connection = http.client.HTTPConnection(*address, timeout=120)
        try:
            connection.request("POST", f"/api/search?k={K}", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})
            response = connection.getresponse()
            response.read()
            statuses.append(response.status)
        except OSError:
            statuses.append(0)
        finally:
            connection.close()


def _staller(address: tuple[str, int], stop: threading.Event) -> None:
    head = (b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; boundary=x\r\n"
            b"Content-Length: 10000000\r\n\r\n--x\r\n")
    while not stop.is_set():
        try:
            with socket.create_connection(address, timeout=1) as connection:
                connection.sendall(head)
                while not stop.is_set():
                    try:
                        if connection.recv(4096) == b"":
                            break  # cut by the server's deadline: come back
                    except socket.timeout:
                        continue
        except OSError:
            time.sleep(0.1)


def abuse_level(address: tuple[str, int], per_client: int) -> dict:
    """`load_level` with 8 query clients while large and stalled uploads are in flight."""
    stop, statuses = threading.Event(), []
    image = _large_png()
    abusers = [threading.Thread(target=_uploader, args=(address, image, stop, statuses)) for _ in range(LARGE_UPLOADERS)]
    abusers += [threading.Thread(target=_staller, args=(address, stop)) for _ in range(STALLED_UPLOADS)]
    for thread in abusers:
        thread.start()
    time.sleep(2.0)  # the uploads and stalls are in flight before the clock starts
    try:
        level = load_level(address, ABUSE_QUERY_CLIENTS, per_client)
    finally:
        stop.set()
        for thread in abusers:
            thread.join(150)
    return {**level, "large_uploads_answered": len(statuses), "large_upload_statuses": sorted(set(statuses))}


def _peak_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024


def measure(variant: str, params: dict) -> dict:
    """Serve the run in `params["run_dir"]`, load the server at each concurrency in `params["clients"]`."""
    if variant != "ours":
        raise ValueError(f"the service benchmark has only the 'ours' variant, not {variant!r}")
    scratch = Path(tempfile.mkdtemp(prefix="service-", dir=params["scratch"]))
    server, address = _start_server(Path(params["run_dir"]), params["data_dir"], scratch / "server.log")
    try:
        _client(address, demo_queries()[:WARMUP_QUERIES], [], [])
        levels = [load_level(address, clients, params["queries_per_client"]) for clients in params["clients"]]
        abuse = abuse_level(address, params["queries_per_client"])
        health = json.loads(_get(address, "/api/health"))
        server_peak = _peak_mb(server.pid)
    finally:
        server.terminate()
        server.wait(60)
    return {"levels": levels, "abuse": abuse, "images": health["images"], "server_peak_mb": server_peak,
            "cores": os.cpu_count()}


def _get(address: tuple[str, int], path: str) -> bytes:
    connection = http.client.HTTPConnection(*address, timeout=60)
    try:
        connection.request("GET", path)
        return connection.getresponse().read()
    finally:
        connection.close()
