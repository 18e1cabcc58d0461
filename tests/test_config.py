"""Config dataclasses: defaults, validation messages and the JSON round-trip."""

import dataclasses
import json

import pytest

from dualenc import config
from dualenc.errors import DualEncError


def test_defaults_fill_image_size_from_backbone():
    assert config.VisionConfig("xception").image_size == (299, 299)
    assert config.VisionConfig("small_cnn").image_size == (128, 64)
    assert config.VisionConfig("resnet50", image_size=[96, 80]).image_size == (96, 80)


@pytest.mark.parametrize(
    "build, words",
    [
        (lambda: config.VisionConfig("vgg"), ["vision backbone", "'vgg'", "xception"]),
        (lambda: config.TextConfig(tower="gpt"), ["text tower", "bilstm", "bert"]),
        (lambda: config.ModelConfig(loss="triplet"), ["loss", "soft_target", "cmpm+cmpc"]),
        (lambda: config.ModelConfig(loss="cmpc"), ["num_classes"]),
        (lambda: config.TrainConfig(placement="ring"), ["placement", "mirrored"]),
        (lambda: config.TrainConfig(batch_size=0), ["batch_size", "> 0"]),
    ],
)
def test_bad_values_name_the_field_and_the_choices(build, words):
    with pytest.raises(DualEncError) as info:
        build()
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


def test_json_round_trip(tmp_path):
    original = config.TrainConfig(
        model=config.ModelConfig(
            vision=config.VisionConfig("mobilenet", weights="imagenet", trainable=False),
            text=config.TextConfig(tower="bert", trainable=False),
            loss="cmpm+cmpc",
            num_classes=11,
        ),
        data="/data/cuhk",
        epochs=3,
    )
    path = tmp_path / "config.json"
    config.save(original, path)
    assert config.load(config.TrainConfig, path) == original
    assert not list(tmp_path.glob("*.tmp"))


def test_replace_revalidates():
    with pytest.raises(DualEncError):
        dataclasses.replace(config.ModelConfig(), temperature=0.0)


def test_load_reports_file_problems(tmp_path):
    with pytest.raises(DualEncError, match="does not exist"):
        config.load(config.TrainConfig, tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(DualEncError, match="bad.json is not valid JSON"):
        config.load(config.TrainConfig, bad)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps({"epochs": 2, "model": {"lr": 1}}))
    with pytest.raises(DualEncError, match=r"unknown.json.model: unknown field\(s\) lr"):
        config.load(config.TrainConfig, unknown)
