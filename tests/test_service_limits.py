"""The search service against careless and hostile clients: every limit in `ServiceLimits`
holds and answers one line with a 4xx (or a 503 when the server is at a limit), another site's
page cannot use the service, and no response names a server path.

Runs on the tiny colour run (tests/support/colour_run.py), in-process through Starlette's test
client, and through one real ``search.py --serve`` on 127.0.0.2 for what only a socket shows (slow
and silent clients, stalled uploads, the Host guard of any loopback address)."""

from __future__ import annotations

import contextlib
import io
import json
import re
import resource
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import httpx
from fastapi.testclient import TestClient
from PIL import Image

import search
from dualenc.retrieval.gallery import FolderGallery
from dualenc.service import server as service_server
from dualenc.service.app import create_app
from dualenc.service.inputs import ServiceLimits
from tests.support.colour_run import COLOURS, make_colour_run, solid_image

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("limits")
    run_dir = make_colour_run(root)
    folder = root / "gallery"
    folder.mkdir()
    for word, rgb in COLOURS.items():
        Image.fromarray(solid_image(rgb, seed=len(word))).save(folder / f"{word}.png")
    return {"run": run_dir, "gallery": FolderGallery(folder)}


@contextlib.contextmanager
def client_for(world: dict, **limits):
    with TestClient(create_app(world["run"], world["gallery"], limits=ServiceLimits(**limits))) as client:
        yield client


def png(rgb=(255, 0, 0), size=(24, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(solid_image(rgb, seed=3, size=size)).save(buffer, "PNG")
    return buffer.getvalue()


def gif_with_huge_second_frame(side: int) -> bytes:
    """A small two-frame GIF whose second frame claims `side` × `side` pixels (a decoder that
    reads every frame sizes its canvas by it)."""
    buffer = io.BytesIO()
    Image.fromarray(solid_image(COLOURS["red"], seed=5, size=(16, 16))).convert("P").save(buffer, "GIF")
    first = buffer.getvalue()[:-1]  # without the trailer
    descriptor = b"\x2c" + struct.pack("<HHHH", 0, 0, side, side) + b"\x00"
    lzw = b"\x02" + b"\x02\x44\x01" + b"\x00"  # minimum code size 2, one tiny sub-block, terminator
    return first + descriptor + lzw + b"\x3b"


def test_k_above_the_limit_is_refused_naming_it(world):
    with client_for(world, max_k=3) as client:
        response = client.get("/api/search", params={"q": "red", "k": 4})
        assert response.status_code == 400 and "at most 3" in response.json()["error"]
        assert len(client.get("/api/search", params={"q": "red", "k": 3}).json()) == 3
        huge = client.get("/api/search", params={"q": "red", "k": "9" * 5000})
        assert huge.status_code == 400 and "whole number" in huge.json()["error"]
        assert client.get("/api/health").json()["max_k"] == 3


def test_only_the_first_frame_of_an_upload_is_ever_decoded(world):
    """A GIF whose second frame claims 30000² pixels (> 3 GiB as RGBA) is answered as its
    first frame alone, without the server's memory growing by anything like it."""
    bomb = gif_with_huge_second_frame(30000)
    assert len(bomb) < 2000
    first_frame = io.BytesIO()
    Image.open(io.BytesIO(bomb)).convert("RGB").save(first_frame, "PNG")
    with client_for(world) as client:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        response = client.post("/api/search", files={"image": ("bomb.gif", bomb)})
        grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
        assert response.status_code == 200, response.text
        expected = client.post("/api/search", files={"image": ("first.png", first_frame.getvalue())}).json()
    assert [row["image_id"] for row in response.json()] == [row["image_id"] for row in expected]
    assert grown_mib < 300


def test_pixels_are_counted_from_the_header_before_decoding(world):
    with client_for(world, max_upload_pixels=500) as client:
        response = client.post("/api/search", files={"image": ("big.png", png(size=(24, 40)))})
        assert response.status_code == 413 and "the limit is 500 pixels" in response.json()["error"]


def test_forms_with_many_parts_are_refused(world):
    with client_for(world) as client:
        files = [("image", ("a.png", png()))] + [(f"extra{number}", ("x.txt", b"x")) for number in range(10)]
        response = client.post("/api/search", files=files)
        assert response.status_code == 400 and "more than 4 parts" in response.json()["error"]


def test_upload_over_the_byte_limit_is_413(world):
    with client_for(world, max_upload_bytes=1000) as client:
        response = client.post("/api/search", files={"image": ("a.png", png(size=(64, 64)))})
        assert response.status_code == 413 and "the limit is 0.000953674 MiB" in response.json()["error"]


@pytest.mark.parametrize("headers", [
    {"sec-fetch-site": "cross-site"},
    {"sec-fetch-site": "same-site"},
    {"origin": "https://attacker.example"},
    {"origin": "http://testserver.attacker.example"},
])
def test_requests_from_other_sites_are_refused(world, headers):
    with client_for(world) as client:
        for method, kwargs in (("GET", {"params": {"q": "red"}}), ("POST", {"files": {"image": ("a.png", png())}})):
            response = client.request(method, "/api/search", headers=headers, **kwargs)
            assert response.status_code == 403 and "other web sites" in response.json()["error"], (method, headers)
        assert client.get("/images/red.png", headers=headers).status_code == 403


def test_own_pages_requests_and_plain_clients_are_served(world):
    with client_for(world) as client:
        for headers in ({}, {"sec-fetch-site": "same-origin", "origin": "http://testserver"}, {"sec-fetch-site": "none"}):
            response = client.get("/api/search", params={"q": "red", "k": 1}, headers=headers)
            assert response.status_code == 200, headers
            assert response.headers["cross-origin-resource-policy"] == "same-origin"


def test_no_response_names_a_server_path(world):
    secret = str(Path(world["run"]).resolve().parent)
    with client_for(world) as client:
        answers = [client.get("/api/health"), client.get("/api/search", params={"q": "red", "k": 5}),
                   client.post("/api/search", files={"image": ("a.png", png())}),
                   client.post("/api/search", files={"image": ("a.png", b"\x89PNG\r\n\x1a\nbroken")}),
                   client.get("/images/../../etc/passwd"), client.get("/nothing")]
    for response in answers:
        assert secret not in response.text and "/tmp/" not in response.text, response.text
    assert [row["path"] for row in answers[1].json()][0].endswith(".png")


def test_a_query_that_waits_too_long_for_the_encoder_is_503(world):
    app = create_app(world["run"], world["gallery"], limits=ServiceLimits(request_timeout_s=0.5))
    with TestClient(app) as client:
        encoder = app.state.searcher.retriever.text_encoder
        original = encoder.embed_batch
        encoder.embed_batch = lambda inputs: (time.sleep(1.5), original(inputs))[1]
        try:
            response = client.get("/api/search", params={"q": "red"})
        finally:
            encoder.embed_batch = original
        assert response.status_code == 503 and "busy" in response.json()["error"]
        time.sleep(1.5)  # the encoder finishes the slow batch; the abandoned query is dropped
        assert client.get("/api/search", params={"q": "red", "k": 1}).status_code == 200


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("[::1]", True),
    ("0.0.0.0", False), ("10.1.2.3", False), ("example.com", False), ("::", False),
])
def test_loopback_is_decided_by_address(host, loopback):
    assert service_server.is_loopback(host) is loopback


