"""Config dataclasses: defaults, validation messages and the JSON round-trip."""

import dataclasses
import json

import pytest

from dualenc.core import config
from dualenc.core.errors import DualEncError


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


@pytest.mark.parametrize(
    "values, message",
    [
        ({"epochs": "3"}, 'src.json: epochs must be an integer, got "3"'),
        ({"seed": 1.0}, "src.json: seed must be an integer, got 1.0"),
        ({"mixed_precision": 1}, "src.json: mixed_precision must be true or false, got 1"),
        ({"data": ["a"]}, 'src.json: data must be a string or null, got ["a"]'),
        ({"model": {"vision": {"image_size": [64, 64, 64]}}},
         "src.json: model.vision.image_size must be a list of 2 integers or null, got [64, 64, 64]"),
        ({"model": {"text": {"trainable": "no"}}}, 'src.json: model.text.trainable must be true or false, got "no"'),
        ({"model": 5}, "src.json.model: expected a JSON object, got int"),
        ({"epochs": -1}, "src.json: epochs must be >= 0, got -1"),
    ],
)
def test_from_dict_names_the_field_and_the_type_wanted(values, message):
    with pytest.raises(DualEncError) as info:
        config.from_dict(config.TrainConfig, values, "src.json")
    assert str(info.value) == message


def test_from_dict_takes_integers_for_numbers():
    loaded = config.from_dict(config.TrainConfig, {"learning_rate": 1, "model": {"temperature": 1}})
    assert loaded.learning_rate == 1.0 and isinstance(loaded.learning_rate, float)
    assert isinstance(loaded.model.temperature, float)


def test_seed_range_and_imagenet_small_cnn():
    assert config.TrainConfig(seed=config.MAX_SEED).seed == 2**32 - 1
    for seed in (-1, 2**32):
        with pytest.raises(DualEncError, match=r"seed must be an integer in \[0, 4294967295\]"):
            config.TrainConfig(seed=seed)
    with pytest.raises(DualEncError, match="'small_cnn' has no ImageNet weights"):
        config.VisionConfig("small_cnn", weights="imagenet")
    assert config.VisionConfig("resnet50", weights="imagenet").weights == "imagenet"
