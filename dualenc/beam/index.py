"""Embed a gallery with Apache Beam `RunInference`: ``search.py --build-index --runner NAME [-- OPTIONS]``.

The result is the index `dualenc.retrieval.index.open_index` builds (same rows in the same order, same
``meta.json``, embeddings equal within float rounding of a different batching); the search side
cannot tell which path built it. The pipeline:

    work items ─ Reshuffle ─ read images ─┬─ RunInference (the run's vision encoder) ──────┐
    (packed shards or folder chunks)      └─ unreadable ───────────────────────────────────┴─
        GroupByKey(work item) ─ write one embedding shard + its rows

- packed split: one work item per TFRecord shard; each distinct ``image_id`` is embedded once,
  at its first record in packing order: `dualenc.data.packed.first_records` reads each shard,
  and a GroupByKey on ``image_id`` keeps the least (shard, record) across shards, which is the
  rule `first_records` applies to a whole split on the local path;
- folder: the sorted image files in chunks of `FOLDER_CHUNK`, read and canonicalised by
  `dualenc.retrieval.gallery.read_folder_images`, the local path's reader, unreadable ones
  skipped with their reason.

Images the encoder refuses are skipped by `dualenc.retrieval.gallery.embed_skipping_bad`, the
local path's rule and reasons, and the meta is built by its `Gallery.meta`, so the index equals
the local one. Each embedding
shard (``embeddings-NNNNN.npy`` + ``rows-NNNNN.json``) is written to a hidden work directory
beside the index, atomically and idempotently per work item, so a retried bundle rewrites the
same files; a work item whose every image was skipped writes an empty shard. The driver then
streams the shards into the index (`copy_shards`, `write_index_streamed`), never holding more
than one shard, and removes the work directory. The work directory is named after the driver's
process (`dualenc.core.files.owned_temporary`), so the next build removes one a killed driver left.
"""

from __future__ import annotations

import dataclasses
import functools
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

import numpy as np

from dualenc.core.startup import import_tensorflow

# Beam workers import this module first (the handler class below is pickled by reference); Beam's
# TensorFlow model handler imports TensorFlow, quietly once it is loaded.
import_tensorflow()

from apache_beam.ml.inference.tensorflow_inference import TFModelHandlerTensor  # noqa: E402

from dualenc.core import jsonfiles  # noqa: E402
from dualenc.core.errors import DualEncError  # noqa: E402
from dualenc.core.files import atomic_file, owned_temporary, probe_writable, remove_leftovers, write_json_atomic  # noqa: E402

FOLDER_CHUNK = 256
ROWS_PREFIX = "rows-"
EMBEDDINGS_PREFIX = "embeddings-"


def _shard_names(group: int) -> tuple[str, str]:
    return f"{EMBEDDINGS_PREFIX}{group:05d}.npy", f"{ROWS_PREFIX}{group:05d}.json"


def _read_packed_shard(item: tuple[str, str, int]) -> Iterator[tuple[str, tuple]]:
    """The first record of each image in one shard of a split (`first_records`):
    ``(image_id, ((shard, ordinal), image, bytes))``."""
    from dualenc.data.packed import first_records
    from dualenc.data.records import CAPTION, IMAGE, IMAGE_ID, LABEL
    from dualenc.retrieval.gallery import EMBED_BATCH, GalleryImage

    data_dir, split, shard = item
    for record in first_records(data_dir, split, (IMAGE, CAPTION, LABEL), shards=[shard], batch_size=EMBED_BATCH):
        features = record.features
        image = GalleryImage(features[IMAGE_ID].decode("utf-8"), int(features[LABEL]), features[CAPTION].decode("utf-8"))
        yield image.image_id, ((record.shard, record.ordinal), image, features[IMAGE])


def _first_occurrence(grouped: tuple[str, Iterable[tuple]]) -> tuple:
    """Of one image's first records in several shards, the earliest in packing order."""
    _, occurrences = grouped
    return min(occurrences, key=lambda occurrence: occurrence[0])


