"""Named starting points for a training run; command-line flags override any field.

- ``demo``: a small CNN and a WordPiece BiLSTM trained from scratch on the synthetic
  pedestrians, sized for a 2-core CPU. CLIP's InfoNCE with a learned temperature: from
  random towers the soft-target loss's targets (built from the embeddings themselves) start
  near uniform and teach little, so it is kept for pretrained towers. Early stopping follows
  text->image R@1, which keeps rising for epochs after the validation loss flattens. 10 epochs
  over the demo's 4,000 people: on its attribute queries, that beats 30 epochs over 1,000 people
  in less time (`tfrecords_tools.demo.DEFAULT_IDENTITIES`).
- ``coco``: seed 003 (keras.io natural-language image search): frozen ImageNet Xception at
  299 px and frozen small BERT (L-4 H-512) from TF Hub, heads of 256 with one residual layer,
  soft-target loss at T = 0.05, AdamW 1e-3 / 1e-3, batch 256.
- ``cuhk-pedes``: seed 000 (Zhang & Lu's CMPM/CMPC person search): ImageNet MobileNet V1
  fine-tuned on 384x128 crops, BiLSTM text tower, CMPM + CMPC.
- ``cuhk-pedes-clip``: IRRA's set-up (Jiang & Ye, CVPR 2023): CLIP ViT-B/16 image and text
  towers fine-tuned with CLIP's own 512-wide projection, SDM at IRRA's fixed temperature 0.02
  plus identity classification (CMPC's, standing in for IRRA's ID loss), Adam-style 1e-5 with
  weight decay 4e-5, batch 64, 60 epochs. Unlike IRRA: the preset's 224x224 input (IRRA
  interpolates position embeddings for 384x128), one learning rate, no MLM branch.
- ``coco-clip``: CLIP ViT-B/16 fine-tuned with the CLIP loss and its learned temperature
  (from 0.01, CLIP's logit scale 100), learning rate 1e-5, weight decay 0.1, batch 128.

The CLIP presets name the keras-hub handle ``clip_vit_base_patch16``; offline, pass the
downloaded preset directory with ``--vision-preset DIR --text-preset DIR``.
"""

from __future__ import annotations

from dualenc.core.config import ModelConfig, TextConfig, TrainConfig, VisionConfig
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
        epochs=10,
        batch_size=64,
        learning_rate=2e-3,
        weight_decay=1e-4,
        monitor="val_t2i_r1",
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
    ),
}


def preset(name: str) -> TrainConfig:
    """The preset called `name`; unknown names list the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise DualEncError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None
