"""HTTP service: one loaded model behind a small JSON API and a static web page.

Why the upload is parsed by hand: Starlette's form parser spools any size of file to disk before the handler
sees it, so a 1 GB upload would cost a 1 GB temporary file. Here the multipart body is streamed through
python-multipart chunk by chunk and refused (413) the moment the file passes the limit; nothing bigger than the
limit is ever held. The file type is sniffed from its first bytes (the client's filename and content type are
only labels), decoding runs in a small pool of worker threads (``--concurrency``) so the event loop keeps answering,
and the network runs in one more thread, the batcher (``batching.py``), which scores the images of concurrent
requests together.
Every failure is ``{"error": "<one line>"}`` with the matching status code.

Around every request (``_Service``, plain ASGI): a request id (``X-Request-ID``), the API key check on ``/v1/`` and
``/metrics`` when keys are on (``auth.py``), one audit line (``audit.py``) and the Prometheus figures
(``metrics.py``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import io
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import anyio
import numpy as np
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from PIL import Image
from python_multipart.multipart import MultipartParseError, MultipartParser, parse_options_header
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import __version__
from ..errors import PneumoscanError
from .audit import AuditLog
from .auth import KeyStore
from .batching import Batcher
from .limits import DEFAULT_CONCURRENCY, DEFAULT_MAX_BATCH, DEFAULT_MAX_PENDING, DEFAULT_WINDOW_MS
from .metrics import Metrics, route_label

logger = logging.getLogger("pneumoscan.serve")

STATIC_DIR = Path(__file__).parent / "static"
DEFAULT_MAX_UPLOAD = 20 * 2**20
MULTIPART_SLACK = 64 * 1024  # part headers, boundaries and small extra fields on top of the file itself
MAX_PARTS = 16
DISPLAY_SIZE = 1024  # longest side of the preview and heatmap PNGs

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
EMPTY_FILE = "the uploaded file is empty"
TOO_LARGE = "upload is larger than the {limit} limit"
NOT_AN_IMAGE = "{name}: unsupported file type; expected a JPEG, PNG, TIFF, BMP or DICOM image"
SLOW_UPLOAD = "upload not received within {seconds:g} s"
BUSY = "server busy: too many requests in progress, retry shortly"
NO_HEATMAP = "heatmaps need the torch backend (Grad-CAM runs on the PyTorch network); this server has none"
INTERNAL = "internal server error"
KEY_MISSING = "missing API key: send the header 'Authorization: Bearer KEY'"
KEY_INVALID = "invalid API key"


class HTTPError(Exception):
    """A request we refuse, with its status code and the one-line reason sent back as ``{"error": ...}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers


@dataclass(frozen=True)
class Upload:
    filename: str
    data: bytes


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n >= 2**20 else f"{n} bytes"


def _clean_filename(raw: str | None) -> str:
    """Base name only, printable, short: it is echoed in messages and must not smuggle paths or control chars."""
    name = re.split(r"[\\/]", raw or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable())[:120].strip()
    return name or "upload"


def sniff(data: bytes) -> str | None:
    """'jpeg' | 'png' | 'tiff' | 'bmp' | 'dicom' from the file's magic bytes, None for anything else (the formats
    the command line reads, so every route accepts the same files)."""
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    if data.startswith(b"BM"):
        return "bmp"
    if len(data) > 132 and data[128:132] == b"DICM":
        return "dicom"
    return None


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
    """The ``file`` field of a multipart request, read in chunks and refused as soon as it passes ``max_bytes``."""
    too_large = HTTPError(413, TOO_LARGE.format(limit=_mib(max_bytes)))
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
        raise HTTPError(400, "client disconnected during the upload") from None
    if total == 0:
        raise HTTPError(400, EMPTY_BODY)
    if not sink.ended:
        raise HTTPError(400, TRUNCATED)
    if sink.data is None:
        raise HTTPError(422, MISSING_FILE)
    if not sink.data:
        raise HTTPError(400, EMPTY_FILE)
    return Upload(_clean_filename(sink.filename), bytes(sink.data))


def _png_base64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", optimize=False, compress_level=3)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _gray(image: np.ndarray) -> Image.Image:
    """The decoded image as 8-bit gray: lets the page show DICOMs, which browsers cannot decode."""
    return Image.fromarray(np.round(np.clip(image, 0.0, 1.0) * 255.0).astype(np.uint8), "L")


