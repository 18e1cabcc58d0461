"""A gallery's image embeddings, computed once with a run's exported vision encoder and kept.

An index lives in ``RUN/index/<gallery-key>/``:

- ``embeddings.npy``: ``(N, D)`` unit-norm rows, float32 (or float16 to halve the size);
- ``meta.json``: per row its ``image_ids``, ``labels`` and first ``captions`` (packed splits)
  or ``paths`` (folders); the skipped unreadable images; what the gallery is; and two
  fingerprints — the encoder's (sha256 of ``saved_model.pb`` and the variables files) and the
  gallery's (see `dualenc.retrieval.gallery`) — and the sha256 of the stored embeddings, so a file
  replaced by another model's of the same shape is caught and rebuilt, not searched;
- ``embeddings-stat.json``: the embeddings file's size, time and inode when it was hashed, so
  opening a large index re-hashes it only when the file has changed;
- ``ann-hnsw.faiss`` / ``ann-ivf.faiss``: approximate-search indexes, built on first use;
- ``ann-compressed.faiss``: for a gallery too large for memory (built by the Beam path, see
  `dualenc.retrieval.large_index`), a compressed IVF index that ``--ann auto`` searches memory-mapped,
  the embeddings then staying memory-mapped too;
- ``ann-<kind>.json`` beside each: the sha256 of the embeddings it was built from and the FAISS
  file's (size, mtime, inode) when it was saved. An approximate index is used only while both
  match (and it reads whole and holds as many rows): one built for an earlier index, by a
  process that loaded it before a rebuild, would answer with rows of other images. A stale or
  damaged HNSW / IVF file is rebuilt; a compressed one, which only the Beam path can build, is
  refused in one line when its embeddings' sha256 or its shape differs.

`open_index` reuses an index while both fingerprints match and rebuilds it for a new encoder;
for a gallery that changed under the same encoder, the gallery decides what to embed again
(`Gallery.embed`). This module only stores: it never asks what kind of gallery it holds. The
index directory is written with `dualenc.core.files.atomic_directory` (temporary sibling, synced,
renamed into place).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import numpy as np

from dualenc.retrieval import knn
from dualenc.core.errors import DualEncError
from dualenc.export.encoders import VISION_ENCODER_DIR, encoder_fingerprint
from dualenc.export.engines import load_vision_encoder
from dualenc.core.files import atomic_directory, recover_directory, reserve_space, write_json_atomic
from dualenc.retrieval.gallery import EMBED_BATCH, Gallery
from dualenc.core import jsonfiles

INDEX_DIR = "index"
META_NAME = "meta.json"
EMBEDDINGS_NAME = "embeddings.npy"
STAT_NAME = "embeddings-stat.json"  # (size, mtime, inode) of embeddings.npy when it was hashed
META_VERSION = 1
REQUIRED_META = frozenset(
    ("encoder_fingerprint", "gallery_fingerprint", "embeddings_sha256", "dtype", "image_ids", "paths", "labels",
     "captions", "skipped")
)
# Gallery rows used as queries to measure an approximate index against exact search.
RECALL_SAMPLE = 200
COMPRESSED_NAME = "ann-compressed.faiss"


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
    embeddings_sha256: str  # what every approximate index of these rows is bound to
    embedded: int = 0
    compressed: object | None = None  # the memory-mapped `ann-compressed.faiss`, when there is one
    _ann: dict = dataclasses.field(default_factory=dict, init=False, repr=False, compare=False)  # kind -> FAISS index

    def __len__(self) -> int:
        return len(self.image_ids)

    def search_kind(self, ann: str = "auto") -> str:
        """How `search` answers for `ann` (a ``--ann`` choice): "compressed" (the gallery's
        `ann-compressed.faiss`, which "auto" prefers), "exact", "hnsw" or "ivf". The one place
        that chooses; the CLI, the service, the Python API and evaluation all search through it."""
        if ann == "auto" and self.compressed is not None:
            return "compressed"
        return knn.resolve_ann(ann, len(self))

    def search(self, query_embeddings: np.ndarray, k: int, ann: str = "auto", log: TextIO | None = None):
        """Top-k rows per query: ``(scores, indices)``, each ``(Q, min(k, N))``, best first.

        Rows of -1 mark "no more found" (see `dualenc.retrieval.knn.ann_search`)."""
        kind = self.search_kind(ann)
        if kind == "exact":
            return knn.exact_search(query_embeddings, self.embeddings, k)
        return knn.ann_search(self.ann_index(kind, log), query_embeddings, k)

    def ann_index(self, kind: str, log: TextIO | None = None):
        """The FAISS index of `kind` ("compressed", "hnsw" or "ivf") for these embeddings, kept
        once loaded: loaded from its file, or built, measured (recall on `log`, default
        stderr) and saved."""
        if kind == "compressed" and self.compressed is not None:
            return self.compressed
        if kind in self._ann:
            return self._ann[kind]
        self._ann[kind] = self._load_or_build_ann(kind, sys.stderr if log is None else log)
        return self._ann[kind]

    def _load_or_build_ann(self, kind: str, log: TextIO):
        path = self.directory / f"ann-{kind}.faiss"
        stored = self._stored_ann(path, log)
        if stored is not None:
            return stored
        index = knn.build_ann(self.embeddings, kind)
        sample = np.random.default_rng(0).permutation(len(self))[:RECALL_SAMPLE]
        recall = knn.ann_recall(index, self.embeddings, self.embeddings[sample], k=10)
        print(
            f"{kind.upper()} index over {len(self)} images: recall@10 vs exact search = {recall:.3f} "
            f"({len(sample)} gallery images as queries)",
            file=log,
        )
        try:
            knn.save_ann(index, path)
            write_json_atomic(ann_binding_path(path), ann_binding(path, self.embeddings_sha256))
        except (OSError, DualEncError) as error:
            message = error.strerror if isinstance(error, OSError) and error.strerror else error
            print(f"cannot save {path} ({message}); searching with it unsaved", file=log)
        return index

    def _stored_ann(self, path: Path, log: TextIO):
        """The FAISS index saved at `path` when it was built from these embeddings and reads
        whole, else None (why: on `log`)."""
        if not path.is_file():
            return None
        if _read_json(ann_binding_path(path)) != ann_binding(path, self.embeddings_sha256):
            print(f"{path} was not built from this index's embeddings; rebuilding it", file=log)
            return None
        try:
            index = knn.load_ann(path)
        except DualEncError as error:
            print(f"{error}; rebuilding it", file=log)
            return None
        if index.ntotal != len(self):
            print(f"{path} holds {index.ntotal} rows, not {len(self)}; rebuilding it", file=log)
            return None
        return index


def ann_binding_path(path: Path) -> Path:
    """Where the binding of the FAISS file `path` is kept: ``ann-<kind>.json`` beside it."""
    return path.with_suffix(".json")


def ann_binding(path: Path, embeddings_print: str) -> dict:
    """What binds the FAISS file `path` to the embeddings it was built from: their sha256, and
    the file's (size, mtime, inode), so a FAISS file put in its place later does not match."""
    return {"embeddings_sha256": embeddings_print, "file": _file_stat(path)}


