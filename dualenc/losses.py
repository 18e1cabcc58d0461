"""Training objectives of the dual encoder, as pure functions of embeddings.

Shapes: B is the batch size, D the embedding width, N the number of identity classes.
Every loss takes caption/text and image embeddings of shape (B, D) (numpy arrays or tensors),
computes in float32 unless given float64 (so mixed-precision float16 embeddings are upcast),
and returns the batch mean as a scalar tensor. `CE(logits, y)` below is the softmax
cross-entropy ``-Σ_j y_j · log_softmax(logits)_j`` row by row.

- `soft_target_contrastive_loss`: seed 003 (keras.io natural-language image search).
- `clip_contrastive_loss`: symmetric InfoNCE (Radford et al., 2021).
- `cmpm_loss`, `cmpc_loss`: Cross-Modal Projection Matching / Classification (Zhang & Lu,
  "Deep Cross-Modal Projection Learning for Image-Text Matching", ECCV 2018), after seed 000.
- `identity_constraint_loss`: seed 000's "constraints" term (same-identity compactness).
- `siglip_loss`: the pairwise sigmoid loss of SigLIP (Zhai et al., "Sigmoid Loss for Language
  Image Pre-Training", ICCV 2023), with a learnable temperature and bias.
- `sdm_loss`: IRRA's Similarity Distribution Matching (Jiang & Ye, "Cross-Modal Implicit
  Relation Reasoning and Aligning for Text-to-Image Person Retrieval", CVPR 2023).

`dual_encoder_loss` picks one of them by the `ModelConfig.loss` name, so the model never
hard-codes an objective.
"""

from __future__ import annotations

from typing import Any

import tensorflow as tf

from dualenc.core.config import SIGLIP_BIAS, SIGLIP_TEMPERATURE  # noqa: F401  re-exported: SigLIP's initialisation
from dualenc.core.errors import DualEncError

LOSS_NAMES = ("soft_target", "clip", "cmpm", "cmpc", "cmpm+cmpc", "siglip", "sdm", "sdm+cmpc")

LABEL_NORMS = ("l1", "l2")


def _compute_dtype(*values: Any) -> tf.DType:
    """float64 when any input already is, float32 otherwise (float16 is upcast for stability)."""
    for value in values:
        dtype = getattr(value, "dtype", None)
        if dtype is not None and tf.as_dtype(dtype) == tf.float64:
            return tf.float64
    return tf.float32


def _as_float(value: Any, dtype: tf.DType) -> tf.Tensor:
    return tf.cast(tf.convert_to_tensor(value), dtype)


