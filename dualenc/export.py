"""Export the two towers as standalone SavedModels that take raw inputs, and load them back.

Each tower is saved on its own (images for indexing, text for queries) with one signature,
``serving_default``:

- ``vision_encoder``: ``images`` string ``[N]`` of encoded JPEG/PNG/BMP bytes → decoded and
  resized inside the graph (`dualenc.data.decode_image`) → ``{"embeddings": float32 [N, D]}``;
- ``text_encoder``: ``captions`` string ``[N]`` → ``{"embeddings": float32 [N, D]}``.

Embeddings leave both signatures L2-normalised, so a dot product is a cosine similarity and a
gallery needs normalising only once, when it is indexed. The SavedModels load with plain
``tf.saved_model.load`` in a process that imports only TensorFlow and TensorFlow Text (the text
tower may use its ops), on CPU or GPU: no device placement is saved.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from dualenc.errors import DualEncError, first_line

VISION_ENCODER_DIR = "vision_encoder"
TEXT_ENCODER_DIR = "text_encoder"
SIGNATURE = "serving_default"
OUTPUT = "embeddings"
VISION_INPUT = "images"
TEXT_INPUT = "captions"


def _tracked(encode: Callable, track: Sequence[object] | None) -> list[object]:
    """The objects whose variables and resources `encode` uses: `track`, else `encode`'s owner.

    Saving needs every variable and lookup table a traced function captures to be reachable
    from the saved root, so the module keeps references to them. By default that is a bound
    method's owner (e.g. the whole DualEncoder) or `encode` itself (a Keras model or layer);
    passing just one tower and its head keeps the other tower's weights out of the file.
    """
    return list(track) if track is not None else [getattr(encode, "__self__", encode)]


def _unit_embeddings(embeddings: tf.Tensor) -> tf.Tensor:
    """``[N, D]`` → float32 rows of unit L2 norm (a mixed-precision tower may return float16)."""
    return tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1)


class _VisionServing(tf.Module):
    """Encoded image bytes ``[N]`` → unit embeddings ``[N, D]``."""

    def __init__(self, encode_images: Callable, image_size: tuple[int, int], track: Sequence[object] | None):
        super().__init__(name="vision_encoder")
        from dualenc.images import decode_image  # the one decoder shared with training

        self.tracked = _tracked(encode_images, track)
        height, width = (int(side) for side in image_size)
        pixels_spec = tf.TensorSpec([height, width, 3], tf.uint8)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=VISION_INPUT)])
        def serve(images: tf.Tensor) -> dict[str, tf.Tensor]:
            def encode_batch() -> tf.Tensor:
                pixels = tf.map_fn(
                    lambda image_bytes: decode_image(image_bytes, (height, width)),
                    images,
                    fn_output_signature=pixels_spec,
                )
                return encode_images(pixels)

            def encode_nothing() -> tf.Tensor:
                # Some CPU kernels (oneDNN convolutions) mis-shape an empty batch; encoding one
                # black image and keeping none of it gives the right [0, D] instead.
                return encode_images(tf.zeros([1, height, width, 3], tf.uint8))[:0]

            embeddings = tf.cond(tf.size(images) > 0, encode_batch, encode_nothing)
            return {OUTPUT: _unit_embeddings(embeddings)}

        self.serve = serve


class _TextServing(tf.Module):
    """Captions ``[N]`` → unit embeddings ``[N, D]``."""

    def __init__(self, encode_texts: Callable, track: Sequence[object] | None):
        super().__init__(name="text_encoder")
        self.tracked = _tracked(encode_texts, track)

        @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name=TEXT_INPUT)])
        def serve(captions: tf.Tensor) -> dict[str, tf.Tensor]:
            return {OUTPUT: _unit_embeddings(encode_texts(captions))}

        self.serve = serve


def _save_atomically(module: tf.Module, path: Path) -> None:
    """Save `module` with its ``serve`` function as ``serving_default`` under `path`.

    The SavedModel is written to a sibling temporary directory and renamed into place, so a
    crash never leaves a half-written encoder where a loader would find it.
    """
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp")
    previous = path.with_name(f".{path.name}.old")
    for leftover in (temporary, previous):
        shutil.rmtree(leftover, ignore_errors=True)
    # Default variable policy: no device names are saved, so a model trained on GPUs loads on CPU.
    options = tf.saved_model.SaveOptions(experimental_io_device=None)
    tf.saved_model.save(module, str(temporary), signatures={SIGNATURE: module.serve}, options=options)
    if path.exists():
        path.rename(previous)
    temporary.rename(path)
    shutil.rmtree(previous, ignore_errors=True)


def export_vision_encoder(
    encode_images: Callable, image_size: tuple[int, int], path: Path, track: Sequence[object] | None = None
) -> None:
    """Save `encode_images` (uint8 ``[N, H, W, 3]`` → ``[N, D]``) as a bytes-in SavedModel at `path`.

    `image_size` is ``(H, W)``, the size images are resized to before encoding. `encode_images`
    is a Keras model or layer, or a bound method of one (e.g. ``DualEncoder.encode_images``);
    what is saved with it is `track` or, by default, its owner (see `_tracked`).
    """
    _save_atomically(_VisionServing(encode_images, image_size, track), path)


def export_text_encoder(encode_texts: Callable, path: Path, track: Sequence[object] | None = None) -> None:
    """Save `encode_texts` (string ``[N]`` → ``[N, D]``) as a captions-in SavedModel at `path`."""
    _save_atomically(_TextServing(encode_texts, track), path)


def export_encoders(
    run_dir: Path,
    *,
    encode_images: Callable,
    encode_texts: Callable,
    image_size: tuple[int, int],
    track_images: Sequence[object] | None = None,
    track_texts: Sequence[object] | None = None,
) -> None:
    """Write ``run_dir/vision_encoder`` and ``run_dir/text_encoder`` (see the module docstring).

    For a `DualEncoder`, pass ``track_images=[model.vision_tower, model.image_head]`` and
    ``track_texts=[model.text_tower, model.caption_head]`` so each file holds one tower only.
    """
    run_dir = Path(run_dir)
    export_vision_encoder(encode_images, image_size, run_dir / VISION_ENCODER_DIR, track_images)
    export_text_encoder(encode_texts, run_dir / TEXT_ENCODER_DIR, track_texts)


class LoadedEncoder:
    """An exported encoder: a list of inputs (bytes or str) → unit embeddings, NumPy ``[N, D]``.

    Inputs are fed `batch_size` at a time; `embed_batch` encodes one batch and lets TensorFlow
    errors through, so a caller can find which input in a batch was bad.
    """

    def __init__(self, path: Path, batch_size: int = 64):
        self.path = Path(path)
        self.batch_size = batch_size
        self._loaded = _load_saved_model(self.path)  # keeps the signature's variables alive
        signature = self._loaded.signatures.get(SIGNATURE)
        if signature is None:
            raise DualEncError(f"{self.path} has no {SIGNATURE!r} signature; re-export it with dualenc")
        input_names = list(signature.structured_input_signature[1])
        if len(input_names) != 1 or OUTPUT not in signature.structured_outputs:
            raise DualEncError(f"{self.path} is not a dualenc encoder (inputs {input_names}); re-export it")
        self._signature = signature
        self.input_name = input_names[0]
        self.dimension = int(signature.structured_outputs[OUTPUT].shape[-1])

    def embed_batch(self, inputs: Sequence[bytes | str]) -> np.ndarray:
        """One batch of inputs → float32 ``[len(inputs), D]``."""
        tensor = tf.constant(list(inputs), dtype=tf.string, shape=[len(inputs)])
        return self._signature(**{self.input_name: tensor})[OUTPUT].numpy()

    def __call__(self, inputs: Sequence[bytes | str]) -> np.ndarray:
        batches = [
            self.embed_batch(inputs[start : start + self.batch_size])
            for start in range(0, len(inputs), self.batch_size)
        ]
        if not batches:
            return np.zeros((0, self.dimension), np.float32)
        return np.concatenate(batches, axis=0)


def _load_saved_model(path: Path):
    if not (path / "saved_model.pb").is_file():
        raise DualEncError(f"no exported encoder at {path}; run `python train.py` first or pass --model RUN_DIR")
    import tensorflow_text  # noqa: F401  registers the text ops a BERT or WordPiece tower may use

    try:
        return tf.saved_model.load(str(path))
    except Exception as exc:  # TensorFlow raises several unrelated types for a damaged SavedModel
        raise DualEncError(f"cannot load the encoder at {path} ({first_line(exc)}); re-export it or retrain") from None


def load_encoder(path: Path, batch_size: int = 64) -> LoadedEncoder:
    """Load an encoder written by `export_vision_encoder` / `export_text_encoder`."""
    return LoadedEncoder(Path(path), batch_size=batch_size)
