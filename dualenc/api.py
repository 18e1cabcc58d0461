"""The public Python API: a trained run as one object that embeds, indexes and searches.

    import dualenc

    run = dualenc.load("runs/latest")              # or a keras-hub CLIP/SigLIP preset
    run.search("a woman in a red coat", k=3)       # the run's test split, indexed on first use
    run.index(folder="~/photos").search(open("query.jpg", "rb").read(), k=5)
    run.encode_text(["a red car"]), run.encode_images([jpeg_bytes])

Every front-end is a thin caller of this module, so each gives the same answer to the same
question: ``search.py`` (its ``--json`` prints what `Retriever.search` returns), the search
service, the Beam index (which builds the same ``RUN/index/`` folder) and ``--evaluate``. The
pieces it joins are each defined once: the image canonicaliser (`dualenc.data.images`), the
gallery index and its one choice of search method (`GalleryIndex.search_kind`), and the result
rows (`dualenc.retrieval.query.result_dicts`).
"""

from __future__ import annotations

import copy
import functools
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

import numpy as np

from dualenc.core.errors import DualEncError
from dualenc.data.images import ImageProblem, canonical_image_bytes, read_image_file
from dualenc.export.encoders import TEXT_ENCODER_DIR, VISION_ENCODER_DIR, Encoder, LoadedEncoder, load_encoder
from dualenc.export.engines import load_vision_encoder, resolve_engine
from dualenc.retrieval.gallery import FolderGallery, Gallery, PackedGallery
from dualenc.retrieval.index import GalleryIndex, open_index
from dualenc.retrieval.query import check_query, result_dicts

DEFAULT_RUN = "runs/latest"
DEFAULT_K = 9
IMAGE_FORMATS = "JPEG, PNG, BMP, GIF, WebP or TIFF"


def check_run(run_dir: Path) -> Path:
    """`run_dir` if it holds both exported encoders, else a `DualEncError` saying what to do."""
    if not run_dir.is_dir():
        raise DualEncError(f"run directory {run_dir} does not exist; run `python train.py` first or pass --model RUN_DIR")
    for name in (VISION_ENCODER_DIR, TEXT_ENCODER_DIR):
        if not (run_dir / name / "saved_model.pb").is_file():
            raise DualEncError(f"{run_dir} has no exported {name}; run `python train.py` first or pass --model RUN_DIR")
    return run_dir


def resolve_run(model: str | Path) -> Path:
    """The run directory `model` names; a keras-hub preset (handle or local preset directory)
    becomes a zero-shot run exported once under ``runs/zero-shot/`` (`dualenc.export.zero_shot`)."""
    from dualenc.export.zero_shot import looks_like_preset, zero_shot_run

    if looks_like_preset(str(model)):
        return zero_shot_run(str(model), Path(DEFAULT_RUN).parent)
    return check_run(Path(model).expanduser())


