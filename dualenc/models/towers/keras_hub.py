"""Towers from keras-hub presets: CLIP and SigLIP image and text towers, and BERT text towers.

A preset is a keras-hub handle (``clip_vit_base_patch16``, ``kaggle://…``, ``hf://…``) that
keras-hub downloads, or a local directory written by keras-hub's ``save_to_preset`` (what an
offline machine uses). Each tower takes the numbers our preprocessors produce, so the preset's
own preprocessing is split as everywhere else in dualenc:

- images: the shared decoder (`dualenc.data.images.decode_image`) resizes to the preset's image size
  in `tf.data` and in the exported encoder; the tower starts with `PixelNormalization`, the
  preset image converter's per-channel ``scale`` and ``offset``, so it takes uint8 pixels.
- text: `dualenc.models.preprocessing.KerasHubTextPreprocessor` runs the preset's tokenizer and packer;
  the tower takes CLIP/SigLIP token ids ``[B, S]`` or BERT's dict of three.

``projection="preset"`` keeps the preset's projection into its joint image-text space (CLIP's
``vision_projection``/``text_projection``, SigLIP's pooling head and text head), so the towers
are CLIP/SigLIP as published and the model can be scored zero-shot; ``"heads"`` stops at the
pooled features before that projection and leaves projecting to dualenc's heads.

Every failure a user can cause (an unreachable handle, a directory that is no preset, a preset
of another family, image sizes or projection widths that do not fit) is a one-line
`DualEncError`.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import keras

from dualenc.core.config import KERAS_HUB_TEXT_TOWERS, KERAS_HUB_VISION_BACKBONES, ModelConfig, TextConfig, VisionConfig
from dualenc.core.errors import DualEncError, first_line
from dualenc.models.keras_hub_presets import flag as _flag
from dualenc.models.keras_hub_presets import keras_hub_preset, preset_family
from dualenc.models.preprocessing import KerasHubTextPreprocessor

def _check_family(preset: str, modality: str, expected: str) -> None:
    family = preset_family(preset, _flag(modality))
    if family != expected:
        raise DualEncError(f"{_flag(modality)} {preset} holds a {family} model, not {expected}; pass --{modality} {family}")


def _load_backbone(preset: str, modality: str, load_weights: bool = True) -> Any:
    import keras_hub

    try:
        return keras_hub.models.Backbone.from_preset(keras_hub_preset(preset), load_weights=load_weights)
    except Exception as exc:  # a damaged or partial preset: missing weights, bad JSON, wrong shapes
        raise DualEncError(f"cannot load {_flag(modality)} {preset} ({first_line(exc)[:200]}); re-save the preset") from None


def _load_image_converter(preset: str) -> Any:
    import keras_hub

    try:
        return keras_hub.layers.ImageConverter.from_preset(keras_hub_preset(preset))
    except Exception as exc:
        raise DualEncError(f"--vision-preset {preset} has no usable image converter ({first_line(exc)[:200]})") from None


def preset_image_size(backbone: Any) -> tuple[int, int]:
    """The (height, width) the preset's vision encoder was built for (ViT position embeddings fix it)."""
    height, width = backbone.vision_encoder.image_shape[:2]
    return int(height), int(width)


def _check_image_size(config: VisionConfig, expected: tuple[int, int]) -> None:
    if config.image_size is None or tuple(config.image_size) != expected:
        given = "none" if config.image_size is None else f"{config.image_size[0]}x{config.image_size[1]}"
        raise DualEncError(
            f"--vision-preset {config.preset} takes {expected[0]}x{expected[1]} images, not {given}; "
            f"drop the image_size setting or set it to {list(expected)}"
        )


def _channel_values(value: Any) -> list[float] | float | None:
    if value is None:
        return None
    if isinstance(value, (list, tuple)):
        return [float(item) for item in value]
    return float(value)


@keras.saving.register_keras_serializable(package="dualenc")
class PixelNormalization(keras.layers.Layer):
    """Pixels ``[B, H, W, 3]`` in [0, 255] → ``pixels · scale + offset``, per channel.

    `scale` and `offset` are those of the preset's keras-hub image converter (a number, three
    numbers or None), applied in the same order and dtype, so the tower sees exactly what the
    converter would produce from the same resized pixels.
    """

    def __init__(self, scale: Any = None, offset: Any = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.scale = _channel_values(scale)
        self.offset = _channel_values(offset)

    def call(self, pixels: Any) -> Any:
        normalized = keras.ops.cast(pixels, self.compute_dtype)
        if self.scale is not None:
            normalized = normalized * keras.ops.convert_to_tensor(self.scale, self.compute_dtype)
        if self.offset is not None:
            normalized = normalized + keras.ops.convert_to_tensor(self.offset, self.compute_dtype)
        return normalized

    def compute_output_shape(self, input_shape: Any) -> Any:
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "scale": self.scale, "offset": self.offset}


def _float32_features(features: Any) -> Any:
    # float32 even under a mixed-precision policy: the heads and losses expect it.
    return keras.layers.Activation("linear", dtype="float32", name="features")(features)


