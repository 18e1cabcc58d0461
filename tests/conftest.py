"""Fixtures that several test modules share: resources built once per session.

Builders a test calls with its own arguments are plain functions in `tests.support`; TensorFlow
is imported inside the fixtures, so collecting a test module that needs neither stays fast.
"""

from __future__ import annotations

from pathlib import Path

import pytest

# Identities in the packed demo the training tests use: about 80 training pairs.
DEMO_IDENTITIES = 12


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packed synthetic demo with `DEMO_IDENTITIES` identities; tests that damage it copy it first."""
    from tfrecords_tools.demo_cache import packed_demo

    return packed_demo(cache_dir=tmp_path_factory.mktemp("demo-cache"), identities=DEMO_IDENTITIES)


@pytest.fixture(scope="session")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """``(preprocessor_dir, encoder_dir)`` of a tiny TF-Hub-format BERT (see `tests.support.tiny_bert`)."""
    from tests.support.tiny_bert import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny_bert"))


@pytest.fixture(scope="session")
def keras_hub_presets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """{"clip", "siglip", "bert": dir}: tiny random-weight presets saved by keras-hub (`tests.support.keras_hub_presets`)."""
    from tests.support.keras_hub_presets import make_bert_preset, make_clip_preset, make_siglip_preset

    root = tmp_path_factory.mktemp("keras_hub_presets")
    return {
        "clip": make_clip_preset(root / "clip"),
        "siglip": make_siglip_preset(root / "siglip"),
        "bert": make_bert_preset(root / "bert"),
    }
