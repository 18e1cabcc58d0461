"""Index build, a folder of JPEGs → image embeddings: seed 003's `predict` vs `dualenc.retrieval.index.open_index`.

Both start from a saved encoder of the same architecture (`bench.datasets.build_small_encoder`)
and a folder of COCO-like JPEGs, and end with the embeddings in memory.

``seed``: ``keras.models.load_model`` of the Keras encoder, then
``encoder.predict(Dataset.from_tensor_slices(paths).map(read_image).batch(B))``: read_file,
decode_jpeg, resize to the encoder's size, in a map without parallel calls and no prefetch.
The seed then L2-normalises the gallery on every query (see `bench.query`).

``ours``: ``open_index(run_dir, FolderGallery(images), rebuild=True, engine="savedmodel")``: loads
the exported SavedModel (which decodes and resizes in-graph), reads files in parallel with
prefetch, fingerprints the encoder and the folder, embeds in batches of
`dualenc.retrieval.index.EMBED_BATCH`, normalises once and writes ``embeddings.npy`` + ``meta.json``
atomically.

``tflite``: the same with ``engine="tflite"`` (`dualenc.export.engines`: the run's
``vision_encoder.tflite`` with XNNPACK on every core, images decoded by the SavedModel's decoder),
what ``--engine auto`` picks on a machine without a GPU. It also reports the least cosine between
its rows and the SavedModel's embeddings of `COSINE_SAMPLE` of the images (not timed). That file
is converted with the encoder, among the shared inputs (`bench.datasets`), as `export_encoders`
converts a trained run's.
"""

from __future__ import annotations

import io
import sys
from pathlib import Path

import numpy as np

from bench.common import Stopwatch

COSINE_SAMPLE = 64


def measure(variant: str, params: dict) -> dict:
    """Embed every image in `params["images"]`; images/s with and without loading the encoder."""
    import tensorflow as tf

    images_dir = Path(params["images"])
    paths = sorted(str(path) for path in images_dir.glob("*.jpg"))
    tf.constant(0)
    if variant == "seed":
        import keras

        import dualenc.models.towers.vision  # noqa: F401  registers the backbone preprocessing layer

        image_size = tuple(params["image_size"])

        def read_image(image_path):
            image_array = tf.image.decode_jpeg(tf.io.read_file(image_path), channels=3)
            return tf.image.resize(image_array, image_size)

        with Stopwatch() as load_clock:
            encoder = keras.models.load_model(params["keras_model"])
        with Stopwatch() as embed_clock:
            embeddings = encoder.predict(
                tf.data.Dataset.from_tensor_slices(paths).map(read_image).batch(params["batch_size"]), verbose=0
            )
        seconds = load_clock.seconds + embed_clock.seconds
        load_seconds = load_clock.seconds
        cpu_seconds = load_clock.cpu_seconds + embed_clock.cpu_seconds
    else:
        from dualenc.export.engines import load_vision_encoder
        from dualenc.retrieval.gallery import FolderGallery
        from dualenc.retrieval.index import open_index

        run_dir = Path(params["run_dir"])
        engine = "savedmodel" if variant == "ours" else "tflite"
        # A separate load, timed on its own, only to split open_index's total into load + embed.
        with Stopwatch() as load_clock:
            load_vision_encoder(run_dir, engine)
        with Stopwatch() as clock:
            index = open_index(run_dir, FolderGallery(images_dir), rebuild=True, log=io.StringIO(), engine=engine)
        embeddings = index.embeddings
        seconds, cpu_seconds = clock.seconds, clock.cpu_seconds
        load_seconds = min(load_clock.seconds, seconds)
    print(f"{variant}: embedded {len(embeddings)} images", file=sys.stderr)
    images = len(embeddings)
    result = {"seconds": seconds, "cpu_seconds": cpu_seconds, "load_seconds": load_seconds, "images": images,
              "images_per_s": images / seconds, "images_per_cpu_s": images / cpu_seconds,
              "embed_images_per_s": images / max(seconds - load_seconds, 1e-9)}
    if variant == "tflite":
        sample = [Path(path).read_bytes() for path in index.paths[:COSINE_SAMPLE]]
        reference = load_vision_encoder(run_dir, "savedmodel")(sample)
        # Normalised here: a random-weight backbone's raw embeddings can be too small for the
        # export's own L2 normalisation (its epsilon), and the cosine is of directions.
        ours, reference = (rows / np.linalg.norm(rows, axis=1, keepdims=True)
                           for rows in (embeddings[:COSINE_SAMPLE].astype(np.float64), reference.astype(np.float64)))
        result["min_cosine_vs_savedmodel"] = float((ours * reference).sum(axis=1).min())
    return result
