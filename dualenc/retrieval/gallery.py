"""Galleries: the sets of images an index is built over, behind one `Gallery` protocol.

`dualenc.retrieval.index` stores and reuses embeddings without knowing what kind of gallery it holds;
each implementation owns what differs:

- `PackedGallery`: one split of a packed dataset. Its fingerprint is the sha256 of its shards'
  checksums from the manifest; each distinct image is embedded once, with its first caption and
  its label; a changed split is embedded again from scratch.
- `FolderGallery`: every image file (`dualenc.data.images.SUPPORTED_SUFFIXES`) under a directory,
  recursively. Its fingerprint is the sha256 of the sorted (relative path, size, mtime_ns) list of its image files; a changed
  folder is updated incrementally (only new or modified files are embedded, deleted ones dropped).

Images that cannot be decoded are skipped and listed with their reason, never fatal. What is
the same for every kind, and for the Beam index (`dualenc.beam.index`), lives here once:
`read_folder_images` reads a folder's files, `embed_skipping_bad` embeds a batch and says why
an image was skipped, `gallery_meta` builds the per-row meta an index stores.
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
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol, TextIO

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from dualenc.core.errors import DualEncError
from dualenc.export.encoders import LoadedEncoder
from dualenc.data.images import SUPPORTED_SUFFIXES, pillow_reason, read_image_files
from dualenc.data.manifest import load_manifest
from dualenc.data.packed import distinct_images, first_records
from dualenc.data.records import CAPTION, IMAGE, IMAGE_ID, LABEL

# Images per encoder call: MobileNetV2 at 224x224 costs ~5 % less CPU per image in batches of 16
# than of 32 or 64 (activations stay in cache; measured on 2 cores), with 2 batches in flight.
EMBED_BATCH = 16
# Batches handed to the encoder at once: a TensorFlow call releases the GIL, so one batch decodes
# (in the encoder's graph) while another runs the network. 1.8x the images/s on 2 cores.
BATCHES_IN_FLIGHT = 2
NOT_FINITE = "the encoder gave it an embedding that is not finite (NaN or inf)"


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

    def meta(self, rows: Sequence[tuple[GalleryImage, str | None]]) -> dict:
        """`gallery_meta` of `rows` for this gallery: what `embed` returns, for an index built elsewhere (Beam)."""


@dataclasses.dataclass(frozen=True)
class GalleryImage:
    """One image of a gallery as its listing gives it, before it is embedded or skipped.

    `image_id` names it in every kind (a folder file's is its path relative to the folder). A
    packed split's image carries its first record's `label` and `caption`; a folder's file its
    `size` and `mtime_ns`, by which an unchanged file keeps its row, or its skip, when the
    folder is indexed again.
    """

    image_id: str
    label: int | None = None
    caption: str | None = None
    size: int | None = None
    mtime_ns: int | None = None


def gallery_meta(rows: Sequence[tuple[GalleryImage, str | None]], directory: Path | None) -> dict:
    """The per-row meta of an index (see `Gallery`) from each image and why it was skipped (None:
    embedded), the embedded ones in row order: the one builder, for every gallery and the Beam path.

    `directory` is a folder gallery's resolved folder, None for a packed split. A skipped entry
    names its image by the key ``meta.json`` has always used for that kind, which other tools
    read: ``image_id`` for a packed split (in packing order); for a folder ``path`` (relative to
    it), with ``size`` and ``mtime_ns`` so the file is tried again once it changes (sorted by path).
    """
    embedded = [image for image, reason in rows if reason is None]
    skipped = [(image, reason) for image, reason in rows if reason is not None]
    image_ids = [image.image_id for image in embedded]
    if directory is None:
        return {
            "image_ids": image_ids,
            "paths": None,
            "labels": [image.label for image in embedded],
            "captions": [image.caption for image in embedded],
            "skipped": [{"image_id": image.image_id, "reason": reason} for image, reason in skipped],
        }
    return {
        "image_ids": image_ids,
        "paths": [str(directory / image_id) for image_id in image_ids],
        "labels": None,
        "captions": None,
        "files": [[image.image_id, image.size, image.mtime_ns] for image in embedded],
        "skipped": sorted(({"path": image.image_id, "reason": reason, "size": image.size, "mtime_ns": image.mtime_ns}
                           for image, reason in skipped), key=lambda entry: entry["path"]),
    }


def report_skipped(description: str, skipped: Iterable[tuple[GalleryImage, str]], log: TextIO) -> None:
    """One line per image newly skipped in the gallery `description`, with its reason."""
    for image, reason in skipped:
        print(f"skipping unreadable image {image.image_id}: {reason} ({description})", file=log)


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
        meta, embeddings = _embed_packed(encoder, self, log)
        return meta, embeddings, len(embeddings)

    def meta(self, rows: Sequence[tuple[GalleryImage, str | None]]) -> dict:
        return gallery_meta(rows, None)

    def read_images(self, image_ids: list[str]) -> dict[str, bytes]:
        """Each from its first record (`first_records`), scanning the split in packing order
        until all are found."""
        wanted, found = set(image_ids), {}
        for record in first_records(self.data_dir, self.split, (IMAGE,), batch_size=EMBED_BATCH):
            if len(found) == len(wanted):
                break
            image_id = record.features[IMAGE_ID].decode("utf-8")
            if image_id in wanted:
                found[image_id] = record.features[IMAGE]
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

    def meta(self, rows: Sequence[tuple[GalleryImage, str | None]]) -> dict:
        return gallery_meta(rows, self.directory.resolve())

    def read_images(self, image_ids: list[str]) -> dict[str, bytes]:
        return {image_id: (self.directory / image_id).read_bytes() for image_id in image_ids}


def _embed_packed(encoder: LoadedEncoder, gallery: PackedGallery, log: TextIO) -> tuple[dict, np.ndarray]:
    """Each distinct image of the split once (`distinct_images`: its first record's caption and label)."""
    summary = load_manifest(gallery.data_dir).split(gallery.split, gallery.data_dir)
    rows, chunks = [], []

    def image_batches() -> Iterator[tuple[list[GalleryImage], list[bytes]]]:
        for batch in distinct_images(gallery.data_dir, gallery.split, batch_size=EMBED_BATCH).as_numpy_iterator():
            images = [GalleryImage(image_id.decode("utf-8"), int(label), caption.decode("utf-8"))
                      for image_id, label, caption in zip(batch[IMAGE_ID], batch[LABEL], batch[CAPTION])]
            yield images, list(batch[IMAGE])

    with tqdm(total=summary.images, unit="img", desc=f"indexing {gallery.split}", file=sys.stderr, disable=None) as bar:
        for images, (embeddings, reasons) in _embedded(encoder, image_batches(), pillow_reasons=False):
            chunks.append(embeddings)
            rows += zip(images, reasons)
            bar.update(len(images))
    report_skipped(gallery.description, [(image, reason) for image, reason in rows if reason is not None], log)
    return gallery.meta(rows), _stack(chunks, encoder.dimension)


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


def embed_skipping_bad(encoder: LoadedEncoder, blobs: list[bytes],
                       pillow_reasons: bool) -> tuple[np.ndarray, list[str | None]]:
    """Embed a batch of images; if TensorFlow refuses it, embed one by one to find the bad ones.

    Returns the embeddings of the images embedded, in order, and per image None or why it was
    skipped: TensorFlow's own line without its preamble, or, with `pillow_reasons`, Pillow's
    (`dualenc.data.images.pillow_reason`) where Pillow refuses the image too. A folder's files
    are read with their pixels left to the encoder (`read_folder_images`), so they take
    `pillow_reasons` and are explained as by full validation; a packed split's images were
    validated when packed, so one refused now is one another tool wrote, and the kernel's reason
    says what went wrong. An image whose embedding is not finite (NaN or inf, which no search can
    rank) is skipped too. Every gallery, and the Beam index's inference function, skips by this rule.
    """
    try:
        return _finite_only(encoder.embed_batch(blobs), [None] * len(blobs))
    except tf.errors.OpError:
        pass
    rows, reasons = [], []
    for blob in blobs:
        try:
            rows.append(encoder.embed_batch([blob]))
            reasons.append(None)
        except tf.errors.OpError as exc:
            # The kernel's message is the last line that is not a "[[node ...]]" trace.
            lines = [line.strip() for line in exc.message.splitlines()]
            lines = [line for line in lines if line and not line.startswith("[[")]
            reasons.append(pillow_reasons and pillow_reason(blob)
                           or f"TensorFlow cannot decode the image: {lines[-1] if lines else type(exc).__name__}")
    embeddings = np.concatenate(rows) if rows else np.zeros((0, encoder.dimension), np.float32)
    return _finite_only(embeddings, reasons)


def _finite_only(embeddings: np.ndarray, reasons: list[str | None]) -> tuple[np.ndarray, list[str | None]]:
    """`embeddings` (one row per None in `reasons`) without the rows that are not finite, whose
    images get that as their reason."""
    finite = np.isfinite(embeddings).all(axis=1)
    if finite.all():
        return embeddings, reasons
    finite_rows = iter(finite)  # one per embedded image, in order
    reasons = [NOT_FINITE if reason is None and not next(finite_rows) else reason for reason in reasons]
    return embeddings[finite], reasons


def _embedded(encoder: LoadedEncoder, batches: Iterable[tuple[object, list[bytes]]],
              pillow_reasons: bool) -> Iterator[tuple[object, tuple]]:
    """(item, `embed_skipping_bad` of its blobs) per (item, blobs) of `batches`, in order, with
    `BATCHES_IN_FLIGHT` batches in the encoder at once."""
    pending: collections.deque = collections.deque()
    with concurrent.futures.ThreadPoolExecutor(BATCHES_IN_FLIGHT) as pool:
        for item, blobs in batches:
            pending.append((item, pool.submit(embed_skipping_bad, encoder, blobs, pillow_reasons)))
            if len(pending) >= BATCHES_IN_FLIGHT:
                item, result = pending.popleft()
                yield item, result.result()
        while pending:
            item, result = pending.popleft()
            yield item, result.result()


def _stack(chunks: list[np.ndarray], dimension: int) -> np.ndarray:
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, dimension), np.float32)


