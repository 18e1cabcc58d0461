"""The search service: its API against `search.py --json` and a float64 reference, every bad input,
path traversal, a real server under 32 concurrent clients, and the page in a real browser.

The model is the demo run test_train inspects (`frozen_vision_run`: answers need not be good,
only identical wherever they are computed); the gallery is the demo's train split (44 images),
so k = 9 fits.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import io
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import httpx
import numpy as np
import pytest
import tensorflow as tf
import uvicorn
from PIL import Image

import search
from dualenc.retrieval.gallery import FolderGallery, PackedGallery
from dualenc.retrieval.query import RESULT_FIELDS
from dualenc.service import server as service_server
from dualenc.service.app import create_app
from dualenc.service.batching import EmbeddingBatcher
from dualenc.service.images import Thumbnails
from dualenc.service.inputs import MAX_UPLOAD_BYTES
from tests.support.training import REPO_ROOT

SPLIT = "train"
GALLERY_SIZE = 44  # distinct images in the 12-identity demo's train split
QUERY = "a woman in a red coat"
SECRET = b"TOP-SECRET-NOT-A-GALLERY-FILE"
STARTUP_SECONDS = 180


@contextlib.contextmanager
def running(app):
    """`app` served by uvicorn on 127.0.0.1 (a free port) in a thread; yields (host, port)."""
    listener = service_server.listening_socket("127.0.0.1", 0)
    config = uvicorn.Config(app, log_level="warning", h11_max_incomplete_event_size=service_server.MAX_REQUEST_HEAD_BYTES)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    try:
        yield "127.0.0.1", listener.getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(30)


@pytest.fixture(scope="module")
def run_dir(frozen_vision_run) -> Path:
    assert frozen_vision_run.exit_code == 0
    return frozen_vision_run.run_dir


@pytest.fixture(scope="module")
def client(run_dir, demo_data):
    """An httpx client of the app on the demo split, served by uvicorn on loopback."""
    with running(create_app(run_dir, PackedGallery(demo_data, SPLIT))) as (host, port):
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=120) as http_client:
            yield http_client


def gallery_flags(run_dir: Path, demo_data: Path) -> list[str]:
    return ["--model", str(run_dir), "--data", str(demo_data), "--split", SPLIT]


def cli_json(capsys, *argv: str) -> list[dict]:
    assert search.main(list(argv) + ["--json"]) == 0
    return json.loads(capsys.readouterr().out)


def split_images(data_dir: Path, split: str) -> tuple[list[str], list[bytes]]:
    """Each distinct image of a split, first record first, read with plain tf.data."""
    spec = {"image": tf.io.FixedLenFeature([], tf.string), "image_id": tf.io.FixedLenFeature([], tf.string)}
    ids, blobs = [], []
    for serialized in tf.data.TFRecordDataset([str(path) for path in sorted(data_dir.glob(f"{split}-*.tfrecord"))]):
        example = tf.io.parse_single_example(serialized, spec)
        image_id = example["image_id"].numpy().decode()
        if image_id not in ids:
            ids.append(image_id)
            blobs.append(example["image"].numpy())
    return ids, blobs


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def assert_json_error(response, status: int, message: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    body = response.json()
    assert list(body) == ["error"] and message in body["error"], body
    assert "Traceback" not in response.text and "File \"" not in response.text


# --- the API on the trained model -------------------------------------------------------------


def test_text_search_equals_search_cli_json(client, run_dir, demo_data, capsys):
    response = client.get("/api/search", params={"q": QUERY})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    served = response.json()
    printed = cli_json(capsys, QUERY, *gallery_flags(run_dir, demo_data))
    assert len(served) == len(printed) == 9
    for ours, theirs in zip(served, printed):
        assert list(ours) == list(theirs) == list(RESULT_FIELDS)
        assert {key: ours[key] for key in ("rank", "image_id", "path", "caption", "label")} == {
            key: theirs[key] for key in ("rank", "image_id", "path", "caption", "label")}
        assert ours["score"] == pytest.approx(theirs["score"], abs=1e-5)


def test_scores_equal_a_float64_reference(client, run_dir, demo_data):
    ids, blobs = split_images(demo_data, SPLIT)
    assert len(ids) == GALLERY_SIZE
    vision = tf.saved_model.load(str(run_dir / "vision_encoder")).signatures["serving_default"]
    text = tf.saved_model.load(str(run_dir / "text_encoder")).signatures["serving_default"]
    images = np.concatenate([vision(images=tf.constant(blobs[start:start + 8]))["embeddings"].numpy()
                             for start in range(0, len(blobs), 8)]).astype(np.float64)
    query = text(captions=tf.constant(["a man with a backpack"]))["embeddings"].numpy()[0].astype(np.float64)
    images /= np.linalg.norm(images, axis=1, keepdims=True)
    scores = images @ (query / np.linalg.norm(query))
    order = np.argsort(-scores, kind="stable")[:5]

    served = client.get("/api/search", params={"q": "  a man with a backpack ", "k": "5"}).json()
    assert [result["image_id"] for result in served] == [ids[row] for row in order]
    np.testing.assert_allclose([result["score"] for result in served], scores[order], atol=1e-5)


def test_image_search_equals_search_cli_json(client, run_dir, demo_data, tmp_path, capsys):
    ids, blobs = split_images(demo_data, SPLIT)
    with Image.open(io.BytesIO(blobs[7])) as image:
        query = png_bytes(image.convert("RGB"))
    (tmp_path / "query.png").write_bytes(query)
    response = client.post("/api/search", params={"k": "9"}, files={"image": ("query.png", query, "image/png")})
    assert response.status_code == 200, response.text
    served = response.json()
    printed = cli_json(capsys, "--image", str(tmp_path / "query.png"), *gallery_flags(run_dir, demo_data))
    assert [result["image_id"] for result in served] == [result["image_id"] for result in printed]
    assert served[0]["image_id"] == ids[7] and served[0]["score"] > 0.999
    assert len(served) == 9 and all(list(result) == list(RESULT_FIELDS) for result in served)


def test_thumbnails_are_the_gallery_images(client, demo_data):
    ids, blobs = split_images(demo_data, SPLIT)
    for image_id, blob in list(zip(ids, blobs))[:5]:
        response = client.get(f"/images/{urllib.parse.quote(image_id, safe='')}")
        assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
        with Image.open(io.BytesIO(response.content)) as thumbnail, Image.open(io.BytesIO(blob)) as original:
            assert thumbnail.format == "JPEG" and max(thumbnail.size) <= 256
            expected = original.convert("RGB")
            expected.thumbnail((256, 256))
            assert thumbnail.size == expected.size
            difference = np.abs(np.asarray(thumbnail, np.float64) - np.asarray(expected, np.float64)).mean()
            assert difference < 8, (image_id, difference)
        assert client.get(f"/images/{image_id}").content == response.content


def test_health_page_and_static_files_are_local(client, run_dir, demo_data):
    health = client.get("/api/health").json()
    assert health["images"] == GALLERY_SIZE and health["index"] == "exact"
    # No server path leaves the machine: the run and the data folder by name only.
    assert health["model"] == run_dir.resolve().name and SPLIT in health["gallery"] and demo_data.name in health["gallery"]
    assert str(demo_data.parent) not in health["gallery"]
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    for element in ('id="query"', 'id="k"', 'type="file"', 'id="results"', 'id="model"', 'id="gallery"'):
        assert element in page.text
    for name, kind in (("app.js", "text/javascript"), ("style.css", "text/css")):
        response = client.get(f"/static/{name}")
        assert response.status_code == 200 and response.headers["content-type"].startswith(kind)
        assert not re.search(r"https?://|//cdn", response.text)
    assert not re.search(r"https?://", page.text)
    assert client.get("/docs").status_code == 404  # FastAPI's API pages would load a CDN


# --- bad input ---------------------------------------------------------------------------------


def big_blank_png(width: int, height: int) -> bytes:
    return png_bytes(Image.new("1", (width, height)))


@pytest.fixture(scope="module")
def query_png(demo_data) -> bytes:
    _, blobs = split_images(demo_data, SPLIT)
    with Image.open(io.BytesIO(blobs[0])) as image:
        return png_bytes(image.convert("RGB"))


BAD_TEXT = [
    ("q=", 400, "the query is empty"),
    ("q=%20%20%09", 400, "the query is empty"),
    ("k=3", 400, "no query"),
    ("q=" + "x" * 60_000, 400, "the limit is 10000"),  # 100 kB: see test_real_server_limits_host_and_raw_traversal
    ("q=caf%E9", 400, "not valid UTF-8"),
    ("q=red&k=0", 400, "k must be at least 1"),
    ("q=red&k=-4", 400, "k must be at least 1"),
    ("q=red&k=abc", 400, "k must be a whole number"),
    ("q=red&k=2.5", 400, "k must be a whole number"),
    ("q=red&k=", 400, "k must be a whole number"),
    (f"q=red&k={GALLERY_SIZE + 1}", 400, f"more than the {GALLERY_SIZE} images"),
]


@pytest.mark.parametrize("query_string, status, message", BAD_TEXT, ids=lambda value: str(value)[:30])
def test_bad_text_queries_get_json_4xx_and_the_server_carries_on(client, query_string, status, message):
    assert_json_error(client.get(f"/api/search?{query_string}"), status, message)
    assert len(client.get("/api/search", params={"q": "red", "k": "2"}).json()) == 2


def bad_uploads(query_png: bytes) -> list[tuple[dict, dict, int, str]]:
    """(files, extra request options, status, message) for each bad upload."""
    return [
        ({"image": ("notes.png", b"just some text, not a picture", "image/png")}, {}, 400, "not an image"),
        ({"image": ("cut.png", query_png[: len(query_png) // 2], "image/png")}, {}, 400, "truncated or corrupt"),
        ({"image": ("empty.png", b"", "image/png")}, {}, 400, "is empty"),
        ({"picture": ("q.png", query_png, "image/png")}, {}, 400, "no 'image' field"),
        ({"image": ("huge.bin", os.urandom(MAX_UPLOAD_BYTES + 1), "image/png")}, {}, 413, "the limit is 10 MiB"),
        ({"image": ("wide.png", big_blank_png(8000, 6000), "image/png")}, {}, 413, "pixels; the limit is"),
        ({"image": ("q.png", query_png, "image/png")}, {"params": {"k": "0"}}, 400, "k must be at least 1"),
    ]


def test_bad_uploads_get_json_4xx_and_the_server_carries_on(client, query_png):
    for files, options, status, message in bad_uploads(query_png):
        assert_json_error(client.post("/api/search", files=files, **options), status, message)
        ok = client.post("/api/search", params={"k": "3"}, files={"image": ("q.png", query_png, "image/png")})
        assert ok.status_code == 200 and len(ok.json()) == 3
    raw = client.post("/api/search", content=query_png, headers={"content-type": "image/png"})
    assert_json_error(raw, 415, "multipart/form-data")
    boundary = "b0undary"
    cut = (f"--{boundary}\r\ncontent-disposition: form-data; name=\"image\"; filename=\"q.png\"\r\n"
           f"content-type: image/png\r\n\r\n").encode() + query_png  # no closing boundary
    response = client.post("/api/search", content=cut, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert_json_error(response, 400, "incomplete")


def test_missing_ids_unknown_pages_and_methods_are_json_errors(client):
    assert_json_error(client.get("/images/0001/no_such_image.jpg"), 404, "no image '0001/no_such_image.jpg'")
    assert_json_error(client.get("/nowhere"), 404, "no such page: /nowhere")
    assert_json_error(client.get("/static/secret.py"), 404, "no static file")
    assert_json_error(client.delete("/api/search"), 405, "DELETE is not allowed")
    assert client.get("/api/health").status_code == 200


# --- path traversal ----------------------------------------------------------------------------


def raw_get(address: tuple[str, int], target: str, headers: dict | None = None) -> tuple[int, str, bytes]:
    """GET `target` exactly as written (no normalisation of ``..`` or escapes)."""
    connection = http.client.HTTPConnection(*address, timeout=60)
    try:
        connection.request("GET", target, headers=headers or {})
        response = connection.getresponse()
        return response.status, response.getheader("content-type", ""), response.read()
    finally:
        connection.close()


@pytest.fixture(scope="module")
def folder_gallery(tmp_path_factory) -> tuple[Path, Path]:
    """A gallery folder with three images and links leading out of it, and the folder outside."""
    root = tmp_path_factory.mktemp("traversal")
    gallery, outside = root / "gallery", root / "outside"
    gallery.mkdir()
    outside.mkdir()
    rng = np.random.default_rng(0)
    for name in ("a.png", "b.png", "c.png"):
        (gallery / name).write_bytes(png_bytes(Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8))))
    # A real image outside: it is indexed through the link, yet must never be served.
    (outside / "secret.png").write_bytes(png_bytes(Image.new("RGB", (30, 40), (200, 10, 10))) + SECRET)
    (outside / "secret.txt").write_bytes(SECRET)
    (gallery / "escape.png").symlink_to(outside / "secret.png")
    (gallery / "passwd.png").symlink_to(outside / "secret.txt")
    (gallery / "linked").symlink_to(outside, target_is_directory=True)
    return gallery, outside


def traversal_targets(gallery: Path, outside: Path) -> list[str]:
    secret_txt, secret_png = outside / "secret.txt", outside / "secret.png"
    return [
        "/images/../outside/secret.txt",
        "/images/../../outside/secret.png",
        "/images/%2e%2e%2foutside%2fsecret.txt",
        "/images/%2E%2E/outside/secret.png",
        "/images/..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
        "/images/" + str(secret_txt),
        "/images//" + urllib.parse.quote(str(secret_png), safe=""),
        "/images/%2Fetc%2Fpasswd",
        "/images/escape.png",
        "/images/passwd.png",
        "/images/linked/secret.png",
        "/images/linked%2fsecret.txt",
        "/static/../../outside/secret.txt",
        "/static/%2e%2e%2f%2e%2e%2fapp.py",
        "/..%2f..%2foutside%2fsecret.txt",
    ]


def test_path_traversal_serves_no_file_content(run_dir, folder_gallery):
    gallery, outside = folder_gallery
    app = create_app(run_dir, FolderGallery(gallery))
    with running(app) as address:
        status, kind, body = raw_get(address, "/images/a.png")
        assert status == 200 and kind == "image/jpeg"  # the control: a gallery image is served
        for target in traversal_targets(gallery, outside):
            status, kind, body = raw_get(address, target)
            assert status in (400, 404), (target, status)
            assert kind == "application/json" and set(json.loads(body)) == {"error"}, (target, body)
            assert SECRET not in body and b"\x89PNG" not in body and b"\xff\xd8" not in body, target
        assert raw_get(address, "/images/b.png")[0] == 200


# --- a real server from the command line ---------------------------------------------------------


@pytest.fixture(scope="module")
def served(run_dir, demo_data, tmp_path_factory):
    """`search.py --serve --port 0` in a child process; yields its base URL."""
    log_path = tmp_path_factory.mktemp("served") / "server.log"
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable, str(REPO_ROOT / "search.py"), "--serve", "--port", "0", *gallery_flags(run_dir, demo_data)]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + STARTUP_SECONDS
    url = None
    while url is None and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.2)
        match = re.search(r"at (http://127\.0\.0\.1:\d+/) \(Ctrl-C to stop\)", log_path.read_text())
        url = match.group(1) if match else None
    try:
        assert url is not None, log_path.read_text()[-3000:]
        yield url
    finally:
        process.terminate()
        process.wait(30)


def get_json(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_32_concurrent_clients_get_the_sequential_answers(served):
    words = ["red coat", "blue jeans", "a man with a backpack", "white shirt and black shorts", "a green sweater",
             "she carries a handbag", "grey trousers", "a woman in a yellow skirt"]
    expected = {}
    for number, text in enumerate(words):
        status, results = get_json(f"{served}api/search?{urllib.parse.urlencode({'q': text, 'k': 3 + number})}")
        assert status == 200
        expected[text] = results

    def client(number: int) -> list[str]:
        problems = []
        for query_number in range(20):
            text = words[(number + query_number) % len(words)]
            k = 3 + words.index(text)
            status, results = get_json(f"{served}api/search?{urllib.parse.urlencode({'q': text, 'k': k})}")
            if status != 200:
                problems.append(f"{text}: HTTP {status} {results}")
            elif [r["image_id"] for r in results] != [r["image_id"] for r in expected[text]] or not np.allclose(
                    [r["score"] for r in results], [r["score"] for r in expected[text]], atol=1e-5):
                problems.append(f"{text}: answer differs under load")
        return problems

    with concurrent.futures.ThreadPoolExecutor(32) as pool:
        problems = [problem for found in pool.map(client, range(32)) for problem in found]
    assert problems == []


def test_real_server_limits_host_and_raw_traversal(served):
    address = (urllib.parse.urlsplit(served).hostname, urllib.parse.urlsplit(served).port)
    status, kind, body = raw_get(address, "/api/search?q=" + "x" * 100_000)
    assert status == 400 and kind == "application/json" and b"the limit is 10000" in body
    status, kind, body = raw_get(address, "/api/health", headers={"Host": "attacker.example"})
    assert status == 400 and b"answers only to" in body
    for target in ("/images/../../../../etc/passwd", "/images/%2e%2e%2f%2e%2e%2fetc%2fpasswd", "/images//etc/passwd"):
        status, kind, body = raw_get(address, target)
        assert status == 404 and kind == "application/json" and b"root:" not in body
    connection = http.client.HTTPConnection(*address, timeout=120)
    body = b"--x\r\ncontent-disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n\r\n" + bytes(MAX_UPLOAD_BYTES + 10) + b"\r\n--x--\r\n"
    connection.request("POST", "/api/search", body=body, headers={"content-type": "multipart/form-data; boundary=x"})
    response = connection.getresponse()
    assert response.status == 413 and b"the limit is 10 MiB" in response.read()
    connection.close()
    assert get_json(f"{served}api/health")[0] == 200


def test_cli_refuses_bad_serve_flags(run_dir, demo_data, capsys):
    flags = gallery_flags(run_dir, demo_data)
    assert search.main(["red", "--serve", *flags]) == 2
    assert "--serve answers queries over HTTP" in capsys.readouterr().err
    assert search.main(["--serve", "--port", "70000", *flags]) == 2
    assert "--port 70000 is not a TCP port" in capsys.readouterr().err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert search.main(["--serve", "--port", str(taken.getsockname()[1]), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: cannot listen on 127.0.0.1 port")


def test_other_hosts_get_a_warning_and_no_host_check(run_dir, demo_data, monkeypatch):
    # Never binds anything but loopback: the socket and the server are stand-ins.
    made, log = {}, io.StringIO()
    monkeypatch.setattr(service_server, "listening_socket", lambda host, port: socket.socket())
    monkeypatch.setattr(service_server, "create_app", lambda *args, **options: made.update(options))
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets: None)
    gallery = PackedGallery(demo_data, SPLIT)
    service_server.serve(run_dir, gallery, host="0.0.0.0", port=8000, log=log)
    assert log.getvalue().startswith("warning: --host 0.0.0.0 lets other machines reach") and made["allowed_hosts"] is None
    log.truncate(0)
    service_server.serve(run_dir, gallery, host="127.0.0.1", port=8000, log=log)
    assert "warning" not in log.getvalue() and "127.0.0.1" in made["allowed_hosts"]


# --- building blocks -----------------------------------------------------------------------------


class FakeEncoder:
    """Embeds a string as [len, first code point, 1]; inputs containing "bad" fail the batch."""

    path = Path("fake_encoder")

    def __init__(self):
        self.batch_sizes = []

    def embed_batch(self, inputs):
        self.batch_sizes.append(len(inputs))
        time.sleep(0.01)  # long enough for requests to queue up behind a running batch
        if any("bad" in text for text in inputs):
            raise tf.errors.InvalidArgumentError(None, None, "cannot decode")
        return np.array([[len(text), ord(text[0]), 1.0] for text in inputs], np.float32)


def test_batcher_answers_each_caller_and_isolates_a_bad_input():
    encoder = FakeEncoder()
    batcher = EmbeddingBatcher(encoder, max_batch=8)
    texts = [f"{chr(97 + number % 26)}{'x' * number}" for number in range(40)] + ["bad one"]
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        futures = {text: pool.submit(batcher.embed, text) for text in texts}
    for text, future in futures.items():
        if text == "bad one":
            with pytest.raises(tf.errors.InvalidArgumentError):
                future.result()
        else:
            np.testing.assert_array_equal(future.result(), [len(text), ord(text[0]), 1.0])
    batcher.close()
    assert max(encoder.batch_sizes) > 1 and max(encoder.batch_sizes) <= 8


def test_thumbnail_cache_reads_once_and_keeps_the_latest():
    reads = []

    class Images:
        def read(self, image_id):
            reads.append(image_id)
            return png_bytes(Image.new("RGB", (600, 300), (0, 90, 200)))

    thumbnails = Thumbnails(Images(), capacity=2)
    first = thumbnails.get("a")
    with Image.open(io.BytesIO(first)) as image:
        assert image.size == (256, 128) and image.format == "JPEG"
    assert thumbnails.get("a") == first and reads == ["a"]
    thumbnails.get("b")
    thumbnails.get("c")  # evicts "a", the least recently used
    thumbnails.get("a")
    assert reads == ["a", "b", "c", "a"]


# --- the page in a real browser ------------------------------------------------------------------


def chromium_and_driver() -> tuple[str, str]:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if browser is None or driver is None:
        pytest.skip("Debian's chromium and chromium-driver are not installed (make test installs them as root via apt-get)")
    return browser, driver


def test_page_in_headless_chromium_shows_nine_loaded_images(served, query_png, tmp_path):
    browser_path, driver_path = chromium_and_driver()
    (tmp_path / "query.png").write_bytes(query_png)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = webdriver.ChromeOptions()
    options.binary_location = browser_path
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1000",
                     "--disable-gpu", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(executable_path=driver_path), options=options)
    try:
        driver.get(served)
        WebDriverWait(driver, 60).until(lambda d: "images" in d.find_element(By.ID, "gallery").text)
        query = driver.find_element(By.ID, "query")
        query.send_keys(QUERY)
        query.submit()
        loaded = "return [...document.querySelectorAll('#results img')].filter(i => i.complete && i.naturalWidth > 0).length"
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(loaded) == 9)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#results figure")) == 9
        assert "9 results for" in driver.find_element(By.ID, "status").text
        screenshot = tmp_path / "search-page.png"
        driver.save_screenshot(str(screenshot))

        driver.find_element(By.ID, "image").send_keys(str(tmp_path / "query.png"))
        WebDriverWait(driver, 60).until(lambda d: "results for image query.png" in d.find_element(By.ID, "status").text)
        WebDriverWait(driver, 60).until(lambda d: d.execute_script(loaded) == 9)
        assert driver.execute_script("return document.getElementById('query-image').naturalWidth") > 0
    finally:
        driver.quit()
    with Image.open(screenshot) as image:
        assert image.size[0] >= 800
    artefacts = os.environ.get("DUALENC_ARTEFACTS")
    if artefacts:
        Path(artefacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(screenshot, Path(artefacts) / screenshot.name)


def test_thumbnails_use_the_shared_decoder_for_16_bit_and_exif_rotated_photos():
    from dualenc.service.images import make_thumbnail

    grey = np.full((20, 10), 128 * 257, np.uint16)  # mid-grey in 16 bits
    buffer = io.BytesIO()
    Image.fromarray(grey).save(buffer, "PNG")
    pixels = np.asarray(Image.open(io.BytesIO(make_thumbnail(buffer.getvalue()))))
    assert abs(pixels.astype(int).mean() - 128) <= 2  # not clipped to white

    upright = np.zeros((30, 10, 3), np.uint8)
    upright[:10] = 255  # white top, black below: tall
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated; viewers turn it 90° clockwise
    buffer = io.BytesIO()
    Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90).save(buffer, "JPEG", exif=exif, quality=95)
    shown = Image.open(io.BytesIO(make_thumbnail(buffer.getvalue())))
    assert shown.size == (10, 30)
