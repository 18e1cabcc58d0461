"""The SigLIP and SDM losses inside `DualEncoder`: the bias weight, training steps, names.

Stand-in towers (`tests.support.stand_ins`) keep these seconds-long and independent of the
real towers; the loss values themselves are checked against NumPy in test_losses.py.
"""

import dataclasses

import keras
import numpy as np
import pytest
import tensorflow as tf

from dualenc import losses
from dualenc.core.config import ModelConfig
from dualenc.models.model import DualEncoder
from tests.support.stand_ins import NUM_CLASSES, matching_batch, stand_in_towers


def make_model(**overrides) -> DualEncoder:
    config = dataclasses.replace(ModelConfig(projection_dim=8, projection_layers=1, dropout=0.0), **overrides)
    model = DualEncoder(config, *stand_in_towers(0))
    model(matching_batch(np.arange(4)))
    return model


def batches(count: int) -> tf.data.Dataset:
    """`count` batches of every class once (labels 0..NUM_CLASSES-1)."""
    return tf.data.Dataset.from_tensor_slices(matching_batch(np.arange(NUM_CLASSES))).batch(NUM_CLASSES).repeat(count)


def test_siglip_model_learns_its_bias_from_minus_ten_without_weight_decay():
    model = make_model(loss="siglip", temperature=losses.SIGLIP_TEMPERATURE, learn_temperature=True)
    assert model.logit_bias.numpy() == pytest.approx(-10.0)
    assert model.temperature.numpy() == pytest.approx(0.1, rel=1e-6)
    assert make_model(loss="clip").logit_bias is None
    model.compile(optimizer=keras.optimizers.AdamW(0.1, weight_decay=0.5))
    inner = model.optimizer
    assert inner._use_weight_decay(model.image_head.weights[0])
    assert not inner._use_weight_decay(model.logit_bias)
    history = model.fit(batches(3), epochs=2, verbose=0, shuffle=False)
    assert np.all(np.isfinite(history.history["loss"]))
    # B positives against B² − B negatives started at b = -10: the bias must rise.
    assert model.logit_bias.numpy() > -10.0


@pytest.mark.parametrize("name", ["sdm", "sdm+cmpc"])
def test_sdm_losses_train_with_identity_labels(name):
    model = make_model(loss=name, num_classes=NUM_CLASSES, temperature=0.02)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    history = model.fit(batches(2), epochs=1, verbose=0, shuffle=False)
    assert np.isfinite(history.history["loss"][0])
    assert (model.class_weights is not None) == (name == "sdm+cmpc")


def test_train_flags_accept_the_new_loss_names():
    import train

    siglip = train.build_config(train.parse_args(["--loss", "siglip"])).model
    assert (siglip.loss, siglip.temperature, siglip.learn_temperature) == ("siglip", losses.SIGLIP_TEMPERATURE, True)
    assert train.build_config(train.parse_args(["--loss", "siglip", "--temperature", "0.5"])).model.temperature == 0.5
    combined = train.build_config(train.parse_args(["--loss", "sdm+cmpc"])).model
    assert combined.loss == "sdm+cmpc" and combined.num_classes >= 1
