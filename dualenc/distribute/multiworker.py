"""Training one model on several machines with `tf.distribute.MultiWorkerMirroredStrategy`.

Every worker runs the same `train.py` command with its own `TF_CONFIG` (`dualenc.distribute.cluster`).
Each embeds its slice of every global batch; the model's steps all-gather the embeddings
(`dualenc.models.placement.gather_replicas`) so the contrastive loss sees the whole global batch as
negatives, exactly as one process would.

Why `MultiWorkerStrategy` and not the stock class: Keras 3's TensorFlow trainer (3.15,
``keras/src/backend/tensorflow/trainer.py``) calls ``strategy.reduce`` in two ways that
`tf.distribute.MultiWorkerMirroredStrategy.reduce` rejects once it spans several workers:

- ``_maybe_symbolic_build`` (start of every ``fit``/``evaluate`` of a model created in the
  strategy's scope) reduces the first input batch, a dict or tuple, in one call; the
  strategy reduces one value at a time (its own docstring: "TODO: support `value` being a
  nest") and fails with ``Attempt to convert a value (PerReplica...)``;
- ``reduce_per_replica`` averages each step's logs with ``reduce("MEAN", value, axis=0)``,
  and the logs are scalars, which have no axis 0 (``Invalid reduction dimension 0``).

`MultiWorkerStrategy.reduce` accepts both: a nest is reduced leaf by leaf (integer leaves,
which Keras only inspects for their shapes, keep this worker's values), and a scalar is
averaged over the replicas without an axis. Nothing private is overridden.

Before the strategy starts TensorFlow, the workers check in with the chief
(`dualenc.distribute.rendezvous`), which names a worker that never comes and refuses one whose config
fingerprint differs. Only the chief writes the run directory; the other workers run the same callbacks into a
scratch directory they delete (`worker_run_paths`), since saving reads every variable, which
may need all workers. The chief's backup lies in the shared run directory and every worker
restores from it, so restarting every worker resumes from the last finished epoch.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import signal
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import keras
import tensorflow as tf

from dualenc.distribute.cluster import Cluster
from dualenc.core.errors import DualEncError
from dualenc.distribute.rendezvous import check_in
from dualenc.core.runs import RunPaths
from dualenc.core.startup import native_stderr_dropped

# How long a worker waits for all others to join before giving up; `$DUALENC_WORKER_TIMEOUT_S` overrides.
DEFAULT_JOIN_TIMEOUT_S = 300.0
JOIN_TIMEOUT_VARIABLE = "DUALENC_WORKER_TIMEOUT_S"
SHARD_BY_FILE = "file"
SHARD_BY_DATA = "data"


class MultiWorkerStrategy(tf.distribute.MultiWorkerMirroredStrategy):
    """`MultiWorkerMirroredStrategy` whose `reduce` takes what Keras' trainer gives it (module docstring)."""

    def reduce(self, reduce_op: Any, value: Any, axis: int | None) -> Any:
        """`Strategy.reduce` of each leaf of `value`; integer leaves stay local, scalars ignore `axis`."""

        def reduce_leaf(leaf: Any) -> Any:
            local = self.experimental_local_results(leaf)[0]
            if not local.dtype.is_floating:
                return local
            leaf_axis = None if local.shape.rank == 0 else axis
            return super(MultiWorkerStrategy, self).reduce(reduce_op, leaf, leaf_axis)

        return tf.nest.map_structure(reduce_leaf, value)


def join_timeout_s() -> float:
    """Seconds to wait for the other workers (`$DUALENC_WORKER_TIMEOUT_S`, else 300)."""
    text = os.environ.get(JOIN_TIMEOUT_VARIABLE, "")
    try:
        return float(text) if text else DEFAULT_JOIN_TIMEOUT_S
    except ValueError:
        raise DualEncError(f"${JOIN_TIMEOUT_VARIABLE}={text!r} is not a number of seconds") from None


def create_strategy(cluster: Cluster, config_fingerprint: str) -> MultiWorkerStrategy:
    """The strategy for `cluster`, once every worker has checked in with the same `config_fingerprint`.

    Call it before any other TensorFlow op: the strategy configures TensorFlow's runtime.
    """
    check_in(cluster, config_fingerprint, join_timeout_s())
    with native_stderr_dropped():  # TensorFlow's device start-up chatter, as import_tensorflow drops it
        strategy = MultiWorkerStrategy()
    _stop_on_sigterm()
    return strategy


