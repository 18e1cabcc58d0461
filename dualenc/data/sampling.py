"""Identity-aware batching: P identities × K instances per batch, as a tf.data pipeline.

CMPM and CMPC learn from same-identity pairs inside a batch; with plain shuffling and a
dataset like CUHK-PEDES (about 7 captions per identity among 68k) most batches hold no such
pair. `identity_batches` makes every batch P distinct identities with K elements each, the
scheme of IRRA's `RandomIdentitySampler` (after the person re-identification samplers):

1. Each epoch, for every identity: shuffle its element indices; an identity with fewer than K
   elements is first upsampled to exactly K by sampling with replacement; split the shuffled
   list into chunks of K, dropping a last chunk shorter than K.
2. While at least P identities still have chunks: pick P of them uniformly at random (without
   replacement) and take the next chunk of each; that is one batch of P·K elements.

So every element of an identity with at least K elements appears at most once per epoch, and
an epoch misses only the per-identity remainders (fewer than K each) and the chunks left when
fewer than P identities remain. How many chunks are left depends on the draw, so every epoch is
cut to `identity_batch_count` batches, the fewest any draw gives: Keras then knows the epoch's
length and averages its metrics over the steps actually run.

The input dataset is read once into memory (one stacked tensor per feature) and batches are
gathered from it by index, since tf.data has no random access into files. Keep its elements
light — encoded image bytes or file names plus captions, not decoded images — and decode after
batching. Labels are read from those elements, so they need not be passed separately.
"""

from __future__ import annotations

import numpy as np
import tensorflow as tf

from dualenc.core.errors import DualEncError

MATERIALISE_BATCH = 4096


def identity_batch_plan(
    labels: np.ndarray,
    identities_per_batch: int,
    instances_per_identity: int,
    rng: np.random.Generator,
) -> np.ndarray:
    """One epoch's batches as element indices, shape (num_batches, P·K), following IRRA.

    labels: (N,) identity of each element. Row b lists batch b's elements identity by identity:
    columns [p·K, (p+1)·K) all share one label, and the P labels of a row are distinct.
    """
    labels = np.asarray(labels).reshape(-1)
    order = np.argsort(labels, kind="stable")
    _, starts, counts = np.unique(labels[order], return_index=True, return_counts=True)
    chunks_per_identity = []
    for start, count in zip(starts, counts):
        members = order[start : start + count]
        if count < instances_per_identity:
            members = rng.choice(members, size=instances_per_identity, replace=True)
        members = rng.permutation(members)
        usable = len(members) // instances_per_identity * instances_per_identity
        chunks_per_identity.append(members[:usable].reshape(-1, instances_per_identity))
    chunk_counts = np.array([len(chunks) for chunks in chunks_per_identity])
    next_chunk = np.zeros(len(chunks_per_identity), dtype=np.int64)
    available = np.arange(len(chunks_per_identity))
    batches = []
    while len(available) >= identities_per_batch:
        picks = rng.choice(len(available), size=identities_per_batch, replace=False)
        selected = available[picks]
        batches.append(np.concatenate([chunks_per_identity[identity][next_chunk[identity]] for identity in selected]))
        next_chunk[selected] += 1
        available = np.delete(available, picks[next_chunk[selected] == chunk_counts[selected]])
    return np.array(batches, dtype=np.int64).reshape(-1, identities_per_batch * instances_per_identity)


