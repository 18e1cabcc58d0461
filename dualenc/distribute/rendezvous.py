"""Workers of a multi-worker run meet at the chief's address before TensorFlow starts.

TensorFlow waits for missing workers inside native code that holds the interpreter lock, for
up to an hour and with no word on who is missing; and it never checks that the workers run
the same configuration. So before creating the strategy every worker checks in at the chief's
"host:port" (the port TensorFlow's server binds a moment later): the chief listens there and
answers each worker with ``ok`` or the one-line reason the run cannot start (a worker that
never came, one whose config differs). Every worker then raises the same `DualEncError`, or
goes on.

Check-in: the chief greets each connection with a fresh random nonce; the worker answers with
one line ``{"rank": i, "proof": HMAC-SHA256(key=fingerprint, nonce + rank)}``. Only a proof made
with the chief's own config fingerprint takes a rank, so neither a worker started with another
config nor a stray client can claim one (the first one is told why at once and named when the
chief gives up); the fingerprint itself never crosses the network. Each connection has its own
read deadline (`CHECK_IN_READ_S`) and the chief serves all of them at once, so a connection that
sends nothing holds up nobody.

The workers close their connections first, so the chief's port holds no TIME_WAIT entries of
its own when TensorFlow binds it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import secrets
import selectors
import socket
import time

from dualenc.core import jsonfiles
from dualenc.core.errors import DualEncError
from dualenc.distribute.cluster import Cluster

OK = "ok"
GREETING = "dualenc-rendezvous"
# How often a worker retries connecting to a chief that is not listening yet.
RETRY_S = 0.25
# Longest line a check-in may be (a rank and a hex digest need ~100 bytes).
MAX_LINE = 4096
# How long the chief waits for a connection's check-in line, and a worker for the greeting: a
# worker sends its line at once, so only a stalled or stray client takes longer.
CHECK_IN_READ_S = 10.0
# How long the chief waits for a worker to take its answer and close first.
ANSWER_S = 5.0


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


def proof(fingerprint: str, nonce: str, rank: int) -> str:
    """What worker `rank` answers the chief's `nonce` with: an HMAC keyed by its config fingerprint."""
    return hmac.new(fingerprint.encode(), f"{nonce} {rank}".encode(), hashlib.sha256).hexdigest()


def _differing(cluster: Cluster, ranks: list[int]) -> str:
    names = ", ".join(f"worker {rank} ({cluster.addresses[rank]})" for rank in ranks)
    return (f"{names} started with a different command or config than the chief ({cluster.address}); "
            "run the same train.py command on every worker")


def _answer(connection: socket.socket, line: str, wait_for_close: bool = True) -> None:
    """Send `line` and close; with `wait_for_close`, let the worker close first (module
    docstring). A refusal while others are still served does not wait: nothing may stall them."""
    try:
        connection.settimeout(ANSWER_S if wait_for_close else 0.0)
        connection.sendall((line + "\n").encode())
        if wait_for_close:
            connection.recv(1)
    except OSError:
        pass
    connection.close()


@dataclasses.dataclass
class _Pending:
    """A connection whose check-in line has not come yet."""

    nonce: str
    deadline: float
    received: bytes = b""