def _read_folder_chunk(item: tuple[int, str, list[list]]):
    """Each file of a folder chunk (`read_folder_images`): ``(position, image, bytes)``, or a
    tagged skip with its reason."""
    import apache_beam as beam

    from dualenc.retrieval.gallery import GalleryImage, read_folder_images

    group, directory, files = item
    images = [GalleryImage(name, size=size, mtime_ns=mtime) for name, size, mtime in files]
    for ordinal, (image, (blob, reason)) in enumerate(
            zip(images, read_folder_images(Path(directory), [image.image_id for image in images]))):
        if blob is None:
            yield beam.pvalue.TaggedOutput("skipped", (group, (ordinal, image, None, reason)))
        else:
            yield (group, ordinal), image, blob


def _embed_or_explain(encoder, batch, inference_args, model_id=None, *, pillow_reasons: bool):
    """RunInference's inference function (`embed_skipping_bad`): per image its embedding row, or
    the reason it is skipped."""
    from apache_beam.ml.inference.base import PredictionResult

    from dualenc.retrieval.gallery import embed_skipping_bad

    embeddings, reasons = embed_skipping_bad(encoder, list(batch), pillow_reasons)
    rows = iter(embeddings)
    return [PredictionResult(None, next(rows) if reason is None else reason, model_id) for reason in reasons]


class VisionEncoderHandler(TFModelHandlerTensor):
    """Beam's TensorFlow model handler over the run's vision encoder (bytes → embeddings).

    It loads with `dualenc.export.engines.load_vision_encoder`, the local index's and the API's
    loader, on `engine` as each worker resolves it (``auto``: TFLite on a worker without a GPU):
    Keras 3's ``load_model``, which the base class calls, does not read SavedModels.
    """

    def __init__(self, run_dir: Path, batch_size: int, pillow_reasons: bool, engine: str):
        from dualenc.export.encoders import VISION_ENCODER_DIR

        inference_fn = functools.partial(_embed_or_explain, pillow_reasons=pillow_reasons)
        super().__init__(str(Path(run_dir) / VISION_ENCODER_DIR), inference_fn=inference_fn, min_batch_size=1,
                         max_batch_size=batch_size)
        self.run_dir = str(run_dir)
        self.batch_size = batch_size
        self.engine = engine

    def load_model(self):
        from dualenc.export.engines import load_vision_encoder

        return load_vision_encoder(Path(self.run_dir), self.engine, batch_size=self.batch_size)


def _vision_handler(run_dir: Path, batch_size: int, pillow_reasons: bool, engine: str):
    """`VisionEncoderHandler`, keyed by image position (and its `GalleryImage`)."""
    from apache_beam.ml.inference.base import KeyedModelHandler

    return KeyedModelHandler(VisionEncoderHandler(run_dir, batch_size, pillow_reasons, engine))


def _to_group(keyed_result) -> tuple[int, tuple]:
    (position, image), prediction = keyed_result
    group, ordinal = position
    inference = prediction.inference
    if isinstance(inference, str):
        return group, (ordinal, image, None, inference)
    return group, (ordinal, image, np.asarray(inference, np.float32), None)


def write_embedding_shard(grouped: tuple[int, Iterable[tuple]], work_dir: str) -> int:
    """Write one work item's embeddings and rows, in position order, atomically; the same
    input writes the same files, so a retried bundle cannot duplicate rows."""
    group, results = grouped
    results = sorted(results, key=lambda result: result[0])
    embedded = [result for result in results if result[2] is not None]
    embeddings_name, rows_name = _shard_names(group)
    matrix = np.stack([result[2] for result in embedded]) if embedded else np.zeros((0, 0), np.float32)
    with atomic_file(Path(work_dir) / embeddings_name) as temporary, open(temporary, "wb") as stream:
        np.save(stream, matrix)
    rows = [{"image": dataclasses.asdict(image), "reason": reason} for _, image, _, reason in results]
    write_json_atomic(Path(work_dir) / rows_name, rows)  # last: a shard counts once its rows exist
    return len(embedded)