@dataclass
class _Prepared:
    decoded: object  # DecodedImage
    small: np.ndarray  # uint8 (S, S) network input
    reason: str | None  # why the checks say it is no frontal chest X-ray
    seconds: float


def _prepare(model, upload: Upload, audit: dict) -> _Prepared:
    """Decode and prepare one upload (worker thread; blocking, CPU-bound): the same ``decode`` and ``prepare`` as
    ``Model.predict``, header and image checks included. The network call is the batcher's."""
    start = time.perf_counter()
    audit["upload_sha256"] = hashlib.sha256(upload.data).hexdigest()
    decoded = model.decode(upload.data, upload.filename)
    small, reason = model.prepare(decoded)
    return _Prepared(decoded, small, reason, time.perf_counter() - start)


def _extras(model, decoded, pred, heatmap: bool, preview: bool) -> tuple[dict, dict]:
    """The heatmap and the preview PNGs a request asked for (worker thread)."""
    timing: dict[str, float] = {}
    extra: dict[str, str | None] = {}
    if heatmap:
        start = time.perf_counter()
        if pred.status == "ok":
            from ..explain import gradcam_overlay

            extra["heatmap_png_base64"] = _png_base64(gradcam_overlay(model, decoded.pixels, DISPLAY_SIZE))
        else:
            extra["heatmap_png_base64"] = None  # no evidence map for an image the model refuses to judge
        timing["heatmap"] = time.perf_counter() - start
    if preview:
        from ..explain import display_copy

        extra["image_png_base64"] = _png_base64(_gray(display_copy(decoded.pixels, DISPLAY_SIZE)))
    return timing, extra


def _ordered(thresholds: dict[str, float]) -> dict[str, float]:
    """Screening first, then balanced, then anything else: the order a reader meets them in."""
    rank = {"screening": 0, "balanced": 1}
    return {k: thresholds[k] for k in sorted(thresholds, key=lambda k: (rank.get(k, 2), k))}


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors():
        where = " ".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return "invalid request: " + "; ".join(parts)


class _SecurityHeaders:
    """Plain ASGI middleware (it does not wrap the request body, unlike BaseHTTPMiddleware): the page may load
    nothing but its own files, and nothing is sniffed, framed or cached."""

    HEADERS = [
        (b"x-content-type-options", b"nosniff"),
        (b"x-frame-options", b"DENY"),
        (b"referrer-policy", b"no-referrer"),
        (
            b"content-security-policy",
            b"default-src 'self'; img-src 'self' data: blob:; style-src 'self'; script-src 'self'; "
            b"connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'",
        ),
    ]

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *self.HEADERS]}
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def _protected(path: str) -> bool:
    return path == "/metrics" or path == "/v1" or path.startswith("/v1/")


class _Service:
    """Plain ASGI middleware around every HTTP request: request id, API key check, audit line, metrics.

    The key is checked before the app sees the request, so an unauthenticated upload is refused unread. Handlers
    add what they learn (upload digest, prediction) to ``scope["pneumoscan.audit"]``; the line is written when the
    response is done, whatever happened, and a failure to write it never reaches the client.
    """

    def __init__(self, app, *, keys: KeyStore | None, audit: AuditLog | None, metrics: Metrics, model_sha256: str):
        self.app = app
        self.keys = keys
        self.audit = audit
        self.metrics = metrics
        self.model_sha256 = model_sha256

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        request_id = uuid.uuid4().hex
        path = scope.get("path", "")
        client = scope.get("client")
        entry = {"time": time.time(), "request_id": request_id, "method": scope.get("method"),
                 "route": route_label(path), "key": None, "client": client[0] if client else None,
                 "model_sha256": self.model_sha256}
        scope["pneumoscan.audit"] = entry
        status: list[int | None] = [None]

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode("ascii"))]}
            await send(message)

        try:
            if self.keys is not None and _protected(path):
                header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"),
                              None)
                name = self.keys.identify(header)
                if name is None:
                    missing = not header
                    self.metrics.unauthorized.labels("missing" if missing else "invalid").inc()
                    challenge = 'Bearer realm="pneumoscan"' + ("" if missing else ', error="invalid_token"')
                    await _send_json(send_tagged, 401, {"error": KEY_MISSING if missing else KEY_INVALID},
                                     {"www-authenticate": challenge, "cache-control": "no-store"})
                    return
                entry["key"] = name
            await self.app(scope, receive, send_tagged)
        except Exception:
            if status[0] is None:
                status[0] = 500
            raise
        finally:
            elapsed = time.perf_counter() - start
            entry["status"] = status[0]
            entry["latency_ms"] = round(elapsed * 1000.0, 2)
            route = entry["route"]
            try:
                self.metrics.requests.labels(route, str(status[0] or "none")).inc()
                self.metrics.latency.labels(route).observe(elapsed)
            except Exception:  # noqa: BLE001 (figures are best effort too)
                logger.exception("pneumoscan: metrics update failed")
            if self.audit is not None:
                self.audit.write(entry)