def identity_batch_count(labels: np.ndarray, identities_per_batch: int, instances_per_identity: int) -> int:
    """The fewest batches `identity_batch_plan` can draw for `labels`, whatever the random picks.

    Each identity has c = max(1, n // K) chunks. Drawing stops once fewer than P identities have
    chunks left, so at most the chunks of the P - 1 largest identities are left over:
    batches >= ceil((sum(c) - sum of the P - 1 largest c) / P).
    """
    _, counts = np.unique(np.asarray(labels).reshape(-1), return_counts=True)
    chunks = np.sort(np.maximum(1, counts // instances_per_identity))[::-1]
    usable = int(chunks.sum() - chunks[: identities_per_batch - 1].sum())
    return max(0, -(-usable // identities_per_batch))


def _check_element_spec(dataset: tf.data.Dataset, label_key: str) -> None:
    spec = dataset.element_spec
    if not isinstance(spec, dict):
        raise DualEncError(f"identity_batches needs a dataset of dict elements; got elements of {type(spec).__name__}")
    if label_key not in spec:
        raise DualEncError(f"identity_batches: elements have no {label_key!r} feature; features: {', '.join(sorted(spec))}")
    label_spec = spec[label_key]
    if not isinstance(label_spec, tf.TensorSpec) or not label_spec.dtype.is_integer or label_spec.shape.rank != 0:
        raise DualEncError(f"identity_batches: feature {label_key!r} must be an integer scalar; got {label_spec}")
    if not all(isinstance(feature, tf.TensorSpec) for feature in spec.values()):
        raise DualEncError("identity_batches needs dense tensor features only (no ragged or sparse ones)")


def _materialise(dataset: tf.data.Dataset, label_key: str) -> dict[str, tf.Tensor]:
    """The whole (unbatched) dataset as one stacked tensor per feature, shape (N, ...)."""
    parts: dict[str, list[tf.Tensor]] = {key: [] for key in dataset.element_spec}
    try:
        for batch in dataset.batch(MATERIALISE_BATCH):
            for key, value in batch.items():
                parts[key].append(value)
        if not parts[label_key]:
            raise DualEncError("identity_batches got an empty dataset")
        return {key: tf.concat(values, axis=0) for key, values in parts.items()}
    except (tf.errors.InvalidArgumentError, ValueError) as error:
        raise DualEncError(
            "identity_batches needs every feature to have one shape in all elements (decode and resize "
            f"images after batching); batching failed: {str(error).splitlines()[0]}"
        ) from None


def identity_batches(
    dataset: tf.data.Dataset,
    identities_per_batch: int,
    instances_per_identity: int,
    seed: int | None = None,
    label_key: str = "label",
    epoch_seeds: list[int] | None = None,
) -> tf.data.Dataset:
    """Batches of P·K elements, P = identities_per_batch distinct labels × K = instances_per_identity.

    dataset: unbatched dict elements with an integer scalar `label_key` feature and any other
    dense features of fixed shape (captions, encoded images, ids ...). Returns a dataset of dicts
    with the same keys, each feature batched to (P·K, ...), identity by identity (see
    `identity_batch_plan`), `identity_batch_count` batches per epoch. Each iteration over the
    result (each epoch) draws a new plan; with `seed` set the sequence of epochs is the same in
    every run. With `epoch_seeds` instead, one iteration is len(epoch_seeds) epochs in a row,
    epoch i drawn from `epoch_seeds[i]` alone, so a run resumed at epoch i draws what an
    uninterrupted one would have.
    """
    if identities_per_batch < 1 or instances_per_identity < 1:
        raise DualEncError(
            f"identities_per_batch and instances_per_identity must be >= 1; got {identities_per_batch} and {instances_per_identity}"
        )
    _check_element_spec(dataset, label_key)
    elements = _materialise(dataset, label_key)
    labels = elements[label_key].numpy()
    identity_count = len(np.unique(labels))
    if identity_count < identities_per_batch:
        raise DualEncError(
            f"identities_per_batch is {identities_per_batch} but the dataset has only {identity_count} identities"
        )
    batch_size = identities_per_batch * instances_per_identity
    batches_per_epoch = identity_batch_count(labels, identities_per_batch, instances_per_identity)
    if batches_per_epoch < 1:
        raise DualEncError(
            f"identities_per_batch is {identities_per_batch} but only {identity_count} identities give whole batches"
        )

    def epoch_plan(epoch_seed: np.int64) -> np.ndarray:
        rng = np.random.default_rng(int(epoch_seed) % (1 << 64))  # SeedSequence takes no negatives
        return identity_batch_plan(labels, identities_per_batch, instances_per_identity, rng)

    def plan_rows(epoch_seed: tf.Tensor) -> tf.data.Dataset:
        plan = tf.numpy_function(epoch_plan, [epoch_seed], tf.int64, stateful=False)
        return tf.data.Dataset.from_tensor_slices(tf.ensure_shape(plan, [None, batch_size])).take(batches_per_epoch)

    def gather(indices: tf.Tensor) -> dict[str, tf.Tensor]:
        return {key: tf.gather(values, indices) for key, values in elements.items()}

    if epoch_seeds is None:
        # One random draw per iteration of the dataset: a fresh, seed-determined plan every epoch.
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).take(1)
    else:
        seeds = tf.data.Dataset.from_tensor_slices(np.asarray(epoch_seeds, dtype=np.int64))
    batches = seeds.flat_map(plan_rows).map(gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    epochs = 1 if epoch_seeds is None else len(epoch_seeds)
    return batches.apply(tf.data.experimental.assert_cardinality(epochs * batches_per_epoch))
