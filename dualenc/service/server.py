"""Run the search service with uvicorn on a socket bound before the model loads.

Binding first turns a busy port or a bad host into one `DualEncError` line at once (uvicorn
would log it and exit the process itself), and lets ``--port 0`` pick a free port that the
startup line then names. Only a loopback host keeps the service private; any other host is
served, with a warning, since the service has no authentication.
"""

from __future__ import annotations

import socket
import sys
from pathlib import Path
from typing import TextIO

import uvicorn

from dualenc.core.errors import DualEncError
from dualenc.retrieval.gallery import Gallery
from dualenc.retrieval.index import GalleryIndex
from dualenc.service.app import create_app

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


def serve(
    run_dir: Path,
    gallery: Gallery,
    *,
    host: str,
    port: int,
    index: GalleryIndex | None = None,
    ann: str = "auto",
    log: TextIO | None = None,
) -> None:
    """Serve `gallery` with the run's encoders at http://host:port/ until interrupted."""
    log = sys.stderr if log is None else log
    listener = listening_socket(host, port)
    loopback = host in LOOPBACK_HOSTS
    if not loopback:
        print(f"warning: --host {host} lets other machines reach this search service, which has no "
              "authentication; use 127.0.0.1 unless that is what you want", file=log)
    app = create_app(run_dir, gallery, index=index, ann=ann, allowed_hosts=LOOPBACK_HOSTS if loopback else None)
    bound_port = listener.getsockname()[1]
    shown_host = f"[{host}]" if ":" in host else host
    print(f"serving {gallery.description} with {run_dir} at http://{shown_host}:{bound_port}/ (Ctrl-C to stop)",
          file=log, flush=True)
    config = uvicorn.Config(app, log_level="warning", h11_max_incomplete_event_size=MAX_REQUEST_HEAD_BYTES)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    except KeyboardInterrupt:  # uvicorn shuts down cleanly, then re-raises the Ctrl-C it caught
        print("stopped", file=log)