def embeddings_sha256(embeddings: np.ndarray) -> str:
    """sha256 over the stored embeddings' dtype, shape and bytes."""
    digest = hashlib.sha256(f"{embeddings.dtype.str}{embeddings.shape}".encode("utf-8"))
    digest.update(np.ascontiguousarray(embeddings).data)
    return digest.hexdigest()


def _file_stat(path: Path) -> list[int]:
    """(size, mtime, inode) of the stored embeddings as written: while they still match, the file
    is the one hashed at write time, so opening a large index does not re-read all of it (a file
    put in its place has another inode or time, and is hashed)."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ino]


def _read_json(path: Path):
    """The JSON content of `path`, or None when it is missing, unreadable or not sane JSON."""
    try:
        return jsonfiles.load_file(path, "index file")
    except DualEncError:
        return None


def _recorded_stat(index_dir: Path) -> list[int] | None:
    return _read_json(index_dir / STAT_NAME)


def _read_existing(index_dir: Path, log: TextIO) -> tuple[dict, np.ndarray] | None:
    """(meta, embeddings) of a previous index, or None when there is none, it is unreadable or
    its embeddings are not the ones it recorded (said on `log`)."""
    recover_directory(index_dir)  # a rebuild killed mid-swap leaves the previous index aside
    meta = _read_json(index_dir / META_NAME)
    try:
        embeddings = np.load(index_dir / EMBEDDINGS_NAME, mmap_mode="r")
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("version") != META_VERSION or not REQUIRED_META <= meta.keys():
        return None
    if embeddings.ndim != 2 or len(embeddings) != len(meta["image_ids"]):
        return None
    if _recorded_stat(index_dir) != _file_stat(index_dir / EMBEDDINGS_NAME) and \
            embeddings_sha256(embeddings) != meta["embeddings_sha256"]:
        print(f"{index_dir / EMBEDDINGS_NAME} is not the file this index wrote (its sha256 differs); rebuilding the index",
              file=log)
        return None
    return meta, embeddings


def _write_index(index_dir: Path, meta: dict, embeddings: np.ndarray) -> None:
    """Write the index folder atomically (the old one, ANN files included, is replaced)."""

    def fill(target: np.ndarray, _: Path) -> None:
        target[:] = embeddings

    write_index_streamed(index_dir, meta, fill)


def write_index_streamed(index_dir: Path, meta: dict, fill: Callable[[np.ndarray, Path], None]) -> None:
    """Write the index folder atomically, ``embeddings.npy`` filled in place by `fill`.

    `meta` carries ``count``, ``dimension`` and ``dtype``; `fill` gets the memory-mapped
    ``(count, dimension)`` array of the new file and the folder being built (for any other file
    that must appear with it), so a gallery too large for memory is written piece by piece (the
    Beam path fills it one embedding shard at a time). The sha256 of what was stored goes into
    ``meta.json``. A read-only or full run directory is one error line, nothing half-written left.
    """
    try:
        with atomic_directory(index_dir) as building:
            target = np.lib.format.open_memmap(building / EMBEDDINGS_NAME, mode="w+", dtype=np.dtype(meta["dtype"]),
                                               shape=(meta["count"], meta["dimension"]))
            reserve_space(building / EMBEDDINGS_NAME)  # a full disk: this OSError, not a SIGBUS in `fill`
            fill(target, building)
            target.flush()
            meta["embeddings_sha256"] = embeddings_sha256(target)
            del target
            (building / META_NAME).write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
            (building / STAT_NAME).write_text(json.dumps(_file_stat(building / EMBEDDINGS_NAME)) + "\n", encoding="utf-8")
            if (building / COMPRESSED_NAME).is_file():
                ann_binding_path(building / COMPRESSED_NAME).write_text(
                    json.dumps(ann_binding(building / COMPRESSED_NAME, meta["embeddings_sha256"])) + "\n", encoding="utf-8")
    except OSError as error:
        raise DualEncError(
            f"cannot write the gallery index {index_dir} ({error.strerror or error}); "
            "make the run directory writable, or copy the run somewhere writable and pass --model"
        ) from None


def _open_compressed(index_dir: Path, meta: dict, embeddings: np.ndarray):
    """The index's memory-mapped ``ann-compressed.faiss``, None without one; `DualEncError` when
    it was built for other embeddings (its binding, when it has one, or its row count differs)."""
    path = index_dir / COMPRESSED_NAME
    if not path.is_file():
        return None
    from dualenc.retrieval.large_index import open_large_index

    # Only the embeddings' sha256 is compared: a copied index folder gives the file another
    # inode, and this index cannot be rebuilt here. One saved without a binding: its shape.
    binding = _read_json(ann_binding_path(path))
    compressed = open_large_index(path)
    if (isinstance(binding, dict) and binding.get("embeddings_sha256") != meta["embeddings_sha256"]) or \
            (compressed.ntotal, compressed.d) != embeddings.shape:
        raise DualEncError(f"{path} was not built from the embeddings of {index_dir}; "
                           "rebuild the index with --build-index (and --runner for a gallery this large)")
    return compressed


def _loaded(index_dir: Path, meta: dict, embeddings: np.ndarray, embedded: int) -> GalleryIndex:
    compressed = _open_compressed(index_dir, meta, embeddings)
    if compressed is None:
        # float16 storage leaves norms off by ~1e-3; normalising once here keeps scores cosines.
        # A gallery with a compressed index is too large to copy: its rows stay memory-mapped.
        embeddings = knn.normalise_rows(embeddings)
        if not np.isfinite(embeddings).all():
            raise DualEncError(f"the index {index_dir} holds embeddings that are not finite (NaN or inf); "
                               "rebuild it with --build-index")
    return GalleryIndex(
        directory=index_dir,
        embeddings=embeddings,
        compressed=compressed,
        image_ids=meta["image_ids"],
        paths=meta["paths"],
        labels=meta["labels"],
        captions=meta["captions"],
        skipped=meta["skipped"],
        embeddings_sha256=meta["embeddings_sha256"],
        embedded=embedded,
    )


def open_index(
    run_dir: Path, gallery: Gallery, *, rebuild: bool = False, float16: bool = False, log: TextIO | None = None,
    engine: str = "auto",
) -> GalleryIndex:
    """The index of `gallery` for the run's vision encoder: reused, updated or (re)built.

    `rebuild` forces a full rebuild; `float16` stores the embeddings in half precision when
    the index is written; images are embedded on `engine` (`dualenc.export.engines`). Notes
    (rebuilds, skipped images) go to `log`.
    """
    log = sys.stderr if log is None else log
    encoder_dir, index_dir = index_location(run_dir, gallery)
    encoder_print = encoder_fingerprint(encoder_dir)
    gallery_print = gallery.fingerprint()
    existing = None if rebuild else _read_existing(index_dir, log)
    if existing is not None and existing[0]["encoder_fingerprint"] != encoder_print:
        print(f"index {index_dir} was built by another encoder; rebuilding it", file=log)
        existing = None
    if existing is not None and existing[0]["gallery_fingerprint"] == gallery_print:
        meta, embeddings = existing
        if meta["dtype"] != ("float16" if float16 else "float32"):
            meta["dtype"] = "float16" if float16 else "float32"
            _write_index(index_dir, meta, embeddings)
        if meta["skipped"]:
            print(f"{len(meta['skipped'])} unreadable image(s) of this gallery are skipped; see {index_dir / META_NAME}", file=log)
        return _loaded(index_dir, meta, embeddings, embedded=0)

    encoder = load_vision_encoder(run_dir, engine, batch_size=EMBED_BATCH)
    meta, embeddings, embedded = gallery.embed(encoder, existing, log)
    if not meta["image_ids"]:
        raise DualEncError(f"{gallery.description} has no readable images; pass another --gallery or --data/--split")
    meta = complete_meta(meta, gallery, encoder_print, gallery_print, float16, embeddings.shape)
    _write_index(index_dir, meta, embeddings)
    return _loaded(index_dir, meta, embeddings, embedded)


def index_location(run_dir: Path, gallery: Gallery) -> tuple[Path, Path]:
    """``(vision encoder dir, index dir)`` of `gallery` under the run; `DualEncError` when the
    run has no exported vision encoder."""
    run_dir = Path(run_dir).resolve()
    encoder_dir = run_dir / VISION_ENCODER_DIR
    recover_directory(encoder_dir)  # an export killed mid-swap leaves the previous encoder aside
    if not (encoder_dir / "saved_model.pb").is_file():
        raise DualEncError(f"no exported vision encoder at {encoder_dir}; run `python train.py` first or pass --model RUN_DIR")
    return encoder_dir, run_dir / INDEX_DIR / gallery.key


def complete_meta(meta: dict, gallery: Gallery, encoder_print: str, gallery_print: str, float16: bool,
                  shape: tuple[int, int]) -> dict:
    """A gallery's per-row `meta` (see `Gallery.embed`) plus what every index records: version,
    gallery, both fingerprints, dtype, dimension and count."""
    return {
        **meta,
        "version": META_VERSION,
        "gallery": gallery.to_json(),
        "encoder_fingerprint": encoder_print,
        "gallery_fingerprint": gallery_print,
        "dtype": "float16" if float16 else "float32",
        "dimension": int(shape[1]),
        "count": int(shape[0]),
    }


def load_index(index_dir: Path, embedded: int = 0) -> GalleryIndex:
    """The index stored in `index_dir` (as written by `open_index` or the Beam path)."""
    existing = _read_existing(index_dir, sys.stderr)
    if existing is None:
        raise DualEncError(f"no readable index in {index_dir}; rebuild it with --build-index")
    return _loaded(index_dir, *existing, embedded=embedded)
