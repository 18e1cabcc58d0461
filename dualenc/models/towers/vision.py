"""The image tower: raw pixels ``[B, H, W, 3]`` in [0, 255] → pooled features ``[B, F]`` float32.

Each tower carries its backbone's own preprocessing, so callers feed decoded images as they
are (uint8 or float) and the exported tower needs no separate preprocessing step. Backbones
are keras.applications models without their classifier, global-average pooled, plus a small
CNN (seed 000's person crops, 128×64) that trains from scratch on a CPU.

Freezing (`trainable=False`) also calls the backbone with ``training=False``: a frozen
backbone's BatchNorm must keep normalising with its ImageNet moving statistics rather than
batch statistics, or fine-tuning the heads on top would chase a drifting input.
"""

from __future__ import annotations

from pathlib import Path

import keras

from dualenc.core.config import KERAS_HUB_VISION_BACKBONES, VISION_BACKBONES, VisionConfig
from dualenc.core.errors import DualEncError, first_line

BACKBONE_LAYER_NAME = "backbone"

# keras.applications constructor and preprocessing module for each pretrained backbone.
_APPLICATIONS = {
    "xception": (keras.applications.Xception, keras.applications.xception),
    "mobilenet": (keras.applications.MobileNet, keras.applications.mobilenet),
    "mobilenet_v2": (keras.applications.MobileNetV2, keras.applications.mobilenet_v2),
    "resnet50": (keras.applications.ResNet50, keras.applications.resnet50),
    "efficientnet_v2_b0": (keras.applications.EfficientNetV2B0, keras.applications.efficientnet_v2),
}

SMALL_CNN_FILTERS = (16, 32, 64, 128)


@keras.saving.register_keras_serializable(package="dualenc")
class BackbonePreprocessing(keras.layers.Layer):
    """Pixels in [0, 255] → the input range backbone `backbone` was trained on.

    Delegates to ``keras.applications.<module>.preprocess_input`` (e.g. ``x / 127.5 - 1``
    for MobileNetV2, BGR mean subtraction for ResNet50; EfficientNetV2 rescales inside its
    own model). Input and output ``[B, H, W, 3]``.
    """

    def __init__(self, backbone: str, **kwargs):
        super().__init__(**kwargs)
        if backbone not in _APPLICATIONS:
            raise ValueError(f"no keras.applications preprocessing for backbone {backbone!r}")
        self.backbone = backbone

    def call(self, images):
        images = keras.ops.cast(images, self.compute_dtype)
        return _APPLICATIONS[self.backbone][1].preprocess_input(images)

    def get_config(self) -> dict:
        return {**super().get_config(), "backbone": self.backbone}


def _small_cnn(image_size: tuple[int, int]) -> keras.Model:
    """Four conv blocks (Conv3×3 → BatchNorm → ReLU → MaxPool 2×2), 16-32-64-128 filters.

    About 100k parameters; input ``[B, H, W, 3]`` scaled to [0, 1], output the last feature
    map ``[B, H/16, W/16, 128]``.
    """
    images = keras.Input(shape=(*image_size, 3), name="pixels")
    features = images
    for block, filters in enumerate(SMALL_CNN_FILTERS):
        # No bias: BatchNorm's offset replaces it.
        features = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"conv{block}")(features)
        # Momentum 0.9, not Keras' 0.99: a demo epoch is only tens of steps, and slow moving
        # statistics would make every early validation pass run on stale normalisation.
        features = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{block}")(features)
        features = keras.layers.ReLU(name=f"relu{block}")(features)
        features = keras.layers.MaxPooling2D(2, name=f"pool{block}")(features)
    return keras.Model(images, features, name=BACKBONE_LAYER_NAME)