def _soft_cross_entropy(targets: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
    """Per-row ``-Σ_j targets_ij · log_softmax(logits)_ij``; shape (B,)."""
    return -tf.reduce_sum(targets * tf.nn.log_softmax(logits, axis=-1), axis=-1)


def soft_target_contrastive_loss(caption_embeddings: Any, image_embeddings: Any, temperature: Any) -> tf.Tensor:
    """Seed 003's contrastive loss with soft targets from within-modality similarity.

    With C = caption_embeddings (B, D), I = image_embeddings (B, D) and temperature T::

        logits  = C·Iᵀ / T                                   (B, D)·(D, B) -> (B, B)
        targets = softmax(((C·Cᵀ + I·Iᵀ) / 2) / T, axis=-1)   (B, B)
        loss    = mean_i [CE(logits, targets)_i + CE(logitsᵀ, targetsᵀ)_i] / 2

    The first term has captions as rows, the second images as rows. Two captions of the
    same image (or two near-identical images) get a shared target instead of being pushed
    apart as false negatives. Inputs are used as given: the model L2-normalises them first.
    As in the seed, gradients also flow through `targets` (no stop-gradient), so the loss
    shapes the within-modality similarities too.
    """
    dtype = _compute_dtype(caption_embeddings, image_embeddings)
    captions = _as_float(caption_embeddings, dtype)
    images = _as_float(image_embeddings, dtype)
    temperature = _as_float(temperature, dtype)
    logits = tf.matmul(captions, images, transpose_b=True) / temperature
    within_modality = (tf.matmul(captions, captions, transpose_b=True) + tf.matmul(images, images, transpose_b=True)) / 2
    targets = tf.nn.softmax(within_modality / temperature, axis=-1)
    caption_loss = _soft_cross_entropy(targets, logits)
    image_loss = _soft_cross_entropy(tf.transpose(targets), tf.transpose(logits))
    return tf.reduce_mean((caption_loss + image_loss) / 2)


def clip_contrastive_loss(caption_embeddings: Any, image_embeddings: Any, temperature: Any) -> tf.Tensor:
    """Symmetric InfoNCE: each caption must pick its own image among the batch, and vice versa.

    With Ĉ, Î the L2-normalised caption and image embeddings (B, D) and temperature T::

        logits = Ĉ·Îᵀ / T                                     (B, B)
        loss   = (mean CE(logits, diag) + mean CE(logitsᵀ, diag)) / 2

    The inputs are normalised here, so raw tower outputs may be passed. `temperature` may be a
    python float or a (trainable) scalar tensor; gradients flow into it.
    """
    dtype = _compute_dtype(caption_embeddings, image_embeddings)
    captions = tf.math.l2_normalize(_as_float(caption_embeddings, dtype), axis=-1)
    images = tf.math.l2_normalize(_as_float(image_embeddings, dtype), axis=-1)
    logits = tf.matmul(captions, images, transpose_b=True) / _as_float(temperature, dtype)
    diagonal = tf.range(tf.shape(logits)[0])
    caption_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=diagonal, logits=logits)
    image_loss = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=diagonal, logits=tf.transpose(logits))
    return (tf.reduce_mean(caption_loss) + tf.reduce_mean(image_loss)) / 2


def cmpm_loss(
    image_embeddings: Any,
    text_embeddings: Any,
    labels: Any,
    epsilon: float = 1e-8,
    label_norm: str = "l1",
) -> tf.Tensor:
    """Cross-Modal Projection Matching: KL(p ‖ q) between predicted and true match distributions.

    With I, T (B, D) the raw image and text embeddings, Î, T̂ their L2-normalised rows and
    labels (B,) identity ids::

        image_proj_text = I·T̂ᵀ          text_proj_image = T·Îᵀ          (B, B)
        p   = softmax(image_proj_text, axis=-1)   (likewise for text_proj_image)
        m   = [labels_i == labels_j]               (B, B) 0/1 match mask
        q   = m / Σ_j m_ij   ("l1", the paper and its official code; default)
              m / ‖m_i‖₂     ("l2", seed 000's PyTorch form)
        loss = mean_i Σ_j p_ij (log p_ij − log(q_ij + ε))   for i2t, plus the same for t2i

    Projecting onto the *normalised* other modality keeps the image (text) norm as a learnable
    confidence. With "l2", q does not sum to one when an identity repeats in the batch, so the
    term is no longer a true KL divergence (it can be negative); with unique labels both agree.
    """
    if label_norm not in LABEL_NORMS:
        raise ValueError(f"label_norm must be one of {', '.join(LABEL_NORMS)}; got {label_norm!r}")
    dtype = _compute_dtype(image_embeddings, text_embeddings)
    images = _as_float(image_embeddings, dtype)
    texts = _as_float(text_embeddings, dtype)
    labels = tf.reshape(tf.convert_to_tensor(labels), [-1])
    match_mask = tf.cast(tf.equal(labels[:, None], labels[None, :]), dtype)
    if label_norm == "l1":
        match_distribution = match_mask / tf.reduce_sum(match_mask, axis=1, keepdims=True)
    else:
        match_distribution = match_mask / tf.norm(match_mask, axis=1, keepdims=True)
    log_target = tf.math.log(match_distribution + tf.cast(epsilon, dtype))

    def projection_matching(scores: tf.Tensor) -> tf.Tensor:
        log_predicted = tf.nn.log_softmax(scores, axis=-1)
        return tf.reduce_mean(tf.reduce_sum(tf.exp(log_predicted) * (log_predicted - log_target), axis=-1))

    image_proj_text = tf.matmul(images, tf.math.l2_normalize(texts, axis=-1), transpose_b=True)
    text_proj_image = tf.matmul(texts, tf.math.l2_normalize(images, axis=-1), transpose_b=True)
    return projection_matching(image_proj_text) + projection_matching(text_proj_image)