def _stop_on_sigterm() -> None:
    """Let SIGTERM end this worker again, as it ends any Python program.

    Starting the strategy installs TensorFlow's preemption notifier as the SIGTERM handler: it
    only records the signal for `tf.distribute.experimental.PreemptionCheckpointHandler`, which
    dualenc does not use, so the worker would go on training (or wait on a dead peer) and
    `kill`, a cluster manager's stop, or `dualenc.launch` stopping the others after a failure
    would each wait for SIGKILL. A stopped worker resumes from the last backup when restarted.
    Signal handlers can be set from the main thread only; elsewhere TensorFlow's stays.
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def fingerprint(config_json: str) -> str:
    """What the workers compare to know they run the same command: the SHA-256 of the resolved config."""
    return hashlib.sha256(config_json.encode()).hexdigest()


def join_run(strategy: tf.distribute.Strategy, cluster: Cluster, paths: RunPaths, prepare: Callable[[], None]) -> RunPaths:
    """Let the chief `prepare` the shared files of the run directory (the vocabulary) while the
    others wait, then run `prepare` on them, which finds those files in place on shared storage;
    return where this worker writes (`worker_run_paths`)."""
    if cluster.is_chief:
        prepare()

    @tf.function  # strategy.run outside a tf.function warns of (and has) eager overhead
    def barrier() -> Any:
        return strategy.run(lambda: tf.distribute.get_replica_context().all_reduce("sum", tf.ones(())))

    barrier()
    if not cluster.is_chief:
        prepare()
    return worker_run_paths(paths, cluster)


def _leaf_layers(layer: keras.layers.Layer) -> Iterator[keras.layers.Layer]:
    children = getattr(layer, "layers", None)
    if not children:
        yield layer
        return
    for child in children:
        yield from _leaf_layers(child)


class AverageMovingStatistics(keras.callbacks.Callback):
    """Averages over the workers what training layers update outside the optimiser (BatchNorm's
    moving mean and variance), before each validation and at each epoch end.

    Those variables have no aggregation, so each worker updates them from its own slice of
    the batch and they drift apart; a worker would then validate (and export) another model
    than the chief, and callbacks that follow validation metrics (early stopping, the learning
    rate) could decide differently on different workers, leaving one waiting for the rest.
    List it first, before the callbacks that read the weights.
    """

    def __init__(self, strategy: tf.distribute.Strategy):
        super().__init__()
        self.strategy = strategy
        self._average = None

    def _build_average(self) -> Callable[[], Any]:
        seen: dict[int, Any] = {}
        for layer in _leaf_layers(self.model):
            if layer.trainable:
                for weight in layer.non_trainable_weights:
                    if "float" in str(weight.dtype):
                        seen.setdefault(id(weight), weight)
        variables = list(seen.values())

        @tf.function
        def average() -> None:
            def replica() -> None:
                # Reads give this worker's copy; assigning without aggregation writes it back locally.
                means = tf.distribute.get_replica_context().all_reduce("mean", [tf.identity(v.value) for v in variables])
                for variable, mean in zip(variables, means):
                    variable.value.assign(mean)

            if variables:
                self.strategy.run(replica)

        return average

    def _synchronise(self) -> None:
        if self._average is None:
            self._average = self._build_average()
        self._average()

    def on_test_begin(self, logs: dict | None = None) -> None:
        self._synchronise()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._synchronise()


def worker_callbacks(placement: Any) -> list[keras.callbacks.Callback]:
    """Callbacks a multi-worker run needs before all others (`AverageMovingStatistics`); none otherwise."""
    if placement is None or placement.cluster is None:
        return []
    return [AverageMovingStatistics(placement.strategy)]


def input_sharding(
    cluster: Cluster | None, manifest: Any, data_dir: Path, split: str
) -> Callable[[tf.data.Dataset], tf.data.Dataset] | None:
    """For a multi-worker run, a function giving the training inputs of `split` the sharding its
    number of files allows (`shard_mode`), which it prints. None otherwise."""
    if cluster is None:
        return None
    files = len(manifest.split(split, data_dir).shards)
    mode = shard_mode(files, cluster.num_workers)
    print(describe(cluster, mode, files), flush=True)
    return lambda dataset: shard_inputs(dataset, mode)


def shard_mode(num_files: int, num_workers: int) -> str:
    """"file" when every worker can read whole files of its own, "data" otherwise."""
    return SHARD_BY_FILE if num_files >= num_workers else SHARD_BY_DATA


def shard_inputs(dataset: tf.data.Dataset, mode: str) -> tf.data.Dataset:
    """`dataset` with the auto-shard policy `mode` that `experimental_distribute_dataset` applies.

    By file, each worker reads its own TFRecord shards; by data, each reads everything and keeps
    its slice of every global batch (so the global batches are the single-process ones).
    """
    policy = {
        SHARD_BY_FILE: tf.data.experimental.AutoShardPolicy.FILE,
        SHARD_BY_DATA: tf.data.experimental.AutoShardPolicy.DATA,
    }[mode]
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = policy
    return dataset.with_options(options)


def worker_run_paths(paths: RunPaths, cluster: Cluster | None) -> RunPaths:
    """Where this worker writes: the run directory for the chief (or a single process), else a
    scratch directory that starts with a copy of the chief's backup and checkpoints, so this
    worker resumes from the same epoch.

    The scratch directory is removed when the process exits; its name is fixed per run and
    worker, so one left behind by a killed worker is replaced when that worker restarts.
    """
    if cluster is None or cluster.is_chief:
        return paths
    run_id = hashlib.sha256(str(paths.root).encode()).hexdigest()[:12]
    scratch = Path(tempfile.gettempdir()) / f"dualenc-{run_id}-worker{cluster.rank}"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir(mode=0o700)
    atexit.register(shutil.rmtree, scratch, ignore_errors=True)
    # What a resume reads: the backup, and the best epochs' weights it may export from.
    for kept in (paths.backup, paths.best_weights.parent):
        if kept.is_dir():
            shutil.copytree(kept, scratch / kept.relative_to(paths.root))
    return RunPaths(scratch)


def worker_cache_dir(cache_dir: Path, cluster: Cluster | None) -> Path:
    """The feature cache of this worker: its own subdirectory, so workers sharing a disk never
    write one cache file at the same time."""
    return cache_dir if cluster is None else cache_dir / f"worker-{cluster.rank}"


def describe(cluster: Cluster, mode: str, num_files: int) -> str:
    """The line a run prints about its cluster and input sharding."""
    reason = (
        f"{num_files} shards >= {cluster.num_workers} workers"
        if mode == SHARD_BY_FILE
        else f"{num_files} shard(s) < {cluster.num_workers} workers"
    )
    role = "chief" if cluster.is_chief else "writes to a scratch directory"
    return (
        f"multi-worker: worker {cluster.rank} of {cluster.num_workers} ({cluster.address}, {role}); "
        f"input sharded by {mode} ({reason})"
    )
