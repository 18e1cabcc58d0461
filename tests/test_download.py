"""COCO download against a local HTTP server: extraction, Range resume, verification, errors."""

from __future__ import annotations

import hashlib
import io
import json
import re
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from PIL import Image

from dualenc.core.errors import DualEncError
from tfrecords_tools import download
from tfrecords_tools.download import ANNOTATIONS_ARCHIVE, IMAGES_ARCHIVE, download_coco

IMAGE_NAMES = [f"train2014/COCO_train2014_{index:012d}.jpg" for index in (9, 25, 30)]
CAPTIONS = {
    "images": [{"id": index, "file_name": name.split("/")[1]} for index, name in enumerate(IMAGE_NAMES)],
    "annotations": [
        {"id": 100 + index, "image_id": index, "caption": f"A small test picture number {index}."}
        for index in range(len(IMAGE_NAMES))
    ],
}


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 6), (40 * seed, 255 - 40 * seed, 90)).save(buffer, format="JPEG")
    return buffer.getvalue()


def _zip(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    # Stored, not deflated, so the archives are large enough to split for the resume test.
    with zipfile.ZipFile(buffer, "w", compression=zipfile.ZIP_STORED) as bundle:
        for name, payload in members.items():
            bundle.writestr(name, payload)
    return buffer.getvalue()


JPEGS = {name: _jpeg(seed) for seed, name in enumerate(IMAGE_NAMES)}
ARCHIVES = {
    ANNOTATIONS_ARCHIVE: _zip({"annotations/captions_train2014.json": json.dumps(CAPTIONS).encode()}),
    IMAGES_ARCHIVE: _zip(JPEGS),
}
CHECKSUMS = {path: (len(data), hashlib.sha256(data).hexdigest()) for path, data in ARCHIVES.items()}


class RangeHandler(BaseHTTPRequestHandler):
    """Serves `server.archives` with single ``bytes=N-`` ranges and logs every request.

    `server.cut_after` (bytes) makes a full-file response stop early while still announcing the
    whole length, like a dropped connection; `server.ignore_range` makes it answer every request
    with the whole file, as servers without Range support do.
    """

    def do_GET(self) -> None:  # noqa: N802  (the name http.server dispatches to)
        path = self.path.lstrip("/")
        self.server.requests.append((path, self.headers.get("Range")))
        payload = self.server.archives.get(path)
        if payload is None:
            self.send_error(404)
            return
        start = 0
        requested = "" if self.server.ignore_range else self.headers.get("Range") or ""
        match = re.fullmatch(r"bytes=(\d+)-", requested)
        if match:
            start = int(match.group(1))
            if start >= len(payload):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(payload)}")
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(payload) - 1}/{len(payload)}")
        else:
            self.send_response(200)
        self.send_header("Content-Length", str(len(payload) - start))
        self.end_headers()
        body = payload[start:]
        if self.server.cut_after is not None and not match:
            body = body[: self.server.cut_after]
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        """Keep pytest's output clean."""


@pytest.fixture
def server():
    """A local HTTP server on an ephemeral port, shut down when the test ends."""
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    httpd.daemon_threads = True
    httpd.archives = dict(ARCHIVES)
    httpd.requests = []
    httpd.cut_after = None
    httpd.ignore_range = False
    httpd.url = f"http://127.0.0.1:{httpd.server_address[1]}"
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield httpd
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def _download(dest, url, **overrides):
    arguments = {"base_url": url, "checksums": CHECKSUMS, "show_progress": False, **overrides}
    return download_coco(dest, **arguments)


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def test_full_download_extracts_both_archives_and_removes_the_zips(server, tmp_path):
    captions_json, images_dir = _download(tmp_path, server.url)

    assert captions_json == tmp_path / "annotations" / "captions_train2014.json"
    assert json.loads(captions_json.read_text()) == CAPTIONS
    assert images_dir == tmp_path / "train2014"
    for name, payload in JPEGS.items():
        assert (tmp_path / name).read_bytes() == payload
        with Image.open(tmp_path / name) as picture:
            assert picture.size == (8, 6)
    assert sorted(path for path, _ in server.requests) == sorted(ARCHIVES)
    assert not list(tmp_path.glob("*.zip")) and not list(tmp_path.glob("*.part"))
    assert not list(tmp_path.glob(".*extracting"))


def test_partial_file_is_resumed_with_a_range_request(server, tmp_path):
    payload = ARCHIVES[IMAGES_ARCHIVE]
    head = len(payload) // 3
    (tmp_path / "train2014.zip.part").write_bytes(payload[:head])

    _download(tmp_path, server.url)

    assert (IMAGES_ARCHIVE, f"bytes={head}-") in server.requests
    assert (ANNOTATIONS_ARCHIVE, None) in server.requests
    for name, content in JPEGS.items():
        assert (tmp_path / name).read_bytes() == content


def test_server_without_range_support_restarts_the_file(server, tmp_path):
    server.ignore_range = True
    (tmp_path / "train2014.zip.part").write_bytes(b"stale bytes that must not survive")

    _download(tmp_path, server.url)
    for name, content in JPEGS.items():
        assert (tmp_path / name).read_bytes() == content


