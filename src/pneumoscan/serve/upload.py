"""The upload of ``POST /v1/predict``: one multipart field named ``file``, streamed and bounded.

Why the body is parsed here and not by Starlette's form parser: that parser spools any size of file to disk before
the handler sees it, so a 1 GB upload would cost a 1 GB temporary file. Here the body goes through python-multipart
chunk by chunk and is refused (413) the moment the file passes the limit; nothing bigger than the limit is ever
held. What the file is comes from its first bytes (``data.images.sniff``, the one list of accepted formats), never
from the client's file name or content type; why a file cannot be screened is the stage's message, as on every
route.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from ..data.images import sniff

MULTIPART_SLACK = 64 * 1024  # part headers, boundaries and small extra fields on top of the file itself
MAX_PARTS = 16

# The messages clients see; tests assert them verbatim.
EMPTY_BODY = "empty request body: send multipart/form-data with the image in a field named 'file'"
NOT_MULTIPART = (
    "unsupported content type {ctype!r}: send multipart/form-data with the image in a field named 'file'"
)
NO_BOUNDARY = "malformed multipart body: the Content-Type header has no boundary"
MALFORMED = "malformed multipart body ({reason})"
TRUNCATED = "malformed multipart body: it ended before the closing boundary"
TOO_MANY_PARTS = f"malformed multipart body: more than {MAX_PARTS} parts"
MISSING_FILE = "missing form field 'file' (the image to screen)"
TOO_LARGE = "upload is larger than the {limit} limit"
DISCONNECTED = "client disconnected during the upload"


class HTTPError(Exception):
    """A request we refuse, with its status code and the one-line reason sent back as ``{"error": ...}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass(frozen=True)
class Upload:
    filename: str  # cleaned: base name, printable, short
    data: bytes
    format: str  # what ``sniff`` says the bytes are


def mib(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"


def clean_filename(raw: str | None) -> str:
    """Base name only, printable, short: it is echoed in messages and must not smuggle paths or control chars."""
    name = re.split(r"[\\/]", raw or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:120].strip()
    return name or "upload"


class _MultipartFile:
    """Streaming multipart consumer that keeps the first part named ``file`` (at most ``limit`` bytes)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.parts = 0
        self.ended = False
        self.too_large = False
        self.filename: str | None = None
        self.data: bytearray | None = None  # set once the file part is found
        self._in_file = False
        self._headers: dict[str, str] = {}
        self._field = bytearray()
        self._value = bytearray()

    def callbacks(self) -> dict:
        return {
            "on_part_begin": self._part_begin,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_header_field": lambda d, s, e: self._field.extend(d[s:e]),
            "on_header_value": lambda d, s, e: self._value.extend(d[s:e]),
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_end": self._end,
        }

    def _part_begin(self) -> None:
        self.parts += 1
        self._headers = {}

    def _header_end(self) -> None:
        self._headers[self._field.decode("latin-1").lower()] = self._value.decode("latin-1")
        self._field.clear()
        self._value.clear()

    def _headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get("content-disposition", ""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        self._in_file = name == "file" and self.data is None
        if self._in_file:
            self.data = bytearray()
            self.filename = options.get(b"filename", b"").decode("utf-8", "replace")

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if not self._in_file or self.too_large:
            return  # other fields are counted against the body limit by the reader, then dropped
        if len(self.data) + (end - start) > self.limit:
            self.too_large = True
            return
        self.data.extend(data[start:end])

    def _part_end(self) -> None:
        self._in_file = False

    def _end(self) -> None:
        self.ended = True


async def read_upload(request: Request, max_bytes: int) -> Upload:
    """The ``file`` field of a multipart request, read in chunks and refused as soon as it passes ``max_bytes``;
    ``HTTPError`` (400, 413, 415, 422) for a request that does not carry one. What the file holds (empty, not an
    image, unreadable) is the screening stage's to say."""
    too_large = HTTPError(413, TOO_LARGE.format(limit=mib(max_bytes)))
    body_limit = max_bytes + MULTIPART_SLACK
    declared = request.headers.get("content-length")
    if declared is not None and declared.strip().isdigit():
        if int(declared) == 0:
            raise HTTPError(400, EMPTY_BODY)
        if int(declared) > body_limit:
            raise too_large  # refused unread; uvicorn discards the rest of the body without keeping it
    ctype = request.headers.get("content-type", "")
    kind, options = parse_options_header(ctype)
    if kind != b"multipart/form-data":
        if declared is None and not ctype:
            raise HTTPError(400, EMPTY_BODY)
        raise HTTPError(415, NOT_MULTIPART.format(ctype=ctype or "none"))
    boundary = options.get(b"boundary")
    if not boundary:
        raise HTTPError(400, NO_BOUNDARY)

    sink = _MultipartFile(max_bytes)
    parser = MultipartParser(boundary, sink.callbacks())
    total = 0
    try:
        async for chunk in request.stream():
            total += len(chunk)
            if total > body_limit:
                raise too_large
            if sink.ended or not chunk:
                continue  # epilogue after the closing boundary
            parser.write(chunk)
            if sink.too_large:
                raise too_large
            if sink.parts > MAX_PARTS:
                raise HTTPError(400, TOO_MANY_PARTS)
    except MultipartParseError as exc:
        reason = str(exc).split("\n")[0] or "unparseable"
        raise HTTPError(400, MALFORMED.format(reason=reason)) from None
    except ClientDisconnect:
        raise HTTPError(400, DISCONNECTED) from None
    if total == 0:
        raise HTTPError(400, EMPTY_BODY)
    if not sink.ended:
        raise HTTPError(400, TRUNCATED)
    if sink.data is None:
        raise HTTPError(422, MISSING_FILE)
    data = bytes(sink.data)
    return Upload(clean_filename(sink.filename), data, sniff(data))
