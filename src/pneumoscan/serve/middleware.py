"""Plain ASGI middleware around every HTTP request (plain ASGI: unlike BaseHTTPMiddleware it does not wrap the
request body, so an upload still streams).

``Guard``: a request id (``X-Request-ID``), the API key check when keys are on (before the app reads anything, so
an unauthenticated upload is refused unread), one audit line and the Prometheus figures.
``SecurityHeaders``: the page may load nothing but its own files; nothing is sniffed, framed or cached by others;
over TLS, browsers are told to keep to HTTPS (HSTS).
"""

from __future__ import annotations

import json
import logging
import time
import uuid

from .audit import AuditLog
from .auth import KeyStore
from .metrics import Metrics, route_label

logger = logging.getLogger("pneumoscan.serve")

KEY_MISSING = "missing API key: send the header 'Authorization: Bearer KEY'"
KEY_INVALID = "invalid API key"
HSTS_SECONDS = 365 * 24 * 3600


class SecurityHeaders:
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
    HSTS = (b"strict-transport-security", f"max-age={HSTS_SECONDS}".encode("ascii"))

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = [*self.HEADERS, self.HSTS] if scope.get("scheme") == "https" else self.HEADERS

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *headers]}
            await send(message)

        return await self.app(scope, receive, send_with_headers)


def protected(path: str, *, public_docs: bool) -> bool:
    """The paths that need a key when keys are on: the API, the metrics, and the API's schema unless public."""
    if path == "/metrics" or path == "/v1" or path.startswith("/v1/"):
        return True
    return not public_docs and path in ("/openapi.json", "/docs")


def new_entry(*, method: str | None, path: str, client: str | None, model_sha256: str) -> dict:
    """The start of one audit line (``audit.FIELDS``), for a request or a rejected connection."""
    return {"time": time.time(), "request_id": uuid.uuid4().hex, "method": method, "route": route_label(path),
            "key": None, "client": client, "model_sha256": model_sha256}


class Guard:
    """Handlers add what they learn (upload digest, prediction) to ``scope["pneumoscan.audit"]``; the line is
    written when the response is done, whatever happened, and a failure to write it never reaches the client."""

    def __init__(self, app, *, keys: KeyStore | None, audit: AuditLog | None, metrics: Metrics, model_sha256: str,
                 public_docs: bool = False):
        self.app = app
        self.keys = keys
        self.audit = audit
        self.metrics = metrics
        self.model_sha256 = model_sha256
        self.public_docs = public_docs

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start = time.perf_counter()
        path = scope.get("path", "")
        client = scope.get("client")
        entry = new_entry(method=scope.get("method"), path=path, client=client[0] if client else None,
                          model_sha256=self.model_sha256)
        request_id = entry["request_id"]
        scope["pneumoscan.audit"] = entry
        status: list[int | None] = [None]

        async def send_tagged(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []),
                                                  (b"x-request-id", request_id.encode("ascii"))]}
            await send(message)

        try:
            if self.keys is not None and protected(path, public_docs=self.public_docs):
                header = next((v.decode("latin-1") for k, v in scope.get("headers", []) if k == b"authorization"),
                              None)
                name = self.keys.identify(header)
                if name is None:
                    missing = not header
                    self.metrics.unauthorized.labels("missing" if missing else "invalid").inc()
                    challenge = 'Bearer realm="pneumoscan"' + ("" if missing else ', error="invalid_token"')
                    await send_json(send_tagged, 401, {"error": KEY_MISSING if missing else KEY_INVALID},
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


async def send_json(send, status: int, body: dict, headers: dict[str, str]) -> None:
    data = json.dumps(body).encode("utf-8")
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode("ascii")),
           *((k.encode("latin-1"), v.encode("latin-1")) for k, v in headers.items())]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": data})
