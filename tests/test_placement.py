"""Placement: split towers over two devices, mirrored data parallelism, fallback to one device.

Logical devices can be configured only once per process and before any op runs, so the
two-device checks import this module in a subprocess that first configures two logical CPUs;
it prints its measurements as JSON and the tests below assert on them.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from dualenc.core.errors import DualEncError
from dualenc.distribute.placement import make_placement

TIMEOUT_S = 300


def _two_device_measurements() -> dict:
    """Runs in the subprocess, after two logical CPUs are configured."""
    import tempfile

    import keras

    from dualenc.core.config import ModelConfig
    from dualenc.models.model import DualEncoder, build_dual_encoder
    from tests.support.stand_ins import factory_config, matching_batch, stand_in_towers

    results = {}
    labels = np.array([0, 1, 2, 3, 0, 1, 2, 5])  # repeated labels: the same-label rule matters
    batch = matching_batch(labels)

    split = make_placement("split")
    # Towers are created on their device, as build_dual_encoder does, so their weights live there.
    with tf.device(split.vision_device):
        vision_tower, _ = stand_in_towers()
    with tf.device(split.text_device):
        _, text_tower = stand_in_towers()
    model = DualEncoder(ModelConfig(projection_dim=8, dropout=0.0), vision_tower, text_tower, placement=split)
    caption_embeddings, image_embeddings = model(batch)
    results["split"] = {
        "kind": split.kind,
        "caption_device": caption_embeddings.device,
        "image_device": image_embeddings.device,
        "text_weight_devices": sorted({w.value.device for w in model.text_tower.weights + model.caption_head.weights}),
        "vision_weight_devices": sorted({w.value.device for w in model.vision_tower.weights + model.image_head.weights}),
    }
    model.compile(optimizer="sgd")
    results["split"]["fit_loss"] = model.fit(tf.data.Dataset.from_tensors(batch), verbose=0, shuffle=False).history["loss"][0]
    images_spec = tf.TensorSpec([None, 8, 8, 3], tf.float32)
    graph = tf.function(model.encode_images).get_concrete_function(images_spec).graph
    results["split"]["encode_images_op_devices"] = sorted({op.device for op in graph.get_operations()})

    with tempfile.TemporaryDirectory() as directory:
        built = build_dual_encoder(factory_config(Path(directory)), split)
    results["factory_split"] = {
        "text_weight_devices": sorted({w.value.device for w in built.text_tower.weights + built.caption_head.weights}),
        "vision_weight_devices": sorted({w.value.device for w in built.vision_tower.weights + built.image_head.weights}),
    }

    mirrored = make_placement("mirrored", ["/cpu:0", "/cpu:1"])
    results["num_replicas"] = mirrored.num_replicas
    # Batched (not from_tensors) so the strategy splits it: 4 examples per replica.
    data = tf.data.Dataset.from_tensor_slices(batch).batch(len(labels))
    for loss in ("clip", "cmpm+cmpc", "siglip", "sdm+cmpc"):
        config = ModelConfig(projection_dim=8, dropout=0.0, loss=loss, num_classes=6, learn_temperature=loss in ("clip", "siglip"))
        single = DualEncoder(config, *stand_in_towers(seed=3))
        single(batch)
        with mirrored.scope():
            parallel = DualEncoder(config, *stand_in_towers(seed=4), placement=mirrored)
            parallel(batch)
            parallel.compile(optimizer=keras.optimizers.SGD(0.5))
        parallel.set_weights(single.get_weights())
        # The single-device reference runs its step eagerly: tracing a step per loss for it
        # would cost as much as the mirrored runs under test, and computes the same numbers.
        single.compile(optimizer=keras.optimizers.SGD(0.5), run_eagerly=True)
        initial = single.get_weights()
        single_logs = single.fit(data, verbose=0, shuffle=False).history
        parallel_logs = parallel.fit(data, verbose=0, shuffle=False).history
        results[loss] = {
            "single_logs": {name: values[0] for name, values in single_logs.items()},
            "mirrored_logs": {name: values[0] for name, values in parallel_logs.items()},
            "max_weight_change": max(float(np.abs(a - b).max()) for a, b in zip(initial, single.get_weights())),
            # Relative to each weight's size: float32 keeps ~7 digits, and a step can move a bias to ~100.
            "max_weight_difference": max(
                float(np.abs(a - b).max() / max(1.0, np.abs(a).max()))
                for a, b in zip(single.get_weights(), parallel.get_weights())
            ),
            "eval_single": single.evaluate(data, verbose=0, return_dict=True),
            "eval_mirrored": parallel.evaluate(data, verbose=0, return_dict=True),
        }
    results["unknown_device_error"] = ""
    try:
        make_placement("split", ["/cpu:0", "/cpu:7"])
    except DualEncError as error:
        results["unknown_device_error"] = str(error)
    return results


@pytest.fixture(scope="module")
def measured() -> dict:
    script = (
        "import sys, json, tensorflow as tf\n"
        "tf.config.set_logical_device_configuration(tf.config.list_physical_devices('CPU')[0], "
        "[tf.config.LogicalDeviceConfiguration()] * 2)\n"
        f"sys.path.insert(0, {str(Path(__file__).parents[1])!r})\n"
        "from tests import test_placement\n"
        "print('RESULTS ' + json.dumps(test_placement._two_device_measurements()))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""},
    )
    assert done.returncode == 0, done.stderr[-4000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("RESULTS "))
    return json.loads(line[len("RESULTS "):])


@pytest.mark.slow
def test_split_runs_each_tower_and_head_on_its_own_device(measured):
    split = measured["split"]
    assert split["kind"] == "split"
    assert split["caption_device"].endswith("CPU:0") and split["image_device"].endswith("CPU:1")
    assert split["text_weight_devices"] and all(device.endswith("CPU:0") for device in split["text_weight_devices"])
    assert split["vision_weight_devices"] and all(device.endswith("CPU:1") for device in split["vision_weight_devices"])
    assert np.isfinite(split["fit_loss"])


@pytest.mark.slow
def test_factory_creates_each_tower_on_its_device(measured):
    placed = measured["factory_split"]
    assert placed["text_weight_devices"] and all(device.endswith("CPU:0") for device in placed["text_weight_devices"])
    assert placed["vision_weight_devices"] and all(device.endswith("CPU:1") for device in placed["vision_weight_devices"])


@pytest.mark.slow
def test_exported_encoder_graph_carries_no_device_strings(measured):
    assert measured["split"]["encode_images_op_devices"] == [""]


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["clip", "cmpm+cmpc", "siglip", "sdm+cmpc"])
def test_mirrored_step_matches_single_device_on_the_global_batch(measured, loss):
    assert measured["num_replicas"] == 2
    result = measured[loss]
    for logs in ("single_logs", "mirrored_logs", "eval_single", "eval_mirrored"):
        assert set(result[logs]) == {"loss", "r1_t2i", "r1_i2t"}
    for name in ("loss", "r1_t2i", "r1_i2t"):
        assert result["mirrored_logs"][name] == pytest.approx(result["single_logs"][name], rel=1e-5)
        assert result["eval_mirrored"][name] == pytest.approx(result["eval_single"][name], rel=1e-5)
    # The step moved the weights, and both runs moved them the same way.
    assert result["max_weight_change"] > 1e-3
    assert result["max_weight_difference"] < 1e-5


@pytest.mark.slow
def test_unknown_device_is_a_one_line_error(measured):
    message = measured["unknown_device_error"]
    assert "'/cpu:7'" in message and "CPU:1" in message and "\n" not in message


def test_one_device_falls_back_to_single_with_a_warning():
    if len(tf.config.list_logical_devices("GPU")) >= 2 or len(tf.config.list_logical_devices("CPU")) >= 2:
        pytest.skip("this process sees two devices")
    for kind in ("split", "mirrored"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            placement = make_placement(kind)
        assert placement.kind == "single" and placement.strategy is None and placement.text_device is None
        assert len(caught) == 1 and kind in str(caught[0].message) and "single" in str(caught[0].message)
        with placement.scope():
            assert tf.reduce_sum(tf.ones(3)).numpy() == 3


def test_bad_kind_is_a_one_line_error():
    with pytest.raises(DualEncError, match="unknown placement 'ring'.*mirrored"):
        make_placement("ring")
    with pytest.raises(DualEncError, match="needs two devices"):
        make_placement("split", ["/cpu:0"])
