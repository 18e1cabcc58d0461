"""Export the two towers as standalone SavedModels (and a TFLite vision model), and load them back.

Each tower is saved on its own (images for indexing, text for queries) with
`keras.export.ExportArchive`, which tracks every variable and lookup table the endpoints use, so
the files run under every TensorFlow client: ``tf.saved_model.load``, TensorFlow Serving's TF1
session loader (``saved_model_cli run``) and the TFLite converter. Signatures:

- ``vision_encoder``: ``serving_default``: ``images`` string ``[N]`` of encoded image bytes →
  decoded and resized in the graph by the shared decoder (`dualenc.data.images.decode_image`) →
  ``{"embeddings": float32 [N, D]}``; and ``pixels``: uint8 ``[N, H, W, 3]`` → the same.
- ``text_encoder``: ``serving_default``: ``captions`` string ``[N]`` → the text preprocessor
  (`dualenc.models.preprocessing`, TF Text ops) → ``{"embeddings": float32 [N, D]}``.
- ``vision_encoder.tflite``: the ``pixels`` signature converted with TFLite builtin ops only
  (decoding image bytes is left to the app, as TFLite has no general image decoder).

Embeddings leave every signature L2-normalised, so a dot product is a cosine similarity. The
SavedModels load in a process that imports only TensorFlow and TensorFlow Text (whose ops the
text preprocessor uses), on CPU or GPU: no device placement is saved.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import keras
import numpy as np
import tensorflow as tf

from dualenc.core.errors import DualEncError, first_line
from dualenc.core.files import atomic_directory, recover_directory, sha256_of_file, write_bytes_atomic, write_json_atomic

VISION_ENCODER_DIR = "vision_encoder"
TEXT_ENCODER_DIR = "text_encoder"
VISION_TFLITE = "vision_encoder.tflite"
# Beside the TFLite file: the fingerprint of the vision SavedModel it was converted from.
VISION_TFLITE_SOURCE = "vision_encoder.tflite.json"
SIGNATURE = "serving_default"
PIXELS_SIGNATURE = "pixels"
OUTPUT = "embeddings"
VISION_INPUT = "images"
PIXELS_INPUT = "pixels"
TEXT_INPUT = "captions"


def _unit_embeddings(embeddings: tf.Tensor) -> tf.Tensor:
    """``[N, D]`` → float32 rows of unit L2 norm (a mixed-precision tower may return float16)."""
    return tf.math.l2_normalize(tf.cast(embeddings, tf.float32), axis=-1)


def _owner(encode: Callable) -> object:
    """What to save with `encode` by default: a bound method's owner, else `encode` itself."""
    return getattr(encode, "__self__", encode)


def _archive(parts: Sequence[object]) -> keras.export.ExportArchive:
    archive = keras.export.ExportArchive()
    for part in parts:
        archive.track(part)
    return archive


def _write(archive: keras.export.ExportArchive, path: Path) -> None:
    """Write the archive to `path` through a temporary sibling, so a crash never leaves half an encoder."""
    with atomic_directory(Path(path)) as staging:
        # Default variable policy: no device names are saved, so a model trained on GPUs loads on CPU.
        archive.write_out(str(staging), options=tf.saved_model.SaveOptions(experimental_io_device=None), verbose=False)


def decode_images(images: tf.Tensor, image_size: tuple[int, int]) -> tf.Tensor:
    """Image bytes ``[N]`` → uint8 pixels ``[N, H, W, 3]`` by the one decoder shared with training
    (`dualenc.data.images.decode_image`): what the vision SavedModel runs in its graph, and what
    the TFLite engine (`dualenc.export.engines`) runs before its model, so both see the same pixels."""
    from dualenc.data.images import decode_image

    height, width = image_size
    return tf.map_fn(lambda image_bytes: decode_image(image_bytes, (height, width)), images,
                     fn_output_signature=tf.TensorSpec([height, width, 3], tf.uint8))


