"""Run configuration as frozen dataclasses, with JSON in and out in one place.

`VisionConfig` and `TextConfig` describe one tower each, `ModelConfig` the whole dual encoder
(towers, projection heads, loss, temperature), `TrainConfig` one training run. Change a config
with `dataclasses.replace`; each checks its own values in `__post_init__` and raises
`DualEncError` naming the field and the valid choices. `from_dict` (JSON in) first checks each
value against its field's annotation, so `{"epochs": "3"}` is refused naming the field and the
type wanted instead of failing later inside a comparison.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any

from dualenc.core import jsonfiles
from dualenc.core.errors import DualEncError
from dualenc.core.files import write_json_atomic

VISION_BACKBONES = ("small_cnn", "xception", "mobilenet", "mobilenet_v2", "resnet50", "efficientnet_v2_b0", "clip", "siglip")
TEXT_TOWERS = ("bilstm", "bert", "clip", "siglip")
# Towers built from keras-hub presets (`dualenc.models.towers.keras_hub`); "bert" only with a preset.
KERAS_HUB_VISION_BACKBONES = ("clip", "siglip")
KERAS_HUB_TEXT_TOWERS = ("clip", "siglip", "bert")
# "heads": dualenc's projection heads on pooled tower features; "preset": keep the keras-hub
# presets' own projection into their joint space (zero-shot CLIP/SigLIP), no heads.
PROJECTIONS = ("heads", "preset")
LOSSES = ("soft_target", "clip", "cmpm", "cmpc", "cmpm+cmpc", "siglip", "sdm", "sdm+cmpc")
# SigLIP's initial temperature T = 1 / exp(t') and logit bias b (Zhai et al. 2023, section 3.2:
# t' = log 10, b = -10); `--loss siglip` starts from them.
SIGLIP_TEMPERATURE = 0.1
SIGLIP_BIAS = -10.0
PLACEMENTS = ("single", "split", "mirrored", "multi-worker", "auto")
# Epoch-end values that learning-rate reduction, early stopping and checkpoints may follow.
# How the learning rate moves within a run (`dualenc.training.optimizer.schedule_factor`).
SCHEDULES = ("constant", "cosine")
MONITORS = ("val_loss", "val_t2i_r1", "val_t2i_r10", "val_i2t_r1", "val_i2t_r10", "val_t2i_map", "val_i2t_map")

# Seed 003's BERT: the uncased preprocessor and small BERT L-4 H-512 from TensorFlow Hub.
DEFAULT_BERT_PREPROCESSOR = "https://tfhub.dev/tensorflow/bert_en_uncased_preprocess/3"
DEFAULT_BERT_ENCODER = "https://tfhub.dev/tensorflow/small_bert/bert_en_uncased_L-4_H-512_A-8/2"

# (height, width) each backbone was designed for; the small CNN uses person-crop proportions.
DEFAULT_IMAGE_SIZES = {
    "small_cnn": (128, 64),
    "xception": (299, 299),
    "mobilenet": (224, 224),
    "mobilenet_v2": (224, 224),
    "resnet50": (224, 224),
    "efficientnet_v2_b0": (224, 224),
}
# Seeds feed NumPy's and TensorFlow's generators, which take unsigned 32-bit values.
MAX_SEED = 2**32 - 1
# Every HDF5 file (Keras' .weights.h5 and legacy .h5 weights) starts with this signature.
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
# How a field's annotation is named in errors, one value and several.
_TYPE_NAMES = {bool: ("true or false", "booleans"), int: ("an integer", "integers"),
               float: ("a number", "numbers"), str: ("a string", "strings"), type(None): ("null", "nulls")}


def _choice(field: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise DualEncError(f"unknown {field} {value!r}; choose one of: {', '.join(choices)}")


def _positive(field: str, value: float) -> None:
    if not value > 0:
        raise DualEncError(f"{field} must be > 0, got {value!r}")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The image tower: a keras.applications backbone (or a small CNN), pooled, or a keras-hub
    CLIP/SigLIP vision encoder.

    `weights` is "imagenet", None (random init) or a local weights file; `trainable=False`
    freezes the backbone (its BatchNorm then stays in inference mode). `image_size` is
    (height, width) and defaults to the backbone's own size. "clip" and "siglip" take their
    weights and image size from `preset` (a keras-hub handle or local preset directory):
    `weights` is not used, and `image_size` stays None until
    `dualenc.models.towers.keras_hub.resolve_model_config` reads it from the preset.
    """

    backbone: str = "small_cnn"
    weights: str | None = None
    trainable: bool = True
    image_size: tuple[int, int] | None = None
    preset: str | None = None

    def __post_init__(self) -> None:
        _choice("vision backbone", self.backbone, VISION_BACKBONES)
        if self.backbone in KERAS_HUB_VISION_BACKBONES:
            if not self.preset:
                raise DualEncError(f"vision backbone {self.backbone!r} needs --vision-preset HANDLE_OR_DIR (a keras-hub preset)")
            if self.image_size is not None:
                object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
            return
        if self.preset is not None:
            raise DualEncError(f"--vision-preset applies to --vision {' or '.join(KERAS_HUB_VISION_BACKBONES)}, not {self.backbone!r}")
        if self.backbone == "small_cnn" and self.weights == "imagenet":
            raise DualEncError("vision backbone 'small_cnn' has no ImageNet weights; use weights none or a local file")
        if self.image_size is None:
            object.__setattr__(self, "image_size", DEFAULT_IMAGE_SIZES[self.backbone])
        else:
            object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))
        if len(self.image_size) != 2 or min(self.image_size) < 32:
            raise DualEncError(f"image_size must be (height, width), each >= 32, got {self.image_size!r}")


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The text tower: a TF-Hub BERT (preprocessor + encoder handles), a WordPiece BiLSTM, or a
    keras-hub CLIP, SigLIP or BERT text encoder from `preset`.

    Handles are TF-Hub URLs or local SavedModel directories. "bert" with a `preset` (keras-hub
    handle or local preset directory) is keras-hub's BERT, without one TF Hub's; "clip" and
    "siglip" need a preset, whose sequence length becomes `max_tokens`
    (`dualenc.models.towers.keras_hub.resolve_model_config`). For the BiLSTM, `vocabulary` is
    the path of a WordPiece vocabulary file learned from the training captions (train.py writes
    it into the run directory) and `vocab_size` bounds its size when it is learned.
    """

    tower: str = "bilstm"
    preprocessor: str = DEFAULT_BERT_PREPROCESSOR
    encoder: str = DEFAULT_BERT_ENCODER
    trainable: bool = True
    vocabulary: str | None = None
    vocab_size: int = 2000
    max_tokens: int = 48
    embedding_dim: int = 128
    lstm_units: int = 128
    preset: str | None = None

    def __post_init__(self) -> None:
        _choice("text tower", self.tower, TEXT_TOWERS)
        if self.tower in ("clip", "siglip") and not self.preset:
            raise DualEncError(f"text tower {self.tower!r} needs --text-preset HANDLE_OR_DIR (a keras-hub preset)")
        if self.preset is not None and self.tower not in KERAS_HUB_TEXT_TOWERS:
            raise DualEncError(f"--text-preset applies to --text {', '.join(KERAS_HUB_TEXT_TOWERS)}, not {self.tower!r}")
        for field in ("vocab_size", "max_tokens", "embedding_dim", "lstm_units"):
            _positive(field, getattr(self, field))


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """The dual encoder: two towers, projection heads into one space, and the training objective.

    Heads follow seed 003: Dense(projection_dim), then `projection_layers` times
    GELU -> Dense -> Dropout -> residual add -> LayerNorm. `temperature` divides the
    similarity logits; with `learn_temperature` it is a trainable scalar initialised there.
    `num_classes` (identities in the training split) sizes the CMPC classifier. `projection`
    "preset" keeps keras-hub presets' own projections instead of heads (see `PROJECTIONS`).
    """

    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    projection_dim: int = 256
    projection_layers: int = 1
    dropout: float = 0.1
    loss: str = "soft_target"
    temperature: float = 0.05
    learn_temperature: bool = False
    num_classes: int = 0
    projection: str = "heads"

    def __post_init__(self) -> None:
        _choice("loss", self.loss, LOSSES)
        _choice("projection", self.projection, PROJECTIONS)
        if self.projection == "preset" and (
            self.vision.backbone not in KERAS_HUB_VISION_BACKBONES or self.text.tower not in ("clip", "siglip")
        ):
            raise DualEncError(
                "--projection preset keeps a CLIP/SigLIP preset's projection, so it needs --vision clip|siglip and "
                f"--text clip|siglip (got {self.vision.backbone!r} and {self.text.tower!r}); use --projection heads"
            )
        _positive("projection_dim", self.projection_dim)
        _positive("temperature", self.temperature)
        if self.projection_layers < 0:
            raise DualEncError(f"projection_layers must be >= 0, got {self.projection_layers!r}")
        if not 0 <= self.dropout < 1:
            raise DualEncError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if "cmpc" in self.loss and self.num_classes < 1:
            raise DualEncError(f"loss {self.loss!r} needs num_classes >= 1 (identities in the training split)")


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Training-only augmentation (`dualenc.data.augment`): applied in the input pipeline to
    training batches, never to validation, evaluation or the exported encoders.

    `flip`: mirror each image left-right with probability 1/2 (a run turns it off when its
    training captions name left or right). `translate`: shift each image by up to this fraction
    of its height and width, filling from the edge (pad-and-crop without new colours or a
    resize, so no garment changes length). `erase`: probability of random erasing (one box of
    2-20 % of the image filled with noise). `token_dropout`: probability that each caption token
    is dropped (BiLSTM token ids only).
    """

    flip: bool = False
    translate: float = 0.0
    erase: float = 0.0
    token_dropout: float = 0.0

    def __post_init__(self) -> None:
        for field in ("translate", "erase", "token_dropout"):
            value = getattr(self, field)
            if not 0 <= value < 1:
                raise DualEncError(f"augment {field} must be in [0, 1), got {value!r}")

    @property
    def images(self) -> bool:
        """Whether any augmentation changes images (so a frozen vision tower's features cannot be cached)."""
        return self.flip or self.translate > 0 or self.erase > 0


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """One training run: data, model, optimisation and devices.

    `monitor` is what the plateau schedule, early stopping and the best epoch follow: seed
    003's ``val_loss``, or a validation retrieval score (higher is better), which tracks what
    search needs more closely when the loss keeps drifting while recall still improves.
    `schedule` shapes the learning rate within the run: "constant" (with the plateau cuts) or
    "cosine" (down to 0 at the last step, no plateau cuts), either after `warmup_epochs` of
    linear warm-up from `warmup_from` times the rate. `head_lr_multiplier` scales the rate of
    everything but the towers (heads, temperature, bias, ID classifier): new parts learn faster
    than pretrained towers (IRRA: 5x). `augment` is training-only augmentation.
    `validation` is filled in when the run resolves its data (`dualenc.training.loop.resolve_config`):
    the split it validates on, or "train-holdout" when the data has no validation split and a
    tenth of the training identities (or images) are held out instead.
    """

    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: str | None = None
    epochs: int = 30
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-3
    placement: str = "single"
    mixed_precision: bool = False
    seed: int = 0
    monitor: str = "val_loss"
    validation: str | None = None
    schedule: str = "constant"
    warmup_epochs: float = 0.0
    warmup_from: float = 0.1
    head_lr_multiplier: float = 1.0
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)

    def __post_init__(self) -> None:
        _choice("placement", self.placement, PLACEMENTS)
        _choice("monitor", self.monitor, MONITORS)
        _choice("schedule", self.schedule, SCHEDULES)
        for field in ("batch_size", "learning_rate", "head_lr_multiplier"):
            _positive(field, getattr(self, field))
        # 0 epochs: export and score the towers as they start (zero-shot for pretrained presets).
        if self.epochs < 0:
            raise DualEncError(f"epochs must be >= 0, got {self.epochs!r}")
        # A warm-up longer than a short run (a smoke run of a preset) covers the whole run.
        if not 0 <= self.warmup_epochs < math.inf:
            raise DualEncError(f"warmup_epochs must be a finite number >= 0, got {self.warmup_epochs!r}")
        if not 0 <= self.warmup_from <= 1:
            raise DualEncError(f"warmup_from must be in [0, 1], got {self.warmup_from!r}")
        if not 0 <= self.seed <= MAX_SEED:
            raise DualEncError(f"seed must be an integer in [0, {MAX_SEED}], got {self.seed!r}")
        # BERT-style towers take a dict of tensors, not plain token ids to drop.
        if self.augment.token_dropout > 0 and self.model.text.tower != "bilstm":
            raise DualEncError(f"--token-dropout applies to the bilstm text tower's token ids, not to "
                               f"--text {self.model.text.tower}; drop the flag")


