"""dualenc: a dual-encoder (CLIP-style) model library for natural-language image search."""

__version__ = "0.1.0"
