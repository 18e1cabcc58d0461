"""keras-hub presets by name: a handle to download or a local directory, and which family
("clip", "siglip", "bert") it holds, each failure one actionable line.

Shared by the keras-hub towers and the text preprocessors (which read the same preset's
tokenizer), so neither imports the other.
"""

from __future__ import annotations

from pathlib import Path

from dualenc.core.errors import DualEncError, first_line
from dualenc.core import jsonfiles

# The keras-hub backbone class each family's presets hold.
BACKBONE_CLASSES = {"clip": "CLIPBackbone", "siglip": "SigLIPBackbone", "bert": "BertBackbone"}
PRESET_CONFIG = "config.json"


def is_handle(preset: str) -> bool:
    """Whether `preset` is a keras-hub handle to download: ``scheme://…`` or a built-in preset
    name (``clip_vit_base_patch16``) with no local path of that name."""
    from keras_hub.src.utils.preset_utils import BUILTIN_PRESETS

    if Path(preset).expanduser().exists():
        return False
    return "://" in preset or preset in BUILTIN_PRESETS


def _is_local(preset: str) -> bool:
    return not is_handle(preset)


def keras_hub_preset(preset: str) -> str:
    """What to hand keras-hub: a local directory as an absolute path, so that a directory named
    like a built-in preset (``clip_vit_base_patch16``) is read, not downloaded."""
    return str(Path(preset).expanduser().resolve()) if _is_local(preset) else preset


def flag(modality: str) -> str:
    """The command-line option a `modality` ("vision"/"text") preset comes from."""
    return f"--{modality}-preset"


def preset_family(preset: str, flag: str) -> str:
    """"clip", "siglip" or "bert": which backbone the preset holds (downloads its config if a handle).

    `flag` names the option the preset came from, for the error messages.
    """
    from keras_hub.src.utils.preset_utils import check_config_class, get_preset_loader

    if _is_local(preset):
        directory = Path(preset).expanduser()
        if not directory.is_dir():
            raise DualEncError(f"{flag} {preset}: no such directory; pass a keras-hub preset directory or handle")
        try:
            backbone_class = check_config_class(jsonfiles.load_file(directory / PRESET_CONFIG, "preset config")).__name__
        except (DualEncError, ValueError, KeyError, TypeError):  # missing, not JSON, or not a serialised keras-hub object
            raise DualEncError(
                f"{flag} {preset} is not a keras-hub preset directory (no {PRESET_CONFIG} of a keras-hub backbone); "
                "save one with keras-hub's save_to_preset (see README, 'Starting from CLIP or SigLIP')"
            ) from None
    else:
        try:
            backbone_class = get_preset_loader(preset).check_backbone_class().__name__
        except Exception as exc:  # requests, kagglehub, huggingface_hub and keras-hub errors all mean "not reachable"
            raise DualEncError(
                f"cannot reach keras-hub preset {preset!r} ({type(exc).__name__}: {first_line(exc)[:80]}); copy the "
                f"preset directory from a machine with network (see README, 'Starting from CLIP or SigLIP') and pass {flag} DIR"
            ) from None
    for family, name in BACKBONE_CLASSES.items():
        if name == backbone_class:
            return family
    raise DualEncError(f"{flag} {preset} holds a {backbone_class}; dualenc takes CLIP, SigLIP or BERT presets")
