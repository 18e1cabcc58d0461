"""Where the dual encoder runs: one device, the two towers split over two, or data-parallel.

- "single": no placement at all; TensorFlow picks the device.
- "split" (seed 003): the text tower and its head on the first device, the vision tower and its
  head on the second, so two accelerators share one model without copying it. Devices default
  to the first two GPUs, or without GPUs the first two logical CPUs (tests configure those).
- "mirrored": `tf.distribute.MirroredStrategy` data parallelism. Each replica embeds its slice
  of the batch; `gather_replicas` concatenates the slices so every replica's contrastive loss
  sees the whole global batch as negatives (as open_clip's `gather_features` does).
- "multi-worker": the same across machines, on `dualenc.distribute.multiworker.MultiWorkerStrategy`, with
  the workers named by `TF_CONFIG` (`dualenc.distribute.cluster`); create it before any other TF op.
- "auto": "multi-worker" when `TF_CONFIG` names more than one worker, else "single".

Without enough devices "split" and "mirrored" fall back to "single" with a warning, so a
config written for a two-GPU machine still trains on a laptop.
"""

from __future__ import annotations

import warnings

import tensorflow as tf

from dualenc.distribute.cluster import cluster_from_environment, resolve_placement
from dualenc.core.config import PLACEMENTS
from dualenc.core.errors import DualEncError
from dualenc.distribute.multiworker import create_strategy
from dualenc.models.placement import Placement


def _same_device(requested: tf.DeviceSpec, name: str) -> bool:
    visible = tf.DeviceSpec.from_string(name)
    same_type = (requested.device_type or "").upper() == visible.device_type
    return same_type and (requested.device_index or 0) == visible.device_index


def _resolve(devices: list[str]) -> tuple[str, ...]:
    """Full logical names of `devices` ("/gpu:1", "CPU:0", ...); DualEncError for unknown ones."""
    visible = [device.name for device in tf.config.list_logical_devices()]
    resolved = []
    for device in devices:
        try:
            requested = tf.DeviceSpec.from_string(device if device.startswith("/") else f"/{device}")
        except ValueError:
            requested = None
        matches = [name for name in visible if requested is not None and _same_device(requested, name)]
        if not matches:
            raise DualEncError(f"device {device!r} is not visible; visible devices: {', '.join(visible)}")
        resolved.append(matches[0])
    return tuple(resolved)


def _default_devices() -> tuple[str, ...]:
    """All GPUs if any, else all logical CPUs (one unless configured, as the tests do).

    One GPU never pairs with a CPU: moving a tower off the GPU would only slow it down.
    """
    gpus = [device.name for device in tf.config.list_logical_devices("GPU")]
    if gpus:
        return tuple(gpus)
    return tuple(device.name for device in tf.config.list_logical_devices("CPU"))


def make_placement(kind: str, devices: list[str] | None = None, *, config_fingerprint: str = "") -> Placement:
    """Resolve placement `kind` (one of `PLACEMENTS`) onto `devices` or the visible ones.

    Explicit `devices` must exist and number at least two for "split" (the first two are used)
    and at least one for "mirrored". Without explicit devices, fewer than two usable devices
    fall back to "single" with a warning. "multi-worker" needs `TF_CONFIG`, ignores `devices`
    (each worker uses its own GPUs, or its CPU) and starts only once every worker has checked
    in with the same `config_fingerprint` (`dualenc.distribute.rendezvous`).
    """
    if kind not in PLACEMENTS:
        raise DualEncError(f"unknown placement {kind!r}; choose one of: {', '.join(PLACEMENTS)}")
    kind = resolve_placement(kind)
    if kind == "single":
        return Placement()
    if kind == "multi-worker":
        return _multi_worker_placement(config_fingerprint)
    if devices is not None:
        chosen = _resolve(list(devices))
        if kind == "split" and len(chosen) < 2:
            raise DualEncError(f"placement 'split' needs two devices, got {list(devices)!r}")
    else:
        chosen = _default_devices()
        if len(chosen) < 2:
            warnings.warn(
                f"placement {kind!r} needs two devices but only {list(chosen)} is visible; using 'single'", stacklevel=2
            )
            return Placement()
    if kind == "split":
        return Placement("split", chosen[:2], text_device=chosen[0], vision_device=chosen[1])
    return Placement("mirrored", chosen, strategy=tf.distribute.MirroredStrategy(list(chosen)))


def _multi_worker_placement(config_fingerprint: str) -> Placement:
    cluster = cluster_from_environment()
    if cluster is None:
        raise DualEncError(
            "placement 'multi-worker' needs TF_CONFIG naming the workers; "
            "see README 'Training on several machines' or start them with python -m dualenc.launch"
        )
    return Placement("multi-worker", strategy=create_strategy(cluster, config_fingerprint), cluster=cluster)
