"""Start N training workers on this machine, as a cluster manager would start them on N machines.

    python -m dualenc.launch --workers 2 -- train.py --data data/demo --out runs/two --placement multi-worker

Each worker is the given command with its own `TF_CONFIG` naming every worker at a free
127.0.0.1 port; a command starting with a ``.py`` file runs under this Python. Every output
line is printed with a ``[worker i]`` prefix. When a worker fails, the others are stopped (they
would wait for it forever) and the launcher exits with the failed worker's status; 0 when all
succeed. What one box can show: the code path of a cluster, not its speed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from dualenc.distribute.cluster import TF_CONFIG
from dualenc.core.errors import DualEncError

LOOPBACK = "127.0.0.1"
# Seconds a stopped worker gets to exit after SIGTERM before it is killed.
STOP_GRACE_S = 10.0
POLL_S = 0.2


def free_ports(count: int) -> list[int]:
    """`count` distinct TCP ports free on the loopback right now (the OS picks them)."""
    sockets = []
    try:
        for _ in range(count):
            candidate = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            candidate.bind((LOOPBACK, 0))
            sockets.append(candidate)
        return [candidate.getsockname()[1] for candidate in sockets]
    finally:
        for candidate in sockets:
            candidate.close()


def tf_configs(ports: Sequence[int]) -> list[str]:
    """The `TF_CONFIG` of each worker of a loopback cluster on `ports`, worker 0 (the chief) first."""
    addresses = [f"{LOOPBACK}:{port}" for port in ports]
    return [
        json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
        for index in range(len(addresses))
    ]


def worker_command(command: Sequence[str]) -> list[str]:
    """`command`, run under this Python when it starts with a script."""
    return [sys.executable, *command] if command[0].endswith(".py") else list(command)


def start_workers(command: Sequence[str], workers: int, env: dict[str, str] | None = None) -> list[subprocess.Popen]:
    """Start `workers` copies of `command` with loopback `TF_CONFIG`s; stdout and stderr merged, as text."""
    base = dict(os.environ if env is None else env)
    return [
        subprocess.Popen(
            worker_command(command),
            env={**base, TF_CONFIG: config},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        for config in tf_configs(free_ports(workers))
    ]


def _relay(index: int, stream: IO[str], sink: IO[str], lock: threading.Lock) -> None:
    for line in stream:
        with lock:
            sink.write(f"[worker {index}] {line}" if line.endswith("\n") else f"[worker {index}] {line}\n")
            sink.flush()


def stop(processes: Sequence[subprocess.Popen]) -> None:
    """SIGTERM every running process, then SIGKILL those still running after `STOP_GRACE_S`."""
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def supervise(processes: Sequence[subprocess.Popen], sink: IO[str] | None = None) -> int:
    """Relay every worker's output with its prefix (to `sink`, default stdout) until all exit;
    stop the rest when one fails.

    Returns 0 when every worker succeeded, else the status of the first that failed (1 if that
    status was itself 0 or negative, i.e. a signal).
    """
    sink = sys.stdout if sink is None else sink
    lock = threading.Lock()
    relays = [
        threading.Thread(target=_relay, args=(index, process.stdout, sink, lock), daemon=True)
        for index, process in enumerate(processes)
    ]
    for relay in relays:
        relay.start()
    failed = None
    try:
        while failed is None and any(process.poll() is None for process in processes):
            failed = next((process for process in processes if process.poll() not in (None, 0)), None)
            time.sleep(POLL_S)
        failed = failed or next((process for process in processes if process.returncode != 0), None)
    finally:
        stop(processes)
        for relay in relays:
            relay.join()
    if failed is None:
        return 0
    with lock:
        sink.write(f"worker {processes.index(failed)} exited with status {failed.returncode}; stopped the others\n")
    return failed.returncode if failed.returncode > 0 else 1


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m dualenc.launch",
        description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workers", type=int, default=2, help="how many workers to start (default: 2)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command every worker runs")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    try:
        if args.workers < 1:
            raise DualEncError(f"--workers {args.workers}: start at least one worker")
        if not command:
            raise DualEncError("no command; give one after --, e.g. -- train.py --placement multi-worker --out runs/two")
        processes = start_workers(command, args.workers)
    except DualEncError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except OSError as error:
        print(f"error: cannot start {command[0]!r}: {error.strerror}", file=sys.stderr)
        return 2
    try:
        return supervise(processes)
    except KeyboardInterrupt:  # the workers were stopped on the way out
        return 130


if __name__ == "__main__":
    sys.exit(main())