async def _send_json(send, status: int, body: dict, headers: dict[str, str]) -> None:
    data = json.dumps(body).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode("ascii")),
           *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})


_PREDICT_OPENAPI = {
    "requestBody": {
        "required": True,
        "content": {
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "required": ["file"],
                    "properties": {
                        "file": {
                            "type": "string",
                            "format": "binary",
                            "description": "chest X-ray: JPEG, PNG or DICOM",
                        }
                    },
                }
            }
        },
    },
    "responses": {
        str(code): {
            "description": text,
            "content": {
                "application/json": {
                    "schema": {"type": "object", "properties": {"error": {"type": "string"}}}
                }
            },
        }
        for code, text in [
            (400, "malformed request"),
            (413, "upload too large"),
            (415, "not a JPEG, PNG or DICOM"),
            (422, "unreadable image or invalid parameter"),
            (503, "server busy"),
        ]
    },
}

_META_KEYS = (
    "name",
    "arch",
    "classes",
    "thresholds",
    "temperature",
    "target_sensitivity",
    "preprocessing",
    "validation",
    "guard",
    "precision",
    "version",
    "created",
)

_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
NO_MODEL_CARD = "no model card for {name}: the card describes the bundled default model only"


def bundled_model_card(model) -> str | None:
    """The model card's markdown when ``model`` is the bundled default (or an ONNX export of it), else None."""
    try:
        bundled = (_WEIGHTS / "default.sha256").read_text().split()[0]
        card = (_WEIGHTS / "model_card.md").read_text(encoding="utf-8")
    except (OSError, IndexError):
        return None
    source = getattr(getattr(model, "record", None), "source_sha256", None)
    return card if bundled in (model.sha256, source) else None