def cmpc_loss(image_embeddings: Any, text_embeddings: Any, labels: Any, weights: Any) -> tf.Tensor:
    """Cross-Modal Projection Classification: classify each modality's projection on the other.

    With I, T (B, D) raw embeddings, Î, T̂ their L2-normalised rows, W (D, N) the classifier
    weights and labels (B,) 0-based class ids::

        W_norm          = W / ‖W_:,c‖₂ per column c          (D, N)
        image_proj_text = (Σ_d I_id · T̂_id) · T̂_i            (B, D): I projected on its own text
        text_proj_image = (Σ_d T_id · Î_id) · Î_i            (B, D)
        loss = mean CE(image_proj_text·W_norm, labels) + mean CE(text_proj_image·W_norm, labels)

    Column-normalising W makes the logits depend on the projection's norm and its angle to each
    class centre, not on per-class weight scale (norm-softmax in the paper). The classes are the
    training identities: a row whose label is outside [0, N) (an identity of the validation or
    test split, which person-search splits keep apart) has no class to be classified as and is
    left out of the means; a batch of only such rows gives 0.
    """
    dtype = _compute_dtype(image_embeddings, text_embeddings)
    images = _as_float(image_embeddings, dtype)
    texts = _as_float(text_embeddings, dtype)
    class_weights = _as_float(weights, dtype)
    labels = tf.reshape(tf.cast(tf.convert_to_tensor(labels), tf.int64), [-1])
    normalised_weights = class_weights / tf.norm(class_weights, axis=0, keepdims=True)
    unit_images = tf.math.l2_normalize(images, axis=-1)
    unit_texts = tf.math.l2_normalize(texts, axis=-1)
    image_proj_text = tf.reduce_sum(images * unit_texts, axis=-1, keepdims=True) * unit_texts
    text_proj_image = tf.reduce_sum(texts * unit_images, axis=-1, keepdims=True) * unit_images

    classes = tf.shape(class_weights, out_type=tf.int64)[1]
    known = tf.cast((labels >= 0) & (labels < classes), dtype)
    # Unknown rows get a valid stand-in class (their term is multiplied by 0), keeping fixed shapes for XLA.
    class_ids = tf.clip_by_value(labels, 0, classes - 1)

    def classification(projection: tf.Tensor) -> tf.Tensor:
        logits = tf.matmul(projection, normalised_weights)
        cross_entropy = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=class_ids, logits=logits)
        return tf.math.divide_no_nan(tf.reduce_sum(known * cross_entropy), tf.reduce_sum(known))

    return classification(image_proj_text) + classification(text_proj_image)


def identity_constraint_loss(embeddings: Any, labels: Any) -> tf.Tensor:
    """Mean squared distance between embeddings of the same identity (seed 000's "constraints").

    With E (B, D) and labels (B,)::

        loss = Σ_{i≠j, labels_i = labels_j} ‖E_i − E_j‖² / #{(i, j): i≠j, labels_i = labels_j}

    and exactly 0 when no two rows share a label (the seed's per-class form gives NaN for a
    class with one sample). Computed through each row's identity mean μ_i = Σ_j m_ij E_j / n_i,
    with m the (B, B) label-match mask and n_i = Σ_j m_ij, using
    ``Σ_{i,j in one identity} ‖E_i − E_j‖² = Σ_i 2·n_i·‖E_i − μ_i‖²`` and
    ``#pairs = Σ_i (n_i − 1)``: no (B, B, D) difference tensor, no cancellation from expanding
    ‖a‖² + ‖b‖² − 2a·b, and only fixed shapes, so it compiles under XLA.
    """
    dtype = _compute_dtype(embeddings)
    embeddings = _as_float(embeddings, dtype)
    labels = tf.reshape(tf.convert_to_tensor(labels), [-1])
    match_mask = tf.cast(tf.equal(labels[:, None], labels[None, :]), dtype)
    identity_size = tf.reduce_sum(match_mask, axis=1)
    identity_mean = tf.matmul(match_mask, embeddings) / identity_size[:, None]
    squared_spread = tf.reduce_sum(tf.square(embeddings - identity_mean), axis=-1)
    pair_distance_sum = tf.reduce_sum(2 * identity_size * squared_spread)
    ordered_pairs = tf.reduce_sum(identity_size - 1)
    return tf.math.divide_no_nan(pair_distance_sum, ordered_pairs)


