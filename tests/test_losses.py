"""Each loss against an independent float64 NumPy reference, plus stability and selection."""

import numpy as np
import pytest
import tensorflow as tf

from dualenc.core import config

from dualenc import losses
from dualenc.core.errors import DualEncError

RTOL = 1e-5


def _log_softmax(scores: np.ndarray) -> np.ndarray:
    shifted = scores - scores.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def reference_soft_target(captions, images, temperature):
    logits = captions @ images.T / temperature
    target_scores = (captions @ captions.T + images @ images.T) / 2 / temperature
    targets = np.exp(_log_softmax(target_scores))
    caption_loss = -(targets * _log_softmax(logits)).sum(axis=1)
    image_loss = -(targets.T * _log_softmax(logits.T)).sum(axis=1)
    return np.mean((caption_loss + image_loss) / 2)


def reference_clip(captions, images, temperature):
    logits = _unit(captions) @ _unit(images).T / temperature
    diagonal = np.arange(len(logits))
    caption_loss = -_log_softmax(logits)[diagonal, diagonal].mean()
    image_loss = -_log_softmax(logits.T)[diagonal, diagonal].mean()
    return (caption_loss + image_loss) / 2


def reference_cmpm(images, texts, labels, epsilon=1e-8, label_norm="l1"):
    batch = len(labels)
    mask = np.zeros((batch, batch))
    for row in range(batch):
        for column in range(batch):
            mask[row, column] = float(labels[row] == labels[column])
    if label_norm == "l1":
        target = mask / mask.sum(axis=1, keepdims=True)
    else:
        target = mask / np.sqrt((mask**2).sum(axis=1, keepdims=True))
    total = 0.0
    for scores in (images @ _unit(texts).T, texts @ _unit(images).T):
        log_predicted = _log_softmax(scores)
        total += np.mean((np.exp(log_predicted) * (log_predicted - np.log(target + epsilon))).sum(axis=1))
    return total


def reference_cmpc(images, texts, labels, weights):
    normalised_weights = weights / np.linalg.norm(weights, axis=0, keepdims=True)
    total = 0.0
    for source, other in ((images, texts), (texts, images)):
        unit_other = _unit(other)
        projection = np.array([np.dot(source[row], unit_other[row]) * unit_other[row] for row in range(len(source))])
        log_probabilities = _log_softmax(projection @ normalised_weights)
        total += -np.mean(log_probabilities[np.arange(len(labels)), labels])
    return total


def reference_identity_constraint(embeddings, labels):
    distances, pairs = 0.0, 0
    for first in range(len(labels)):
        for second in range(len(labels)):
            if first != second and labels[first] == labels[second]:
                distances += np.sum((embeddings[first] - embeddings[second]) ** 2)
                pairs += 1
    return distances / pairs if pairs else 0.0


def _match(labels, batch):
    if labels is None:
        return np.eye(batch)
    return np.array([[float(labels[row] == labels[column]) for column in range(batch)] for row in range(batch)])


def reference_siglip(captions, images, temperature, bias, labels=None):
    batch = len(captions)
    logits = _unit(captions) @ _unit(images).T / temperature + bias
    signs = np.where(_match(labels, batch) > 0, 1.0, -1.0)
    # log σ(x) = −log(1 + e^(−x)), written with logaddexp so large |x| stays finite
    return -np.sum(-np.logaddexp(0.0, -signs * logits)) / batch


def reference_sdm(images, texts, temperature, labels=None, epsilon=1e-8):
    batch = len(images)
    match = _match(labels, batch)
    target = match / match.sum(axis=1, keepdims=True)
    cosines = _unit(texts) @ _unit(images).T
    total = 0.0
    for scores in (cosines / temperature, cosines.T / temperature):
        log_predicted = _log_softmax(scores)
        total += np.mean((np.exp(log_predicted) * (log_predicted - np.log(target + epsilon))).sum(axis=1))
    return total


def _embeddings(rng, batch, dim=8, scale=1.0, normalised=False):
    rows = rng.normal(size=(batch, dim)) * scale
    return _unit(rows) if normalised else rows


LABEL_CASES = {
    "repeated": np.array([3, 1, 3, 0, 1, 3, 2]),
    "unique": np.arange(7) * 2,
    "single": np.array([5]),
}


