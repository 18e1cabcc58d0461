"""Towers: one model per modality mapping raw input (pixels or strings) to pooled features."""

from dualenc.models.towers.text import build_text_tower
from dualenc.models.towers.vision import build_vision_tower

__all__ = ["build_text_tower", "build_vision_tower"]
