"""Galleries: the sets of images an index is built over, behind one `Gallery` protocol.

`dualenc.retrieval.index` stores and reuses embeddings without knowing what kind of gallery it holds;
each implementation owns what differs:

- `PackedGallery`: one split of a packed dataset. Its fingerprint is the sha256 of its shards'
  checksums from the manifest; each distinct image is embedded once, with its first caption and
  its label; a changed split is embedded again from scratch.
- `FolderGallery`: every image file (`dualenc.data.images.SUPPORTED_SUFFIXES`) under a directory,
  recursively. Its fingerprint is the sha256 of the sorted (relative path, size, mtime_ns) list of its image files; a changed
  folder is updated incrementally (only new or modified files are embedded, deleted ones dropped).

Images that cannot be decoded are skipped and listed with their reason, never fatal.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import os
import re
import sys
from pathlib import Path
from collections.abc import Iterable, Iterator
from typing import Protocol, TextIO

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from dualenc.core.errors import DualEncError
from dualenc.export.encoders import LoadedEncoder
from dualenc.data.images import SUPPORTED_SUFFIXES, pillow_reason, read_image_files
from dualenc.data.manifest import load_manifest
from dualenc.data.packed import distinct_images, read_batches
from dualenc.data.records import CAPTION, IMAGE, IMAGE_ID, LABEL

# Images per encoder call: MobileNetV2 at 224x224 costs ~5 % less CPU per image in batches of 16
# than of 32 or 64 (activations stay in cache; measured on 2 cores), with 2 batches in flight.
EMBED_BATCH = 16
# Batches handed to the encoder at once: a TensorFlow call releases the GIL, so one batch decodes
# (in the encoder's graph) while another runs the network. 1.8x the images/s on 2 cores.
BATCHES_IN_FLIGHT = 2


class Gallery(Protocol):
    """A set of images that `dualenc.retrieval.index.open_index` can embed, fingerprint and read back.

    `embed` returns ``(meta, embeddings, embedded)``: `meta` holds per row ``image_ids``,
    ``paths`` (absolute, or None), ``labels`` and ``captions`` (or None) and a ``skipped`` list
    of unreadable images with their reasons; `embeddings` is ``(N, D)`` float32; `embedded`
    counts the images embedded by this call. `previous` is the gallery's last index built by
    the same encoder, ``(meta, embeddings)``, or None; an implementation may reuse its rows.
    """

    @property
    def key(self) -> str:
        """The index folder name: readable, and unique per absolute location."""

    @property
    def description(self) -> str:
        """The gallery in words, for messages."""

    def fingerprint(self) -> str:
        """sha256 identifying the gallery's current content."""

    def to_json(self) -> dict:
        """What the gallery is, as stored in the index's ``meta.json``."""

    def embed(
        self, encoder: LoadedEncoder, previous: tuple[dict, np.ndarray] | None, log: TextIO
    ) -> tuple[dict, np.ndarray, int]:
        """Embed the gallery's readable images (see the class docstring)."""

    def read_images(self, image_ids: list[str]) -> dict[str, bytes]:
        """Encoded bytes of the given images, by image_id."""


def _content_hash(content: object) -> str:
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class PackedGallery:
    """One split of a packed dataset (``manifest.json`` + TFRecord shards)."""

    data_dir: Path
    split: str

    @property
    def key(self) -> str:
        return f"{_slug(self.data_dir.resolve().name)}-{_slug(self.split)}-{_path_hash(self.data_dir)}"

    @property
    def description(self) -> str:
        return f"split {self.split!r} of {self.data_dir}"

    def fingerprint(self) -> str:
        return _content_hash(dict(load_manifest(self.data_dir).split(self.split, self.data_dir).sha256))

    def to_json(self) -> dict:
        return {"kind": "packed", "data_dir": str(self.data_dir.resolve()), "split": self.split}

    def embed(
        self, encoder: LoadedEncoder, previous: tuple[dict, np.ndarray] | None, log: TextIO
    ) -> tuple[dict, np.ndarray, int]:
        if previous is not None:
            print(f"{self.description} changed since it was indexed; rebuilding the index", file=log)
        meta, embeddings = _embed_packed(encoder, self)
        for entry in meta["skipped"]:
            print(f"skipping unreadable image {entry['image_id']} in {self.data_dir}: {entry['reason']}", file=log)
        return meta, embeddings, len(embeddings)

    def read_images(self, image_ids: list[str]) -> dict[str, bytes]:
        """Found by scanning the split in packing order, stopping once all are found."""
        wanted, found = set(image_ids), {}
        for batch in read_batches(self.data_dir, self.split, (IMAGE_ID, IMAGE), batch_size=EMBED_BATCH):
            for image_id, blob in zip(batch[IMAGE_ID], batch[IMAGE]):
                image_id = image_id.decode("utf-8")
                if image_id in wanted and image_id not in found:
                    found[image_id] = blob
            if len(found) == len(wanted):
                break
        return found