@pytest.mark.parametrize("batch", [1, 6])
@pytest.mark.parametrize("temperature", [0.05, 1.0])
def test_soft_target_matches_reference(batch, temperature):
    rng = np.random.default_rng(batch)
    captions = _embeddings(rng, batch, normalised=True)
    images = _embeddings(rng, batch, normalised=True)
    got = losses.soft_target_contrastive_loss(captions, images, temperature)
    assert got.dtype == tf.float64
    np.testing.assert_allclose(got.numpy(), reference_soft_target(captions, images, temperature), rtol=RTOL)


def test_soft_target_float32_close_to_float64_reference():
    rng = np.random.default_rng(1)
    captions = _embeddings(rng, 5, normalised=True)
    images = _embeddings(rng, 5, normalised=True)
    got = losses.soft_target_contrastive_loss(captions.astype(np.float32), images.astype(np.float32), 0.05)
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), reference_soft_target(captions, images, 0.05), rtol=1e-4)


@pytest.mark.parametrize("batch", [1, 6])
def test_clip_matches_reference_on_raw_embeddings(batch):
    rng = np.random.default_rng(10 + batch)
    captions = _embeddings(rng, batch, scale=3.0)
    images = _embeddings(rng, batch, scale=0.2)
    got = losses.clip_contrastive_loss(captions, images, 0.07)
    np.testing.assert_allclose(got.numpy(), reference_clip(captions, images, 0.07), rtol=RTOL)


def test_clip_accepts_trainable_temperature_and_differentiates_it():
    rng = np.random.default_rng(2)
    captions = _embeddings(rng, 4).astype(np.float32)
    images = _embeddings(rng, 4).astype(np.float32)
    temperature = tf.Variable(0.1, dtype=tf.float32)
    with tf.GradientTape() as tape:
        loss = losses.clip_contrastive_loss(captions, images, temperature)
    gradient = tape.gradient(loss, temperature)
    np.testing.assert_allclose(loss.numpy(), reference_clip(captions.astype(np.float64), images.astype(np.float64), 0.1), rtol=1e-4)
    assert gradient is not None and np.isfinite(gradient.numpy()) and gradient.numpy() != 0


@pytest.mark.parametrize("label_case", sorted(LABEL_CASES))
@pytest.mark.parametrize("label_norm", ["l1", "l2"])
def test_cmpm_matches_reference(label_case, label_norm):
    labels = LABEL_CASES[label_case]
    rng = np.random.default_rng(len(labels))
    images = _embeddings(rng, len(labels), scale=2.0)
    texts = _embeddings(rng, len(labels), scale=2.0)
    got = losses.cmpm_loss(images, texts, labels, label_norm=label_norm)
    np.testing.assert_allclose(got.numpy(), reference_cmpm(images, texts, labels, label_norm=label_norm), rtol=RTOL)


def test_cmpm_label_norms_differ_only_when_an_identity_repeats():
    rng = np.random.default_rng(3)
    images = _embeddings(rng, 7)
    texts = _embeddings(rng, 7)
    repeated = LABEL_CASES["repeated"]
    unique = LABEL_CASES["unique"]
    l1_repeated = losses.cmpm_loss(images, texts, repeated, label_norm="l1").numpy()
    l2_repeated = losses.cmpm_loss(images, texts, repeated, label_norm="l2").numpy()
    assert abs(l1_repeated - l2_repeated) > 1e-3
    np.testing.assert_allclose(
        losses.cmpm_loss(images, texts, unique, label_norm="l1").numpy(),
        losses.cmpm_loss(images, texts, unique, label_norm="l2").numpy(),
        rtol=1e-12,
    )


def test_cmpm_rejects_unknown_label_norm():
    with pytest.raises(ValueError, match="l1, l2"):
        losses.cmpm_loss(np.ones((2, 3)), np.ones((2, 3)), [0, 1], label_norm="max")


@pytest.mark.parametrize("label_case", sorted(LABEL_CASES))
def test_cmpc_matches_reference(label_case):
    labels = LABEL_CASES[label_case]
    rng = np.random.default_rng(20 + len(labels))
    images = _embeddings(rng, len(labels), scale=2.0)
    texts = _embeddings(rng, len(labels), scale=0.5)
    weights = rng.normal(size=(8, labels.max() + 3))
    got = losses.cmpc_loss(images, texts, labels, weights)
    np.testing.assert_allclose(got.numpy(), reference_cmpc(images, texts, labels, weights), rtol=RTOL)


