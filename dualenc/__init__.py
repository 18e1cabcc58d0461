"""dualenc: a dual-encoder (CLIP-style) model library for natural-language image search.

The public API (`dualenc.api`), imported on first use so that ``import dualenc`` and the
command-line tools' argument checks stay fast (TensorFlow loads only when a run is loaded):

- `load(run_dir)` → a `Retriever` with ``encode_text``, ``encode_images``, ``index`` and
  ``search`` (the dicts ``search.py --json`` prints);
- `canonical_image_bytes(data)`: the bytes every dualenc path decodes an image file from.

The library's packages, one concept each: `core`, `data`, `models`, `losses`, `distribute`,
`training`, `export`, `retrieval`, `service`, `beam`.
"""

__version__ = "0.1.0"
__all__ = ["Retriever", "canonical_image_bytes", "load"]

_PUBLIC = {"load": "dualenc.api", "Retriever": "dualenc.api", "canonical_image_bytes": "dualenc.data.images"}


def __getattr__(name: str):
    if name in _PUBLIC:
        import importlib

        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'dualenc' has no attribute {name!r}")
