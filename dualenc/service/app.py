"""The search service's ASGI app (FastAPI): a page, a JSON API and gallery thumbnails.

Routes:

- ``GET /``: the search page (``static/``: plain HTML, CSS and JavaScript, nothing external);
- ``GET /api/search?q=TEXT&k=9``: text → image; ``POST /api/search?k=9`` with a
  ``multipart/form-data`` field ``image``: image → image. Both answer a JSON list of results
  with the fields of ``search.py --json`` (`dualenc.retrieval.query.RESULT_FIELDS`);
- ``GET /api/health``: the model, the gallery, its size, the kind of index and the limits;
- ``GET /images/{id}``: a JPEG thumbnail of the gallery image with that index id, nothing else.

Every error is ``{"error": "one line"}`` with a 4xx status (500 for a bug, without its
traceback, which goes to the server's log; 503 when the server is at a limit). Nothing a
request sends is written anywhere. What a request can make the server allocate or wait for is
bounded (`ServiceLimits`); CPU work (multipart parsing, image checks, search) runs in worker
threads, never on the event loop. Another web site's page cannot use the service: requests a
browser marks as cross-site are refused, responses may not be embedded by other origins
(``Cross-Origin-Resource-Policy``), and no response names a server path (folder results carry
the path relative to the gallery folder).
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import re
from collections.abc import Callable, Collection
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from dualenc.api import Retriever
from dualenc.core.errors import DualEncError
from dualenc.export.engines import resolve_engine
from dualenc.retrieval.gallery import Gallery
from dualenc.retrieval.index import GalleryIndex, open_index
from dualenc.retrieval.query import MAX_QUERY_CHARS
from dualenc.service.images import ImageUnavailable, Thumbnails, gallery_images
from dualenc.service.inputs import (
    MULTIPART_OVERHEAD_BYTES,
    RequestError,
    ServiceLimits,
    UploadBudget,
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
    (b"cross-origin-resource-policy", b"same-origin"),
]
# Sec-Fetch-Site values of requests a page of this service itself makes (or a typed URL).
OWN_SITES = frozenset((b"same-origin", b"none"))
ABSOLUTE_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"/]+/)*([^\s'\"/]+)")


class _Guard:
    """ASGI middleware: refuses requests for other host names and cross-site requests, and
    adds `SECURITY_HEADERS`.

    With `allowed_hosts` set (a loopback server), a page on another site that rebinds its DNS
    name to 127.0.0.1 cannot use the service: its requests carry that site's name as Host.
    A request a browser marks as coming from another site (``Sec-Fetch-Site``), or whose
    ``Origin`` is not this server, gets a 403 before it reaches a route: another page can
    neither run searches with the visitor's browser nor probe the gallery's ids.
    """

    def __init__(self, app, allowed_hosts: Collection[str] | None):
        self.app = app
        self.allowed_hosts = None if allowed_hosts is None else frozenset(allowed_hosts)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        refusal = _cross_site_refusal(headers)
        if refusal is not None:
            await JSONResponse({"error": refusal}, 403)(scope, receive, send)
            return
        if self.allowed_hosts is not None:
            host = headers.get(b"host", b"").decode("latin-1")
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


def _cross_site_refusal(headers: dict[bytes, bytes]) -> str | None:
    """Why a request from another site is refused, or None for this site's own requests and
    for clients that are no browser (they send neither header)."""
    site = headers.get(b"sec-fetch-site")
    if site is not None and site not in OWN_SITES:
        return "requests from other web sites are refused; open this service's own page"
    origin = headers.get(b"origin")
    if origin is not None:
        parts = urlsplit(origin.decode("latin-1"))
        if parts.netloc.lower() != headers.get(b"host", b"").decode("latin-1").lower():
            return "requests from other web sites are refused; open this service's own page"
    return None


def redact_paths(text: str) -> str:
    """`text` with every absolute path cut to its last component: responses name no server path."""
    return ABSOLUTE_PATH.sub(lambda match: match.group(1), text)


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _static_files() -> dict[str, tuple[bytes, str]]:
    folder = importlib.resources.files("dualenc.service") / "static"
    files = {name: ((folder / name).read_bytes(), media_type) for name, media_type in STATIC_FILES.items()}
    files["index.html"] = ((folder / "index.html").read_bytes(), "text/html; charset=utf-8")
    return files


async def _read_upload(request: Request, max_bytes: int, take: Callable[[int], None]) -> bytes:
    """The request body, or a 413 once it passes the upload limit (plus multipart overhead);
    each chunk kept is first `take`n from the upload budget (`UploadBudget.holding`)."""
    limit = max_bytes + MULTIPART_OVERHEAD_BYTES
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max(DRAIN_BYTES, limit):
        raise too_large(int(declared), max_bytes)
    body, received = bytearray(), 0
    async for chunk in request.stream():
        received += len(chunk)
        if received <= limit:
            take(len(chunk))
            body += chunk
        elif received > max(DRAIN_BYTES, limit):
            break
    if received > limit:
        raise too_large(received, max_bytes)
    return bytes(body)


def _public_results(results: list[dict]) -> list[dict]:
    """`results` with each folder image's path relative to the gallery folder (its index id)."""
    return [{**row, "path": row["image_id"]} if row["path"] is not None else row for row in results]