def build_pipeline(pipeline, gallery, run_dir: Path, work_dir: Path, batch_size: int, engine: str = "auto") -> None:
    """Add the embedding transforms for `gallery` (packed or folder) to `pipeline`, embedding with
    the vision encoder of the run in `run_dir` on `engine`."""
    import apache_beam as beam
    from apache_beam.ml.inference.base import RunInference

    from dualenc.data.manifest import load_manifest
    from dualenc.retrieval.gallery import FolderGallery, PackedGallery, folder_files

    if isinstance(gallery, PackedGallery):
        summary = load_manifest(gallery.data_dir).split(gallery.split, gallery.data_dir)
        shards = [(str(gallery.data_dir), gallery.split, shard) for shard in range(len(summary.shards))]
        images = (
            pipeline
            | "shards" >> beam.Create(shards)
            | "spread over workers" >> beam.Reshuffle()
            | "first record of each image" >> beam.FlatMap(_read_packed_shard)
            | "by image_id" >> beam.GroupByKey()
            | "first occurrence" >> beam.Map(_first_occurrence)
        )
        unreadable, pillow_reasons = None, False
    elif isinstance(gallery, FolderGallery):
        directory = gallery.directory.resolve()
        files = folder_files(directory)
        chunks = [(group, str(directory), [list(entry) for entry in files[start:start + FOLDER_CHUNK]])
                  for group, start in enumerate(range(0, len(files), FOLDER_CHUNK))]
        read = (
            pipeline
            | "chunks" >> beam.Create(chunks)
            | "spread over workers" >> beam.Reshuffle()
            | "read images" >> beam.FlatMap(_read_folder_chunk).with_outputs("skipped", main="images")
        )
        images, unreadable, pillow_reasons = read.images, read.skipped, True
    else:
        raise DualEncError(f"the Beam path indexes packed splits and folders, not {gallery.description}")
    embedded = (
        images
        | "key by position" >> beam.Map(lambda image: ((image[0], image[1]), image[2]))
        | "embed" >> RunInference(_vision_handler(run_dir, batch_size, pillow_reasons, engine))
        | "by work item" >> beam.Map(_to_group)
    )
    results = embedded if unreadable is None else (embedded, unreadable) | "with skips" >> beam.Flatten()
    (
        results
        | "group" >> beam.GroupByKey()
        | "write embedding shard" >> beam.Map(write_embedding_shard, str(work_dir))
    )


def _row_lists(work_dir: Path) -> list[tuple[Path, list[tuple]]]:
    """``(embeddings file, rows)`` per embedding shard, in work-item order; a row is
    ``(GalleryImage, reason or None)``."""
    from dualenc.retrieval.gallery import GalleryImage

    shards = []
    for rows_path in sorted(work_dir.glob(f"{ROWS_PREFIX}*.json")):
        group = int(rows_path.stem[len(ROWS_PREFIX):])
        rows = [(GalleryImage(**row["image"]), row["reason"]) for row in jsonfiles.load_file(rows_path, "Beam work file")]
        shards.append((work_dir / _shard_names(group)[0], rows))
    return shards


def copy_shards(target: np.ndarray, shard_paths: list[Path]) -> None:
    """Copy the embedding shards, in order, into consecutive rows of `target`. A work item whose
    every image was skipped wrote an empty shard (without even a width), which adds no row."""
    start = 0
    for path in shard_paths:
        block = np.load(path)
        if len(block):
            target[start:start + len(block)] = block
            start += len(block)


def _check_writable(directory: Path) -> None:
    try:
        probe_writable(directory)
    except OSError as error:
        raise DualEncError(f"cannot write the index under {directory} ({error.strerror or error}); "
                           "pass a --model run directory you can write to") from None


