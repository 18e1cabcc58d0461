"""The search service's ASGI app (FastAPI): a page, a JSON API and gallery thumbnails.

Routes:

- ``GET /``: the search page (``static/``: plain HTML, CSS and JavaScript, nothing external);
- ``GET /api/search?q=TEXT&k=9``: text → image; ``POST /api/search?k=9`` with a
  ``multipart/form-data`` field ``image``: image → image. Both answer a JSON list of results
  with the fields of ``search.py --json`` (`dualenc.retrieval.query.RESULT_FIELDS`);
- ``GET /api/health``: the model, the gallery, its size and the kind of index;
- ``GET /images/{id}``: a JPEG thumbnail of the gallery image with that index id, nothing else.

Every error is ``{"error": "one line"}`` with a 4xx status (500 for a bug, without its
traceback, which goes to the server's log). Nothing a request sends is written anywhere.
"""

from __future__ import annotations

import contextlib
import importlib.resources
from collections.abc import Collection
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from dualenc.api import Retriever
from dualenc.core.errors import DualEncError
from dualenc.retrieval.gallery import Gallery
from dualenc.retrieval.index import GalleryIndex, open_index
from dualenc.retrieval.query import MAX_QUERY_CHARS
from dualenc.service.images import ImageUnavailable, Thumbnails, gallery_images
from dualenc.service.inputs import (
    MAX_UPLOAD_BYTES,
    MULTIPART_OVERHEAD_BYTES,
    RequestError,
    check_image,
    multipart_field,
    query_parameters,
    result_count,
    text_query,
    too_large,
)
from dualenc.service.searcher import Searcher

DEFAULT_K = 9
# A body over the limit is still read (and dropped) up to here, so the client, which is still
# sending, gets the 413 instead of a reset connection; beyond it the connection is cut.
DRAIN_BYTES = 64 * 2**20
STATIC_FILES = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}
SECURITY_HEADERS = [
    (b"content-security-policy",
     b"default-src 'self'; img-src 'self' blob:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
]


class _Guard:
    """ASGI middleware: refuses requests for other host names and adds `SECURITY_HEADERS`.

    With `allowed_hosts` set (a loopback server), a page on another site that rebinds its DNS
    name to 127.0.0.1 cannot use the service: its requests carry that site's name as Host.
    """

    def __init__(self, app, allowed_hosts: Collection[str] | None):
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else frozenset(allowed_hosts)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        if self.allowed_hosts is not None:
            host = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
            if name.strip("[]") not in self.allowed_hosts:
                response = JSONResponse({"error": f"this server answers only to {', '.join(sorted(self.allowed_hosts))}"}, 400)
                await response(scope, receive, send)
                return

        async def send_with_headers(message) -> None:
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _static_files() -> dict[str, tuple[bytes, str]]:
    folder = importlib.resources.files("dualenc.service") / "static"
    files = {name: ((folder / name).read_bytes(), media_type) for name, media_type in STATIC_FILES.items()}
    files["index.html"] = ((folder / "index.html").read_bytes(), "text/html; charset=utf-8")
    return files


async def _read_upload(request: Request) -> bytes:
    """The request body, or a 413 once it passes the upload limit (plus multipart overhead)."""
    limit = MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > DRAIN_BYTES:
        raise too_large(int(declared))
    body, received = bytearray(), 0
    async for chunk in request.stream():
        received += len(chunk)
        if received <= limit:
            body += chunk
        elif received > DRAIN_BYTES:
            break
    if received > limit:
        raise too_large(received)
    return bytes(body)


def create_app(
    run_dir: Path,
    gallery: Gallery,
    *,
    index: GalleryIndex | None = None,
    ann: str = "auto",
    allowed_hosts: Collection[str] | None = None,
) -> FastAPI:
    """The service for the run's encoders over `gallery` (its index opened or built if not given).

    `ann` chooses the search method as ``search.py --ann`` does; `allowed_hosts`, when given,
    are the only Host names answered (see `_Guard`).
    """
    run_dir = Path(run_dir)
    index = open_index(run_dir, gallery) if index is None else index
    searcher = Searcher(Retriever(run_dir, ann=ann).use_index(gallery, index))
    thumbnails = Thumbnails(gallery_images(gallery, index.image_ids))
    static = _static_files()
    health = {
        "status": "ok",
        "model": str(run_dir.resolve()),
        "gallery": gallery.description,
        "images": len(index),
        "index": searcher.kind,
        "dimension": int(index.embeddings.shape[1]),
        "max_query_chars": MAX_QUERY_CHARS,
        "max_upload_bytes": MAX_UPLOAD_BYTES,
    }

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        searcher.close()

    # No /docs: FastAPI's API pages load their scripts from a CDN.
    app = FastAPI(title="dualenc search", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.exception_handler(RequestError)
    async def refused(_: Request, exc: RequestError) -> JSONResponse:
        return _error(exc.status, exc.message)

    @app.exception_handler(DualEncError)
    async def user_mistake(_: Request, exc: DualEncError) -> JSONResponse:
        return _error(400, str(exc))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return _error(404, f"no such page: {request.url.path}")
        if exc.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path}")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(400, "the request does not match the API; see GET /api/health and the README")

    @app.exception_handler(Exception)
    async def bug(_: Request, exc: Exception) -> JSONResponse:
        return _error(500, "internal error; the details are in the server's log")

    @app.get("/", response_class=HTMLResponse)
    def page() -> Response:
        content, media_type = static["index.html"]
        return Response(content, media_type=media_type)

    @app.get("/static/{name}")
    def static_file(name: str) -> Response:
        if name not in STATIC_FILES:
            raise RequestError(404, f"no static file {name[:80]!r}")
        content, media_type = static[name]
        return Response(content, media_type=media_type)

    @app.get("/api/health")
    def health_check() -> JSONResponse:
        return JSONResponse(health)

    @app.get("/api/search")
    def search_text(request: Request) -> JSONResponse:
        parameters = query_parameters(request.scope["query_string"])
        query = text_query(parameters)
        k = result_count(parameters, DEFAULT_K, len(index))
        return JSONResponse(searcher.search_text(query, k))

    @app.post("/api/search")
    async def search_image(request: Request) -> JSONResponse:
        k = result_count(query_parameters(request.scope["query_string"]), DEFAULT_K, len(index))
        body = await _read_upload(request)
        image = check_image(multipart_field(body, request.headers.get("content-type", "")))
        return JSONResponse(await run_in_threadpool(searcher.search_image, image, k))

    @app.get("/images/{image_id:path}")
    def image(image_id: str) -> Response:
        try:
            thumbnail = thumbnails.get(image_id)
        except ImageUnavailable as exc:
            raise RequestError(404, str(exc)) from None
        return Response(thumbnail, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

    app.add_middleware(_Guard, allowed_hosts=allowed_hosts)
    return app
