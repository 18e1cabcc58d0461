"""A gallery's image embeddings, computed once with a run's exported vision encoder and kept.

An index lives in ``RUN/index/<gallery-key>/``:

- ``embeddings.npy``: ``(N, D)`` unit-norm rows, float32 (or float16 to halve the size);
- ``meta.json``: per row its ``image_ids``, ``labels`` and first ``captions`` (packed splits)
  or ``paths`` (folders); the skipped unreadable images; and two fingerprints —
  the encoder's (sha256 of ``saved_model.pb`` and the variables files) and the gallery's (a
  packed split: its shards' sha256 from the manifest; a folder: sha256 of the sorted
  (relative path, size, mtime_ns) list of its image files);
- ``ann-hnsw.faiss`` / ``ann-ivf.faiss``: approximate-search indexes, built on first use.

`open_index` reuses an index while both fingerprints match. A new encoder rebuilds it; a folder
that changed under the same encoder is updated incrementally (only new or modified files are
embedded, deleted ones dropped). A packed split with several captions per image indexes each
image once. The index directory is written under a temporary name and renamed into place.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

import numpy as np
import tensorflow as tf
from tqdm import tqdm

from dualenc import retrieval
from dualenc.data import sha256_of_file, split_summary
from dualenc.errors import DualEncError
from dualenc.export import VISION_ENCODER_DIR, LoadedEncoder, load_encoder
from dualenc.images import SUPPORTED_SUFFIXES, read_image_files
from dualenc.records import CAPTION, IMAGE, IMAGE_ID, LABEL, parse_example

INDEX_DIR = "index"
META_NAME = "meta.json"
EMBEDDINGS_NAME = "embeddings.npy"
META_VERSION = 1
EMBED_BATCH = 32
REQUIRED_META = frozenset(
    ("encoder_fingerprint", "gallery_fingerprint", "dtype", "image_ids", "paths", "labels", "captions", "skipped")
)
# Gallery rows used as queries to measure an approximate index against exact search.
RECALL_SAMPLE = 200


@dataclasses.dataclass(frozen=True)
class PackedGallery:
    """One split of a packed dataset (``manifest.json`` + TFRecord shards)."""

    data_dir: Path
    split: str


@dataclasses.dataclass(frozen=True)
class FolderGallery:
    """Every image file (`dualenc.images.SUPPORTED_SUFFIXES`) under a directory, recursively."""

    directory: Path


Gallery = PackedGallery | FolderGallery


@dataclasses.dataclass
class GalleryIndex:
    """A loaded index: ``embeddings`` (N, D) float32 unit rows and per-row metadata.

    `paths` (absolute) is set for folder galleries, `labels` and `captions` (the first caption
    of each image) for packed ones. `embedded` counts the images embedded by the call that
    returned this index: 0 when it was reused as it was.
    """

    directory: Path
    embeddings: np.ndarray
    image_ids: list[str]
    paths: list[str] | None
    labels: list[int] | None
    captions: list[str] | None
    skipped: list[dict]
    embedded: int = 0

    def __len__(self) -> int:
        return len(self.image_ids)

    def search(self, query_embeddings: np.ndarray, k: int, ann: str = "auto", log: TextIO | None = None):
        """Top-k rows per query: ``(scores, indices)``, each ``(Q, min(k, N))``, best first."""
        kind = retrieval.resolve_ann(ann, len(self))  # `log` (default stderr) gets the ANN's recall
        if kind == "exact":
            return retrieval.exact_search(query_embeddings, self.embeddings, k)
        return retrieval.ann_search(self.ann_index(kind, log), query_embeddings, k)

    def ann_index(self, kind: str, log: TextIO | None = None):
        """The FAISS index of `kind` for these embeddings: loaded, or built, measured and saved."""
        log = sys.stderr if log is None else log
        path = self.directory / f"ann-{kind}.faiss"
        if path.is_file():
            return retrieval.load_ann(path)
        index = retrieval.build_ann(self.embeddings, kind)
        sample = np.random.default_rng(0).permutation(len(self))[:RECALL_SAMPLE]
        recall = retrieval.ann_recall(index, self.embeddings, self.embeddings[sample], k=10)
        print(
            f"{kind.upper()} index over {len(self)} images: recall@10 vs exact search = {recall:.3f} "
            f"({len(sample)} gallery images as queries)",
            file=log,
        )
        retrieval.save_ann(index, path)
        return index


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text).strip("_.") or "gallery"


def _path_hash(path: Path) -> str:
    return hashlib.sha256(str(path.resolve()).encode("utf-8")).hexdigest()[:10]


def gallery_key(gallery: Gallery) -> str:
    """The index folder name of `gallery`: readable, and unique per absolute location."""
    if isinstance(gallery, PackedGallery):
        return f"{_slug(gallery.data_dir.resolve().name)}-{_slug(gallery.split)}-{_path_hash(gallery.data_dir)}"
    return f"folder-{_slug(gallery.directory.resolve().name)}-{_path_hash(gallery.directory)}"


def encoder_fingerprint(encoder_dir: Path) -> str:
    """sha256 over ``saved_model.pb`` and the ``variables/`` index and data files, with their names."""
    files = [encoder_dir / "saved_model.pb", *sorted((encoder_dir / "variables").glob("variables.*"))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(encoder_dir)}\0{sha256_of_file(path)}\n".encode("utf-8"))
    return digest.hexdigest()


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


def gallery_fingerprint(gallery: Gallery) -> str:
    """sha256 identifying the gallery's content (see the module docstring)."""
    if isinstance(gallery, PackedGallery):
        content = split_summary(gallery.data_dir, gallery.split)["sha256"]
    else:
        content = folder_files(gallery.directory)
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode("utf-8")).hexdigest()


