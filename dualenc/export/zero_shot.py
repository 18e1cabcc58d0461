"""A keras-hub CLIP or SigLIP preset as a ready-to-search run, with no training.

`python search.py --model PRESET` (a keras-hub handle or local preset directory) goes through
`zero_shot_run`: the preset's towers, with its own projection and no heads, are exported once
into ``runs/zero-shot/<name>/`` exactly as `train.py` exports a trained run (vision and text
SavedModels taking raw bytes and strings, plus ``config.json``), and everything `search.py`
does with a run — indexing, searching, ``--evaluate``, ``--serve`` — then works unchanged.
The scores are the preset's as published, so a user sees what fine-tuning adds.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from dualenc.core import config as configs
from dualenc.core.errors import DualEncError
from dualenc.core import jsonfiles

ZERO_SHOT_DIR = "zero-shot"


def looks_like_preset(model: str) -> bool:
    """Whether `--model` names a keras-hub preset rather than a run directory.

    A directory is a preset when its config.json is a serialised keras-hub object; otherwise
    keras-hub handles (``clip_vit_base_patch16``, ``kaggle://…``, ``hf://…``) are presets.
    """
    from dualenc.models.keras_hub_presets import is_handle

    path = Path(model).expanduser()
    if path.is_dir():
        try:
            return "registered_name" in jsonfiles.load_file(path / "config.json", "preset config")
        except (DualEncError, TypeError):
            return False
    return is_handle(model)


def preset_model_config(preset: str) -> configs.ModelConfig:
    """Frozen preset towers with their own projection: the model CLIP or SigLIP ships as."""
    from dualenc.models.keras_hub_presets import preset_family
    from dualenc.models.towers.keras_hub import resolve_model_config

    family = preset_family(preset, "--model")
    if family not in configs.KERAS_HUB_VISION_BACKBONES:
        raise DualEncError(f"--model {preset} holds a {family} model with no image tower; pass a CLIP or SigLIP preset")
    model = configs.ModelConfig(
        vision=configs.VisionConfig(family, preset=preset, trainable=False),
        text=configs.TextConfig(family, preset=preset, trainable=False),
        projection="preset",
        loss=family if family == "siglip" else "clip",
        temperature=configs.SIGLIP_TEMPERATURE if family == "siglip" else 0.01,
    )
    return resolve_model_config(model)


def _run_name(preset: str) -> str:
    """A directory name for `preset`: readable, and distinct for two presets of one basename."""
    path = Path(preset).expanduser()
    identity = str(path.resolve()) if path.is_dir() else preset
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", path.name if path.is_dir() else preset).strip("_.") or "preset"
    return f"{readable}-{hashlib.sha256(identity.encode()).hexdigest()[:8]}"


def zero_shot_run(preset: str, runs_root: Path) -> Path:
    """``runs_root/zero-shot/<name>``: the preset's exported encoders and config, made once."""
    from dualenc.export.encoders import TEXT_ENCODER_DIR, VISION_ENCODER_DIR, export_encoders
    from dualenc.models.model import build_dual_encoder
    from dualenc.models.preprocessing import build_text_preprocessor

    run_dir = Path(runs_root) / ZERO_SHOT_DIR / _run_name(preset)
    config_path = run_dir / "config.json"
    exported = all((run_dir / name / "saved_model.pb").is_file() for name in (VISION_ENCODER_DIR, TEXT_ENCODER_DIR))
    if exported and config_path.is_file():
        return run_dir
    model_config = preset_model_config(preset)
    model = build_dual_encoder(model_config)
    export_encoders(
        run_dir,
        encode_images=model.encode_images,
        encode_texts=model.encode_texts,
        image_size=model_config.vision.image_size,
        text_preprocessor=build_text_preprocessor(model_config.text),
        track_images=[model.vision_tower, model.image_head],
        track_texts=[model.text_tower, model.caption_head],
    )
    # Written last: its presence marks the export complete.
    configs.save(configs.TrainConfig(model=model_config, epochs=0), config_path)
    return run_dir