def query_image(data: bytes, source: str = "the query image") -> bytes:
    """The canonical bytes (`canonical_image_bytes`) of an image a user gives as a query, or a
    one-line `DualEncError` naming `source`. Every entry that takes a user's image bytes (the
    CLI's ``--image``, service uploads, `Retriever.search`/`encode_images`) goes through it."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise DualEncError(f"{source} must be the bytes of an image file, got {type(data).__name__}")
    try:
        return canonical_image_bytes(bytes(data))
    except ImageProblem as problem:
        raise DualEncError(f"{source}: {problem}; pass a {IMAGE_FORMATS} file") from None


def query_image_file(path: str | Path) -> bytes:
    """`query_image` of the file at `path` (``search.py --image``), one line when it cannot be read."""
    try:
        return read_image_file(path)
    except ImageProblem as problem:
        raise DualEncError(f"query image {path}: {problem}; pass a {IMAGE_FORMATS} file") from None


def default_gallery(run_dir: Path, data: str | Path | None = None, split: str | None = None,
                    log: TextIO | None = None) -> PackedGallery:
    """The packed split searched when no folder is named: `split` of `data` (default: the
    dataset the run trained on), by default its test split (see `choose_split`)."""
    from dualenc.core import config as run_config

    if data is None:
        config_path = run_dir / "config.json"
        data = run_config.load(run_config.TrainConfig, config_path).data
        if data is None:
            raise DualEncError(f"{config_path} names no dataset; pass --data DIR [--split NAME] or --gallery DIR")
        if not Path(data).is_dir():
            raise DualEncError(f"the run's dataset {data} (from {config_path}) is gone; pass --data DIR or --gallery DIR")
    data_dir = Path(data).expanduser()
    return PackedGallery(data_dir, split if split is not None else choose_split(data_dir, log))


def choose_split(data_dir: Path, log: TextIO | None = None) -> str:
    """The split searched and evaluated by default (`dualenc.data.manifest.default_split`, the rule
    train.py's final score uses too), said on `log` (default stderr) when it is not "test"."""
    from dualenc.data.manifest import default_split, load_manifest

    split = default_split(load_manifest(data_dir), data_dir)
    if split != "test":
        print(f"{data_dir} has no 'test' split; searching {split!r} (choose with --split)", file=sys.stderr if log is None else log)
    return split


class Retriever:
    """A run's two exported encoders and, once chosen, a gallery's index.

    Build one with `load`. Embeddings are float32 rows of unit length; search results are the
    dicts ``search.py --json`` prints (`dualenc.retrieval.query.RESULT_FIELDS`). `ann` is the
    default search method ("auto", "exact", "hnsw", "ivf"; see ``search.py --ann``); `engine`
    embeds images, for queries and indexes alike ("auto", "tflite", "savedmodel"; see
    `dualenc.export.engines`).
    """

    def __init__(self, run_dir: Path, *, ann: str = "auto", batch_size: int = 64, engine: str = "auto"):
        self.run_dir = Path(run_dir)
        self.ann = ann
        self.batch_size = batch_size
        self.engine = engine
        self.gallery: Gallery | None = None
        self.gallery_index: GalleryIndex | None = None

    @functools.cached_property
    def text_encoder(self) -> LoadedEncoder:
        """The exported text encoder, loaded on first use."""
        return load_encoder(self.run_dir / TEXT_ENCODER_DIR, batch_size=self.batch_size)

    @functools.cached_property
    def vision_encoder(self) -> Encoder:
        """The vision encoder on the retriever's engine, loaded on first use (indexing loads its own copy)."""
        return load_vision_encoder(self.run_dir, self.engine, batch_size=self.batch_size)

    def encode_text(self, texts: str | Sequence[str]) -> np.ndarray:
        """Captions or queries → ``(N, D)`` embeddings (a single string gives one row)."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        for number, text in enumerate(texts):
            if not isinstance(text, str):
                raise DualEncError(f"text {number} is a {type(text).__name__}, not a string")
        return self.text_encoder(texts)

    def encode_images(self, images: Sequence[bytes]) -> np.ndarray:
        """Encoded image files (JPEG, PNG, BMP, GIF, WebP, TIFF bytes) → ``(N, D)`` embeddings,
        each image through the one canonicaliser first (`query_image`)."""
        if isinstance(images, (bytes, bytearray)):
            images = [images]
        canonical = [query_image(data, f"image {number}") for number, data in enumerate(images)]
        return self.vision_encoder(canonical)

    def index(self, folder: str | Path | None = None, *, data: str | Path | None = None, split: str | None = None,
              gallery: Gallery | None = None, rebuild: bool = False, float16: bool = False,
              log: TextIO | None = None) -> Retriever:
        """A retriever of the same run (sharing its loaded encoders) over another gallery, its
        index opened (reused, updated or built, see `dualenc.retrieval.index.open_index`): a
        `folder` of images, a packed `data` set's `split`, a `Gallery`, or by default the run's
        own dataset, test split. This retriever keeps the gallery it had."""
        if sum(option is not None for option in (folder, data, gallery)) > 1:
            raise DualEncError("name one gallery: a folder, a packed dataset (data=, split=) or a Gallery")
        if folder is not None:
            if split is not None:
                raise DualEncError("--split applies to --data, not to --gallery folders")
            gallery = FolderGallery(Path(folder).expanduser())
        elif gallery is None:
            gallery = default_gallery(self.run_dir, data, split, log)
        return self.use_index(gallery, open_index(self.run_dir, gallery, rebuild=rebuild, float16=float16, log=log,
                                                  engine=self.engine))

    def use_index(self, gallery: Gallery, gallery_index: GalleryIndex) -> Retriever:
        """A retriever of the same run searching `gallery` through `gallery_index`, an index
        already opened (e.g. built by Beam)."""
        bound = copy.copy(self)  # loaded encoders (cached properties) are shared, not reloaded
        bound.gallery, bound.gallery_index = gallery, gallery_index
        return bound

    @property
    def search_kind(self) -> str:
        """How searches are answered: "compressed", "exact", "hnsw" or "ivf"."""
        return self._index().search_kind(self.ann)

    def search(self, query: str | bytes | Path, k: int = DEFAULT_K) -> list[dict]:
        """The top `k` gallery images for a text query (str), a query image (file bytes) or an
        image file (a `Path`, read and canonicalised once, its refusals naming the file)."""
        if isinstance(query, str):
            return self.search_embedding(self.encode_text([check_query(query)])[0], k)
        image = query_image_file(query) if isinstance(query, Path) else query_image(query)
        return self.search_embedding(self.vision_encoder([image])[0], k)

    def search_embedding(self, embedding: np.ndarray, k: int = DEFAULT_K) -> list[dict]:
        """The top `k` gallery images for one query embedding ``(D,)`` (fewer when fewer are found)."""
        if not isinstance(k, (int, np.integer)) or isinstance(k, bool) or k < 1:
            raise DualEncError(f"k must be a whole number of at least 1, got {k!r}")
        index = self._index()
        scores, rows = index.search(np.asarray(embedding)[None, :], int(k), ann=self.ann)
        return result_dicts(index, scores[0], rows[0])

    def evaluate(self, protocol: str | None = None) -> dict:
        """Retrieval metrics on the indexed packed split (by default the run's test split): R@1/5/10
        and mAP both ways, top-k accuracy, the paper table of `protocol` ("image-text" or
        "person"; by default the one the split's labels show) under ``paper``
        (`dualenc.retrieval.evaluation.evaluate_split`, the function train.py's ``metrics.json``
        comes from), and attribute precision on the demo."""
        from dualenc.retrieval.attributes import run_attribute_report
        from dualenc.retrieval.evaluation import check_protocol, evaluate_split

        if protocol is not None:
            check_protocol(protocol)
        index = self._index()
        if not isinstance(self.gallery, PackedGallery):
            raise DualEncError("evaluation needs captions: pass a packed dataset with --data DIR [--split NAME], not --gallery")
        report = evaluate_split(self.text_encoder, self.gallery.data_dir, self.gallery.split, index.embeddings,
                                index.labels, index.image_ids, protocol)
        attribute_scores = run_attribute_report(self.run_dir, self.gallery.data_dir)
        return report if attribute_scores is None else {**report, "attributes": attribute_scores}

    def projector(self, directory: str | Path) -> Path:
        """Write TensorBoard's embedding-projector files for the indexed gallery (by default the
        run's test split) into `directory`, so ``tensorboard --logdir DIRECTORY`` shows its
        embedding space (`dualenc.retrieval.projector`); returns the config's path."""
        from dualenc.retrieval.projector import check_projector_directory, write_projector

        check_projector_directory(directory)
        index = self._index()
        return write_projector(directory, self.gallery, index)

    def _index(self) -> GalleryIndex:
        if self.gallery_index is None:
            default = self.index()
            self.gallery, self.gallery_index = default.gallery, default.gallery_index
        return self.gallery_index


def load(run_dir: str | Path = DEFAULT_RUN, *, ann: str = "auto", batch_size: int = 64, engine: str = "auto") -> Retriever:
    """The run in `run_dir` (both exported encoders), or a keras-hub CLIP/SigLIP preset made a
    zero-shot run, ready to embed and search. `DualEncError` when it holds no exported encoders.

    `engine` embeds images: "tflite" (the run's ``vision_encoder.tflite`` with XNNPACK on every
    core), "savedmodel", or "auto", TFLite where TensorFlow sees no GPU and the run has the file
    (`dualenc.export.engines.resolve_engine`, resolved here once for every search and index).
    """
    from dualenc.core.startup import import_tensorflow
    from dualenc.retrieval.knn import resolve_ann

    import_tensorflow(False)
    resolve_ann(ann, 0)  # an unknown choice fails now, not at the first search
    run = resolve_run(run_dir)
    return Retriever(run, ann=ann, batch_size=batch_size, engine=resolve_engine(run, engine))
