"""A resolved placement as the model sees it: which device runs each tower, which strategy
replicates it, and the two cross-replica helpers its train step needs.

Resolving a placement name onto devices, clusters and strategies is `dualenc.distribute.placement`;
the model only reads the result, so it never imports distribution code.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, ContextManager

import tensorflow as tf


@dataclasses.dataclass(frozen=True)
class Placement:
    """A resolved placement; build one with `dualenc.distribute.placement.make_placement`.

    `text_device`/`vision_device` are full logical device names for "split" and None otherwise;
    `strategy` is the `MirroredStrategy` for "mirrored", the `MultiWorkerStrategy` for
    "multi-worker" and None otherwise; `cluster` is this worker's place for "multi-worker".
    """

    kind: str = "single"
    devices: tuple[str, ...] = ()
    text_device: str | None = None
    vision_device: str | None = None
    strategy: tf.distribute.Strategy | None = dataclasses.field(default=None, compare=False, repr=False)
    cluster: Any = None  # a `dualenc.distribute.cluster.Cluster`

    def scope(self) -> ContextManager:
        """Context to build and compile the model in: the strategy's scope, or a no-op."""
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()

    @property
    def num_replicas(self) -> int:
        """Model copies that each see a slice of every batch (1 unless mirrored or multi-worker)."""
        return self.strategy.num_replicas_in_sync if self.strategy is not None else 1


def on_device(device: str | None) -> ContextManager:
    """`tf.device(device)`, or a no-op for None so unplaced code carries no device string."""
    return tf.device(device) if device is not None else contextlib.nullcontext()


def gather_replicas(tensor: tf.Tensor) -> tf.Tensor:
    """Concatenate `tensor` [b, ...] from every replica along axis 0 -> [num_replicas * b, ...].

    Identity outside a multi-replica step. The gradient of `all_gather` sums the upstream
    gradients of all replicas and hands each replica its own rows, so when every replica
    computes the same global loss divided by the replica count (`replica_loss_scale`), the
    summed gradients equal the single-device gradient of the global-batch loss.
    """
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return tensor
    return context.all_gather(tensor, axis=0)


def replica_loss_scale() -> float:
    """1 / number of replicas in sync: the factor each replica's copy of a global loss needs."""
    return 1.0 / tf.distribute.get_strategy().num_replicas_in_sync