@dataclasses.dataclass(frozen=True)
class FolderGallery:
    """Every image file (`dualenc.data.images.SUPPORTED_SUFFIXES`) under a directory, recursively."""

    directory: Path

    @property
    def key(self) -> str:
        return f"folder-{_slug(self.directory.resolve().name)}-{_path_hash(self.directory)}"

    @property
    def description(self) -> str:
        return f"folder {self.directory}"

    def fingerprint(self) -> str:
        return _content_hash(folder_files(self.directory))

    def to_json(self) -> dict:
        return {"kind": "folder", "directory": str(self.directory.resolve())}

    def embed(
        self, encoder: LoadedEncoder, previous: tuple[dict, np.ndarray] | None, log: TextIO
    ) -> tuple[dict, np.ndarray, int]:
        return _embed_folder(encoder, self, previous, log)

    def read_images(self, image_ids: list[str]) -> dict[str, bytes]:
        return {image_id: (self.directory / image_id).read_bytes() for image_id in image_ids}


def _embed_packed(encoder: LoadedEncoder, gallery: PackedGallery) -> tuple[dict, np.ndarray]:
    """Each distinct image of the split once (its first record's caption and label)."""
    summary = load_manifest(gallery.data_dir).split(gallery.split, gallery.data_dir)
    image_ids, labels, captions, skipped, chunks = [], [], [], [], []

    def named_batches() -> Iterator[tuple[tuple[dict, list[str]], list[str], list[bytes]]]:
        for batch in distinct_images(gallery.data_dir, gallery.split, batch_size=EMBED_BATCH).as_numpy_iterator():
            names = [image_id.decode("utf-8") for image_id in batch[IMAGE_ID]]
            yield (batch, names), names, list(batch[IMAGE])

    with tqdm(total=summary.images, unit="img", desc=f"indexing {gallery.split}", file=sys.stderr, disable=None) as bar:
        for (batch, names), (embeddings, kept, bad) in _embedded(encoder, named_batches()):
            chunks.append(embeddings)
            image_ids += [names[position] for position in kept]
            labels += [int(batch[LABEL][position]) for position in kept]
            captions += [batch[CAPTION][position].decode("utf-8") for position in kept]
            skipped += [{"image_id": name, "reason": reason} for name, reason in bad]
            bar.update(len(names))
    meta = {"image_ids": image_ids, "paths": None, "labels": labels, "captions": captions, "skipped": skipped}
    return meta, _stack(chunks, encoder.dimension)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "gallery"


def _path_hash(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode("utf-8")).hexdigest()[:10]


def folder_files(directory: Path) -> list[tuple[str, int, int]]:
    """Sorted (relative path, size, mtime_ns) of the image files under `directory` (-1s if unstat-able)."""
    if not directory.is_dir():
        raise DualEncError(f"gallery directory {directory} does not exist; pass a folder of images with --gallery")
    files = []
    for root, _, names in os.walk(directory):
        for name in names:
            if name.lower().endswith(SUPPORTED_SUFFIXES):
                path = Path(root) / name
                try:
                    stat = path.stat()
                    size, mtime = stat.st_size, stat.st_mtime_ns
                except OSError:  # e.g. a dangling link: listed, then reported as unreadable
                    size, mtime = -1, -1
                files.append((path.relative_to(directory).as_posix(), size, mtime))
    return sorted(files)