def _match_mask(labels: Any, batch: tf.Tensor, dtype: tf.DType) -> tf.Tensor:
    """(B, B) 1.0 where rows i and j share an identity; the identity matrix when `labels` is None."""
    if labels is None:
        return tf.eye(batch, dtype=dtype)
    labels = tf.reshape(tf.convert_to_tensor(labels), [-1])
    return tf.cast(tf.equal(labels[:, None], labels[None, :]), dtype)


def siglip_loss(caption_embeddings: Any, image_embeddings: Any, temperature: Any, bias: Any, labels: Any = None) -> tf.Tensor:
    """SigLIP's sigmoid loss: every caption-image pair is its own binary "match?" decision.

    With Ĉ, Î the L2-normalised caption and image embeddings (B, D), temperature T (SigLIP's
    t = exp(t') = 1 / T) and bias b::

        logits = Ĉ·Îᵀ / T + b                             (B, D)·(D, B) -> (B, B)
        z_ij   = +1 if captions i and image j match, else -1
        loss   = −(1/B) Σ_i Σ_j log σ(z_ij · logits_ij)

    (paper eq. 1 and Algorithm 1). Matches are the diagonal, or with `labels` (B,) every pair
    of one identity. No softmax couples the rows, so the loss needs no normalisation over the
    batch; b offsets the heavy imbalance of B positives against B² − B negatives.
    `temperature` and `bias` may be python floats or trainable scalars.
    """
    dtype = _compute_dtype(caption_embeddings, image_embeddings)
    captions = tf.math.l2_normalize(_as_float(caption_embeddings, dtype), axis=-1)
    images = tf.math.l2_normalize(_as_float(image_embeddings, dtype), axis=-1)
    logits = tf.matmul(captions, images, transpose_b=True) / _as_float(temperature, dtype) + _as_float(bias, dtype)
    batch = tf.shape(logits)[0]
    signs = 2 * _match_mask(labels, batch, dtype) - 1
    return -tf.reduce_sum(tf.math.log_sigmoid(signs * logits)) / tf.cast(batch, dtype)


def sdm_loss(image_embeddings: Any, text_embeddings: Any, temperature: Any, labels: Any = None, epsilon: float = 1e-8) -> tf.Tensor:
    """Similarity Distribution Matching: KL(p ‖ q) from scaled cosine similarities to identity matches.

    With Î, T̂ the L2-normalised image and text embeddings (B, D), temperature T (IRRA's
    1 / logit_scale, 0.02 there) and labels (B,) identity ids (each row its own identity when
    None)::

        S   = T̂·Îᵀ / T                                 (B, B): text rows, image columns
        m   = [labels_i == labels_j]                    (B, B)
        q   = m / Σ_j m_ij                              the true match distribution
        KL(S) = mean_i Σ_j p_ij (log p_ij − log(q_ij + ε)),   p = softmax(S, axis=-1)
        loss  = KL(S) + KL(Sᵀ)                          text→image plus image→text

    Unlike CMPM, both sides are cosine similarities, so embedding norms carry no confidence and
    the temperature alone sets how peaked p may become.
    """
    dtype = _compute_dtype(image_embeddings, text_embeddings)
    images = tf.math.l2_normalize(_as_float(image_embeddings, dtype), axis=-1)
    texts = tf.math.l2_normalize(_as_float(text_embeddings, dtype), axis=-1)
    similarities = tf.matmul(texts, images, transpose_b=True) / _as_float(temperature, dtype)
    match_mask = _match_mask(labels, tf.shape(similarities)[0], dtype)
    log_target = tf.math.log(match_mask / tf.reduce_sum(match_mask, axis=1, keepdims=True) + tf.cast(epsilon, dtype))

    def distribution_matching(scores: tf.Tensor) -> tf.Tensor:
        log_predicted = tf.nn.log_softmax(scores, axis=-1)
        return tf.reduce_mean(tf.reduce_sum(tf.exp(log_predicted) * (log_predicted - log_target), axis=-1))

    # The match mask is symmetric, so one target serves both directions.
    return distribution_matching(similarities) + distribution_matching(tf.transpose(similarities))