@contextlib.contextmanager
def real_server(world: dict, host: str = "127.0.0.1", *flags: str):
    """A real ``search.py --serve`` process on a free port of `host`; yields (host, port)."""
    command = [sys.executable, str(REPO / "search.py"), "--serve", "--model", str(world["run"]), "--gallery",
               str(world["gallery"].directory), "--host", host, "--port", "0", *flags]
    process = subprocess.Popen(command, cwd=REPO, stderr=subprocess.PIPE, text=True)
    try:
        line = process.stderr.readline()
        match = re.search(r"at http://[^:]+:(\d+)/", line)
        assert match, line + process.stderr.read() if process.poll() is not None else line
        threading.Thread(target=process.stderr.read, daemon=True).start()  # keep the pipe drained
        yield host, int(match.group(1))
    finally:
        process.terminate()
        process.wait(30)


@pytest.fixture(scope="module")
def loopback_server(world: dict):
    """(host, port) of one real server, shared by the socket tests (starting one costs seconds):
    on 127.0.0.2, not 127.0.0.1, and with 1 s header and request timeouts."""
    with real_server(world, "127.0.0.2", "--header-timeout", "1", "--request-timeout", "1") as address:
        yield address


def http_get(host: str, port: int, path: str, host_header: str) -> tuple[int, dict]:
    with socket.create_connection((host, port), timeout=30) as connection:
        connection.sendall(f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\nConnection: close\r\n\r\n".encode())
        raw = b""
        while chunk := connection.recv(65536):
            raw += chunk
    head, _, body = raw.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body or b"{}")


