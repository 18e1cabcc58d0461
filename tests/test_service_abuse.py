"""A real ``search.py --serve`` against what an attacker's tools send and against real load.

- A property-based fuzz (Hypothesis) of the HTTP API: random methods, paths, query strings,
  headers (Host, Origin, Sec-Fetch-Site, Content-Type, Content-Length), bodies (random bytes,
  damaged images, multipart forms with many parts). Every answer must be a JSON object with a
  one-line ``error`` and a 4xx (or 503), or a well-formed result list; never a 500, never a
  hung connection, and the server answers its health check afterwards.
- A soak: 32 clients for 2 × 8 s, mixing text and image queries: 0 errors, the
  server's peak memory bounded, and the second half's p99 latency no worse than twice the
  first half's (nothing accumulates).

The server runs the tiny colour run (tests/support/colour_run.py) over a folder gallery, in its
own process on 127.0.0.1; both tests stop by themselves within their budgets.
"""

from __future__ import annotations

import http.client
import io
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from dualenc.retrieval.query import RESULT_FIELDS
from tests.support.colour_run import COLOURS, make_colour_run, solid_image

REPO = Path(__file__).resolve().parents[1]
ALLOWED_STATUS = {200, 400, 403, 404, 405, 408, 413, 415, 503}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """(host, port, process) of a real ``search.py --serve`` on a folder of colour images."""
    root = tmp_path_factory.mktemp("abuse")
    run_dir = make_colour_run(root)
    gallery = root / "gallery"
    gallery.mkdir()
    for number, (word, rgb) in enumerate(COLOURS.items()):
        for copy in range(3):
            Image.fromarray(solid_image(rgb, seed=10 * number + copy)).save(gallery / f"{word}-{copy}.png")
    command = [sys.executable, str(REPO / "search.py"), "--serve", "--model", str(run_dir), "--gallery", str(gallery),
               "--port", "0", "--request-timeout", "3", "--header-timeout", "3"]
    process = subprocess.Popen(command, cwd=root, stderr=subprocess.PIPE, text=True)
    line = process.stderr.readline()
    match = re.search(r"at http://127\.0\.0\.1:(\d+)/", line)
    assert match, line
    threading.Thread(target=process.stderr.read, daemon=True).start()
    yield "127.0.0.1", int(match.group(1)), process
    process.terminate()
    process.wait(30)


