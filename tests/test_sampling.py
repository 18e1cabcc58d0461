"""Identity-aware batching: batch structure, coverage, reshuffling, determinism, riders."""

import collections

import numpy as np
import pytest
import tensorflow as tf

from dualenc.core.errors import DualEncError
from dualenc.data.sampling import identity_batch_count, identity_batch_plan, identity_batches

P, K = 3, 2


def _labels(seed=0, identities=15):
    """Identities with 1 to 7 elements each (some below K), shuffled, as int64 ids with gaps."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(1, 8, size=identities)
    labels = np.repeat(np.arange(identities) * 10 + 3, counts)
    return rng.permutation(labels).astype(np.int64)


def _dataset(labels):
    """Each element carries its own index in every feature, so rows can be checked for mix-ups."""
    indices = np.arange(len(labels))
    return tf.data.Dataset.from_tensor_slices(
        {
            "label": labels,
            "index": indices,
            "caption": [f"caption {index}" for index in indices],
            "image": np.broadcast_to(indices[:, None, None, None], (len(labels), 4, 3, 3)).astype(np.uint8),
        }
    )


def _epoch(batches):
    return [{key: value.numpy() for key, value in batch.items()} for batch in batches]


def _assert_identity_structure(batch_labels, identities_per_batch, instances_per_identity):
    counts = collections.Counter(batch_labels.tolist())
    assert len(counts) == identities_per_batch
    assert set(counts.values()) == {instances_per_identity}
    # grouped identity by identity, K at a time
    assert np.all(batch_labels.reshape(identities_per_batch, instances_per_identity).T == batch_labels[::instances_per_identity])


def test_every_batch_has_p_identities_with_k_instances_and_consistent_features():
    labels = _labels()
    epoch = _epoch(identity_batches(_dataset(labels), P, K, seed=1))
    assert len(epoch) > 5
    for batch in epoch:
        assert batch["label"].shape == (P * K,)
        assert batch["image"].shape == (P * K, 4, 3, 3)
        _assert_identity_structure(batch["label"], P, K)
        np.testing.assert_array_equal(batch["label"], labels[batch["index"]])
        assert [caption.decode() for caption in batch["caption"]] == [f"caption {index}" for index in batch["index"]]
        np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], batch["index"])


def test_output_spec_has_a_static_batch_size():
    batches = identity_batches(_dataset(_labels()), P, K, seed=1)
    assert batches.element_spec["image"].shape == (P * K, 4, 3, 3)
    assert batches.element_spec["label"].dtype == tf.int64


def test_most_elements_appear_each_epoch_and_none_twice_when_identities_are_large_enough():
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(40), rng.integers(2, 9, size=40))
    for seed in range(3):
        plan = identity_batch_plan(labels, 4, K, np.random.default_rng(seed))
        assert plan.shape[1] == 4 * K
        used = plan.reshape(-1)
        assert len(np.unique(used)) == len(used)
        assert len(used) >= 0.8 * len(labels)


@pytest.mark.parametrize("seed", range(4))
def test_the_epoch_length_is_the_fewest_batches_any_draw_gives(seed):
    labels = _labels(seed=seed, identities=9)
    counts = [len(identity_batch_plan(labels, P, K, np.random.default_rng(draw))) for draw in range(300)]
    # A lower bound that the draws reach (or come within one batch of, for an unlucky label mix).
    assert identity_batch_count(labels, P, K) <= min(counts) <= identity_batch_count(labels, P, K) + 1
    batches = identity_batches(_dataset(labels), P, K, seed=seed)
    assert int(batches.cardinality()) == identity_batch_count(labels, P, K) == len(_epoch(batches))


def test_epoch_seeds_give_each_epoch_whatever_epochs_come_before_it():
    labels = _labels()
    whole_run = _epoch(identity_batches(_dataset(labels), P, K, epoch_seeds=[11, 12, 13]))
    resumed = _epoch(identity_batches(_dataset(labels), P, K, epoch_seeds=[13]))
    per_epoch = identity_batch_count(labels, P, K)
    assert len(whole_run) == 3 * per_epoch
    for alone, in_run in zip(resumed, whole_run[2 * per_epoch :]):
        np.testing.assert_array_equal(alone["index"], in_run["index"])
    assert not np.array_equal(whole_run[0]["index"], whole_run[per_epoch]["index"])


def test_small_identities_are_upsampled_with_repetition():
    labels = np.array([0, 1, 1, 1, 2, 2, 2], dtype=np.int64)
    plan = identity_batch_plan(labels, 3, 3, np.random.default_rng(0))
    assert plan.shape == (1, 9)
    _assert_identity_structure(labels[plan[0]], 3, 3)
    assert np.count_nonzero(plan[0] == 0) == 3


def test_reshuffles_every_epoch_and_is_deterministic_with_a_seed():
    labels = _labels()
    batches = identity_batches(_dataset(labels), P, K, seed=7)
    first, second = (np.concatenate([batch["index"] for batch in _epoch(batches)]) for _ in range(2))
    assert not np.array_equal(first[: len(second)], second[: len(first)])

    rebuilt = identity_batches(_dataset(labels), P, K, seed=7)
    again_first, again_second = (np.concatenate([batch["index"] for batch in _epoch(rebuilt)]) for _ in range(2))
    np.testing.assert_array_equal(first, again_first)
    np.testing.assert_array_equal(second, again_second)

    other_seed = identity_batches(_dataset(labels), P, K, seed=8)
    other_first = np.concatenate([batch["index"] for batch in _epoch(other_seed)])
    assert not np.array_equal(first[: len(other_first)], other_first[: len(first)])


def test_unseeded_batches_still_have_identity_structure():
    for batch in _epoch(identity_batches(_dataset(_labels(seed=3)), 2, 3)):
        _assert_identity_structure(batch["label"], 2, 3)


def test_works_with_int32_labels_and_a_custom_label_key():
    labels = _labels(seed=4).astype(np.int32)
    dataset = tf.data.Dataset.from_tensor_slices({"person": labels, "caption": [str(label) for label in labels]})
    for batch in _epoch(identity_batches(dataset, P, K, seed=0, label_key="person")):
        _assert_identity_structure(batch["person"], P, K)
        assert [int(caption) for caption in batch["caption"]] == batch["person"].tolist()


@pytest.mark.parametrize(
    "make_dataset, arguments, message",
    [
        (lambda: _dataset(_labels()), dict(identities_per_batch=16, instances_per_identity=2), "only 15 identities"),
        (lambda: _dataset(_labels()), dict(identities_per_batch=0, instances_per_identity=2), "must be >= 1"),
        (lambda: _dataset(_labels()), dict(identities_per_batch=2, instances_per_identity=2, label_key="pid"), "no 'pid' feature"),
        (lambda: tf.data.Dataset.from_tensor_slices(np.arange(4)), dict(identities_per_batch=2, instances_per_identity=2), "dict elements"),
        (
            lambda: tf.data.Dataset.from_tensor_slices({"label": [0.0, 1.0]}),
            dict(identities_per_batch=2, instances_per_identity=2),
            "integer scalar",
        ),
        (
            lambda: tf.data.Dataset.from_tensor_slices({"label": np.arange(3)}).take(0),
            dict(identities_per_batch=1, instances_per_identity=2),
            "empty dataset",
        ),
        (
            lambda: tf.data.Dataset.range(3).map(lambda index: {"label": index, "image": tf.zeros([index + 1])}),
            dict(identities_per_batch=1, instances_per_identity=2),
            "one shape in all elements",
        ),
    ],
)
def test_bad_input_is_a_one_line_error(make_dataset, arguments, message):
    with pytest.raises(DualEncError, match=message) as raised:
        identity_batches(make_dataset(), **arguments)
    assert "\n" not in str(raised.value)