def export_vision_encoder(
    encode_pixels: Callable, image_size: tuple[int, int], path: Path, track: Sequence[object] | None = None
) -> None:
    """Save `encode_pixels` (uint8 ``[N, H, W, 3]`` → ``[N, D]``) as the vision SavedModel at `path`.

    `image_size` is ``(H, W)``. `encode_pixels` is a Keras model or layer, or a function of the
    Keras layers listed in `track` (e.g. ``DualEncoder.encode_images`` with the vision tower and
    image head), which are what the file holds; by default the method's owner or the model itself.
    """
    height, width = (int(side) for side in image_size)
    archive = _archive(track if track is not None else [_owner(encode_pixels)])

    # The model is traced once, here; the bytes endpoint calls this function rather than the
    # model, so exporting does not trace the tower again for it (nor twice for its cond).
    @tf.function(input_signature=[tf.TensorSpec([None, height, width, 3], tf.uint8, name=PIXELS_INPUT)])
    def embed_pixels(pixels: tf.Tensor) -> dict[str, tf.Tensor]:
        return {OUTPUT: _unit_embeddings(encode_pixels(pixels))}

    def embed_images(images: tf.Tensor) -> dict[str, tf.Tensor]:
        count = tf.size(images)
        # Some CPU kernels (oneDNN convolutions) mis-shape an empty batch; encoding one black
        # image and keeping none of it gives the right [0, D] instead.
        pixels = tf.cond(count > 0, lambda: decode_images(images, (height, width)),
                         lambda: tf.zeros([1, height, width, 3], tf.uint8))
        return {OUTPUT: embed_pixels(pixels)[OUTPUT][:count]}

    archive.add_endpoint(SIGNATURE, embed_images, input_signature=[tf.TensorSpec([None], tf.string, name=VISION_INPUT)])
    archive.add_endpoint(PIXELS_SIGNATURE, embed_pixels)
    _write(archive, path)


def export_text_encoder(
    encode_tokens: Callable,
    path: Path,
    preprocessor: Callable | None = None,
    track: Sequence[object] | None = None,
) -> None:
    """Save captions → `preprocessor` → `encode_tokens` → unit embeddings as the text SavedModel at `path`.

    Without a `preprocessor`, `encode_tokens` takes the caption strings itself. What the file
    holds is `track` (Keras layers) or `encode_tokens`, plus the preprocessor (a `tf.Module`).
    """
    parts = list(track if track is not None else [_owner(encode_tokens)])
    if preprocessor is not None:
        parts.append(preprocessor)
    archive = _archive(parts)

    def embed_captions(captions: tf.Tensor) -> dict[str, tf.Tensor]:
        inputs = preprocessor(captions) if preprocessor is not None else captions
        return {OUTPUT: _unit_embeddings(encode_tokens(inputs))}

    archive.add_endpoint(SIGNATURE, embed_captions, input_signature=[tf.TensorSpec([None], tf.string, name=TEXT_INPUT)])
    _write(archive, path)


def encoder_fingerprint(encoder_dir: Path) -> str:
    """sha256 over ``saved_model.pb`` and the ``variables/`` index and data files, with their names:
    what an index (`dualenc.retrieval.index`) and a TFLite file (`tflite_source`) are bound to."""
    files = [encoder_dir / "saved_model.pb", *sorted((encoder_dir / "variables").glob("variables.*"))]
    digest = hashlib.sha256()
    for path in files:
        digest.update(f"{path.relative_to(encoder_dir)}\0{sha256_of_file(path)}\n".encode("utf-8"))
    return digest.hexdigest()


