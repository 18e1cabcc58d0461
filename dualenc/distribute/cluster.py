"""The `TF_CONFIG` environment variable: which workers train together and which one this is.

Kubeflow's TFJob, Vertex AI, SageMaker and `python -m dualenc.launch` describe a multi-worker
run to every process the same way::

    TF_CONFIG='{"cluster": {"worker": ["host-a:2222", "host-b:2222"]},
                "task": {"type": "worker", "index": 0}}'

A cluster may also name a separate "chief" job (one address); it then is worker 0 and the
"worker" job's addresses follow it, which is the order `MultiWorkerMirroredStrategy` numbers
its replicas in. Parameter-server jobs ("ps") and evaluators are not used by that strategy
and are refused. Pure Python, so a CLI checks `TF_CONFIG` before it imports TensorFlow.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

from dualenc.core import jsonfiles
from dualenc.core.errors import DualEncError

TF_CONFIG = "TF_CONFIG"
# The jobs whose tasks train under MultiWorkerMirroredStrategy, chief first.
TRAINING_JOBS = ("chief", "worker")
TF_CONFIG_SHAPE = '{"cluster": {"worker": ["host:port", ...]}, "task": {"type": "worker", "index": N}}'


@dataclasses.dataclass(frozen=True)
class Cluster:
    """The training tasks of `TF_CONFIG`: `addresses` chief first, and this task's `rank` among them."""

    addresses: tuple[str, ...]
    rank: int
    task_type: str
    task_index: int

    @property
    def num_workers(self) -> int:
        return len(self.addresses)

    @property
    def is_chief(self) -> bool:
        """Worker 0 (the "chief" task, or "worker" 0 without one) writes the run directory."""
        return self.rank == 0

    @property
    def address(self) -> str:
        return self.addresses[self.rank]


def _addresses(cluster: object, job: str) -> list[str]:
    if not isinstance(cluster, Mapping):
        raise DualEncError(f'{TF_CONFIG} "cluster" must be an object of job names to address lists, got {cluster!r}')
    addresses = cluster.get(job, [])
    if not isinstance(addresses, list) or not all(isinstance(address, str) and address for address in addresses):
        raise DualEncError(f'{TF_CONFIG} cluster job {job!r} must be a list of "host:port" strings, got {addresses!r}')
    return addresses


def parse_tf_config(text: str) -> Cluster:
    """The `Cluster` described by a `TF_CONFIG` value; `DualEncError` (one line) for anything unusable."""
    values = jsonfiles.loads(text, TF_CONFIG, hint=f"set it to {TF_CONFIG_SHAPE}")
    if not isinstance(values, Mapping):
        raise DualEncError(f'{TF_CONFIG} must be a JSON object with "cluster" and "task", got {text[:80]!r}')
    cluster = values.get("cluster")
    if cluster is None:
        raise DualEncError(f'{TF_CONFIG} names no "cluster"; list the workers as {{"cluster": {{"worker": ["host:port", ...]}}}}')
    others = sorted(set(cluster) - set(TRAINING_JOBS)) if isinstance(cluster, Mapping) else []
    if others:
        raise DualEncError(
            f"{TF_CONFIG} cluster has job(s) {', '.join(others)}; multi-worker training uses only "
            f"{' and '.join(TRAINING_JOBS)} tasks"
        )
    jobs = {job: _addresses(cluster, job) for job in TRAINING_JOBS}
    if len(jobs["chief"]) > 1:
        raise DualEncError(f'{TF_CONFIG} cluster names {len(jobs["chief"])} chiefs; it may name one at most')
    task = values.get("task")
    if not isinstance(task, Mapping) or "type" not in task or "index" not in task:
        raise DualEncError(f'{TF_CONFIG} names no task; add "task": {{"type": "worker", "index": N}} for this process')
    task_type, task_index = task["type"], task["index"]
    if task_type not in TRAINING_JOBS:
        raise DualEncError(f"{TF_CONFIG} task type {task_type!r} is not one of {', '.join(TRAINING_JOBS)}")
    tasks = jobs[task_type]
    if not isinstance(task_index, int) or isinstance(task_index, bool) or not 0 <= task_index < len(tasks):
        raise DualEncError(
            f"{TF_CONFIG} task index {task_index!r} is outside the cluster: job {task_type!r} has "
            f"{len(tasks)} address(es), so the index must be 0..{len(tasks) - 1}"
        )
    addresses = tuple(jobs["chief"] + jobs["worker"])
    if len(set(addresses)) != len(addresses):
        raise DualEncError(f"{TF_CONFIG} cluster lists an address twice: {', '.join(addresses)}")
    rank = task_index if task_type == "chief" else len(jobs["chief"]) + task_index
    return Cluster(addresses=addresses, rank=rank, task_type=task_type, task_index=task_index)


def cluster_from_environment(environ: Mapping[str, str] | None = None) -> Cluster | None:
    """The `Cluster` of `$TF_CONFIG`, or None when it is unset or empty."""
    text = (os.environ if environ is None else environ).get(TF_CONFIG, "").strip()
    return parse_tf_config(text) if text else None


def resolve_placement(kind: str, environ: Mapping[str, str] | None = None) -> str:
    """`kind` with "auto" made concrete: "multi-worker" when `TF_CONFIG` names more than one
    worker, "single" otherwise (the other kinds are chosen explicitly)."""
    if kind != "auto":
        return kind
    cluster = cluster_from_environment(environ)
    return "multi-worker" if cluster is not None and cluster.num_workers > 1 else "single"


def training_cluster(
    placement: str, out: str | None, data: str | None, environ: Mapping[str, str] | None = None
) -> Cluster | None:
    """This process's `Cluster` when `placement` resolves to "multi-worker", else None.

    What a CLI can check before TensorFlow starts: `TF_CONFIG` itself, and the shared
    directories every worker must be given (a per-worker default would split the run).
    """
    if resolve_placement(placement, environ) != "multi-worker":
        return None
    cluster = cluster_from_environment(environ)
    if cluster is None:
        raise DualEncError(
            f"--placement multi-worker needs {TF_CONFIG} naming the workers; start them with "
            "`python -m dualenc.launch --workers N -- train.py ...` or see README 'Training on several machines'"
        )
    if out is None:
        raise DualEncError("--placement multi-worker needs --out DIR, the same shared directory on every worker")
    if data is None:
        raise DualEncError("--placement multi-worker needs --data DIR, a packed dataset every worker can read")
    return cluster