def embed_skipping_bad(
    encoder: LoadedEncoder, names: list[str], blobs: list[bytes]
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Embed a batch; if it fails, embed one by one to find the images TensorFlow cannot decode.

    Folder images arrive validated and canonical (`dualenc.data.images`), so this catches only packed
    images written by other tools. Returns (embeddings of the good ones, their positions in the
    batch, (name, reason) of the bad), the reason being TensorFlow's own line, not its preamble.
    """
    try:
        return encoder.embed_batch(blobs), list(range(len(blobs))), []
    except tf.errors.OpError:
        pass
    rows, kept, bad = [], [], []
    for position, (name, blob) in enumerate(zip(names, blobs)):
        try:
            rows.append(encoder.embed_batch([blob]))
            kept.append(position)
        except tf.errors.OpError as exc:
            # The kernel's message is the last line that is not a "[[node ...]]" trace.
            lines = [line.strip() for line in exc.message.splitlines()]
            lines = [line for line in lines if line and not line.startswith("[[")]
            bad.append((name, f"TensorFlow cannot decode the image: {lines[-1] if lines else type(exc).__name__}"))
    embeddings = np.concatenate(rows) if rows else np.zeros((0, encoder.dimension), np.float32)
    return embeddings, kept, bad


def _embedded(encoder: LoadedEncoder, batches: Iterable[tuple[object, list[str], list[bytes]]]) -> Iterator[tuple[object, tuple]]:
    """(item, `embed_skipping_bad` of its names and blobs) per (item, names, blobs) of `batches`,
    in order, with `BATCHES_IN_FLIGHT` batches in the encoder at once."""
    pending: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(BATCHES_IN_FLIGHT) as pool:
        for item, names, blobs in batches:
            pending.append((item, pool.submit(embed_skipping_bad, encoder, names, blobs)))
            if len(pending) >= BATCHES_IN_FLIGHT:
                item, result = pending.popleft()
                yield item, result.result()
        while pending:
            item, result = pending.popleft()
            yield item, result.result()


def _stack(chunks: list[np.ndarray], dimension: int) -> np.ndarray:
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, dimension), np.float32)


def _embed_files(encoder: LoadedEncoder, directory: Path, relative_paths: list[str]):
    """Read, validate and canonicalise the files in threads (`dualenc.data.images.read_image_files`),
    then embed them in batches.

    JPEGs and PNGs kept as they are are decoded once, by the encoder (``check_pixels=False``,
    ~1 ms of CPU less per photo); one the encoder refuses is skipped with Pillow's reason where
    Pillow refuses it too, as with full validation.
    Returns (embeddings, relative paths embedded in row order, (relative path, reason) skipped).
    """
    embedded, chunks, skipped = [], [], []

    def readable_batches() -> Iterator[tuple[tuple[list[str], list[bytes]], list[str], list[bytes]]]:
        names, blobs = [], []
        images = read_image_files([directory / name for name in relative_paths], check_pixels=False)
        with tqdm(total=len(relative_paths), unit="img", desc=f"indexing {directory.name}", file=sys.stderr, disable=None) as bar:
            for name, (blob, reason) in zip(relative_paths, images):
                if blob is None:
                    skipped.append((name, reason))
                else:
                    names.append(name)
                    blobs.append(blob)
                    if len(blobs) == EMBED_BATCH:
                        yield (names, blobs), names, blobs
                        names, blobs = [], []
                bar.update(1)
        if blobs:
            yield (names, blobs), names, blobs

    for (names, blobs), (embeddings, kept, bad) in _embedded(encoder, readable_batches()):
        chunks.append(embeddings)
        embedded.extend(names[position] for position in kept)
        blob_of = dict(zip(names, blobs))
        skipped.extend((name, pillow_reason(blob_of[name]) or reason) for name, reason in bad)
    return _stack(chunks, encoder.dimension), embedded, skipped


def _embed_folder(
    encoder: LoadedEncoder, gallery: FolderGallery, previous: tuple[dict, np.ndarray] | None, log: TextIO
) -> tuple[dict, np.ndarray, int]:
    """Embed a folder, reusing `previous` (meta, embeddings) rows for files that did not change."""
    directory = gallery.directory.resolve()
    current = {name: (size, mtime) for name, size, mtime in folder_files(directory)}
    kept_rows, kept_names, kept_skipped = [], [], []
    if previous is not None:
        old_meta, _ = previous
        for row, (name, size, mtime) in enumerate(old_meta["files"]):
            if current.get(name) == (size, mtime):
                kept_rows.append(row)
                kept_names.append(name)
        kept_skipped = [entry for entry in old_meta["skipped"] if current.get(entry["path"]) == (entry["size"], entry["mtime_ns"])]
    known = set(kept_names) | {entry["path"] for entry in kept_skipped}
    new_names = sorted(set(current) - known)
    if previous is not None:
        dropped = len(previous[0]["files"]) - len(kept_rows)
        print(f"gallery {directory} changed: embedding {len(new_names)} new or modified image(s), dropping {dropped}", file=log)

    new_embeddings, embedded, bad = _embed_files(encoder, directory, new_names)
    for name, reason in bad:
        print(f"skipping unreadable image {directory / name}: {reason}", file=log)
    kept_embeddings = previous[1][kept_rows] if previous is not None else np.zeros((0, encoder.dimension), np.float32)
    names = kept_names + embedded
    embeddings = np.concatenate([kept_embeddings.astype(np.float32), new_embeddings])
    order = np.argsort(names, kind="stable")
    names = [names[row] for row in order]
    skipped = kept_skipped + [
        {"path": name, "reason": reason, "size": current[name][0], "mtime_ns": current[name][1]} for name, reason in bad
    ]
    meta = {
        "image_ids": names,
        "paths": [str(directory / name) for name in names],
        "labels": None,
        "captions": None,
        "files": [[name, *current[name]] for name in names],
        "skipped": sorted(skipped, key=lambda entry: entry["path"]),
    }
    return meta, embeddings[order], len(new_names)