def read_folder_images(directory: Path, names: Sequence[str]) -> Iterator[tuple[bytes | None, str | None]]:
    """Per file of `directory` named in `names`, in order: its bytes, read, validated and
    canonicalised in threads by `dualenc.data.images.read_image_files`, or (None, why it is
    skipped). How every path reads a folder gallery's files.

    JPEGs and PNGs kept as they are are decoded once, by the encoder (``check_pixels=False``,
    ~1 ms of CPU less per photo); one the encoder refuses is skipped with Pillow's reason where
    Pillow refuses it too (`embed_skipping_bad` with ``pillow_reasons``), as with full validation.
    """
    return read_image_files([directory / name for name in names], check_pixels=False)


def _embed_files(encoder: LoadedEncoder, directory: Path,
                 images: list[GalleryImage]) -> tuple[np.ndarray, list[tuple[GalleryImage, str | None]]]:
    """Read (`read_folder_images`) and embed the folder's `images` in batches.
    Returns (embeddings of the images embedded, in order; each image with why it was skipped or None)."""
    rows, chunks = [], []

    def readable_batches() -> Iterator[tuple[list[GalleryImage], list[bytes]]]:
        batch, blobs = [], []
        read = read_folder_images(directory, [image.image_id for image in images])
        with tqdm(total=len(images), unit="img", desc=f"indexing {directory.name}", file=sys.stderr, disable=None) as bar:
            for image, (blob, reason) in zip(images, read):
                if blob is None:
                    rows.append((image, reason))
                else:
                    batch.append(image)
                    blobs.append(blob)
                    if len(blobs) == EMBED_BATCH:
                        yield batch, blobs
                        batch, blobs = [], []
                bar.update(1)
        if blobs:
            yield batch, blobs

    for batch, (embeddings, reasons) in _embedded(encoder, readable_batches(), pillow_reasons=True):
        chunks.append(embeddings)
        rows += zip(batch, reasons)
    return _stack(chunks, encoder.dimension), rows