def split_records(data_dir: Path, split: str, with_images: bool, batch_size: int = 256) -> Iterator[dict]:
    """Batches of a split's records in packing order, as NumPy dicts (images only if asked)."""
    summary = split_summary(data_dir, split)
    files = tf.data.Dataset.from_tensor_slices([str(data_dir / name) for name in summary["shards"]])
    # One shard at a time keeps packing order; parsing runs in parallel and reading ahead overlaps
    # with embedding.
    records = files.interleave(tf.data.TFRecordDataset, cycle_length=1, num_parallel_calls=tf.data.AUTOTUNE)
    keys = (CAPTION, IMAGE_ID, LABEL) + ((IMAGE,) if with_images else ())

    def parse(serialized: tf.Tensor) -> dict:
        features = parse_example(serialized)
        return {key: features[key] for key in keys}

    parsed = records.map(parse, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size)
    for batch in parsed.prefetch(tf.data.AUTOTUNE).as_numpy_iterator():
        yield batch


def read_split_captions(data_dir: Path, split: str) -> tuple[list[str], list[str], np.ndarray]:
    """Every caption of a split with its image_id and label, in packing order."""
    captions, image_ids, labels = [], [], []
    for batch in split_records(data_dir, split, with_images=False):
        captions += [caption.decode("utf-8") for caption in batch[CAPTION]]
        image_ids += [image_id.decode("utf-8") for image_id in batch[IMAGE_ID]]
        labels.append(batch[LABEL])
    return captions, image_ids, np.concatenate(labels) if labels else np.zeros(0, np.int64)