class _Chief:
    """The chief's side: serves every connection at once until each other rank has proved its
    check-in or the deadline passed."""

    def __init__(self, cluster: Cluster, fingerprint: str, deadline: float):
        self.cluster, self.fingerprint, self.deadline = cluster, fingerprint, deadline
        self.arrived: dict[int, socket.socket] = {}
        self.refused: set[int] = set()  # ranks claimed with a wrong proof (another config)
        self.selector = selectors.DefaultSelector()

    def serve(self, listener: socket.socket) -> None:
        listener.setblocking(False)
        self.selector.register(listener, selectors.EVENT_READ)
        try:
            while len(self.arrived) < self.cluster.num_workers - 1 and time.monotonic() < self.deadline:
                self._expire()
                pending = [key.data.deadline for key in self.selector.get_map().values() if key.data]
                wait = min([self.deadline, *pending]) - time.monotonic()
                for key, _ in self.selector.select(max(0.0, wait)):
                    if key.data is None:
                        self._accept(listener)
                    else:
                        self._receive(key.fileobj, key.data)
        finally:
            for key in list(self.selector.get_map().values()):
                if key.data is not None:
                    key.fileobj.close()
            self.selector.close()

    def _expire(self) -> None:
        now = time.monotonic()
        for key in list(self.selector.get_map().values()):
            if key.data is not None and key.data.deadline <= now:
                self._drop(key.fileobj)

    def _drop(self, connection: socket.socket) -> None:
        self.selector.unregister(connection)
        connection.close()

    def _accept(self, listener: socket.socket) -> None:
        try:
            connection, _ = listener.accept()
        except BlockingIOError:
            return
        nonce = secrets.token_hex(16)
        try:
            connection.settimeout(CHECK_IN_READ_S)
            connection.sendall(f"{GREETING} {nonce}\n".encode())
        except OSError:
            connection.close()
            return
        connection.setblocking(False)
        self.selector.register(connection, selectors.EVENT_READ,
                               _Pending(nonce, min(self.deadline, time.monotonic() + CHECK_IN_READ_S)))

    def _receive(self, connection: socket.socket, pending: _Pending) -> None:
        try:
            chunk = connection.recv(MAX_LINE)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""
        pending.received += chunk
        if not chunk or len(pending.received) > MAX_LINE:
            self._drop(connection)  # closed early, or not one of ours
        elif b"\n" in pending.received:
            self.selector.unregister(connection)
            self._judge(connection, pending.received.split(b"\n", 1)[0], pending.nonce)

    def _judge(self, connection: socket.socket, line: bytes, nonce: str) -> None:
        """Give the connection its rank, or refuse it: a line that is not a check-in (a port
        scanner, a stale client) is closed, a wrong proof or a taken rank told why."""
        try:
            hello = jsonfiles.loads(line.decode("utf-8", "replace"), "check-in")
            rank, claimed = hello["rank"], hello["proof"]
            valid = (isinstance(rank, int) and not isinstance(rank, bool) and 0 < rank < self.cluster.num_workers
                     and isinstance(claimed, str))
        except (DualEncError, KeyError, TypeError):
            valid = False
        if not valid:
            connection.close()
            return
        if not hmac.compare_digest(claimed.encode(), proof(self.fingerprint, nonce, rank).encode()):
            self.refused.add(rank)
            _answer(connection, _differing(self.cluster, [rank]), wait_for_close=False)
        elif rank in self.arrived:
            _answer(connection, f"worker {rank} ({self.cluster.addresses[rank]}) has already checked in; "
                                "start each worker of TF_CONFIG once", wait_for_close=False)
        else:
            connection.setblocking(True)
            self.arrived[rank] = connection

    def verdict(self, timeout_s: float) -> str:
        missing = [rank for rank in range(1, self.cluster.num_workers) if rank not in self.arrived]
        if not missing:
            return OK
        differing = [rank for rank in missing if rank in self.refused]
        if differing:
            return _differing(self.cluster, differing)
        names = ", ".join(f"worker {rank} ({self.cluster.addresses[rank]})" for rank in missing)
        return f"{names} never came up within {timeout_s:g} s; start every worker named in TF_CONFIG"



def _chief(cluster: Cluster, fingerprint: str, timeout_s: float) -> None:
    chief = _Chief(cluster, fingerprint, time.monotonic() + timeout_s)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("", _split(cluster.address)[1]))
        listener.listen(cluster.num_workers)
        chief.serve(listener)
    except OSError as error:
        for connection in chief.arrived.values():
            connection.close()
        raise DualEncError(f"the chief cannot listen at {cluster.address} ({error.strerror}); is the port in use?") from None
    finally:
        listener.close()
    verdict = chief.verdict(timeout_s)
    for connection in chief.arrived.values():
        _answer(connection, verdict)
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
        try:
            connection.settimeout(CHECK_IN_READ_S)
            greeting, _, nonce = _read_line(connection).partition(" ")
            if greeting != GREETING or not nonce:
                raise DualEncError(f"{chief} (worker 0 of TF_CONFIG) is not a dualenc chief; "
                                   "check TF_CONFIG's addresses and that no other program uses the port")
            check_in_line = {"rank": cluster.rank, "proof": proof(fingerprint, nonce, cluster.rank)}
            connection.sendall((json.dumps(check_in_line) + "\n").encode())
            # The chief answers once every worker has come, or at its own deadline: allow for both.
            connection.settimeout(2 * timeout_s)
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