def test_cmpc_leaves_out_identities_it_has_no_class_for():
    """Validation and test identities lie outside the training classes: no term, no crash."""
    labels = np.array([0, 2, 5, 1, 7])
    rng = np.random.default_rng(24)
    images = _embeddings(rng, len(labels), scale=2.0)
    texts = _embeddings(rng, len(labels), scale=0.5)
    weights = rng.normal(size=(8, 3))
    known = labels < 3
    got = losses.cmpc_loss(images, texts, labels, weights)
    np.testing.assert_allclose(got.numpy(), reference_cmpc(images[known], texts[known], labels[known], weights), rtol=RTOL)
    assert losses.cmpc_loss(images, texts, labels + 10, weights).numpy() == 0.0


@pytest.mark.parametrize("label_case", sorted(LABEL_CASES) + [None])
@pytest.mark.parametrize("temperature, bias", [(losses.SIGLIP_TEMPERATURE, losses.SIGLIP_BIAS), (0.5, 1.5)])
def test_siglip_matches_reference(label_case, temperature, bias):
    labels = None if label_case is None else LABEL_CASES[label_case]
    rng = np.random.default_rng(40 + (0 if labels is None else len(labels)))
    batch = 5 if labels is None else len(labels)
    captions = _embeddings(rng, batch, scale=2.0)
    images = _embeddings(rng, batch, scale=0.3)
    got = losses.siglip_loss(captions, images, temperature, bias, labels)
    assert got.dtype == tf.float64
    np.testing.assert_allclose(got.numpy(), reference_siglip(captions, images, temperature, bias, labels), rtol=RTOL)


def test_siglip_differentiates_temperature_and_bias():
    rng = np.random.default_rng(41)
    captions = _embeddings(rng, 4).astype(np.float32)
    images = _embeddings(rng, 4).astype(np.float32)
    temperature = tf.Variable(losses.SIGLIP_TEMPERATURE, dtype=tf.float32)
    bias = tf.Variable(losses.SIGLIP_BIAS, dtype=tf.float32)
    with tf.GradientTape() as tape:
        loss = losses.siglip_loss(captions, images, temperature, bias)
    gradients = tape.gradient(loss, [temperature, bias])
    assert all(gradient is not None and gradient.numpy() != 0 for gradient in gradients)
    # At b = -10 every pair starts near "no match": the bias is pushed up by the B positives.
    assert gradients[1].numpy() < 0


@pytest.mark.parametrize("label_case", sorted(LABEL_CASES) + [None])
@pytest.mark.parametrize("temperature", [0.02, 1.0])
def test_sdm_matches_reference(label_case, temperature):
    labels = None if label_case is None else LABEL_CASES[label_case]
    rng = np.random.default_rng(50 + (0 if labels is None else len(labels)))
    batch = 5 if labels is None else len(labels)
    images = _embeddings(rng, batch, scale=3.0)
    texts = _embeddings(rng, batch, scale=0.5)
    got = losses.sdm_loss(images, texts, temperature, labels)
    np.testing.assert_allclose(got.numpy(), reference_sdm(images, texts, temperature, labels), rtol=RTOL)


def test_sdm_is_near_zero_when_similarities_match_identities():
    labels = LABEL_CASES["repeated"]
    one_hot = np.eye(4)[labels]
    assert losses.sdm_loss(one_hot, one_hot, 0.01, labels).numpy() < 1e-6


@pytest.mark.parametrize("label_case", sorted(LABEL_CASES))
def test_identity_constraint_matches_reference(label_case):
    labels = LABEL_CASES[label_case]
    rng = np.random.default_rng(30 + len(labels))
    embeddings = _embeddings(rng, len(labels), scale=3.0)
    got = losses.identity_constraint_loss(embeddings, labels)
    np.testing.assert_allclose(got.numpy(), reference_identity_constraint(embeddings, labels), rtol=RTOL)