@pytest.mark.parametrize("extra", [b"", b"junk past the end"])
def test_part_at_or_past_the_end_without_known_size(server, tmp_path, extra):
    """With no expected size the server's 416 decides: exactly the end is done, past it restarts."""
    payload = ARCHIVES[ANNOTATIONS_ARCHIVE]
    (tmp_path / "annotations_trainval2014.zip.part").write_bytes(payload + extra)

    captions_json, _ = _download(tmp_path, server.url, checksums={})
    assert json.loads(captions_json.read_text()) == CAPTIONS
    expected = [(ANNOTATIONS_ARCHIVE, f"bytes={len(payload) + len(extra)}-")]
    if extra:
        expected.append((ANNOTATIONS_ARCHIVE, None))
    assert [request for request in server.requests if request[0] == ANNOTATIONS_ARCHIVE] == expected


def test_dropped_connection_keeps_the_part_and_a_rerun_finishes_it(server, tmp_path):
    cut = len(ARCHIVES[ANNOTATIONS_ARCHIVE]) // 2
    server.cut_after = cut
    with pytest.raises(DualEncError, match="re-run") as info:
        _download(tmp_path, server.url, files=(ANNOTATIONS_ARCHIVE,))
    assert "\n" not in str(info.value)
    assert (tmp_path / "annotations_trainval2014.zip.part").stat().st_size == cut

    server.cut_after = None
    captions_json, _ = _download(tmp_path, server.url)
    assert (ANNOTATIONS_ARCHIVE, f"bytes={cut}-") in server.requests
    assert json.loads(captions_json.read_text()) == CAPTIONS


def test_checksum_mismatch_raises_and_does_not_keep_the_file(server, tmp_path):
    size, _ = CHECKSUMS[ANNOTATIONS_ARCHIVE]
    wrong = {**CHECKSUMS, ANNOTATIONS_ARCHIVE: (size, "0" * 64)}
    with pytest.raises(DualEncError, match="SHA-256") as info:
        _download(tmp_path, server.url, checksums=wrong)
    assert "\n" not in str(info.value)
    assert not (tmp_path / "annotations_trainval2014.zip").exists()
    assert not (tmp_path / "annotations_trainval2014.zip.part").exists()
    assert not (tmp_path / "annotations_trainval2014.zip.extracted").exists()
    assert not (tmp_path / "annotations").exists()


def test_size_mismatch_raises_before_hashing(server, tmp_path):
    _, digest = CHECKSUMS[IMAGES_ARCHIVE]
    wrong = {**CHECKSUMS, IMAGES_ARCHIVE: (len(ARCHIVES[IMAGES_ARCHIVE]) + 7, digest)}
    with pytest.raises(DualEncError, match="bytes but"):
        _download(tmp_path, server.url, checksums=wrong)
    assert not (tmp_path / "train2014.zip").exists()


def test_server_down_gives_one_line_saying_how_to_recover(tmp_path):
    with pytest.raises(DualEncError) as info:
        _download(tmp_path, _closed_port_url())
    message = str(info.value)
    assert "\n" not in message
    for words in ("could not download", "re-run", "--annotations", "--images", "train2014.zip"):
        assert words in message


def test_missing_file_on_server_names_the_http_status(server, tmp_path):
    with pytest.raises(DualEncError, match="404"):
        _download(tmp_path, server.url, files=("zips/val2014.zip",))


def test_rerun_after_completion_makes_no_requests(server, tmp_path):
    first = _download(tmp_path, server.url)
    server.requests.clear()

    assert _download(tmp_path, server.url) == first
    assert _download(tmp_path, _closed_port_url()) == first
    assert server.requests == []


def test_deleted_output_is_fetched_again(server, tmp_path):
    _download(tmp_path, server.url)
    (tmp_path / "train2014" / IMAGE_NAMES[0].split("/")[1]).unlink()
    (tmp_path / "train2014").rename(tmp_path / "elsewhere")
    server.requests.clear()

    _download(tmp_path, server.url)
    assert [path for path, _ in server.requests] == [IMAGES_ARCHIVE]
    assert (tmp_path / IMAGE_NAMES[0]).read_bytes() == JPEGS[IMAGE_NAMES[0]]


def test_zip_placed_by_hand_is_verified_and_used_without_the_network(tmp_path):
    for path, payload in ARCHIVES.items():
        (tmp_path / path.rsplit("/", 1)[1]).write_bytes(payload)

    captions_json, images_dir = _download(tmp_path, _closed_port_url())
    assert json.loads(captions_json.read_text()) == CAPTIONS
    assert sorted(entry.name for entry in images_dir.iterdir()) == sorted(
        name.split("/")[1] for name in IMAGE_NAMES
    )


def test_broken_zip_is_deleted_with_a_clear_error(server, tmp_path):
    server.archives[ANNOTATIONS_ARCHIVE] = b"not a zip at all"
    with pytest.raises(DualEncError, match="not a valid zip"):
        _download(tmp_path, server.url, checksums={})
    assert not (tmp_path / "annotations_trainval2014.zip").exists()


def test_official_table_covers_the_default_archives():
    assert set(download.COCO_ARCHIVES) <= set(download.COCO_CHECKSUMS)
    for size, digest in download.COCO_CHECKSUMS.values():
        assert size > 0 and re.fullmatch(r"[0-9a-f]{64}", digest)