def _compress(embeddings: np.ndarray, shard_paths: list[Path], path: Path, memory_budget: int, log: TextIO) -> None:
    """Build the compressed index of a gallery too large for memory from its embedding shards;
    `RECALL_SAMPLE` gallery rows serve as the queries its recall is calibrated and measured on."""
    from dualenc.retrieval.index import RECALL_SAMPLE
    from dualenc.retrieval.large_index import build_large_index

    sample = np.sort(np.random.default_rng(0).permutation(len(embeddings))[:RECALL_SAMPLE])
    def shards() -> Iterator[np.ndarray]:
        blocks = (np.load(shard, mmap_mode="r") for shard in shard_paths)
        return (block for block in blocks if len(block))  # a work item may have had only unreadable images

    report = build_large_index(shards, path,
                               count=len(embeddings), dimension=embeddings.shape[1],
                               queries=np.asarray(embeddings[sample], np.float32), memory_budget=memory_budget)
    print(f"compressed index {report.factory} over {report.count} images: recall@10 vs exact search = "
          f"{report.recall_at_10:.3f} with nprobe {report.nprobe} ({report.recall_queries} gallery images as queries)",
          file=log)


def build_index_with_beam(run_dir: Path, gallery, options, *, float16: bool = False, batch_size: int | None = None,
                          memory_budget: int | None = None, log: TextIO | None = None, engine: str = "auto"):
    """Embed `gallery` with a Beam pipeline run with `options` and store its index under the run,
    replacing any earlier one; returns the loaded `dualenc.retrieval.index.GalleryIndex`. Images
    are embedded on `engine` (`dualenc.export.engines`), as each worker resolves it.

    A gallery whose float32 rows and HNSW graph would exceed `memory_budget` (default
    `dualenc.retrieval.large_index.DEFAULT_MEMORY_BUDGET`) also gets a compressed index, built from the
    embedding shards without loading them all (`dualenc.retrieval.large_index`).
    """
    import apache_beam as beam

    from dualenc.retrieval.gallery import EMBED_BATCH, report_skipped
    from dualenc.retrieval.index import (
        COMPRESSED_NAME,
        complete_meta,
        encoder_fingerprint,
        index_location,
        load_index,
        write_index_streamed,
    )
    from dualenc.retrieval.large_index import DEFAULT_MEMORY_BUDGET, needs_compressed_index

    memory_budget = memory_budget or DEFAULT_MEMORY_BUDGET

    log = sys.stderr if log is None else log
    encoder_dir, index_dir = index_location(run_dir, gallery)
    _check_writable(index_dir.parent)
    encoder_print, gallery_print = encoder_fingerprint(encoder_dir), gallery.fingerprint()
    work_stem = f"beam-{index_dir.name}"
    remove_leftovers(index_dir.parent / work_stem)  # work directories of killed drivers
    work_dir = owned_temporary(index_dir.parent, work_stem, directory=True)
    try:
        with beam.Pipeline(options=options) as pipeline:
            build_pipeline(pipeline, gallery, encoder_dir.parent, work_dir, batch_size or EMBED_BATCH, engine)
        shards = _row_lists(work_dir)
        rows = [row for _, shard_rows in shards for row in shard_rows]
        meta = gallery.meta(rows)
        if not meta["image_ids"]:
            raise DualEncError(f"{gallery.description} has no readable images; pass another --gallery or --data/--split")
        blocks = (np.load(path, mmap_mode="r") for path, _ in shards)
        dimension = next(block.shape[1] for block in blocks if len(block))
        meta = complete_meta(meta, gallery, encoder_print, gallery_print, float16, (len(meta["image_ids"]), dimension))

        def fill(target: np.ndarray, building: Path) -> None:
            copy_shards(target, [path for path, _ in shards])
            if needs_compressed_index(len(target), dimension, memory_budget):
                _compress(target, [path for path, _ in shards], building / COMPRESSED_NAME, memory_budget, log)

        write_index_streamed(index_dir, meta, fill)
    finally:
        shutil.rmtree(work_dir, ignore_errors=True)
    report_skipped(gallery.description, [(image, reason) for image, reason in rows if reason is not None], log)
    return load_index(index_dir, embedded=len(meta["image_ids"]))