def test_identity_constraint_is_zero_with_unique_labels_and_has_finite_gradient():
    embeddings = tf.constant(np.random.default_rng(4).normal(size=(5, 3)), tf.float32)
    with tf.GradientTape() as tape:
        tape.watch(embeddings)
        loss = losses.identity_constraint_loss(embeddings, np.arange(5))
    gradient = tape.gradient(loss, embeddings)
    assert loss.numpy() == 0.0
    assert np.all(np.isfinite(gradient.numpy()))


def test_identity_constraint_is_positive_when_an_identity_repeats():
    embeddings = np.random.default_rng(5).normal(size=(4, 3))
    assert losses.identity_constraint_loss(embeddings, [0, 1, 0, 2]).numpy() > 0


LARGE_LOGIT_CASES = {
    "soft_target_small_temperature": (
        lambda images, texts, labels, weights: losses.soft_target_contrastive_loss(_unit(texts), _unit(images), 1e-3),
        lambda images, texts, labels, weights: reference_soft_target(_unit(texts), _unit(images), 1e-3),
    ),
    "clip_small_temperature": (
        lambda images, texts, labels, weights: losses.clip_contrastive_loss(texts, images, 1e-3),
        lambda images, texts, labels, weights: reference_clip(texts, images, 1e-3),
    ),
    "cmpm_scaled_x50": (
        lambda images, texts, labels, weights: losses.cmpm_loss(50 * images, 50 * texts, labels),
        lambda images, texts, labels, weights: reference_cmpm(50 * images, 50 * texts, labels),
    ),
    "siglip_small_temperature": (
        lambda images, texts, labels, weights: losses.siglip_loss(texts, images, 1e-3, -10.0, labels),
        lambda images, texts, labels, weights: reference_siglip(texts, images, 1e-3, -10.0, labels),
    ),
    "sdm_small_temperature": (
        lambda images, texts, labels, weights: losses.sdm_loss(images, texts, 1e-3, labels),
        lambda images, texts, labels, weights: reference_sdm(images, texts, 1e-3, labels),
    ),
    "cmpc_scaled_x50": (
        lambda images, texts, labels, weights: losses.cmpc_loss(50 * images, 50 * texts, labels, weights),
        lambda images, texts, labels, weights: reference_cmpc(50 * images, 50 * texts, labels, weights),
    ),
}


@pytest.mark.parametrize("case", sorted(LARGE_LOGIT_CASES))
def test_large_logits_stay_finite_and_match_reference(case):
    loss_fn, reference_fn = LARGE_LOGIT_CASES[case]
    rng = np.random.default_rng(6)
    labels = LABEL_CASES["repeated"]
    images = _embeddings(rng, len(labels))
    texts = _embeddings(rng, len(labels))
    weights = rng.normal(size=(8, 4))
    expected = reference_fn(images, texts, labels, weights)
    got = loss_fn(images, texts, labels, weights).numpy()
    assert np.isfinite(expected) and np.isfinite(got)
    np.testing.assert_allclose(got, expected, rtol=RTOL)
    got32 = loss_fn(images.astype(np.float32), texts.astype(np.float32), labels, weights.astype(np.float32)).numpy()
    assert np.isfinite(got32)


@pytest.mark.parametrize("name", losses.LOSS_NAMES)
@pytest.mark.parametrize("scale", [1.0, 50.0])
@pytest.mark.parametrize("batch", [1, 6])
def test_gradients_are_finite(name, scale, batch):
    rng = np.random.default_rng(7)
    images = tf.Variable(_embeddings(rng, batch, scale=scale).astype(np.float32))
    captions = tf.Variable(_embeddings(rng, batch, scale=scale).astype(np.float32))
    class_weights = tf.Variable(rng.normal(size=(8, 3)).astype(np.float32))
    labels = np.array([0, 2, 0, 1, 2, 0])[:batch]
    with tf.GradientTape() as tape:
        loss = losses.dual_encoder_loss(
            name,
            image_embeddings=images,
            caption_embeddings=captions,
            labels=labels,
            temperature=1e-3 if scale == 1.0 else 0.05,
            class_weights=class_weights,
            bias=losses.SIGLIP_BIAS,
        )
    variables = [images, captions] + ([class_weights] if losses.needs_class_weights(name) else [])
    gradients = tape.gradient(loss, variables)
    assert np.isfinite(loss.numpy())
    for gradient in gradients:
        assert gradient is not None and np.all(np.isfinite(gradient.numpy()))


