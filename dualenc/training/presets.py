"""Named starting points for a training run; command-line flags override any field.

- ``demo``: a small CNN and a WordPiece BiLSTM trained from scratch on the synthetic
  pedestrians, sized for a 2-core CPU. CLIP's InfoNCE with a learned temperature: from
  random towers the soft-target loss's targets (built from the embeddings themselves) start
  near uniform and teach little, so it is kept for pretrained towers. Early stopping follows
  text->image R@1, which keeps rising for epochs after the validation loss flattens. 7 epochs
  over the demo's 4,000 people (more people beat more epochs on its attribute queries,
  `tfrecords_tools.demo.DEFAULT_IDENTITIES`), with one epoch of warm-up then a cosine, random
  flips, shifts of up to a tenth and 10 % token dropout: measured on the demo, a cosine over 8
  epochs matched the plateau schedule's 10, and the augmentation keeps the validation loss from
  rising once the model starts to memorise outfits (README "Measured"). No random erasing: a box
  can hide the bag or a garment a caption names, and it cost attribute precision.
- ``coco``: seed 003 (keras.io natural-language image search): frozen ImageNet Xception at
  299 px and frozen small BERT (L-4 H-512) from TF Hub, heads of 256 with one residual layer,
  soft-target loss at T = 0.05, AdamW 1e-3 / 1e-3, batch 256.
- ``cuhk-pedes``: seed 000 (Zhang & Lu's CMPM/CMPC person search): ImageNet MobileNet V1
  fine-tuned on 384x128 crops, BiLSTM text tower, CMPM + CMPC.
- ``cuhk-pedes-clip``: IRRA's set-up (Jiang & Ye, CVPR 2023): CLIP ViT-B/16 image and text
  towers fine-tuned with CLIP's own 512-wide projection, SDM at IRRA's fixed temperature 0.02
  plus identity classification (CMPC's, standing in for IRRA's ID loss), AdamW 1e-5 with
  weight decay 4e-5, batch 64, 60 epochs, and IRRA's recipe: the new parts (here the temperature
  and ID classifier) at 5x the towers' rate, 5 epochs of linear warm-up from a tenth of the rate
  then a cosine, and flips, 10-pixel pad-and-crop and random erasing of training images. Unlike
  IRRA: the preset's 224x224 input (IRRA interpolates position embeddings for 384x128), no MLM
  branch, erasing boxes of at most a fifth of the image (IRRA: 0.4).
- ``coco-clip``: CLIP ViT-B/16 fine-tuned with the CLIP loss and its learned temperature
  (from 0.01, CLIP's logit scale 100), learning rate 1e-5, weight decay 0.1, batch 128, and
  open_clip's schedule: linear warm-up from 0 (here over the first epoch), then a cosine to 0.

The CLIP presets name the keras-hub handle ``clip_vit_base_patch16``; offline, pass the
downloaded preset directory with ``--vision-preset DIR --text-preset DIR``.
"""

from __future__ import annotations

from dualenc.core.config import AugmentConfig, ModelConfig, TextConfig, TrainConfig, VisionConfig
from dualenc.core.errors import DualEncError

CLIP_B16 = "clip_vit_base_patch16"

PRESETS = {
    "demo": TrainConfig(
        model=ModelConfig(
            vision=VisionConfig("small_cnn", weights=None, trainable=True, image_size=(64, 32)),
            text=TextConfig(
                tower="bilstm", trainable=True, vocab_size=1000, max_tokens=32, embedding_dim=64, lstm_units=64
            ),
            projection_dim=128,
            projection_layers=1,
            dropout=0.1,
            loss="clip",
            temperature=0.07,
            learn_temperature=True,
        ),
        epochs=7,
        batch_size=64,
        learning_rate=2e-3,
        weight_decay=1e-4,
        monitor="val_t2i_r1",
        schedule="cosine",
        warmup_epochs=1,
        warmup_from=0.1,
        augment=AugmentConfig(flip=True, translate=0.1),
    ),
    "coco": TrainConfig(
        model=ModelConfig(
            vision=VisionConfig("xception", weights="imagenet", trainable=False),
            text=TextConfig(tower="bert", trainable=False),
            projection_dim=256,
            projection_layers=1,
            dropout=0.1,
            loss="soft_target",
            temperature=0.05,
        ),
        epochs=30,
        batch_size=256,
        learning_rate=1e-3,
        weight_decay=1e-3,
    ),
    "cuhk-pedes": TrainConfig(
        model=ModelConfig(
            vision=VisionConfig("mobilenet", weights="imagenet", trainable=True, image_size=(384, 128)),
            text=TextConfig(tower="bilstm", trainable=True, vocab_size=12000, embedding_dim=300, lstm_units=512),
            projection_dim=512,
            projection_layers=1,
            dropout=0.1,
            loss="cmpm+cmpc",
            temperature=0.05,
            # CMPC's classifier is sized from the training split when the data is known.
            num_classes=1,
        ),
        epochs=30,
        batch_size=64,
        learning_rate=2e-4,
        weight_decay=4e-5,
    ),
    "cuhk-pedes-clip": TrainConfig(
        model=ModelConfig(
            vision=VisionConfig("clip", trainable=True, preset=CLIP_B16),
            text=TextConfig(tower="clip", trainable=True, preset=CLIP_B16),
            projection="preset",
            projection_dim=512,
            loss="sdm+cmpc",
            temperature=0.02,
            num_classes=1,
        ),
        epochs=60,
        batch_size=64,
        learning_rate=1e-5,
        weight_decay=4e-5,
        monitor="val_t2i_r1",
        schedule="cosine",
        warmup_epochs=5,
        warmup_from=0.1,
        head_lr_multiplier=5.0,
        # IRRA's 10-pixel pad-and-crop (of 224 here), flip, and random erasing at half the images.
        augment=AugmentConfig(flip=True, translate=0.045, erase=0.5),
    ),
    "coco-clip": TrainConfig(
        model=ModelConfig(
            vision=VisionConfig("clip", trainable=True, preset=CLIP_B16),
            text=TextConfig(tower="clip", trainable=True, preset=CLIP_B16),
            projection="preset",
            projection_dim=512,
            loss="clip",
            temperature=0.01,
            learn_temperature=True,
        ),
        epochs=10,
        batch_size=128,
        learning_rate=1e-5,
        weight_decay=0.1,
        monitor="val_t2i_r1",
        schedule="cosine",
        warmup_epochs=1,
        warmup_from=0.0,
    ),
}


def preset(name: str) -> TrainConfig:
    """The preset called `name`; unknown names list the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise DualEncError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def stored_image_cover(name: str) -> tuple[int, int]:
    """The model input ``(height, width)`` of preset `name`, for a packer that stores images just
    large enough to cover it (`dualenc.data.images.StoreSize`). A keras-hub tower reads its size
    from its own preset, which a packer does not load: those presets are refused in one line."""
    vision = preset(name).model.vision
    if vision.image_size is None:
        raise DualEncError(f"preset {name!r} takes its image size from the keras-hub preset {vision.preset!r}, "
                           "which packing does not read; pack with --max-side S instead")
    return vision.image_size