def create_app(
    run_dir: Path,
    gallery: Gallery,
    *,
    index: GalleryIndex | None = None,
    ann: str = "auto",
    engine: str = "auto",
    allowed_hosts: Collection[str] | None = None,
    limits: ServiceLimits | None = None,
) -> FastAPI:
    """The service for the run's encoders over `gallery` (its index opened or built if not given).

    `ann` chooses the search method and `engine` what embeds images, as ``search.py --ann`` and
    ``--engine`` do; `allowed_hosts`, when given, are the only Host names answered (see
    `_Guard`); `limits` bound every request.
    """
    run_dir = Path(run_dir)
    limits = ServiceLimits() if limits is None else limits
    engine = resolve_engine(run_dir, engine)
    index = open_index(run_dir, gallery, engine=engine) if index is None else index
    searcher = Searcher(Retriever(run_dir, ann=ann, engine=engine).use_index(gallery, index),
                        timeout_s=limits.request_timeout_s)
    thumbnails = Thumbnails(gallery_images(gallery, index.image_ids))
    static = _static_files()
    upload_budget = UploadBudget(limits.max_buffered_upload_bytes)
    health = {
        "status": "ok",
        "model": run_dir.resolve().name,
        "gallery": redact_paths(gallery.description),
        "images": len(index),
        "index": searcher.kind,
        "dimension": int(index.embeddings.shape[1]),
        "max_query_chars": MAX_QUERY_CHARS,
        "max_upload_bytes": limits.max_upload_bytes,
        "max_upload_pixels": limits.max_upload_pixels,
        "max_k": limits.max_k,
        "request_timeout_s": limits.request_timeout_s,
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
        return _error(400, redact_paths(str(exc)))

    @app.exception_handler(TimeoutError)
    async def busy(_: Request, exc: TimeoutError) -> JSONResponse:
        return _error(503, f"the server is busy: no answer within {limits.request_timeout_s:g} s; try again")

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
        k = result_count(parameters, DEFAULT_K, len(index), limits.max_k)
        return JSONResponse(_public_results(searcher.search_text(query, k)))

    def image_results(body: bytes, content_type: str, k: int) -> list[dict]:
        data = multipart_field(body, content_type, max_bytes=limits.max_upload_bytes, max_parts=limits.max_form_parts)
        return _public_results(searcher.search_image(check_image(data, limits.max_upload_pixels), k))

    @app.post("/api/search")
    async def search_image(request: Request) -> JSONResponse:
        k = result_count(query_parameters(request.scope["query_string"]), DEFAULT_K, len(index), limits.max_k)
        with upload_budget.holding() as take:  # the bytes count until the answer is made
            try:
                body = await asyncio.wait_for(_read_upload(request, limits.max_upload_bytes, take),
                                              limits.request_timeout_s)
            except asyncio.TimeoutError:
                raise RequestError(408, f"the upload did not arrive within {limits.request_timeout_s:g} s; "
                                        "send the whole image at once") from None
            content_type = request.headers.get("content-type", "")
            return JSONResponse(await run_in_threadpool(image_results, body, content_type, k))

    @app.get("/images/{image_id:path}")
    def image(image_id: str) -> Response:
        try:
            thumbnail = thumbnails.get(image_id)
        except ImageUnavailable as exc:
            raise RequestError(404, str(exc)) from None
        return Response(thumbnail, media_type="image/jpeg", headers={"cache-control": "max-age=3600"})

    app.state.searcher = searcher  # for embedding servers and tests: the encoders behind the routes
    app.add_middleware(_Guard, allowed_hosts=allowed_hosts)
    return app