def _embed_folder(
    encoder: LoadedEncoder, gallery: FolderGallery, previous: tuple[dict, np.ndarray] | None, log: TextIO
) -> tuple[dict, np.ndarray, int]:
    """Embed a folder, reusing `previous` (meta, embeddings) rows, and skips, of files that did not change."""
    directory = gallery.directory.resolve()
    current = {name: (size, mtime) for name, size, mtime in folder_files(directory)}
    reused_rows, reused = [], []
    if previous is not None:
        old_meta, _ = previous
        for row, (name, size, mtime) in enumerate(old_meta["files"]):
            if current.get(name) == (size, mtime):
                reused_rows.append(row)
                reused.append((GalleryImage(name, size=size, mtime_ns=mtime), None))
        reused += [(GalleryImage(entry["path"], size=entry["size"], mtime_ns=entry["mtime_ns"]), entry["reason"])
                   for entry in old_meta["skipped"] if current.get(entry["path"]) == (entry["size"], entry["mtime_ns"])]
    known = {image.image_id for image, _ in reused}
    new_images = [GalleryImage(name, size=current[name][0], mtime_ns=current[name][1]) for name in sorted(set(current) - known)]
    if previous is not None:
        dropped = len(previous[0]["files"]) - len(reused_rows)
        print(f"gallery {directory} changed: embedding {len(new_images)} new or modified image(s), dropping {dropped}", file=log)

    new_embeddings, new_rows = _embed_files(encoder, directory, new_images)
    report_skipped(gallery.description, [(image, reason) for image, reason in new_rows if reason is not None], log)
    kept_embeddings = previous[1][reused_rows] if previous is not None else np.zeros((0, encoder.dimension), np.float32)
    embeddings = np.concatenate([kept_embeddings.astype(np.float32), new_embeddings])
    rows = reused + new_rows
    embedded = [image for image, reason in rows if reason is None]  # in the order of `embeddings`
    order = np.argsort([image.image_id for image in embedded], kind="stable")
    rows = [(embedded[row], None) for row in order] + [(image, reason) for image, reason in rows if reason is not None]
    return gallery.meta(rows), embeddings[order], len(new_images)