def build_vision_tower(config: VisionConfig, projection: str) -> keras.Model:
    """uint8 pixels ``[B, H, W, 3]`` (H, W the preset's size) → features ``[B, F]`` float32.

    F is the joint-space width with ``projection="preset"`` (CLIP ``projection_dim``, SigLIP
    ``hidden_dim``), else CLIP's pooled class token (``hidden_dim``) or SigLIP's pooled output.
    """
    _check_family(config.preset, "vision", config.backbone)
    backbone = _load_backbone(config.preset, "vision")
    converter = _load_image_converter(config.preset)
    _check_image_size(config, preset_image_size(backbone))
    encoder = backbone.vision_encoder
    encoder.trainable = config.trainable
    pixels = keras.Input(shape=(*config.image_size, 3), name="pixels")
    normalized = PixelNormalization(converter.scale, converter.offset, name="preprocessing")(pixels)
    if config.backbone == "clip":
        features = backbone.vision_pooler(encoder({"images": normalized}))
        if projection == "preset":
            backbone.vision_projection.trainable = config.trainable
            features = backbone.vision_projection(features)
    else:
        # SigLIP's vision encoder ends in its attention-pooling head, already in the joint space.
        features = encoder({"images": normalized})
    return keras.Model(pixels, _float32_features(features), name=f"vision_{config.backbone}")


def _siglip_pooled_text(encoder: keras.Model) -> keras.Model:
    """SigLIP's text encoder without its final Dense head: token ids → last token's state."""
    return keras.Model(encoder.input, encoder.head.input, name="siglip_text_pooled")


def build_text_tower(config: TextConfig, projection: str) -> keras.Model:
    """The preprocessor's token inputs → features ``[B, F]`` float32 (see `build_vision_tower` for F).

    BERT: ``dict(token_ids, segment_ids, padding_mask)`` → ``pooled_output`` (F = hidden size).
    """
    _check_family(config.preset, "text", config.tower)
    backbone = _load_backbone(config.preset, "text")
    if config.tower == "bert":
        backbone.trainable = config.trainable
        inputs = {
            name: keras.Input(shape=(None,), dtype="int32", name=name)
            for name in ("token_ids", "segment_ids", "padding_mask")
        }
        features = backbone(inputs)["pooled_output"]
        return keras.Model(inputs, _float32_features(features), name="text_bert_keras_hub")
    encoder = backbone.text_encoder
    encoder.trainable = config.trainable
    token_ids = keras.Input(shape=(None,), dtype="int32", name="token_ids")
    if config.tower == "clip":
        features = backbone.text_pooler(encoder({"token_ids": token_ids}), token_ids)
        if projection == "preset":
            backbone.text_projection.trainable = config.trainable
            features = backbone.text_projection(features)
    elif projection == "preset":
        features = encoder({"token_ids": token_ids})
    else:
        features = _siglip_pooled_text(encoder)({"token_ids": token_ids})
    return keras.Model(token_ids, _float32_features(features), name=f"text_{config.tower}")


def _projection_width(backbone: Any, family: str, modality: str) -> int:
    if family == "clip":
        return int(backbone.projection_dim)
    if modality == "vision":
        return int(backbone.vision_encoder.hidden_dim)
    return int(backbone.text_encoder.projection_dim)


def resolve_model_config(model: ModelConfig) -> ModelConfig:
    """`model` with what its keras-hub presets decide filled in and checked.

    Sets the vision image size (and checks a given one) and the text sequence length from the
    presets; with ``projection="preset"`` checks that both presets project to one width. A
    config without keras-hub towers comes back unchanged, without importing keras-hub.
    """
    vision, text = model.vision, model.text
    widths = {}
    if vision.backbone in KERAS_HUB_VISION_BACKBONES:
        _check_family(vision.preset, "vision", vision.backbone)
        backbone = _load_backbone(vision.preset, "vision", load_weights=False)
        expected = preset_image_size(backbone)
        if vision.image_size is not None:
            _check_image_size(vision, expected)
        vision = dataclasses.replace(vision, image_size=expected)
        widths["vision"] = _projection_width(backbone, vision.backbone, "vision")
    if text.tower in KERAS_HUB_TEXT_TOWERS and text.preset is not None:
        _check_family(text.preset, "text", text.tower)
        text = dataclasses.replace(text, max_tokens=KerasHubTextPreprocessor(text.preset, text.tower).sequence_length)
        if model.projection == "preset":
            widths["text"] = _projection_width(_load_backbone(text.preset, "text", load_weights=False), text.tower, "text")
    changes = {"vision": vision, "text": text}
    if model.projection == "preset":
        if widths["vision"] != widths["text"]:
            raise DualEncError(
                f"--vision-preset {vision.preset} projects to {widths['vision']} dimensions but --text-preset "
                f"{text.preset} to {widths['text']}; pass --projection heads to project both with dualenc's heads"
            )
        # The embedding width is the presets' (the CMPC classifier is sized by it).
        changes["projection_dim"] = widths["vision"]
    return dataclasses.replace(model, **changes)