def test_slow_and_silent_clients_are_disconnected(loopback_server):
    host, port = loopback_server
    silent = socket.create_connection((host, port), timeout=10)
    trickle = socket.create_connection((host, port), timeout=10)
    started = time.monotonic()
    trickle.sendall(b"GET /api/health HTTP/1.1\r\n")
    for _ in range(8):  # a header byte every 0.25 s: never a whole head
        try:
            trickle.sendall(b"X")
        except OSError:
            break
        time.sleep(0.25)
    assert silent.recv(1) == b""  # closed by the server, not by our timeout
    assert trickle.recv(1) == b""
    assert time.monotonic() - started < 8
    assert http_get(host, port, "/api/health", f"{host}:{port}")[0] == 200  # still serving
    silent.close()
    trickle.close()


def test_a_stalled_upload_gets_408_within_the_request_timeout(loopback_server):
    with socket.create_connection(loopback_server, timeout=10) as connection:
        connection.sendall(b"POST /api/search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: multipart/form-data; "
                           b"boundary=x\r\nContent-Length: 100000\r\nConnection: close\r\n\r\n--x\r\n")
        raw = b""
        while chunk := connection.recv(65536):
            raw += chunk
    assert raw.split()[1] == b"408" and b"did not arrive within 1 s" in raw


def test_every_loopback_address_gets_the_host_guard(loopback_server):
    host, port = loopback_server
    assert http_get(host, port, "/api/health", f"127.0.0.2:{port}")[0] == 200
    status, body = http_get(host, port, "/api/health", "rebound.attacker.example")
    assert status == 400 and "answers only to" in body["error"]


def test_serve_flags_reach_the_limits_and_bad_ones_are_one_line(world, monkeypatch, capsys):
    made = {}
    monkeypatch.setattr(service_server, "serve", lambda *args, **options: made.update(options))
    assert search.main(["--serve", "--model", str(world["run"]), "--gallery", str(world["gallery"].directory),
                        "--max-k", "50", "--max-upload-mb", "2", "--request-timeout", "5", "--header-timeout", "3"]) == 0
    assert made["limits"].max_k == 50 and made["limits"].max_upload_bytes == 2 * 2**20
    assert made["limits"].request_timeout_s == 5.0 and made["limits"].header_timeout_s == 3.0
    capsys.readouterr()
    assert search.main(["--serve", "--max-k", "0"]) == 2
    assert capsys.readouterr().err == "error: --max-k must be positive, got 0\n"


def test_health_is_answered_while_uploads_are_checked(world, monkeypatch):
    """Parsing and checking uploads runs in worker threads: while two uploads are stuck in their
    image check, the event loop still answers the health check (it would wait for them if the
    check ran on the loop)."""
    import uvicorn

    from dualenc.service import app as service_app

    release, entered = threading.Event(), threading.Semaphore(0)
    original = service_app.check_image

    def slow_check(data: bytes, max_pixels: int) -> bytes:
        entered.release()
        release.wait(60)
        return original(data, max_pixels)

    monkeypatch.setattr(service_app, "check_image", slow_check)
    server = uvicorn.Server(uvicorn.Config(create_app(world["run"], world["gallery"]), log_level="warning"))
    listener = service_server.listening_socket("127.0.0.1", 0)
    port = listener.getsockname()[1]
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            time.sleep(0.02)
        statuses = []

        def upload() -> None:
            with httpx.Client(timeout=60) as client:
                statuses.append(client.post(f"http://127.0.0.1:{port}/api/search",
                                            files={"image": ("a.png", png())}).status_code)

        uploads = [threading.Thread(target=upload) for _ in range(2)]
        for upload_thread in uploads:
            upload_thread.start()
        assert entered.acquire(timeout=30) and entered.acquire(timeout=30)  # both are in their check now
        with httpx.Client(timeout=10) as client:
            assert client.get(f"http://127.0.0.1:{port}/api/health").status_code == 200
        release.set()
        for upload_thread in uploads:
            upload_thread.join(60)
        assert statuses == [200, 200]
    finally:
        release.set()
        server.should_exit = True
        thread.join(30)


def test_uploads_held_in_memory_together_are_bounded(world):
    with client_for(world, max_buffered_upload_bytes=2000) as client:
        response = client.post("/api/search", files={"image": ("a.png", png(size=(64, 64)))})
        assert response.status_code == 503 and "holding as many uploads" in response.json()["error"]
    with client_for(world, max_buffered_upload_bytes=200_000) as client:  # given back after each answer
        for _ in range(3):
            assert client.post("/api/search", files={"image": ("a.png", png(size=(64, 64)))}).status_code == 200