def test_loss_names_match_config():
    assert losses.LOSS_NAMES == config.LOSSES


def test_dual_encoder_loss_dispatches_to_each_loss():
    rng = np.random.default_rng(8)
    images = _embeddings(rng, 6)
    captions = _embeddings(rng, 6)
    labels = np.array([0, 1, 0, 2, 1, 0])
    class_weights = rng.normal(size=(8, 3))
    arguments = dict(
        image_embeddings=images, caption_embeddings=captions, labels=labels, temperature=0.1, class_weights=class_weights, bias=-2.0
    )
    expected = {
        "soft_target": reference_soft_target(captions, images, 0.1),
        "clip": reference_clip(captions, images, 0.1),
        "cmpm": reference_cmpm(images, captions, labels),
        "cmpc": reference_cmpc(images, captions, labels, class_weights),
        "cmpm+cmpc": reference_cmpm(images, captions, labels) + reference_cmpc(images, captions, labels, class_weights),
        "siglip": reference_siglip(captions, images, 0.1, -2.0, labels),
        "sdm": reference_sdm(images, captions, 0.1, labels),
        "sdm+cmpc": reference_sdm(images, captions, 0.1, labels) + reference_cmpc(images, captions, labels, class_weights),
    }
    for name in losses.LOSS_NAMES:
        np.testing.assert_allclose(losses.dual_encoder_loss(name, **arguments).numpy(), expected[name], rtol=RTOL)


def test_needs_flags():
    flags = {name: (losses.needs_labels(name), losses.needs_class_weights(name), losses.needs_bias(name)) for name in losses.LOSS_NAMES}
    assert flags == {
        "soft_target": (False, False, False),
        "clip": (False, False, False),
        "cmpm": (True, False, False),
        "cmpc": (True, True, False),
        "cmpm+cmpc": (True, True, False),
        "siglip": (False, False, True),
        "sdm": (True, False, False),
        "sdm+cmpc": (True, True, False),
    }


def test_unknown_loss_name_is_a_one_line_error_listing_choices():
    for call in (
        lambda: losses.dual_encoder_loss("triplet", image_embeddings=np.ones((2, 2)), caption_embeddings=np.ones((2, 2))),
        lambda: losses.needs_labels("triplet"),
        lambda: losses.needs_class_weights("triplet"),
    ):
        with pytest.raises(DualEncError, match="soft_target, clip, cmpm, cmpc, cmpm\\+cmpc") as raised:
            call()
        assert "\n" not in str(raised.value)


@pytest.mark.parametrize(
    "name, missing",
    [("clip", "temperature"), ("cmpm", "labels"), ("cmpc", "class_weights"), ("siglip", "bias"), ("sdm", "temperature")],
)
def test_missing_argument_is_a_clear_error(name, missing):
    arguments = dict(
        image_embeddings=np.ones((2, 2)), caption_embeddings=np.ones((2, 2)), labels=[0, 1], temperature=0.1,
        class_weights=np.ones((2, 2)), bias=-10.0,
    )
    arguments[missing] = None
    with pytest.raises(DualEncError, match=name):
        losses.dual_encoder_loss(name, **arguments)


@pytest.mark.parametrize("name", losses.LOSS_NAMES + ("identity_constraint",))
def test_losses_compile_under_xla_and_match_eager(name):
    """Keras may jit-compile the train step, so every loss must trace with fixed shapes."""
    rng = np.random.default_rng(9)
    images = rng.normal(size=(6, 8)).astype(np.float32)
    captions = rng.normal(size=(6, 8)).astype(np.float32)
    labels = np.array([0, 2, 0, 1, 2, 0])
    class_weights = rng.normal(size=(8, 3)).astype(np.float32)

    def objective(images, captions, labels, class_weights):
        if name == "identity_constraint":
            return losses.identity_constraint_loss(images, labels)
        return losses.dual_encoder_loss(
            name, image_embeddings=images, caption_embeddings=captions, labels=labels, temperature=0.05,
            class_weights=class_weights, bias=losses.SIGLIP_BIAS,
        )

    compiled = tf.function(objective, jit_compile=True)
    np.testing.assert_allclose(
        compiled(images, captions, labels, class_weights).numpy(),
        objective(images, captions, labels, class_weights).numpy(),
        rtol=1e-4,
    )