def _embed_skipping_bad(
    encoder: LoadedEncoder, names: list[str], blobs: list[bytes]
) -> tuple[np.ndarray, list[int], list[tuple[str, str]]]:
    """Embed a batch; if it fails, embed one by one to find the images TensorFlow cannot decode.

    Folder images arrive validated and canonical (`dualenc.images`), so this catches only packed
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


def _embed_packed(encoder: LoadedEncoder, gallery: PackedGallery) -> tuple[dict, np.ndarray]:
    """Each distinct image of the split once (its first record's caption and label)."""
    summary = split_summary(gallery.data_dir, gallery.split)
    seen: set[str] = set()
    image_ids, labels, captions, skipped, chunks = [], [], [], [], []
    with tqdm(total=summary.get("pairs"), unit="pair", desc=f"indexing {gallery.split}", file=sys.stderr, disable=None) as bar:
        for batch in split_records(gallery.data_dir, gallery.split, with_images=True, batch_size=EMBED_BATCH):
            fresh = []
            for position, image_id in enumerate(batch[IMAGE_ID]):
                image_id = image_id.decode("utf-8")
                if image_id not in seen:
                    seen.add(image_id)
                    fresh.append((position, image_id))
            if fresh:
                names = [image_id for _, image_id in fresh]
                embeddings, kept, bad = _embed_skipping_bad(encoder, names, [batch[IMAGE][p] for p, _ in fresh])
                chunks.append(embeddings)
                for position in kept:
                    row, image_id = fresh[position]
                    image_ids.append(image_id)
                    labels.append(int(batch[LABEL][row]))
                    captions.append(batch[CAPTION][row].decode("utf-8"))
                skipped += [{"image_id": name, "reason": reason} for name, reason in bad]
            bar.update(len(batch[IMAGE_ID]))
    meta = {"image_ids": image_ids, "paths": None, "labels": labels, "captions": captions, "skipped": skipped}
    return meta, _stack(chunks, encoder.dimension)


def _stack(chunks: list[np.ndarray], dimension: int) -> np.ndarray:
    return np.concatenate(chunks).astype(np.float32) if chunks else np.zeros((0, dimension), np.float32)


def _embed_files(encoder: LoadedEncoder, directory: Path, relative_paths: list[str]):
    """Read, validate and canonicalise the files in threads (`dualenc.images.read_image_files`),
    then embed them in batches.

    Returns (embeddings, relative paths embedded in row order, (relative path, reason) skipped).
    """
    embedded, chunks, skipped = [], [], []
    names, blobs = [], []

    def embed_pending() -> None:
        embeddings, kept, bad = _embed_skipping_bad(encoder, names, blobs)
        chunks.append(embeddings)
        embedded.extend(names[position] for position in kept)
        skipped.extend(bad)
        names.clear()
        blobs.clear()

    images = read_image_files([directory / name for name in relative_paths])
    with tqdm(total=len(relative_paths), unit="img", desc=f"indexing {directory.name}", file=sys.stderr, disable=None) as bar:
        for name, (blob, reason) in zip(relative_paths, images):
            if blob is None:
                skipped.append((name, reason))
            else:
                names.append(name)
                blobs.append(blob)
                if len(blobs) == EMBED_BATCH:
                    embed_pending()
            bar.update(1)
    if blobs:
        embed_pending()
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


def _read_existing(index_dir: Path) -> tuple[dict, np.ndarray] | None:
    """(meta, embeddings) of a previous index, or None when there is none or it is unreadable."""
    try:
        meta = json.loads((index_dir / META_NAME).read_text(encoding="utf-8"))
        embeddings = np.load(index_dir / EMBEDDINGS_NAME)
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != META_VERSION or not REQUIRED_META <= meta.keys():
        return None
    if embeddings.ndim != 2 or len(embeddings) != len(meta["image_ids"]):
        return None
    return meta, embeddings


def _write_index(index_dir: Path, meta: dict, embeddings: np.ndarray, float16: bool) -> None:
    """Write the folder under a temporary name, then swap it in (the old one is removed)."""
    temporary = index_dir.with_name(f".{index_dir.name}.tmp")
    previous = index_dir.with_name(f".{index_dir.name}.old")
    for leftover in (temporary, previous):
        shutil.rmtree(leftover, ignore_errors=True)
    temporary.mkdir(parents=True)
    np.save(temporary / EMBEDDINGS_NAME, embeddings.astype(np.float16 if float16 else np.float32))
    (temporary / META_NAME).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if index_dir.exists():
        index_dir.rename(previous)
    temporary.rename(index_dir)
    shutil.rmtree(previous, ignore_errors=True)


def _loaded(index_dir: Path, meta: dict, embeddings: np.ndarray, embedded: int) -> GalleryIndex:
    return GalleryIndex(
        directory=index_dir,
        # float16 storage leaves norms off by ~1e-3; normalising once here keeps scores cosines.
        embeddings=retrieval.normalise_rows(embeddings),
        image_ids=meta["image_ids"],
        paths=meta["paths"],
        labels=meta["labels"],
        captions=meta["captions"],
        skipped=meta["skipped"],
        embedded=embedded,
    )


def describe_gallery(gallery: Gallery) -> str:
    """A gallery in words, for messages."""
    if isinstance(gallery, PackedGallery):
        return f"split {gallery.split!r} of {gallery.data_dir}"
    return f"folder {gallery.directory}"


def _describe(gallery: Gallery) -> dict:
    if isinstance(gallery, PackedGallery):
        return {"kind": "packed", "data_dir": str(gallery.data_dir.resolve()), "split": gallery.split}
    return {"kind": "folder", "directory": str(gallery.directory.resolve())}


def open_index(
    run_dir: Path, gallery: Gallery, *, rebuild: bool = False, float16: bool = False, log: TextIO | None = None
) -> GalleryIndex:
    """The index of `gallery` for the run's vision encoder: reused, updated or (re)built.

    `rebuild` forces a full rebuild; `float16` stores the embeddings in half precision when
    the index is written. Notes (rebuilds, skipped images) go to `log`.
    """
    log = sys.stderr if log is None else log
    run_dir = Path(run_dir).resolve()
    encoder_dir = run_dir / VISION_ENCODER_DIR
    if not (encoder_dir / "saved_model.pb").is_file():
        raise DualEncError(f"no exported vision encoder at {encoder_dir}; run `python train.py` first or pass --model RUN_DIR")
    index_dir = run_dir / INDEX_DIR / gallery_key(gallery)
    encoder_print = encoder_fingerprint(encoder_dir)
    gallery_print = gallery_fingerprint(gallery)
    existing = None if rebuild else _read_existing(index_dir)
    if existing is not None and existing[0]["encoder_fingerprint"] != encoder_print:
        print(f"index {index_dir} was built by another encoder; rebuilding it", file=log)
        existing = None
    if existing is not None and existing[0]["gallery_fingerprint"] == gallery_print:
        meta, embeddings = existing
        if meta["dtype"] != ("float16" if float16 else "float32"):
            meta["dtype"] = "float16" if float16 else "float32"
            _write_index(index_dir, meta, embeddings, float16)
        if meta["skipped"]:
            print(f"{len(meta['skipped'])} unreadable image(s) of this gallery are skipped; see {index_dir / META_NAME}", file=log)
        return _loaded(index_dir, meta, embeddings, embedded=0)

    encoder = load_encoder(encoder_dir, batch_size=EMBED_BATCH)
    if isinstance(gallery, PackedGallery):
        if existing is not None:
            print(f"{describe_gallery(gallery)} changed since it was indexed; rebuilding the index", file=log)
        meta, embeddings = _embed_packed(encoder, gallery)
        embedded = len(embeddings)
        for entry in meta["skipped"]:
            print(f"skipping unreadable image {entry['image_id']} in {gallery.data_dir}: {entry['reason']}", file=log)
    else:
        meta, embeddings, embedded = _embed_folder(encoder, gallery, existing, log)
    if not meta["image_ids"]:
        raise DualEncError(f"{describe_gallery(gallery)} has no readable images; pass another --gallery or --data/--split")
    meta.update(
        version=META_VERSION,
        gallery=_describe(gallery),
        encoder_fingerprint=encoder_print,
        gallery_fingerprint=gallery_print,
        dtype="float16" if float16 else "float32",
        dimension=int(embeddings.shape[1]),
        count=len(embeddings),
    )
    _write_index(index_dir, meta, embeddings, float16)
    return _loaded(index_dir, meta, embeddings, embedded)


def read_gallery_images(gallery: Gallery, image_ids: list[str]) -> dict[str, bytes]:
    """Encoded bytes of the given images: read from the folder, or found by scanning the split."""
    if isinstance(gallery, FolderGallery):
        return {image_id: (gallery.directory / image_id).read_bytes() for image_id in image_ids}
    wanted, found = set(image_ids), {}
    for batch in split_records(gallery.data_dir, gallery.split, with_images=True):
        for image_id, blob in zip(batch[IMAGE_ID], batch[IMAGE]):
            image_id = image_id.decode("utf-8")
            if image_id in wanted and image_id not in found:
                found[image_id] = blob
        if len(found) == len(wanted):
            break
    return found
