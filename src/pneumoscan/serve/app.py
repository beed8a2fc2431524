"""HTTP service: one loaded model behind a small JSON API and a static web page.

How it is put together, in the order a request meets it:
    server.py      uvicorn with the connection bounds (head deadline, idle timeout, connection cap, head size)
    middleware.py  security headers; request id, API key check, audit line and metrics (plain ASGI)
    routes.py      /v1 on an APIRouter (model, model card, predict), health, metrics, schema, page
    upload.py      the multipart upload, streamed and bounded
    state.py       the settings, and the decode pool and batcher thread the lifespan owns
    batching.py    the batcher: queued ``Prepared`` items decided together by ``pipeline.decide``
    models.py      the Pydantic models of every answer (the OpenAPI schema documents them)
Every failure is ``{"error": "<one line>"}`` with the matching status code.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..errors import PneumoscanError
from .audit import AuditLog
from .auth import KeyStore
from .limits import (
    DEFAULT_CONCURRENCY,
    DEFAULT_DRIFT_WINDOW,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_UPLOAD_TIMEOUT,
    DEFAULT_WINDOW_MS,
)
from .metrics import Metrics
from .middleware import KEY_INVALID, KEY_MISSING, Guard, SecurityHeaders
from .routes import BUSY, INTERNAL, NO_HEATMAP, STATIC_DIR, api, bundled_model_card, public
from .state import Service, Settings
from .upload import EMPTY_BODY, HTTPError

__all__ = ["BUSY", "DEFAULT_MAX_UPLOAD", "EMPTY_BODY", "INTERNAL", "KEY_INVALID", "KEY_MISSING", "NO_HEATMAP",
           "bundled_model_card", "create_app", "serve_in_thread"]

logger = logging.getLogger("pneumoscan.serve")

DEFAULT_MAX_UPLOAD = int(DEFAULT_MAX_UPLOAD_MB * 2**20)


@contextlib.asynccontextmanager
async def lifespan(app: FastAPI):
    """The decode pool, the batcher thread and the drift monitor's thread live exactly as long as the server runs
    the app."""
    service: Service = app.state.service
    service.open()
    try:
        yield
    finally:
        service.close()


async def _http_error(request: Request, exc: HTTPError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


async def _starlette_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    message = {404: f"not found: {request.url.path}", 405: f"method {request.method} not allowed here"}
    return JSONResponse({"error": message.get(exc.status_code, str(exc.detail))}, status_code=exc.status_code,
                        headers=getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    parts = []
    for err in exc.errors():
        where = " ".join(str(p) for p in err.get("loc", ()) if p not in ("query", "body"))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg", "invalid")))
    return JSONResponse({"error": "invalid request: " + "; ".join(parts)}, status_code=422)


def create_app(
    model,
    *,
    max_upload_bytes: int = DEFAULT_MAX_UPLOAD,
    max_concurrency: int = DEFAULT_CONCURRENCY,
    max_pending: int = DEFAULT_MAX_PENDING,
    upload_timeout: float = DEFAULT_UPLOAD_TIMEOUT,
    batch_window_ms: float = DEFAULT_WINDOW_MS,
    max_batch: int = DEFAULT_MAX_BATCH,
    api_keys: KeyStore | str | Path | None = None,
    audit_log: AuditLog | str | Path | None = None,
    public_docs: bool = False,
    drift_window: int = DEFAULT_DRIFT_WINDOW,
) -> FastAPI:
    """The service around one already-loaded model (loaded once by the caller, shared by all requests).

    ``max_concurrency`` bounds simultaneous decoding threads; the network runs in one batcher thread that decides
    the images arriving within ``batch_window_ms`` of each other together, up to ``max_batch`` per call.
    ``max_pending`` bounds screening requests in progress (each may hold up to ``max_upload_bytes``); beyond it
    the answer is 503 with Retry-After. ``api_keys`` (a key file or a ``KeyStore``) makes ``/v1/``, ``/metrics``
    and, unless ``public_docs``, ``/openapi.json`` require ``Authorization: Bearer KEY``; ``audit_log`` (a file or
    an ``AuditLog``) gets one JSON line per request. Threads start with the server (the lifespan), not here.
    ``drift_window``: the drift gauges on ``/metrics`` cover the last N screened images (``monitor.SlidingMonitor``,
    fed off the request path); 0, or a model without a drift reference, exports none.
    """
    if max_pending < 1 or max_concurrency < 1:
        raise PneumoscanError("max_pending and max_concurrency must be at least 1")
    settings = Settings(max_upload_bytes, max_concurrency, max_pending, upload_timeout, batch_window_ms, max_batch,
                        public_docs)
    keys = KeyStore(api_keys) if isinstance(api_keys, (str, Path)) else api_keys
    metrics = Metrics(model, batching=settings.batching)
    audit = AuditLog(audit_log) if isinstance(audit_log, (str, Path)) else audit_log
    if audit is not None and audit.on_failure is None:
        audit.on_failure = metrics.audit_failures.inc
    # imported here: it loads the stage (torch), which `pneumoscan serve` must load only after its thread setup
    from .. import monitor

    drift = None
    ref = monitor.reference_for(model) if drift_window else None
    if ref is not None:
        drift = monitor.SlidingMonitor(ref, window=drift_window)
        drift.register(metrics.registry)
    service = Service(model, settings, metrics, keys, audit, drift)

    app = FastAPI(title="pneumoscan", version=__version__, lifespan=lifespan, openapi_url=None, docs_url=None,
                  redoc_url=None, description="Pneumonia screening on chest X-rays. A screening aid, not a diagnosis.")
    app.router.redirect_slashes = False  # a redirect would be built from the client's Host header
    app.state.service = service
    app.state.metrics, app.state.audit, app.state.keys = metrics, audit, keys
    app.include_router(api)
    app.include_router(public)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    app.add_exception_handler(HTTPError, _http_error)
    app.add_exception_handler(StarletteHTTPException, _starlette_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_middleware(Guard, keys=keys, audit=audit, metrics=metrics, model_sha256=model.sha256,
                       public_docs=public_docs)
    app.add_middleware(SecurityHeaders)  # outermost: on every response, the 401s of Guard too
    return app


@contextlib.contextmanager
def serve_in_thread(app: FastAPI, host: str = "127.0.0.1", port: int = 0, timeout: float = 30.0, *,
                    ssl_certfile: str | Path | None = None, ssl_keyfile: str | Path | None = None,
                    log_level: str = "warning", **bounds):
    """Run ``app`` with a real uvicorn server in a background thread (the configuration of ``pneumoscan serve``,
    ``server.server_config``; ``bounds`` are its connection options); yields its base URL, stops it on exit.

    The socket is bound here (port 0 = a free port chosen by the kernel) and handed to uvicorn, so there is no
    window in which another process can take the port. With a certificate and key it serves HTTPS. Used by the
    tests and the HTTP benchmark.
    """
    import uvicorn

    from .server import server_config

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    config = server_config(app, host=host, ssl_certfile=ssl_certfile, ssl_keyfile=ssl_keyfile, log_level=log_level,
                           timeout_graceful_shutdown=5, **bounds)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="pneumoscan-server", daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:  # uvicorn offers no event to wait on; polled, bounded
        if not thread.is_alive() or time.monotonic() > deadline:
            server.should_exit = True
            sock.close()
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"{'https' if ssl_certfile else 'http'}://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout)
        sock.close()
