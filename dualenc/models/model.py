"""The dual encoder: two towers, a projection head each, a temperature and Keras train/test steps.

Captions and images are embedded into one L2-normalised space of width
`ModelConfig.projection_dim`::

    caption -> text tower   -> ProjectionHead -> L2Normalize -> caption embedding (B, D)
    image   -> vision tower -> ProjectionHead -> L2Normalize -> image embedding   (B, D)

and trained with the objective named by `ModelConfig.loss` (`dualenc.losses.dual_encoder_loss`).

Inputs are numbers only — strings and image bytes are turned into them by the preprocessors
(`dualenc.models.preprocessing`) in `tf.data` and in front of the exported encoders: a dict with
"image" uint8/float pixels (B, H, W, 3), "tokens" the text preprocessor's output (token ids
int32 (B, S), or BERT's dict of three), and "label" int64 (B,). The frozen-backbone feature
cache passes "image_features" (B, F) and/or "caption_features" (B, F) *instead of*
"image"/"tokens": that tower is skipped and only its head runs, so a batch of cached features
gives exactly the loss of the raw batch the features were computed from. A skipped tower gets
no gradient; cache only frozen towers. Other keys are ignored.

"label" is required by the CMPM/CMPC losses; without it each caption's own image is its only
match (the diagonal), which is what "soft_target" and "clip" assume anyway.

The model saves and loads as a `.keras` file (`get_config` holds the `ModelConfig` and both
serialised towers) and overrides no private Keras method.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import keras
import tensorflow as tf

from dualenc import losses
from dualenc.core.config import ModelConfig
from dualenc.core.errors import DualEncError
from dualenc.models.heads import L2Normalize, ProjectionHead
from dualenc.models.placement import Placement, gather_replicas, on_device, replica_loss_scale
from dualenc.data.records import IMAGE, LABEL

TOKENS = "tokens"
IMAGE_FEATURES = "image_features"
CAPTION_FEATURES = "caption_features"
# Bumped when get_config or the weight layout changes; a .keras file of another version is refused.
MODEL_FORMAT_VERSION = 2
# The smallest temperature: logits scaled by at most 100, CLIP's bound on its logit scale
# (Radford et al. 2021, section 2.5), so a learned temperature cannot blow the logits up.
MIN_TEMPERATURE = 0.01


@keras.saving.register_keras_serializable(package="dualenc")
class AtLeast(keras.constraints.Constraint):
    """Clips a weight from below after each optimiser step, as CLIP clamps its logit scale.

    Unlike clipping where the weight is read, the gradient still reaches a weight at its bound,
    so it can move back up.
    """

    def __init__(self, minimum: float) -> None:
        self.minimum = minimum

    def __call__(self, weight: Any) -> Any:
        return keras.ops.maximum(weight, self.minimum)

    def get_config(self) -> dict:
        return {"minimum": self.minimum}


def in_batch_recall_at_1(
    query_embeddings: tf.Tensor, gallery_embeddings: tf.Tensor, query_labels: tf.Tensor, gallery_labels: tf.Tensor
) -> tf.Tensor:
    """Percent of queries whose top-scoring gallery item in the batch has the query's label.

    scores = Q·Gᵀ (B, D)·(D, B) -> (B, B); hit_i = [gallery_labels[argmax_j scores_ij] == query_labels_i].
    Matching by label rather than by position means two captions of one image (or two
    images of one identity) both count as correct.
    """
    scores = tf.matmul(query_embeddings, gallery_embeddings, transpose_b=True)
    best = tf.argmax(scores, axis=1)
    hits = tf.equal(tf.gather(gallery_labels, best), query_labels)
    return 100.0 * tf.reduce_mean(tf.cast(hits, tf.float32))


def _check_inputs(inputs: Any) -> None:
    if not isinstance(inputs, Mapping):
        raise DualEncError(
            "DualEncoder expects a dict with 'image' (or 'image_features') and 'tokens' "
            f"(or 'caption_features'), got {type(inputs).__name__}"
        )
    for raw, cached in ((IMAGE, IMAGE_FEATURES), (TOKENS, CAPTION_FEATURES)):
        if raw not in inputs and cached not in inputs:
            raise DualEncError(f"DualEncoder inputs have no {raw!r} or {cached!r}; got keys {sorted(inputs)}")


@keras.saving.register_keras_serializable(package="dualenc")
class DualEncoder(keras.Model):
    """Vision and text towers projected into one embedding space (see the module docstring).

    Owns the towers, one `ProjectionHead` per modality, the temperature (a constant, or with
    `config.learn_temperature` a trainable scalar kept as its log so it stays positive, and
    kept >= `MIN_TEMPERATURE` = 0.01, i.e. logits scaled by at most 100 as in CLIP) and,
    for the CMPC losses, the classifier `class_weights` (projection_dim, num_classes).

    `placement` ("split") runs each tower and head under its own `tf.device` in `call`, which
    the train and test steps use; create each tower on its device too (`build_dual_encoder`
    does) so its weights live there. `encode_images`/`encode_texts` never place anything, so
    exported encoders carry no device strings. For "mirrored", build and compile the model
    inside `placement.scope()`; the steps gather embeddings from all replicas.
    """

    def __init__(
        self,
        config: ModelConfig,
        vision_tower: keras.Model,
        text_tower: keras.Model,
        placement: Placement | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        if config.temperature < MIN_TEMPERATURE:
            raise DualEncError(
                f"temperature {config.temperature} is below {MIN_TEMPERATURE} (logits scaled by more than "
                f"{1 / MIN_TEMPERATURE:.0f}, CLIP's bound); set it to at least {MIN_TEMPERATURE}"
            )
        self.config = config
        self.placement = placement if placement is not None else Placement()
        self.vision_tower = vision_tower
        self.text_tower = text_tower
        if config.projection == "preset":
            # The keras-hub towers already end in their preset's joint-space projection.
            self.image_head = keras.layers.Identity(name="image_head")
            self.caption_head = keras.layers.Identity(name="caption_head")
        else:
            head_arguments = (config.projection_dim, config.projection_layers, config.dropout)
            self.image_head = ProjectionHead(*head_arguments, name="image_head")
            self.caption_head = ProjectionHead(*head_arguments, name="caption_head")
        # L2Normalize computes in float32, so the loss sees float32 even under mixed precision.
        self.l2_normalize = L2Normalize(name="l2_normalize")
        self.log_temperature = None
        if config.learn_temperature:
            # Stored as a log so the temperature exp(log_temperature) stays positive.
            self.log_temperature = self.add_weight(
                name="log_temperature",
                shape=(),
                initializer=keras.initializers.Constant(math.log(config.temperature)),
                constraint=AtLeast(math.log(MIN_TEMPERATURE)),
                dtype="float32",
            )
        self.logit_bias = None
        if losses.needs_bias(config.loss):
            # SigLIP's learnable bias b, started at the paper's -10.
            self.logit_bias = self.add_weight(
                name="logit_bias",
                shape=(),
                initializer=keras.initializers.Constant(losses.SIGLIP_BIAS),
                dtype="float32",
            )
        self.class_weights = None
        if losses.needs_class_weights(config.loss):
            self.class_weights = self.add_weight(
                name="class_weights",
                shape=(config.projection_dim, config.num_classes),
                initializer=keras.initializers.GlorotUniform(),
                dtype="float32",
            )
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.r1_t2i_tracker = keras.metrics.Mean(name="r1_t2i")
        self.r1_i2t_tracker = keras.metrics.Mean(name="r1_i2t")

    @property
    def temperature(self) -> tf.Tensor:
        """The current temperature T (float32 scalar) dividing the similarity logits."""
        if self.log_temperature is None:
            return tf.constant(self.config.temperature, tf.float32)
        return tf.exp(tf.convert_to_tensor(self.log_temperature))

    @property
    def metrics(self) -> list[keras.metrics.Metric]:
        """The per-epoch trackers Keras resets: loss, recall@1 text->image and image->text."""
        return [self.loss_tracker, self.r1_t2i_tracker, self.r1_i2t_tracker]

    def compile(self, optimizer: Any = "adamw", **kwargs: Any) -> None:
        """Keras `compile`; additionally keeps weight decay off the learned log temperature.

        Decaying log T would pull the temperature towards 1 regardless of the data. Call this
        inside `placement.scope()` for "mirrored" so the optimizer is created there too.
        """
        super().compile(optimizer=optimizer, **kwargs)
        # Nor on SigLIP's bias, which decay would pull towards 0 (every pair a likely match).
        scalars = [weight for weight in (self.log_temperature, self.logit_bias) if weight is not None]
        if scalars:
            inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)
            inner.exclude_from_weight_decay(var_list=scalars)

    def build(self, input_shape: Any) -> None:
        """Nothing up front: the towers and heads build on the first call, inside `call`.

        Keras' default build would trace `call` symbolically, creating the variables outside
        `call`'s `tf.device` scopes; building in the real call puts each head's weights on
        its tower's device under "split".
        """

    def _embed(self, head: keras.layers.Layer, features: tf.Tensor, training: bool | None) -> tf.Tensor:
        return self.l2_normalize(head(features, training=training))

    def _image_embeddings(self, inputs: Mapping, training: bool | None) -> tf.Tensor:
        if IMAGE_FEATURES in inputs:
            features = inputs[IMAGE_FEATURES]
        else:
            features = self.vision_tower(inputs[IMAGE], training=training)
        return self._embed(self.image_head, features, training)

    def _caption_embeddings(self, inputs: Mapping, training: bool | None) -> tf.Tensor:
        if CAPTION_FEATURES in inputs:
            features = inputs[CAPTION_FEATURES]
        else:
            features = self.text_tower(inputs[TOKENS], training=training)
        return self._embed(self.caption_head, features, training)

    def encode_images(self, images_or_features: Any, training: bool = False) -> tf.Tensor:
        """Unit image embeddings (B, D) from images (B, H, W, 3) or cached tower features (B, F)."""
        images_or_features = tf.convert_to_tensor(images_or_features)
        rank = images_or_features.shape.rank
        if rank == 4:
            return self._image_embeddings({IMAGE: images_or_features}, training)
        if rank == 2:
            return self._image_embeddings({IMAGE_FEATURES: images_or_features}, training)
        raise DualEncError(
            f"encode_images expects images (B, H, W, 3) or features (B, F), got shape {images_or_features.shape}"
        )

    def encode_texts(self, tokens_or_features: Any, training: bool = False) -> tf.Tensor:
        """Unit caption embeddings (B, D) from the text preprocessor's tokens (integer ids, or
        BERT's dict of them) or from cached tower features (B, F) float."""
        if isinstance(tokens_or_features, Mapping):
            return self._caption_embeddings({TOKENS: tokens_or_features}, training)
        tokens_or_features = tf.convert_to_tensor(tokens_or_features)
        if tokens_or_features.shape.rank != 2 or tokens_or_features.dtype == tf.string:
            raise DualEncError(
                "encode_texts expects token ids (B, S) or features (B, F); preprocess strings with "
                f"dualenc.models.preprocessing first, got {tokens_or_features.dtype.name} {tokens_or_features.shape}"
            )
        if tokens_or_features.dtype.is_integer:
            return self._caption_embeddings({TOKENS: tokens_or_features}, training)
        return self._caption_embeddings({CAPTION_FEATURES: tokens_or_features}, training)

    def get_config(self) -> dict:
        """The `ModelConfig` and both towers, serialised: enough for `from_config` to rebuild the model."""
        from dualenc.core.config import to_dict

        return {
            "format_version": MODEL_FORMAT_VERSION,
            "config": to_dict(self.config),
            "vision_tower": keras.saving.serialize_keras_object(self.vision_tower),
            "text_tower": keras.saving.serialize_keras_object(self.text_tower),
            "name": self.name,
        }

    @classmethod
    def from_config(cls, config: dict) -> "DualEncoder":
        from dualenc.core.config import ModelConfig, from_dict

        found = config.get("format_version")
        if found != MODEL_FORMAT_VERSION:
            raise DualEncError(
                f"this model was saved in dualenc model format {found!r}, this dualenc reads format "
                f"{MODEL_FORMAT_VERSION}; retrain it or load it with the dualenc version that wrote it"
            )
        model_config = from_dict(ModelConfig, config["config"], "saved model config")
        vision_tower = keras.saving.deserialize_keras_object(config["vision_tower"])
        text_tower = keras.saving.deserialize_keras_object(config["text_tower"])
        model = cls(model_config, vision_tower, text_tower, name=config.get("name"))
        model(_dummy_batch(model_config), training=False)  # creates every variable before weights load
        return model

    def __call__(self, inputs: Any, *args: Any, **kwargs: Any) -> Any:
        # Checked before Keras' __call__, which rewrites errors raised inside `call` into a
        # multi-line report and would lose the one-line DualEncError.
        _check_inputs(inputs)
        return super().__call__(inputs, *args, **kwargs)

    def call(self, inputs: Mapping, training: bool | None = None) -> tuple[tf.Tensor, tf.Tensor]:
        """(caption_embeddings, image_embeddings), each (B, D) float32 with unit rows."""
        with on_device(self.placement.text_device):
            caption_embeddings = self._caption_embeddings(inputs, training)
        with on_device(self.placement.vision_device):
            image_embeddings = self._image_embeddings(inputs, training)
        return caption_embeddings, image_embeddings

    def _labels(self, inputs: Mapping) -> tf.Tensor | None:
        if LABEL in inputs:
            return tf.cast(tf.reshape(inputs[LABEL], [-1]), tf.int64)
        if losses.needs_labels(self.config.loss):
            raise DualEncError(f"loss {self.config.loss!r} needs a {LABEL!r} (identity) in every batch")
        return None

    def _global_loss(self, inputs: Mapping, caption_embeddings: tf.Tensor, image_embeddings: tf.Tensor) -> tf.Tensor:
        """The loss over the global batch (all replicas' rows); also updates the metrics.

        Every replica computes this same value from the gathered embeddings.
        """
        labels = self._labels(inputs)
        caption_embeddings = gather_replicas(caption_embeddings)
        image_embeddings = gather_replicas(image_embeddings)
        if labels is None:
            labels = tf.range(tf.shape(caption_embeddings, out_type=tf.int64)[0])
        else:
            labels = gather_replicas(labels)
        loss = self.pair_loss(caption_embeddings, image_embeddings, labels)
        self.loss_tracker.update_state(loss)
        self.r1_t2i_tracker.update_state(in_batch_recall_at_1(caption_embeddings, image_embeddings, labels, labels))
        self.r1_i2t_tracker.update_state(in_batch_recall_at_1(image_embeddings, caption_embeddings, labels, labels))
        return loss

    def pair_loss(self, caption_embeddings: tf.Tensor, image_embeddings: tf.Tensor, labels: tf.Tensor) -> tf.Tensor:
        """The configured loss of one batch of pairs, (B, D) unit embeddings each, with their
        identity `labels` (B,) (or ``range(B)`` when pairs have none): what a train or test step
        minimises or reports, at the model's current temperature, bias and classifier."""
        return losses.dual_encoder_loss(
            self.config.loss,
            image_embeddings=image_embeddings,
            caption_embeddings=caption_embeddings,
            labels=labels,
            temperature=self.temperature,
            class_weights=self.class_weights,
            bias=self.logit_bias,
        )

    def train_step(self, data: Any) -> dict[str, tf.Tensor]:
        """One optimiser step on a batch (the inputs dict; Keras' (x, y) tuples use x)."""
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        with tf.GradientTape() as tape:
            caption_embeddings, image_embeddings = self(inputs, training=True)
            loss = self._global_loss(inputs, caption_embeddings, image_embeddings)
            # Each replica holds the whole global loss; the optimiser sums replica gradients.
            scaled_loss = self.optimizer.scale_loss(loss * replica_loss_scale())
        variables = self.trainable_variables
        gradients = tape.gradient(scaled_loss, variables)
        # Built on every variable first, so the optimiser's slots match `trainable_variables` (what
        # a backup is restored into) even when a cached-feature batch leaves a tower without gradients.
        if not self.optimizer.built:
            self.optimizer.build(variables)
        reached = [(gradient, variable) for gradient, variable in zip(gradients, variables) if gradient is not None]
        self.optimizer.apply_gradients(reached)
        return {metric.name: metric.result() for metric in self.metrics}

    def test_step(self, data: Any) -> dict[str, tf.Tensor]:
        """Loss and in-batch recall@1 on a batch, without updating weights."""
        inputs, _, _ = keras.utils.unpack_x_y_sample_weight(data)
        caption_embeddings, image_embeddings = self(inputs, training=False)
        self._global_loss(inputs, caption_embeddings, image_embeddings)
        return {metric.name: metric.result() for metric in self.metrics}


