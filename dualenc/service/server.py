"""Run the search service with uvicorn on a socket bound before the model loads.

Binding first turns a busy port or a bad host into one `DualEncError` line at once (uvicorn
would log it and exit the process itself), and lets ``--port 0`` pick a free port that the
startup line then names. Only a loopback host (any address of 127.0.0.0/8, ::1 or localhost)
keeps the service private, and only its own names are answered (DNS rebinding); any other host
is served, with a warning, since the service has no authentication.

Slow clients are bounded too: a connection must finish each request head within
`ServiceLimits.header_timeout_s` (uvicorn itself waits forever for one), idle kept-alive
connections close after `keep_alive_s`, and beyond `max_connections` open connections requests
get a 503.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import sys
from pathlib import Path
from typing import TextIO

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from dualenc.core.errors import DualEncError
from dualenc.retrieval.gallery import Gallery
from dualenc.retrieval.index import GalleryIndex
from dualenc.service.app import create_app
from dualenc.service.inputs import ServiceLimits

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# h11 refuses longer request lines with a plain-text 400; this lets a query up to ~10x the
# query limit reach the app and get its JSON error instead.
MAX_REQUEST_HEAD_BYTES = 256 * 2**10


def listening_socket(host: str, port: int) -> socket.socket:
    """A TCP socket listening on (host, port), or a `DualEncError` saying why it cannot."""
    if not 0 <= port <= 65535:
        raise DualEncError(f"--port {port} is not a TCP port; pass 1-65535, or 0 for any free port")
    try:
        family, kind, protocol, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise DualEncError(f"cannot resolve --host {host!r} ({exc.strerror}); pass an address such as 127.0.0.1") from None
    listener = socket.socket(family, kind, protocol)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
        # Listening now queues connections made as soon as the startup line names the URL,
        # before uvicorn has started accepting them.
        listener.listen(socket.SOMAXCONN)
    except OSError as exc:
        listener.close()
        raise DualEncError(f"cannot listen on {host} port {port} ({exc.strerror}); pass another --port") from None
    return listener


def is_loopback(host: str) -> bool:
    """Whether `host` (a --host value) is this machine only: "localhost" or a loopback address."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


class HeadDeadlineProtocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on every request head.

    From a connection's start, and again after each answer, the client has `header_timeout_s`
    to send a complete request head; a client that sends nothing, or trickles a byte at a time,
    is disconnected then instead of holding its connection forever.
    """

    header_timeout_s = ServiceLimits.header_timeout_s
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def handle_events(self) -> None:
        cycle = self.cycle
        super().handle_events()
        if self.cycle is not cycle:  # a request head was completed
            self._disarm()

    def on_response_complete(self) -> None:
        self._arm()
        super().on_response_complete()

    def _arm(self) -> None:
        self._disarm()
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self.transport.close()


def serve(
    run_dir: Path,
    gallery: Gallery,
    *,
    host: str,
    port: int,
    index: GalleryIndex | None = None,
    ann: str = "auto",
    engine: str = "auto",
    limits: ServiceLimits | None = None,
    log: TextIO | None = None,
) -> None:
    """Serve `gallery` with the run's encoders at http://host:port/ until interrupted."""
    log = sys.stderr if log is None else log
    limits = ServiceLimits() if limits is None else limits
    listener = listening_socket(host, port)
    loopback = is_loopback(host)
    if not loopback:
        print(f"warning: --host {host} lets other machines reach this search service, which has no "
              "authentication; use 127.0.0.1 unless that is what you want", file=log)
    allowed_hosts = (*LOOPBACK_HOSTS, host.strip("[]")) if loopback else None
    app = create_app(run_dir, gallery, index=index, ann=ann, engine=engine, allowed_hosts=allowed_hosts, limits=limits)
    bound_port = listener.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    print(f"serving {gallery.description} with {run_dir} at http://{shown_host}:{bound_port}/ (Ctrl-C to stop)",
          file=log, flush=True)
    protocol = type("HeadDeadline", (HeadDeadlineProtocol,), {"header_timeout_s": limits.header_timeout_s})
    config = uvicorn.Config(app, log_level="warning", h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES,
                            http=protocol, timeout_keep_alive=limits.keep_alive_s,
                            limit_concurrency=limits.max_connections)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly, then re-raises the Ctrl-C it caught
        print("stopped", file=log)
