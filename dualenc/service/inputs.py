"""What a request to the search service may carry, checked before any of it reaches TensorFlow.

Every check raises `RequestError` with an HTTP status and one line that says what was wrong and
what to send instead; the app turns it into ``{"error": "..."}``. The query string is parsed
from its raw bytes because frameworks silently replace undecodable bytes with U+FFFD, which
would search for the wrong text instead of refusing it. Uploads are parsed in memory (never
spooled to a temporary file) after the body has been read up to `MAX_UPLOAD_BYTES`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import urllib.parse
from collections.abc import Callable, Iterator

from PIL import Image, UnidentifiedImageError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from dualenc.api import IMAGE_FORMATS, query_image
from dualenc.core.errors import DualEncError
from dualenc.retrieval.query import check_query

MAX_UPLOAD_BYTES = 10 * 2**20
# Room for the multipart boundaries and part headers around an image of the largest size.
MULTIPART_OVERHEAD_BYTES = 64 * 2**10
# Decoding an image costs memory by its pixels, not its bytes: a small PNG can be huge.
MAX_UPLOAD_PIXELS = 40_000_000
MAX_K = 1000
# A form with the image and a few small fields; more parts are refused before they are kept.
MAX_FORM_PARTS = 4
UPLOAD_FIELD = "image"


@dataclasses.dataclass(frozen=True)
class ServiceLimits:
    """What one request may make the service allocate or wait for; each a ``--serve`` flag.

    `max_k`: results per query (``--max-k``); `max_upload_bytes`: an uploaded file
    (``--max-upload-mb``); `max_upload_pixels`: the decoded image, measured from its header
    before any decoder allocates (``--max-upload-pixels``; only the first frame of an animation
    or multi-page file is ever decoded); `max_form_parts`: parts of a multipart form;
    `request_timeout_s`: reading an upload plus waiting for the encoder (``--request-timeout``);
    `header_timeout_s`: a connection's request head, from connect (or the previous answer)
    until its last header line; `keep_alive_s`: an idle kept-alive connection;
    `max_connections`: open connections, beyond which requests get a 503
    (``--max-connections``); `max_buffered_upload_bytes`: upload bytes held in memory by all
    requests together, beyond which an upload gets a 503 (a slow client holds only what it
    has sent, so it never blocks the others' turn).
    """

    max_k: int = MAX_K
    max_upload_bytes: int = MAX_UPLOAD_BYTES
    max_upload_pixels: int = MAX_UPLOAD_PIXELS
    max_form_parts: int = MAX_FORM_PARTS
    request_timeout_s: float = 30.0
    header_timeout_s: float = 10.0
    keep_alive_s: int = 5
    max_connections: int = 64
    max_buffered_upload_bytes: int = 64 * 2**20

    def __post_init__(self):
        for field in dataclasses.fields(self):
            if not getattr(self, field.name) > 0:
                raise DualEncError(f"service limit {field.name} must be positive, got {getattr(self, field.name)!r}")


class RequestError(Exception):
    """A request the service refuses: `status` (4xx) and a one-line `message`."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def query_parameters(raw_query: bytes) -> dict[str, str]:
    """The query string's parameters (first value of each name), strictly decoded as UTF-8."""
    try:
        pairs = urllib.parse.parse_qsl(raw_query.decode("utf-8"), keep_blank_values=True, encoding="utf-8", errors="strict")
    except UnicodeDecodeError:
        raise RequestError(400, "the query is not valid UTF-8 text; send it UTF-8 and percent-encoded") from None
    parameters: dict[str, str] = {}
    for name, value in pairs:
        parameters.setdefault(name, value)
    return parameters


def text_query(parameters: dict[str, str]) -> str:
    """The checked text of parameter ``q`` (see `dualenc.retrieval.query.check_query`)."""
    if "q" not in parameters:
        raise RequestError(400, "no query: pass the words to search for as ?q=...")
    try:
        return check_query(parameters["q"])
    except DualEncError as exc:
        raise RequestError(400, str(exc)) from None


def result_count(parameters: dict[str, str], default: int, gallery_size: int, max_k: int = MAX_K) -> int:
    """Parameter ``k``: a whole number from 1 to the gallery's size and `max_k` (`default` when absent)."""
    text = parameters.get("k")
    if text is None:
        return min(default, gallery_size, max_k)
    try:
        if len(text) > 40:  # int() of thousands of digits is slow work for one parameter
            raise ValueError
        k = int(text.strip())
    except ValueError:
        raise RequestError(400, f"k must be a whole number of results, got {text[:40]!r}") from None
    if k < 1:
        raise RequestError(400, f"k must be at least 1, got {k}")
    if k > max_k:
        raise RequestError(400, f"k={k} is more than this service answers ({max_k}); ask for at most {max_k} "
                                "(the server's --max-k sets it)")
    if k > gallery_size:
        raise RequestError(400, f"k={k} is more than the {gallery_size} images in the gallery; ask for at most {gallery_size}")
    return k


class UploadBudget:
    """The upload bytes all requests hold in memory together, bounded by `limit`.

    Used from the event loop only (no lock needed): a request takes what each chunk adds inside
    ``with budget.holding() as take:`` and gives it all back when the block ends, after its
    answer; a chunk that would pass the limit is refused with a 503."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    @contextlib.contextmanager
    def holding(self) -> Iterator[Callable[[int], None]]:
        taken = 0

        def take(size: int) -> None:
            nonlocal taken
            if self.held + size > self.limit:
                raise RequestError(503, "the server is holding as many uploads as it can; try again in a moment")
            self.held += size
            taken += size

        try:
            yield take
        finally:
            self.held -= taken


def too_large(size: int, limit: int = MAX_UPLOAD_BYTES) -> RequestError:
    """The 413 for an upload of `size` bytes (or more) against a `limit` in bytes."""
    return RequestError(413, f"the upload is {size / 2**20:.1f} MiB or more; the limit is {limit / 2**20:g} MiB")


def multipart_field(body: bytes, content_type: str, name: str = UPLOAD_FIELD, max_bytes: int = MAX_UPLOAD_BYTES,
                    max_parts: int = MAX_FORM_PARTS) -> bytes:
    """The content of form field `name` in a complete ``multipart/form-data`` `body` of at most
    `max_parts` parts, the field at most `max_bytes`."""
    media_type, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise RequestError(415, f"send the image as multipart/form-data in a field named {name!r}")
    parts: list[dict] = []
    header = {"field": bytearray(), "value": bytearray()}
    ended = []

    def begin_part() -> None:
        if len(parts) >= max_parts:
            raise RequestError(400, f"the form has more than {max_parts} parts; send the image alone as {name!r}")
        parts.append({"headers": {}, "data": bytearray(), "complete": False})

    def end_header() -> None:
        parts[-1]["headers"][bytes(header["field"]).lower()] = bytes(header["value"])
        header["field"].clear()
        header["value"].clear()

    callbacks = {
        "on_part_begin": begin_part,
        "on_header_field": lambda data, start, end: header["field"].extend(data[start:end]),
        "on_header_value": lambda data, start, end: header["value"].extend(data[start:end]),
        "on_header_end": end_header,
        "on_part_data": lambda data, start, end: parts[-1]["data"].extend(data[start:end]),
        "on_part_end": lambda: parts[-1].update(complete=True),
        "on_end": lambda: ended.append(True),
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError:
        raise RequestError(400, "the multipart/form-data body is malformed; send the image as a file field") from None
    for part in parts:
        _, disposition = parse_options_header(part["headers"].get(b"content-disposition"))
        if disposition.get(b"name") == name.encode("utf-8"):
            if not (part["complete"] and ended):
                raise RequestError(400, "the upload is incomplete: the multipart body ends before the image does")
            if not part["data"]:
                raise RequestError(400, f"the {name!r} field is empty; choose an image file")
            if len(part["data"]) > max_bytes:
                raise too_large(len(part["data"]), max_bytes)
            return bytes(part["data"])
    raise RequestError(400, f"no {name!r} field in the form; send the image file as {name!r}")


def check_image(data: bytes, max_pixels: int = MAX_UPLOAD_PIXELS) -> bytes:
    """The canonical bytes (`dualenc.api.query_image`, as for ``search.py --image``) of an
    uploaded image of at most `max_pixels`, measured from its header before decoding. Only the
    first frame is ever decoded (a GIF's later frames, an APNG's, a TIFF's other pages never
    reach a decoder), and Pillow sizes that frame's canvas in the header it reads here."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except UnidentifiedImageError:
        raise RequestError(400, f"the upload is not an image in a format the model reads ({IMAGE_FORMATS})") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        raise RequestError(400, "the image is truncated or corrupt; upload the whole file") from None
    if width * height > max_pixels:
        raise RequestError(413, f"the image is {width}x{height} pixels; the limit is {max_pixels:,} pixels")
    try:
        return query_image(data, "the upload")
    except DualEncError as error:
        raise RequestError(400, str(error)) from None
