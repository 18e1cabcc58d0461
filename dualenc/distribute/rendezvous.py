"""Workers of a multi-worker run meet at the chief's address before TensorFlow starts.

TensorFlow waits for missing workers inside native code that holds the interpreter lock, for
up to an hour and with no word on who is missing; and it never checks that the workers run
the same configuration. So before creating the strategy every worker checks in at the chief's
"host:port" (the port TensorFlow's server binds a moment later): the chief listens there,
collects one line ``{"rank": i, "fingerprint": "..."}`` from each other worker, and answers
each with ``ok`` or the one-line reason the run cannot start (a worker that never came, a
fingerprint unlike its own). Every worker then raises the same `DualEncError`, or goes on.

The workers close their connections first, so the chief's port holds no TIME_WAIT entries of
its own when TensorFlow binds it.
"""

from __future__ import annotations

import json
import socket
import time

from dualenc.distribute.cluster import Cluster
from dualenc.core.errors import DualEncError

OK = "ok"
# How often a worker retries connecting to a chief that is not listening yet.
RETRY_S = 0.25
# Longest line a check-in may be (a rank and a hex digest need ~100 bytes).
MAX_LINE = 4096


def _split(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def _read_line(connection: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = connection.recv(MAX_LINE)
        if not chunk or len(data) > MAX_LINE:
            break
        data += chunk
    return data.decode("utf-8", "replace").strip()


def _chief(cluster: Cluster, fingerprint: str, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    arrived: dict[int, tuple[socket.socket, str]] = {}
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", _split(cluster.address)[1]))
        listener.listen(cluster.num_workers)
        while len(arrived) < cluster.num_workers - 1 and time.monotonic() < deadline:
            listener.settimeout(max(0.01, deadline - time.monotonic()))
            try:
                connection, _ = listener.accept()
            except socket.timeout:
                break
            connection.settimeout(max(1.0, deadline - time.monotonic()))
            try:
                hello = json.loads(_read_line(connection))
                rank, theirs = int(hello["rank"]), str(hello["fingerprint"])
            except (OSError, ValueError, KeyError, TypeError):
                connection.close()  # not one of ours (a port scanner, a stale client): ignore it
                continue
            if rank in arrived or not 0 < rank < cluster.num_workers:
                connection.close()
                continue
            arrived[rank] = (connection, theirs)
        missing = [rank for rank in range(1, cluster.num_workers) if rank not in arrived]
        differing = sorted(rank for rank, (_, theirs) in arrived.items() if theirs != fingerprint)
        if missing:
            names = ", ".join(f"worker {rank} ({cluster.addresses[rank]})" for rank in missing)
            verdict = f"{names} never came up within {timeout_s:g} s; start every worker named in TF_CONFIG"
        elif differing:
            names = ", ".join(f"worker {rank} ({cluster.addresses[rank]})" for rank in differing)
            verdict = (
                f"{names} started with a different command or config than the chief ({cluster.address}); "
                "run the same train.py command on every worker"
            )
        else:
            verdict = OK
        for connection, _ in arrived.values():
            try:
                connection.sendall((verdict + "\n").encode())
                connection.settimeout(5.0)
                connection.recv(1)  # the worker closes first (see the module docstring)
            except OSError:
                pass
            connection.close()
    except OSError as error:
        raise DualEncError(f"the chief cannot listen at {cluster.address} ({error.strerror}); is the port in use?") from None
    finally:
        listener.close()
    if verdict != OK:
        raise DualEncError(verdict)


def _worker(cluster: Cluster, fingerprint: str, timeout_s: float) -> None:
    chief = cluster.addresses[0]
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            connection = socket.create_connection(_split(chief), timeout=max(0.1, deadline - time.monotonic()))
            break
        except OSError:
            if time.monotonic() >= deadline:
                raise DualEncError(
                    f"worker {cluster.rank} found no chief listening at {chief} within {timeout_s:g} s; "
                    "start worker 0 of TF_CONFIG too"
                ) from None
            time.sleep(RETRY_S)
    with connection:
        # The chief answers once every worker has come, or at its own deadline: allow for both.
        connection.settimeout(2 * timeout_s)
        try:
            connection.sendall((json.dumps({"rank": cluster.rank, "fingerprint": fingerprint}) + "\n").encode())
            verdict = _read_line(connection)
        except OSError as error:
            raise DualEncError(f"lost the chief at {chief} while waiting for the other workers ({error})") from None
    if verdict != OK:
        raise DualEncError(verdict or f"the chief at {chief} closed the connection before all workers came")


def check_in(cluster: Cluster, fingerprint: str, timeout_s: float) -> None:
    """Meet every other worker of `cluster` (module docstring); `DualEncError` when the run cannot start.

    `fingerprint` identifies the command and config; `timeout_s` bounds the wait for workers
    that never come up (the error names their addresses).
    """
    if cluster.num_workers == 1:
        return
    if cluster.is_chief:
        _chief(cluster, fingerprint, timeout_s)
    else:
        _worker(cluster, fingerprint, timeout_s)