def create_app(
    model,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    max_concurrency: int = DEFAULT_CONCURRENCY,
    max_pending: int = DEFAULT_MAX_PENDING,
    upload_timeout: float = 60.0,
    batch_window_ms: float = DEFAULT_WINDOW_MS,
    max_batch: int = DEFAULT_MAX_BATCH,
    api_keys: KeyStore | str | Path | None = None,
    audit_log: AuditLog | str | Path | None = None,
) -> FastAPI:
    """The service around one already-loaded model (loaded once by the caller, shared by all requests).

    ``max_concurrency`` bounds simultaneous decoding threads; the network runs in one batcher thread that scores
    the images arriving within ``batch_window_ms`` of each other together, up to ``max_batch`` per call.
    ``max_pending`` bounds screening requests in progress (uploading, decoding, queued for the network; each may
    hold up to ``max_upload_bytes``), beyond which the answer is 503 with Retry-After. ``api_keys`` (a key file or
    a ``KeyStore``) makes ``/v1/`` and ``/metrics`` require ``Authorization: Bearer KEY``; ``audit_log`` (a file
    or an ``AuditLog``) gets one JSON line per request.
    """
    if max_pending < 1 or max_concurrency < 1:
        raise PneumoscanError("max_pending and max_concurrency must be at least 1")
    keys = KeyStore(api_keys) if isinstance(api_keys, (str, Path)) else api_keys
    batching = {"batch_window_ms": batch_window_ms, "max_batch": max_batch}
    metrics = Metrics(model, batching=batching)
    audit = AuditLog(audit_log) if isinstance(audit_log, (str, Path)) else audit_log
    if audit is not None and audit.on_failure is None:
        audit.on_failure = metrics.audit_failures.inc
    app = FastAPI(
        title="pneumoscan",
        version=__version__,
        docs_url=None,
        redoc_url=None,
        description="Pneumonia screening on chest X-rays. A screening aid, not a diagnosis.",
    )
    # decoding, checks, heatmaps and previews: at most max_concurrency at once, beside the batcher's network call
    decoders = ThreadPoolExecutor(max_concurrency, thread_name_prefix="pneumoscan-decode")
    heatmap_ok = model.backend.gradcam
    pending = 0  # screening requests admitted and not yet answered
    incoming = 0  # of those, the ones whose image has not reached the batcher yet
    batcher = Batcher(model, window_s=batch_window_ms / 1000.0, max_batch=max_batch, incoming=lambda: incoming,
                      metrics=metrics)
    model_ref = {"name": model.name, "sha256": model.sha256}
    app.state.batcher, app.state.metrics, app.state.audit, app.state.keys = batcher, metrics, audit, keys
    app.state.decoders = decoders

    @app.exception_handler(HTTPError)
    async def _http_error(request: Request, exc: HTTPError):
        return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def _starlette_error(request: Request, exc: StarletteHTTPException):
        message = {404: f"not found: {request.url.path}", 405: f"method {request.method} not allowed here"}
        return JSONResponse(
            {"error": message.get(exc.status_code, str(exc.detail))},
            status_code=exc.status_code,
            headers=getattr(exc, "headers", None),
        )

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError):
        return JSONResponse({"error": _validation_message(exc)}, status_code=422)

    @app.get("/healthz", summary="liveness and the model being served")
    async def healthz() -> dict:
        return {"status": "ok", "version": __version__, "model": model_ref}

    @app.get(
        "/v1/model",
        summary="metadata of the served model: thresholds, calibration, preprocessing, validation",
    )
    async def model_info() -> dict:
        record = model.record.to_dict()
        info = {key: record[key] for key in _META_KEYS if key in record}
        info.update(
            name=model.name,
            sha256=model.sha256,
            thresholds=_ordered(model.thresholds),
            temperature=model.temperature,
            bias=model.bias,
            prevalence={"fitted": model.fitted_prevalence, "used": model.prevalence or model.fitted_prevalence},
            backend=model.backend.name,
            runtime=model.runtime,
            heatmap=heatmap_ok,
            max_upload_bytes=max_upload_bytes,
            batching={**batching, "max_pending": max_pending},
            model_card="/v1/model/card" if bundled_model_card(model) is not None else None,
        )
        return info

    @app.get("/v1/model/card", summary="the bundled model's model card (markdown)", response_model=None)
    async def model_card():
        from fastapi.responses import Response

        card = bundled_model_card(model)
        if card is None:
            raise HTTPError(404, NO_MODEL_CARD.format(name=model.name))
        return Response(card, media_type="text/markdown; charset=utf-8")

    @app.post("/v1/predict", summary="screen one chest X-ray", openapi_extra=_PREDICT_OPENAPI)
    async def predict(
        request: Request,
        threshold: str = Query("screening", description="screening | balanced | a number in (0, 1)"),
        heatmap: bool = Query(False, description="add a Grad-CAM overlay as heatmap_png_base64"),
        preview: bool = Query(False, description="add the decoded image as image_png_base64 (for display)"),
    ) -> JSONResponse:
        nonlocal pending, incoming
        started = time.perf_counter()
        audit = request.scope.get("pneumoscan.audit", {})
        try:
            op = model.resolve_threshold(threshold)
        except PneumoscanError as exc:
            raise HTTPError(422, str(exc)) from None
        if heatmap and not heatmap_ok:
            raise HTTPError(501, NO_HEATMAP)
        if pending >= max_pending:
            metrics.rejected.inc()
            raise HTTPError(503, BUSY, headers={"Retry-After": "1"})
        pending += 1
        incoming += 1
        metrics.in_progress.inc()
        waiting = True  # counted in ``incoming`` until the image is handed to the batcher
        try:
            try:
                with anyio.fail_after(upload_timeout):
                    upload = await read_upload(request, max_upload_bytes)
            except TimeoutError:
                raise HTTPError(408, SLOW_UPLOAD.format(seconds=upload_timeout)) from None
            uploaded = time.perf_counter()
            audit["upload_bytes"] = len(upload.data)
            if sniff(upload.data) is None:
                audit["upload_sha256"] = hashlib.sha256(upload.data).hexdigest()
                raise HTTPError(415, NOT_AN_IMAGE.format(name=upload.filename))
            try:
                prepared = await asyncio.wrap_future(decoders.submit(_prepare, model, upload, audit))
            except PneumoscanError as exc:  # ImageReadError and its kin: the input's fault, one line
                metrics.predictions.labels("error").inc()
                raise HTTPError(422, str(exc).splitlines()[0]) from None
            except Exception:
                logger.exception("decoding failed for request %s", audit.get("request_id"))
                raise HTTPError(500, INTERNAL) from None
            incoming -= 1
            waiting = False
            queued = time.perf_counter()
            try:
                scored = await batcher.score(prepared.small)
            except Exception:
                logger.exception("scoring failed for request %s", audit.get("request_id"))
                raise HTTPError(500, INTERNAL) from None
            pred = model.result(prepared.decoded.name, scored.logits, scored.guard, op, prepared.reason)
            timing = {"upload": uploaded - started, "decode": prepared.seconds,
                      "inference": time.perf_counter() - queued}
            extra: dict = {}
            if heatmap or preview:
                work = decoders.submit(_extras, model, prepared.decoded, pred, heatmap, preview)
                try:
                    more, extra = await asyncio.wrap_future(work)
                except Exception:
                    logger.exception("heatmap or preview failed for request %s", audit.get("request_id"))
                    raise HTTPError(500, INTERNAL) from None
                timing.update(more)
        finally:
            pending -= 1
            if waiting:
                incoming -= 1
            metrics.in_progress.dec()
        metrics.predictions.labels(pred.status).inc()
        audit.update(prediction=pred.status, probability=pred.probability, decision=pred.decision,
                     operating_point=pred.operating_point, threshold=pred.threshold)
        timing["total"] = time.perf_counter() - started
        decisions = None
        if pred.status == "ok":
            decisions = {
                name: model.classes[int(pred.probability >= value)]
                for name, value in _ordered(model.thresholds).items()
            }
        body = {
            "filename": upload.filename,
            "probability": pred.probability,
            "decision": pred.decision,
            "operating_point": pred.operating_point,
            "threshold": pred.threshold,
            "thresholds": _ordered(model.thresholds),
            "decisions": decisions,
            "status": pred.status,
            "message": pred.message,
            "guard_score": pred.guard_score,
            "model": model_ref,
            "timing_ms": {k: round(v * 1000.0, 2) for k, v in timing.items()},
            "batch_size": scored.batch_size,
            "request_id": audit.get("request_id"),
            **extra,
        }
        return JSONResponse(body, headers={"Cache-Control": "no-store"})

    @app.get("/metrics", include_in_schema=False)
    async def metrics_endpoint() -> Response:
        return Response(metrics.render(), media_type=metrics.content_type)

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html; charset=utf-8")

    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_middleware(_Service, keys=keys, audit=audit, metrics=metrics, model_sha256=model.sha256)
    app.add_middleware(_SecurityHeaders)  # outermost: on every response, the 401s of _Service too
    return app


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0, *,
                    ssl_certfile: str | Path | None = None, ssl_keyfile: str | Path | None = None):
    """Run ``app`` with a real uvicorn server in a background thread; yields its base URL, stops it on exit.

    The socket is bound here (port 0 = a free port chosen by the kernel) and handed to uvicorn, so there is no
    window in which another process can take the port. With a certificate and key it serves HTTPS (uvicorn's own
    TLS, as ``pneumoscan serve --ssl-certfile/--ssl-keyfile``). Used by the tests and the HTTP benchmark.
    """
    import socket
    import threading

    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    tls = {"ssl_certfile": str(ssl_certfile), "ssl_keyfile": str(ssl_keyfile)} if ssl_certfile else {}
    config = uvicorn.Config(app, log_level="warning", lifespan="off", timeout_graceful_shutdown=5, **tls)
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run, kwargs={"sockets": [sock]}, name="pneumoscan-server", daemon=True
    )
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"{'https' if tls else 'http'}://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
