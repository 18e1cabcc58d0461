"""What a request to the search service may carry, checked before any of it reaches TensorFlow.

Every check raises `RequestError` with an HTTP status and one line that says what was wrong and
what to send instead; the app turns it into ``{"error": "..."}``. The query string is parsed
from its raw bytes because frameworks silently replace undecodable bytes with U+FFFD, which
would search for the wrong text instead of refusing it. Uploads are parsed in memory (never
spooled to a temporary file) after the body has been read up to `MAX_UPLOAD_BYTES`.
"""

from __future__ import annotations

import io
import urllib.parse

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
UPLOAD_FIELD = "image"


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


def result_count(parameters: dict[str, str], default: int, gallery_size: int) -> int:
    """Parameter ``k``: a whole number from 1 to the gallery's size (`default` when absent)."""
    text = parameters.get("k")
    if text is None:
        return min(default, gallery_size)
    try:
        k = int(text.strip())
    except ValueError:
        raise RequestError(400, f"k must be a whole number of results, got {text[:40]!r}") from None
    if k < 1:
        raise RequestError(400, f"k must be at least 1, got {k}")
    if k > gallery_size:
        raise RequestError(400, f"k={k} is more than the {gallery_size} images in the gallery; ask for at most {gallery_size}")
    return k


def too_large(size: int) -> RequestError:
    """The 413 for an upload of `size` bytes (or more)."""
    return RequestError(413, f"the upload is {size / 2**20:.1f} MiB or more; the limit is {MAX_UPLOAD_BYTES // 2**20} MiB")


def multipart_field(body: bytes, content_type: str, name: str = UPLOAD_FIELD) -> bytes:
    """The content of form field `name` in a complete ``multipart/form-data`` `body`."""
    media_type, options = parse_options_header(content_type)
    boundary = options.get(b"boundary")
    if media_type != b"multipart/form-data" or not boundary:
        raise RequestError(415, f"send the image as multipart/form-data in a field named {name!r}")
    parts: list[dict] = []
    header = {"field": bytearray(), "value": bytearray()}
    ended = []

    def begin_part() -> None:
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
            if len(part["data"]) > MAX_UPLOAD_BYTES:
                raise too_large(len(part["data"]))
            return bytes(part["data"])
    raise RequestError(400, f"no {name!r} field in the form; send the image file as {name!r}")


def check_image(data: bytes) -> bytes:
    """The canonical bytes (`dualenc.api.query_image`, as for ``search.py --image``) of an
    uploaded image of at most `MAX_UPLOAD_PIXELS`, measured from its header before decoding."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
    except UnidentifiedImageError:
        raise RequestError(400, f"the upload is not an image in a format the model reads ({IMAGE_FORMATS})") from None
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError):
        raise RequestError(400, "the image is truncated or corrupt; upload the whole file") from None
    if width * height > MAX_UPLOAD_PIXELS:
        raise RequestError(413, f"the image is {width}x{height} pixels; the limit is {MAX_UPLOAD_PIXELS:,} pixels")
    try:
        return query_image(data, "the upload")
    except DualEncError as error:
        raise RequestError(400, str(error)) from None