def request(address, method: str, target: str, headers: dict[str, str], body: bytes) -> tuple[int, bytes]:
    connection = http.client.HTTPConnection(*address, timeout=30)
    try:
        connection.putrequest(method, target, skip_host="host" in {name.lower() for name in headers},
                              skip_accept_encoding=True)
        for name, value in headers.items():
            connection.putheader(name, value)
        if body and "content-length" not in {name.lower() for name in headers}:
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body or None)
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def png_bytes(seed: int, size=(24, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(solid_image((200, 30, 30), seed=seed, size=size)).save(buffer, "PNG")
    return buffer.getvalue()


IMAGE = png_bytes(1)
texts = st.text(alphabet=st.characters(codec="utf-8"), max_size=60)
header_values = st.text(alphabet=st.characters(min_codepoint=32, max_codepoint=126), max_size=40)


@st.composite
def multipart(draw) -> tuple[str, bytes]:
    boundary = draw(st.sampled_from(["x", "----b0undary", "a" * 70]))
    parts = []
    for _ in range(draw(st.sampled_from([1, 1, 1, 0, 2, 7]))):
        name = draw(st.sampled_from(["image", "image", "image", "other", "", "image\"; filename=\"../../etc/passwd"]))
        content = draw(st.one_of(
            st.just(IMAGE),
            st.just(IMAGE),
            st.binary(max_size=300),
            st.builds(lambda cut: IMAGE[:cut], st.integers(0, len(IMAGE))),
            st.builds(lambda at, byte: IMAGE[:at] + bytes([byte]) + IMAGE[at + 1:], st.integers(0, len(IMAGE) - 1),
                      st.integers(0, 255)),
        ))
        parts.append(f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"f\"\r\n\r\n".encode()
                     + content + b"\r\n")
    closing = draw(mostly(f"--{boundary}--\r\n".encode(), b"", b"--wrong--\r\n"))
    content_type = draw(mostly(f"multipart/form-data; boundary={boundary}", "multipart/form-data", "application/json",
                               "image/png", ""))
    return content_type, b"".join(parts) + closing


def mostly(usual, *unusual):
    """`usual` most of the time (6 in 6 + len(unusual)), else one of `unusual`: most requests get
    past the early checks, so the fuzz reaches the code behind them."""
    return st.sampled_from([usual] * 6 + list(unusual))


@st.composite
def requests(draw) -> tuple[str, str, dict[str, str], bytes]:
    method = draw(st.sampled_from(["GET"] * 4 + ["POST"] * 4 + ["PUT", "DELETE", "HEAD", "OPTIONS"]))
    path = draw(st.sampled_from(["/api/search"] * 6 + ["/api/health", "/", "/static/app.js", "/images/red-0.png",
                                 "/images/../../etc/passwd", "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/nothing"]))
    parameters = draw(st.dictionaries(st.sampled_from(["q", "k", "x"]), st.one_of(texts, st.integers(-10**6, 10**6).map(str),
                                                                                   st.just("9" * 300)), max_size=3))
    query = "&".join(f"{name}={_quote(value)}" for name, value in parameters.items())
    if draw(st.integers(0, 3)) == 0:
        query = draw(st.sampled_from(["q=%ff%fe", "q=%", "k=1&k=2&q=red", "q=" + "a" * 12000, "q=red&k=%00",
                                      "q=%ed%a0%80", "q=red&k=1e3", "q=red&k=%207%20"]))
    headers = {"Host": draw(mostly("127.0.0.1", "localhost", "evil.example", "", "127.0.0.1:1"))}
    if draw(st.integers(0, 4)) == 0:
        headers["Origin"] = draw(st.sampled_from(["http://evil.example", "null", "http://127.0.0.1"]))
    if draw(st.integers(0, 4)) == 0:
        headers["Sec-Fetch-Site"] = draw(st.sampled_from(["cross-site", "same-site", "same-origin", "none", "garbage"]))
    body = b""
    if method == "POST":
        content_type, body = draw(multipart())
        if content_type:
            headers["Content-Type"] = content_type
        if draw(st.integers(0, 9)) == 0:
            headers["Content-Length"] = draw(st.sampled_from(["-1", "abc", str(len(body) + 1), "99999999999999999999"]))
    if draw(st.integers(0, 4)) == 0:
        headers[draw(header_values.filter(lambda name: re.fullmatch(r"[A-Za-z-]{1,20}", name or "") is not None))] = \
            draw(header_values)
    return method, path + (f"?{query}" if query else ""), headers, body


def _quote(value: str) -> str:
    import urllib.parse

    return urllib.parse.quote(value, safe="")


@pytest.mark.slow
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(requests())
def test_fuzzed_requests_get_a_json_4xx_or_a_well_formed_answer(server, case):
    host, port, process = server
    method, target, headers, body = case
    if headers.get("Content-Length") not in (None, str(len(body))) and headers["Content-Length"].isdigit() \
            and int(headers["Content-Length"]) > len(body):
        body_sent_short = True  # the server waits for the rest until its request timeout (3 s)
    else:
        body_sent_short = False
    try:
        status, content = request((host, port), method, target, headers, body)
    except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError):
        assert body_sent_short or headers.get("Content-Length") in ("-1", "abc", "99999999999999999999"), case
        return
    assert status in ALLOWED_STATUS, (status, content[:300], case)
    assert process.poll() is None
    if method == "HEAD" or (status == 200 and not target.startswith("/api/")):
        return
    if status == 400 and content.startswith(b"Invalid HTTP request"):
        return  # malformed HTTP itself (e.g. a non-numeric Content-Length): uvicorn's plain 400
    answer = json.loads(content)
    if status == 200 and target.startswith("/api/search"):
        assert isinstance(answer, list) and all(set(row) == set(RESULT_FIELDS) for row in answer)
        assert all(not str(row["path"]).startswith("/") for row in answer)
    elif status == 200:
        assert answer["status"] == "ok"
    else:
        assert set(answer) == {"error"} and "\n" not in answer["error"] and "/tmp/" not in answer["error"], case


@pytest.mark.slow
def test_the_server_still_answers_after_the_fuzz(server):
    host, port, process = server
    status, content = request((host, port), "GET", "/api/health", {"Host": "127.0.0.1"}, b"")
    assert status == 200 and json.loads(content)["status"] == "ok" and process.poll() is None


def _peak_mib(pid: int) -> float:
    return int(re.search(r"VmHWM:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


def _rss_mib(pid: int) -> float:
    return int(re.search(r"VmRSS:\s+(\d+)", Path(f"/proc/{pid}/status").read_text()).group(1)) / 1024


@pytest.mark.slow
def test_soak_32_clients(server):
    """32 clients for 2 × 8 s: no errors, bounded memory, the second half's p99 stable. (Each half
    holds thousands of requests on 2 cores: enough for a steady p99 and for a leak to show.)"""
    host, port, process = server
    words = list(COLOURS)
    halves: list[list[float]] = [[], []]
    errors: list[str] = []
    half_seconds = 8.0
    started = time.monotonic()
    rss_after_half = []

    def client(number: int) -> None:
        connection = http.client.HTTPConnection(host, port, timeout=60)
        sent = 0
        while (elapsed := time.monotonic() - started) < 2 * half_seconds:
            begin = time.perf_counter()
            try:
                if (number + sent) % 8 == 0:  # an image query now and then
                    boundary = "soak"
                    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n\r\n"
                            .encode() + png_bytes(number * 1000 + sent) + f"\r\n--{boundary}--\r\n".encode())
                    connection.request("POST", "/api/search?k=5", body,
                                       {"Content-Type": f"multipart/form-data; boundary={boundary}"})
                else:
                    connection.request("GET", f"/api/search?q=a+{words[(number + sent) % len(words)]}+square&k=9")
                response = connection.getresponse()
                content = response.read()
                if response.status != 200 or not json.loads(content):
                    errors.append(f"{response.status}: {content[:200]!r}")
            except (OSError, http.client.HTTPException) as error:
                errors.append(repr(error))
                connection.close()
                connection = http.client.HTTPConnection(host, port, timeout=60)
            halves[0 if elapsed < half_seconds else 1].append(time.perf_counter() - begin)
            sent += 1
        connection.close()

    def watch_memory() -> None:
        time.sleep(half_seconds)
        rss_after_half.append(_rss_mib(process.pid))

    threads = [threading.Thread(target=client, args=(number,)) for number in range(32)]
    watcher = threading.Thread(target=watch_memory)
    for thread in [*threads, watcher]:
        thread.start()
    for thread in [*threads, watcher]:
        thread.join(120)
    assert not errors, errors[:5]
    first, second = (sorted(half) for half in halves)
    assert len(first) > 100 and len(second) > 100
    p99 = [half[int(0.99 * (len(half) - 1))] for half in (first, second)]
    assert p99[1] <= 2 * p99[0] + 0.05, p99
    assert _rss_mib(process.pid) <= rss_after_half[0] + 150  # nothing piles up in the second half
    assert _peak_mib(process.pid) < 2500