def to_dict(config: Any) -> dict:
    """A config (any of the dataclasses above) as plain JSON-ready values."""
    return dataclasses.asdict(config)


def _fits(value: Any, hint: Any) -> bool:
    """Whether a JSON value suits a field annotated `hint` (an int suits a float; a bool suits
    only a bool; a list suits a fixed-length tuple)."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_fits(value, argument) for argument in arguments)
    if origin is tuple:
        return (isinstance(value, (list, tuple)) and len(value) == len(arguments)
                and all(_fits(item, argument) for item, argument in zip(value, arguments)))
    if isinstance(value, bool) or hint is bool:
        return isinstance(value, bool) and hint is bool
    if hint is float:
        return isinstance(value, (int, float))
    return isinstance(value, hint)


def _describe(hint: Any) -> str:
    """`hint` in words: "an integer", "a list of 2 integers or null"."""
    origin, arguments = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(argument) for argument in arguments)
    if origin is tuple:
        return f"a list of {len(arguments)} {_TYPE_NAMES[arguments[0]][1]}"
    return _TYPE_NAMES[hint][0]


def _build(cls: type, values: Any, source: str, path: str = "") -> Any:
    """`cls` from JSON `values` read from `source`; `path` ("model.vision.") locates them."""
    where = f"{source}.{path.rstrip('.')}" if path else source
    if not isinstance(values, dict):
        raise DualEncError(f"{where}: expected a JSON object, got {type(values).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - set(fields))
    if unknown:
        raise DualEncError(f"{where}: unknown field(s) {', '.join(unknown)}; valid: {', '.join(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in values.items():
        if dataclasses.is_dataclass(hints[name]):
            value = _build(hints[name], value, source, f"{path}{name}.")
        elif not _fits(value, hints[name]):
            raise DualEncError(f"{source}: {path}{name} must be {_describe(hints[name])}, got {json.dumps(value)}")
        elif hints[name] is float:
            value = float(value)
        kwargs[name] = value
    try:
        return cls(**kwargs)
    except DualEncError as error:
        raise DualEncError(f"{where}: {error}") from None


def from_dict(cls: type, values: dict, where: str = "config") -> Any:
    """Build `cls` (e.g. `TrainConfig`) from `to_dict` output; `where` names the source in errors."""
    return _build(cls, values, where)


def save(config: Any, path: str | Path) -> None:
    """Write a config as indented JSON, atomically (temporary name, then rename)."""
    write_json_atomic(path, to_dict(config), sort_keys=True)


def read_json(path: str | Path, label: str) -> Any:
    """The JSON content of the file at `path`; `label` ("--config", "config file") names it in
    the one-line `DualEncError` for a missing, unreadable, oversized, non-UTF-8 or malformed file
    (`dualenc.core.jsonfiles`)."""
    return jsonfiles.load_file(path, label)


def load(cls: type, path: str | Path) -> Any:
    """Read a config of type `cls` written by `save` (or by hand)."""
    return from_dict(cls, read_json(path, "config file"), str(path))


def check_weights_file(vision: VisionConfig) -> None:
    """Check a local vision weights file before anything is built: present and HDF5 (Keras'
    .weights.h5 or a legacy .h5). Not part of `__post_init__`, so a saved config still loads
    after its weights file has moved."""
    if vision.weights in (None, "imagenet"):
        return
    path = Path(vision.weights)
    hint = "pass a .h5 or .weights.h5 file, 'imagenet' or none"
    if not path.is_file():
        problem = "is a directory" if path.is_dir() else "does not exist"
        raise DualEncError(f"vision weights file {path} {problem}; {hint}")
    try:
        with open(path, "rb") as stream:
            start = stream.read(len(HDF5_SIGNATURE))
    except OSError as exc:
        raise DualEncError(f"cannot read vision weights file {path} ({exc.strerror})") from None
    if start != HDF5_SIGNATURE:
        raise DualEncError(f"vision weights file {path} is not an HDF5 weights file (starts with {start!r}); {hint}")