def _check_name(name: str) -> None:
    if name not in LOSS_NAMES:
        raise DualEncError(f"unknown loss {name!r}; choose one of: {', '.join(LOSS_NAMES)}")


def needs_labels(name: str) -> bool:
    """Whether loss `name` needs identity labels in each batch (CMPM/CMPC and SDM: several
    captions and images of one identity are all positives)."""
    _check_name(name)
    return name in ("cmpm", "cmpc", "cmpm+cmpc", "sdm", "sdm+cmpc")


def needs_class_weights(name: str) -> bool:
    """Whether loss `name` needs a (D, num_classes) classifier weight matrix (CMPC)."""
    _check_name(name)
    return name in ("cmpc", "cmpm+cmpc", "sdm+cmpc")


def needs_bias(name: str) -> bool:
    """Whether loss `name` needs a learnable logit bias (SigLIP)."""
    _check_name(name)
    return name == "siglip"


def dual_encoder_loss(
    name: str,
    *,
    image_embeddings: Any,
    caption_embeddings: Any,
    labels: Any = None,
    temperature: Any = None,
    class_weights: Any = None,
    bias: Any = None,
) -> tf.Tensor:
    """The scalar training objective named `name` (one of `LOSS_NAMES`, as in `ModelConfig.loss`).

    "soft_target" and "clip" use `temperature`; "siglip" `temperature` and `bias` (positives
    from `labels` when given); "cmpm" and "sdm" need `labels` ("sdm" also `temperature`);
    "cmpc" needs `labels` and `class_weights` (D, num_classes); "cmpm+cmpc" and "sdm+cmpc" are
    sums. Embeddings are passed on as given. A missing argument the loss needs raises
    `DualEncError`.
    """
    _check_name(name)
    if name in ("soft_target", "clip", "siglip", "sdm", "sdm+cmpc") and temperature is None:
        raise DualEncError(f"loss {name!r} needs a temperature")
    if name == "soft_target":
        return soft_target_contrastive_loss(caption_embeddings, image_embeddings, temperature)
    if name == "clip":
        return clip_contrastive_loss(caption_embeddings, image_embeddings, temperature)
    if name == "siglip":
        if bias is None:
            raise DualEncError("loss 'siglip' needs a logit bias")
        return siglip_loss(caption_embeddings, image_embeddings, temperature, bias, labels)
    if labels is None:
        raise DualEncError(f"loss {name!r} needs identity labels in every batch (feature 'label')")
    if needs_class_weights(name) and class_weights is None:
        raise DualEncError(f"loss {name!r} needs class_weights of shape (embedding dim, num_classes)")
    if name == "cmpm":
        return cmpm_loss(image_embeddings, caption_embeddings, labels)
    if name == "sdm":
        return sdm_loss(image_embeddings, caption_embeddings, temperature, labels)
    classification = cmpc_loss(image_embeddings, caption_embeddings, labels, class_weights)
    if name == "cmpc":
        return classification
    if name == "sdm+cmpc":
        return sdm_loss(image_embeddings, caption_embeddings, temperature, labels) + classification
    return cmpm_loss(image_embeddings, caption_embeddings, labels) + classification
