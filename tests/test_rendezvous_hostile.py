"""The rendezvous on 127.0.0.1 against idle connections, stray clients and wrong configs."""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from dualenc.core.errors import DualEncError
from dualenc.distribute import launch, rendezvous
from dualenc.distribute.cluster import parse_tf_config

TIMEOUT_S = 20.0


def _clusters(workers: int):
    return [parse_tf_config(text) for text in launch.tf_configs(launch.free_ports(workers))]


def _start(cluster, fingerprint: str, outcomes: dict) -> threading.Thread:
    def run() -> None:
        try:
            rendezvous.check_in(cluster, fingerprint, TIMEOUT_S)
            outcomes[cluster.rank] = "ok"
        except DualEncError as error:
            outcomes[cluster.rank] = str(error)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def _connect(cluster) -> socket.socket:
    """A client connection to the chief's port (127.0.0.1 only), once the chief listens."""
    host, port = cluster.addresses[0].rsplit(":", 1)
    assert host == "127.0.0.1"
    deadline = time.monotonic() + 10
    while True:
        try:
            connection = socket.create_connection((host, int(port)), timeout=5)
            break
        except OSError:
            assert time.monotonic() < deadline, "the chief never listened"
            time.sleep(0.05)
    assert connection.makefile("rb").readline().startswith(rendezvous.GREETING.encode())
    return connection


def _finish(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(timeout=TIMEOUT_S / 2)
    assert not any(thread.is_alive() for thread in threads), "the rendezvous stalled"


def test_an_idle_connection_stalls_nobody():
    clusters = _clusters(3)
    outcomes: dict = {}
    chief = _start(clusters[0], "same", outcomes)
    idle = _connect(clusters[0])  # connects, then says nothing
    started = time.monotonic()
    _finish([chief, *[_start(cluster, "same", outcomes) for cluster in clusters[1:]]])
    assert outcomes == {0: "ok", 1: "ok", 2: "ok"} and time.monotonic() - started < rendezvous.CHECK_IN_READ_S
    idle.close()


def test_an_idle_connection_is_closed_at_its_own_deadline(monkeypatch):
    monkeypatch.setattr(rendezvous, "CHECK_IN_READ_S", 0.5)
    clusters = _clusters(2)
    outcomes: dict = {}
    chief = _start(clusters[0], "same", outcomes)
    idle = _connect(clusters[0])
    idle.settimeout(5)
    assert idle.recv(1) == b""  # closed by the chief while it still waits for worker 1
    _finish([chief, _start(clusters[1], "same", outcomes)])
    assert outcomes == {0: "ok", 1: "ok"}


@pytest.mark.parametrize("line", [
    json.dumps({"rank": 1, "proof": "0" * 64}),
    json.dumps({"rank": 1, "fingerprint": "same"}),  # the old check-in: a hash in the clear proves nothing
    "[" * 100_000,
    json.dumps({"rank": 1, "proof": "é"}),
])
def test_a_stray_client_cannot_take_a_rank(line):
    clusters = _clusters(2)
    outcomes: dict = {}
    chief = _start(clusters[0], "same", outcomes)
    stray = _connect(clusters[0])
    stray.sendall((line + "\n").encode())
    stray.settimeout(5)
    try:
        answer = stray.makefile("rb").readline().decode()
    except ConnectionResetError:  # closed with the unread rest of an over-long line
        answer = ""
    assert answer == "" or "different command or config" in answer
    stray.close()
    _finish([chief, _start(clusters[1], "same", outcomes)])
    assert outcomes == {0: "ok", 1: "ok"}


def test_a_worker_with_another_config_is_refused_at_once_and_named_by_the_chief(monkeypatch):
    clusters = _clusters(2)
    outcomes: dict = {}
    monkeypatch.setattr(rendezvous, "CHECK_IN_READ_S", 1.0)
    chief = threading.Thread(daemon=True, target=lambda: outcomes.update(
        {0: _outcome(clusters[0], "same", timeout_s=2.0)}))
    chief.start()
    started = time.monotonic()
    outcomes[1] = _outcome(clusters[1], "other", timeout_s=2.0)
    assert time.monotonic() - started < 2.0  # told at once, not at the chief's deadline
    _finish([chief])
    expected = f"worker 1 ({clusters[0].addresses[1]}) started with a different command or config than the chief"
    assert outcomes[0].startswith(expected) and outcomes[1] == outcomes[0]


def _outcome(cluster, fingerprint: str, timeout_s: float) -> str:
    try:
        rendezvous.check_in(cluster, fingerprint, timeout_s)
        return "ok"
    except DualEncError as error:
        return str(error)