def _dummy_batch(config: ModelConfig) -> dict[str, Any]:
    from dualenc.models.preprocessing import dummy_tokens

    height, width = config.vision.image_size
    return {IMAGE: tf.zeros((2, height, width, 3), tf.uint8), TOKENS: dummy_tokens(config.text)}


def build_dual_encoder(config: ModelConfig, placement: Placement | None = None) -> DualEncoder:
    """Build both towers from `config`, wrap them in a `DualEncoder` and create every variable.

    Runs inside `placement.scope()` (variables mirrored for "mirrored") on a two-example dummy
    batch; for "split" each tower is created on its device so its weights live where it runs.
    Raises `DualEncError` when a tower does not return pooled features (B, F), which the
    projection heads need.
    """
    from dualenc.models.towers import build_text_tower, build_vision_tower

    placement = placement if placement is not None else Placement()
    batch = _dummy_batch(config)
    with placement.scope():
        with on_device(placement.vision_device):
            vision_tower = build_vision_tower(config.vision, config.projection)
        with on_device(placement.text_device):
            text_tower = build_text_tower(config.text, config.projection)
        for name, tower, raw in (("vision", vision_tower, batch[IMAGE]), ("text", text_tower, batch[TOKENS])):
            features = tower(raw, training=False)
            if features.shape.rank != 2:
                raise DualEncError(
                    f"{name} tower returns shape {features.shape.as_list()} for a batch of 2; "
                    "the projection head needs pooled features (B, F)"
                )
        model = DualEncoder(config, vision_tower, text_tower, placement)
        model(batch, training=False)
    return model