def _applications_backbone(backbone: str, image_size: tuple[int, int], imagenet: bool) -> keras.Model:
    """The keras.applications model without its classifier, ImageNet-initialised or random."""
    constructor = _APPLICATIONS[backbone][0]
    try:
        return constructor(
            include_top=False,
            weights="imagenet" if imagenet else None,
            input_shape=(*image_size, 3),
            name=BACKBONE_LAYER_NAME,
        )
    except ValueError as exc:  # keras.applications' own checks, e.g. Xception needs >= 71×71
        raise DualEncError(
            f"cannot build vision backbone {backbone!r} for image_size {image_size} ({first_line(exc)})"
        ) from None
    except Exception as exc:  # keras.utils.get_file raises a bare Exception when offline
        if not imagenet:
            raise
        reason = first_line(exc)
        raise DualEncError(
            f"cannot get ImageNet weights for vision backbone {backbone!r} ({reason}); "
            "download the notop .h5 file elsewhere and pass --vision-weights /path/to/file.h5, "
            "or put it in ~/.keras/models"
        ) from None


def _load_local_weights(backbone: keras.Model, path: str) -> None:
    if not Path(path).is_file():
        raise DualEncError(
            f"vision weights file {path} does not exist; pass a .h5 or .weights.h5 file, 'imagenet' or none"
        )
    try:
        backbone.load_weights(path)
    except (ValueError, OSError) as exc:
        raise DualEncError(f"cannot load vision weights {path} into the backbone ({first_line(exc)})") from None


def build_vision_tower(config: VisionConfig, projection: str = "heads") -> keras.Model:
    """Build the image tower: ``[B, H, W, 3]`` pixels in [0, 255] → ``[B, F]`` float32 features.

    "clip" and "siglip" come from keras-hub presets (`dualenc.models.towers.keras_hub`, where
    `projection` says whether the preset's own projection is kept).

    ``(H, W) = config.image_size``. `config.weights` is "imagenet" (keras.applications
    download, or its cache in ~/.keras/models), None (random init) or a local weights file
    loaded into the backbone (named ``"backbone"`` inside the tower). F is 128 × H/16 for the
    small CNN (one 128-channel vector per row of its final map) and the backbone's channel
    count otherwise (e.g. 1280 for MobileNetV2).
    """
    if config.backbone not in VISION_BACKBONES:
        raise DualEncError(f"unknown vision backbone {config.backbone!r}; choose one of: {', '.join(VISION_BACKBONES)}")
    if config.backbone in KERAS_HUB_VISION_BACKBONES:
        from dualenc.models.towers import keras_hub

        return keras_hub.build_vision_tower(config, projection)
    if config.backbone == "small_cnn":  # VisionConfig refuses "imagenet" weights for it
        backbone = _small_cnn(config.image_size)
        preprocessing = keras.layers.Rescaling(1.0 / 255.0, name="preprocessing")
    else:
        backbone = _applications_backbone(config.backbone, config.image_size, config.weights == "imagenet")
        preprocessing = BackbonePreprocessing(config.backbone, name="preprocessing")
    if config.weights not in (None, "imagenet"):
        _load_local_weights(backbone, config.weights)

    backbone.trainable = config.trainable
    pixels = keras.Input(shape=(*config.image_size, 3), name="pixels")
    # A frozen backbone always runs in inference mode (see the module docstring).
    feature_map = backbone(preprocessing(pixels), training=None if config.trainable else False)
    # float32 output even under a mixed-precision policy: the heads and loss expect it.
    if config.backbone == "small_cnn":
        # Person crops: average each row of the final map and keep the rows apart (as
        # part-based re-identification models do), so "red coat, black trousers" and "black
        # coat, red trousers" stay distinguishable; global pooling would erase where a colour is.
        rows = keras.layers.AveragePooling2D(pool_size=(1, feature_map.shape[2]), name="row_pool")(feature_map)
        features = keras.layers.Flatten(name="pool", dtype="float32")(rows)
    else:
        features = keras.layers.GlobalAveragePooling2D(name="pool", dtype="float32")(feature_map)
    return keras.Model(pixels, features, name=f"vision_{config.backbone}")