def tflite_source(path: Path) -> str | None:
    """The `encoder_fingerprint` of the SavedModel the TFLite file at `path` was converted from, as
    recorded beside it (`VISION_TFLITE_SOURCE`), or None when nothing readable is recorded."""
    try:
        return json.loads((Path(path).parent / VISION_TFLITE_SOURCE).read_text(encoding="utf-8"))["vision_encoder"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def export_vision_tflite(saved_model_dir: Path, path: Path) -> None:
    """Convert the ``pixels`` signature of a vision SavedModel to a TFLite file (builtin ops only),
    and record beside it which SavedModel it came from (`tflite_source`): a SavedModel exported
    again later without it leaves a stale TFLite file, which the engines then refuse."""
    converter = tf.lite.TFLiteConverter.from_saved_model(str(saved_model_dir), signature_keys=[PIXELS_SIGNATURE])
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
    try:
        flatbuffer = converter.convert()
    except Exception as exc:  # the converter raises ConverterError and plain exceptions alike
        raise DualEncError(f"cannot convert {saved_model_dir} to TFLite ({first_line(exc)})") from None
    write_bytes_atomic(path, flatbuffer)
    # Written last, so a record never vouches for a file converted from another SavedModel.
    write_json_atomic(Path(path).parent / VISION_TFLITE_SOURCE, {"vision_encoder": encoder_fingerprint(Path(saved_model_dir))})


def export_encoders(
    run_dir: Path,
    *,
    encode_images: Callable,
    encode_texts: Callable,
    image_size: tuple[int, int],
    text_preprocessor: Callable | None = None,
    track_images: Sequence[object] | None = None,
    track_texts: Sequence[object] | None = None,
) -> None:
    """Write ``vision_encoder/``, ``vision_encoder.tflite`` and ``text_encoder/`` under `run_dir`.

    For a `DualEncoder`, pass its ``encode_images``/``encode_texts`` with
    ``track_images=[model.vision_tower, model.image_head]`` and
    ``track_texts=[model.text_tower, model.caption_head]``, so each file holds one tower only.
    """
    run_dir = Path(run_dir)
    export_vision_encoder(encode_images, image_size, run_dir / VISION_ENCODER_DIR, track_images)
    export_vision_tflite(run_dir / VISION_ENCODER_DIR, run_dir / VISION_TFLITE)
    export_text_encoder(encode_texts, run_dir / TEXT_ENCODER_DIR, text_preprocessor, track_texts)


class Encoder:
    """What every embedding engine offers: a list of inputs (bytes or str) → unit embeddings,
    NumPy float32 ``[N, D]``, fed `batch_size` at a time.

    A subclass sets `path`, `batch_size` and `dimension` and defines `embed_batch`, which
    encodes one batch and lets TensorFlow errors through, so a caller can find which input in a
    batch was bad (`dualenc.retrieval.gallery.embed_skipping_bad`).
    """

    path: Path
    batch_size: int
    dimension: int

    def embed_batch(self, inputs: Sequence[bytes | str]) -> np.ndarray:
        """One batch of inputs → float32 ``[len(inputs), D]``."""
        raise NotImplementedError

    def __call__(self, inputs: Sequence[bytes | str]) -> np.ndarray:
        batches = [
            self.embed_batch(inputs[start : start + self.batch_size])
            for start in range(0, len(inputs), self.batch_size)
        ]
        if not batches:
            return np.zeros((0, self.dimension), np.float32)
        return np.concatenate(batches, axis=0)


class LoadedEncoder(Encoder):
    """An exported SavedModel encoder (see the module docstring for its signatures)."""

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


def _load_saved_model(path: Path):
    recover_directory(path)  # an export killed mid-swap leaves the previous encoder aside
    if not (path / "saved_model.pb").is_file():
        raise DualEncError(f"no exported encoder at {path}; run `python train.py` first or pass --model RUN_DIR")
    import tensorflow_text  # noqa: F401  registers the text ops a BERT or WordPiece preprocessor uses

    try:
        return tf.saved_model.load(str(path))
    except Exception as exc:  # TensorFlow raises several unrelated types for a damaged SavedModel
        raise DualEncError(f"cannot load the encoder at {path} ({first_line(exc)}); re-export it or retrain") from None


def load_encoder(path: Path, batch_size: int = 64) -> LoadedEncoder:
    """Load an encoder written by `export_vision_encoder` / `export_text_encoder`."""
    return LoadedEncoder(Path(path), batch_size=batch_size)
