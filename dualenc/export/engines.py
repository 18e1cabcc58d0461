"""The engine that embeds images: a run's vision SavedModel, or its TFLite model on CPU.

`load_vision_encoder` is the one place every path that embeds images gets its encoder from:
the local index (`dualenc.retrieval.index.open_index`), the Beam index (`dualenc.beam.index`)
and `dualenc.api.Retriever` (``encode_images``, image queries, and so the search service). So
for one run on one machine they all embed with the same engine, and an image query's embedding
is the very row the index stored for the same file.

Engines (``search.py --engine``, ``dualenc.load(engine=...)``):

- ``savedmodel``: ``vision_encoder/`` through ``tf.saved_model.load`` (`LoadedEncoder`);
- ``tflite``: ``vision_encoder.tflite`` (its ``pixels`` signature) in the TFLite interpreter with
  the XNNPACK delegate on every core this process may use (`TFLiteVisionEncoder`), images decoded
  first by the SavedModel's own decoder (`dualenc.export.encoders.decode_images`). On CPU it embeds
  a MobileNetV2 gallery several times faster than the SavedModel (``bench/index.py``), with
  embeddings whose cosine to the SavedModel's is at least 0.9999;
- ``auto`` (the default): ``tflite`` where TensorFlow sees no GPU and the run has the file, else
  ``savedmodel``.

A TFLite file is used only while the record written beside it at conversion
(`dualenc.export.encoders.tflite_source`) names the run's current SavedModel: a vision encoder
exported again without converting it leaves a stale file, which ``auto`` passes over and
``tflite`` refuses.

The index's encoder fingerprint is the SavedModel's either way (the TFLite file is converted from
it at export), so an index built by one engine is reused by the other rather than rebuilt.
"""

from __future__ import annotations

import os
import re
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from dualenc.core.errors import DualEncError, first_line
from dualenc.core.startup import native_stderr_dropped
from dualenc.export.encoders import (
    OUTPUT,
    PIXELS_INPUT,
    PIXELS_SIGNATURE,
    VISION_ENCODER_DIR,
    VISION_TFLITE,
    Encoder,
    decode_images,
    encoder_fingerprint,
    load_encoder,
    tflite_source,
)

ENGINES = ("auto", "tflite", "savedmodel")
FUNCTION_NAME = re.compile(r"^\{\{function_node [^}]*\}\}\s*")


def cpu_cores() -> int:
    """The cores this process may run on (its CPU affinity, which a container or `taskset` narrows)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def resolve_engine(run_dir: Path, engine: str = "auto") -> str:
    """"tflite" or "savedmodel": what `engine` means for the run in `run_dir` on this machine, or a
    one-line `DualEncError` for an unknown name or a ``tflite`` the run has no file for."""
    if engine not in ENGINES:
        raise DualEncError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINES)}")
    if engine == "savedmodel" or engine == "auto" and tf.config.list_physical_devices("GPU"):
        return "savedmodel"  # a GPU runs the SavedModel faster than TFLite runs on the CPU
    tflite_path = Path(run_dir) / VISION_TFLITE
    if tflite_path.is_file() and tflite_source(tflite_path) == encoder_fingerprint(Path(run_dir) / VISION_ENCODER_DIR):
        return "tflite"
    if engine == "auto":
        return "savedmodel"
    why = "no" if not tflite_path.is_file() else "a stale"
    raise DualEncError(f"{run_dir} has {why} {VISION_TFLITE} (not converted from its {VISION_ENCODER_DIR}/); "
                       "re-export the run or pass --engine savedmodel")


def load_vision_encoder(run_dir: Path, engine: str = "auto", batch_size: int = 64) -> Encoder:
    """The run's vision encoder on the engine `engine` chooses (see the module docstring):
    image bytes → unit embeddings, fed `batch_size` images at a time."""
    run_dir = Path(run_dir)
    if resolve_engine(run_dir, engine) == "tflite":
        return TFLiteVisionEncoder(run_dir / VISION_TFLITE, batch_size=batch_size)
    return load_encoder(run_dir / VISION_ENCODER_DIR, batch_size=batch_size)


class TFLiteVisionEncoder(Encoder):
    """``vision_encoder.tflite`` with XNNPACK on `cpu_cores` threads: image bytes → unit embeddings.

    Each batch is decoded by `decode_images` (the SavedModel's decoder, run as a TensorFlow graph,
    so a bad image raises the same `tf.errors.OpError`) and its pixels fed to the model's
    ``pixels`` signature. One interpreter serves every thread: decoding runs outside its lock, so
    while one batch decodes another runs the network, as the gallery's two batches in flight
    expect, and the network itself never runs twice at once (its threads already fill the cores).
    """

    def __init__(self, path: Path, batch_size: int = 64, num_threads: int | None = None):
        self.path = Path(path)
        self.batch_size = batch_size
        # XNNPACK announces itself on descriptor 2 at the first inference: run one here, quietly.
        with warnings.catch_warnings(), native_stderr_dropped():
            # TensorFlow 2.21 still ships this interpreter but warns that `ai-edge-litert` replaces it.
            warnings.filterwarnings("ignore", message=r"\s*Warning: tf\.lite\.Interpreter is deprecated")
            try:
                # The default op resolver applies the XNNPACK delegate to every float op it supports.
                self._interpreter = tf.lite.Interpreter(model_path=str(self.path), num_threads=num_threads or cpu_cores())
                self._runner = self._interpreter.get_signature_runner(PIXELS_SIGNATURE)
                pixels = self._runner.get_input_details()[PIXELS_INPUT]
                self._runner(**{PIXELS_INPUT: np.zeros(pixels["shape"], np.uint8)})
            except (ValueError, RuntimeError) as exc:
                raise DualEncError(f"cannot load {self.path} ({first_line(exc)}); re-export the run") from None
        _, height, width, _ = (int(side) for side in pixels["shape"])
        self.image_size = (height, width)
        self.dimension = int(self._runner.get_output_details()[OUTPUT]["shape"][-1])
        self._lock = threading.Lock()
        self._decode = tf.function(lambda images: decode_images(images, self.image_size),
                                   input_signature=[tf.TensorSpec([None], tf.string)])

    def embed_batch(self, inputs: Sequence[bytes]) -> np.ndarray:
        """One batch of image files' bytes → float32 ``[len(inputs), D]``."""
        if not len(inputs):
            return np.zeros((0, self.dimension), np.float32)
        try:
            pixels = self._decode(tf.constant(list(inputs), dtype=tf.string, shape=[len(inputs)])).numpy()
        except tf.errors.OpError as exc:
            # A function traced in this process puts its name before the kernel's message (a loaded
            # SavedModel's does not), and the gallery reports that message as why an image is skipped.
            raise type(exc)(exc.node_def, exc.op, FUNCTION_NAME.sub("", exc.message)) from None
        with self._lock:
            # The runner resizes the input (and re-plans XNNPACK) only when the batch size changes.
            return np.asarray(self._runner(**{PIXELS_INPUT: pixels})[OUTPUT], np.float32)
