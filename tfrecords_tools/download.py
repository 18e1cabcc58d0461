"""Download and unpack the MS-COCO 2014 train captions and images, resumably and verified.

Each archive is fetched into ``DEST/<name>.part``; an interrupted download keeps its ``.part``
and the next run asks the server only for the missing tail (an HTTP ``Range`` request). A
finished ``.part`` must have the size the server announced and, where known, the expected size
and SHA-256; only then is it renamed to ``DEST/<name>``, unpacked into a temporary folder inside
``DEST``, moved into place, and marked done with ``DEST/<name>.extracted``. The archive is then
deleted (``train2014.zip`` is 13.5 GB). A marked archive whose entries are all present is skipped
without touching the network, so re-running the command is cheap.

An archive you downloaded yourself can be dropped into ``DEST`` under its own name: it is
verified and unpacked like a downloaded one.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import urllib.error
import urllib.request
import zipfile
from collections.abc import Mapping
from pathlib import Path

from tqdm import tqdm

from dualenc.core import jsonfiles
from dualenc.core.errors import DualEncError
from dualenc.core.files import fsync_tree, move_into_place, write_json_atomic

COCO_BASE_URL = "http://images.cocodataset.org"
ANNOTATIONS_ARCHIVE = "annotations/annotations_trainval2014.zip"
IMAGES_ARCHIVE = "zips/train2014.zip"
COCO_ARCHIVES = (ANNOTATIONS_ARCHIVE, IMAGES_ARCHIVE)

# (size in bytes, SHA-256) of the official archives, as recorded in TensorFlow Datasets'
# url_checksums/coco.txt; paths are relative to COCO_BASE_URL.
COCO_CHECKSUMS: dict[str, tuple[int, str]] = {
    ANNOTATIONS_ARCHIVE: (
        252_872_794,
        "031296bbc80c45a1d1f76bf9a90ead27e94e99ec629208449507a4917a3bf009",
    ),
    IMAGES_ARCHIVE: (
        13_510_573_713,
        "ede4087e640bddba550e090eae701092534b554b42b05ac33f0300b984b31775",
    ),
}

CAPTIONS_JSON = Path("annotations") / "captions_train2014.json"
IMAGES_DIR = Path("train2014")

CHUNK_BYTES = 1 << 20
TIMEOUT_S = 60
# What urllib raises for a refused connection, a reset, a timeout or an HTTP error status.
NETWORK_ERRORS = (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError)


def download_coco(
    dest: Path,
    *,
    base_url: str | None = None,
    files: tuple[str, ...] | None = None,
    checksums: Mapping[str, tuple[int | None, str | None]] | None = None,
    show_progress: bool = True,
) -> tuple[Path, Path]:
    """Fetch, verify and unpack the COCO 2014 train captions and images into `dest`.

    `files` are archive paths relative to `base_url` (default `COCO_ARCHIVES` under
    `COCO_BASE_URL`); `checksums` maps such a path to its expected (size in bytes, SHA-256 hex),
    either of which may be None; a path it does not list is checked only against the size the
    server announces. The default is `COCO_CHECKSUMS`.

    Returns (``dest/annotations/captions_train2014.json``, ``dest/train2014``), the two paths
    the COCO packer reads. Raises `DualEncError` for a network failure (the ``.part`` is kept,
    so re-running resumes), a size or checksum mismatch (the bad file is deleted), a broken zip,
    or archives that lack those two paths.
    """
    dest = Path(dest)
    base_url = (base_url or COCO_BASE_URL).rstrip("/")
    files = COCO_ARCHIVES if files is None else files
    checksums = COCO_CHECKSUMS if checksums is None else checksums
    dest.mkdir(parents=True, exist_ok=True)
    for remote_path in files:
        url = f"{base_url}/{remote_path}"
        expected_size, expected_sha256 = checksums.get(remote_path, (None, None))
        archive = dest / Path(remote_path).name
        if _is_extracted(archive):
            continue
        if not archive.exists():
            part = archive.with_name(archive.name + ".part")
            try:
                _fetch(url, part, expected_size, show_progress)
            except NETWORK_ERRORS as error:
                raise DualEncError(_network_message(url, error, base_url, dest)) from None
            _verify(part, url, expected_size, expected_sha256, show_progress)
            move_into_place(part, archive)
        else:
            _verify(archive, url, expected_size, expected_sha256, show_progress)
        _extract(archive)
        archive.unlink()
    captions_json, images_dir = dest / CAPTIONS_JSON, dest / IMAGES_DIR
    for expected_path in (captions_json, images_dir):
        if not expected_path.exists():
            raise DualEncError(
                f"{expected_path} is missing after unpacking {', '.join(files)} into {dest}; "
                f"the archives do not hold the COCO 2014 train captions and images"
            )
    return captions_json, images_dir


def _marker(archive: Path) -> Path:
    return archive.with_name(archive.name + ".extracted")


def _is_extracted(archive: Path) -> bool:
    """True when `archive` was unpacked earlier and every top-level entry it made still exists."""
    marker = _marker(archive)
    if not marker.exists():
        return False
    try:
        entries = jsonfiles.load_file(marker, "extraction marker")["entries"]
    except (DualEncError, KeyError, TypeError):
        return False
    return all((archive.parent / entry).exists() for entry in entries)


def _fetch(url: str, part: Path, expected_size: int | None, show_progress: bool) -> None:
    """Download `url` into `part`, continuing from the bytes `part` already holds.

    Raises one of `NETWORK_ERRORS`, or `DualEncError` when the transfer ends short of the
    size the server announced (the bytes so far stay in `part`).
    """
    have = part.stat().st_size if part.exists() else 0
    if expected_size is not None and have > expected_size:
        part.unlink()
        have = 0
    if expected_size is not None and have == expected_size:
        return
    headers = {"Range": f"bytes={have}-"} if have else {}
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=TIMEOUT_S)
    except urllib.error.HTTPError as error:
        if error.code != http.client.REQUESTED_RANGE_NOT_SATISFIABLE:
            raise
        # The server says `have` is at or past its end: done if it is exactly the end,
        # otherwise the .part is not a prefix of this file, so start again.
        server_total = error.headers.get("Content-Range", "").rpartition("/")[2]
        if server_total == str(have):
            return
        part.unlink()
        _fetch(url, part, expected_size, show_progress)
        return
    with response:
        if response.status != http.client.PARTIAL_CONTENT:
            have = 0  # the server ignored the Range header and sends the whole file
        length = response.headers.get("Content-Length")
        total = have + int(length) if length is not None else expected_size
        with part.open("ab" if have else "wb") as sink, tqdm(
            total=total,
            initial=have,
            unit="B",
            unit_scale=True,
            unit_divisor=1024,
            desc=part.name.removesuffix(".part"),
            disable=None if show_progress else True,  # None: no redrawn bar when stderr is not a terminal
        ) as progress:
            while chunk := response.read(CHUNK_BYTES):
                sink.write(chunk)
                progress.update(len(chunk))
    got = part.stat().st_size
    if total is not None and got < total:
        raise DualEncError(
            f"download of {url} stopped at {got} of {total} bytes; "
            f"re-run the same command to resume from {part}"
        )


def _verify(
    path: Path, url: str, expected_size: int | None, expected_sha256: str | None, show_progress: bool
) -> None:
    """Check `path` against the expected size and SHA-256; delete it and raise on a mismatch."""
    size = path.stat().st_size
    if expected_size is not None and size != expected_size:
        path.unlink()
        raise DualEncError(
            f"{path} has {size} bytes but {url} should have {expected_size}; "
            f"the file was deleted, re-run to download it again"
        )
    if expected_sha256 is None:
        return
    digest = hashlib.sha256()
    with path.open("rb") as source, tqdm(
        total=size,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=f"sha256 {path.name}",
        disable=None if show_progress else True,  # None: no redrawn bar when stderr is not a terminal
    ) as progress:
        while chunk := source.read(CHUNK_BYTES):
            digest.update(chunk)
            progress.update(len(chunk))
    if digest.hexdigest() != expected_sha256.lower():
        path.unlink()
        raise DualEncError(
            f"SHA-256 of {path} is {digest.hexdigest()}, expected {expected_sha256} for {url}; "
            f"the file was deleted, re-run to download it again"
        )


def _extract(archive: Path) -> None:
    """Unpack `archive` next to itself via a temporary folder, then write its done-marker.

    Files are unpacked into ``.<name>.extracting`` (same file system) and renamed into place
    one by one, merging with folders that already exist; the marker is written last, so an
    interrupted run is redone rather than trusted.
    """
    staging = archive.with_name(f".{archive.name}.extracting")
    if staging.exists():
        shutil.rmtree(staging)
    try:
        with zipfile.ZipFile(archive) as bundle:
            bundle.extractall(staging)
    except zipfile.BadZipFile as error:
        shutil.rmtree(staging, ignore_errors=True)
        archive.unlink()
        raise DualEncError(
            f"{archive} is not a valid zip ({error}); it was deleted, re-run to download it again"
        ) from None
    entries = sorted(entry.name for entry in staging.iterdir())
    shutil.copytree(staging, archive.parent, dirs_exist_ok=True, copy_function=os.replace)
    shutil.rmtree(staging)
    # Synced before the marker is written, so the marker never vouches for unwritten files.
    for entry in entries:
        fsync_tree(archive.parent / entry)
    marker = _marker(archive)
    write_json_atomic(marker, {"archive": archive.name, "entries": entries})


def _network_message(url: str, error: BaseException, base_url: str, dest: Path) -> str:
    """One line: what failed, that a re-run resumes, and how to get the files by hand."""
    # HTTPError's own text carries the status code; URLError's `reason` is the socket error.
    is_http_status = isinstance(error, urllib.error.HTTPError)
    reason = error if is_http_status else getattr(error, "reason", None) or error
    return (
        f"could not download {url} ({reason}); re-run the same command to resume, or fetch "
        f"{base_url}/{ANNOTATIONS_ARCHIVE} and {base_url}/{IMAGES_ARCHIVE} yourself, unzip them "
        f"and pass --annotations <dir>/{CAPTIONS_JSON.as_posix()} --images <dir>/{IMAGES_DIR}"
        f" (or put the zips in {dest} and re-run)"
    ).replace("\n", " ")
