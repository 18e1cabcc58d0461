"""Projection heads: tower features → the shared embedding space, then onto the unit sphere.

Each tower has its own `ProjectionHead` (seed 003) so image and text features of different
widths land in one ``projection_dim``-wide space; `L2Normalize` makes dot products cosine
similarities, which the losses and the search index both assume.
"""

from __future__ import annotations

import keras


@keras.saving.register_keras_serializable(package="dualenc")
class ProjectionHead(keras.layers.Layer):
    """Features ``[B, F]`` → projected embeddings ``[B, projection_dim]``.

    ``p₀ = x·W₀ + b₀``; then for each of `num_layers` residual blocks
    ``pₖ = LayerNorm(pₖ₋₁ + Dropout(GELU(pₖ₋₁)·Wₖ + bₖ))``, GELU the exact (erf) form.
    With ``num_layers=0`` the head is the single linear projection. `dropout` is the rate
    applied inside each block while training.
    """

    def __init__(self, projection_dim: int, num_layers: int = 1, dropout: float = 0.1, **kwargs):
        super().__init__(**kwargs)
        if projection_dim < 1 or num_layers < 0 or not 0 <= dropout < 1:
            raise ValueError(
                "ProjectionHead needs projection_dim >= 1, num_layers >= 0 and 0 <= dropout < 1; "
                f"got projection_dim={projection_dim}, num_layers={num_layers}, dropout={dropout}"
            )
        self.projection_dim = int(projection_dim)
        self.num_layers = int(num_layers)
        self.dropout = float(dropout)

        self.projection = keras.layers.Dense(self.projection_dim, name="projection")
        self.block_dense = [keras.layers.Dense(self.projection_dim, name=f"dense_{k}") for k in range(self.num_layers)]
        self.block_dropout = [keras.layers.Dropout(self.dropout, name=f"dropout_{k}") for k in range(self.num_layers)]
        self.block_norm = [keras.layers.LayerNormalization(name=f"layer_norm_{k}") for k in range(self.num_layers)]

    def build(self, input_shape):
        if len(input_shape) != 2:
            raise ValueError(
                f"ProjectionHead expects features of rank 2 [batch, features], got shape {tuple(input_shape)}"
            )
        self.projection.build(input_shape)
        block_shape = (input_shape[0], self.projection_dim)
        for dense, norm in zip(self.block_dense, self.block_norm):
            dense.build(block_shape)
            norm.build(block_shape)

    def call(self, features, training=None):
        projected = self.projection(features)
        for dense, dropout, norm in zip(self.block_dense, self.block_dropout, self.block_norm):
            update = dropout(dense(keras.activations.gelu(projected, approximate=False)), training=training)
            projected = norm(projected + update)
        return projected

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.projection_dim)

    def get_config(self) -> dict:
        return {
            **super().get_config(),
            "projection_dim": self.projection_dim,
            "num_layers": self.num_layers,
            "dropout": self.dropout,
        }


@keras.saving.register_keras_serializable(package="dualenc")
class L2Normalize(keras.layers.Layer):
    """Scale each vector to unit L2 norm: ``x / sqrt(max(Σ x², epsilon))`` along `axis`.

    `epsilon` keeps an all-zero vector finite (it stays zero). Computes in float32 unless
    given another ``dtype``: under mixed precision Σ x² can overflow float16.
    """

    def __init__(self, axis: int = -1, epsilon: float = 1e-12, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.axis = int(axis)
        self.epsilon = float(epsilon)

    def call(self, vectors):
        squared_norm = keras.ops.sum(keras.ops.square(vectors), axis=self.axis, keepdims=True)
        return vectors * keras.ops.rsqrt(keras.ops.maximum(squared_norm, self.epsilon))

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self) -> dict:
        return {**super().get_config(), "axis": self.axis, "epsilon": self.epsilon}


def build_encoder(tower: keras.Model, head: ProjectionHead, name: str | None = None) -> keras.Model:
    """Chain ``tower → head → L2Normalize``: raw input → unit embeddings ``[B, projection_dim]``.

    The returned model shares the tower's and head's weights, so it is also what an exporter
    saves for indexing (images) or querying (text).
    """
    raw_input = keras.Input(batch_shape=tower.input.shape, dtype=tower.input.dtype, name=tower.input.name)
    embeddings = L2Normalize(name="l2_normalize")(head(tower(raw_input)))
    return keras.Model(raw_input, embeddings, name=name or f"{tower.name}_encoder")
