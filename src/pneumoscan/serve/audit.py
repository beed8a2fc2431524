"""The audit trail: one JSON line per HTTP request in a size-rotated file.

What a line holds: time (UTC), request id (also sent back as ``X-Request-ID``), method, route, key name (never
the key), client address, the upload's sha256 and size, the served model's sha256, the HTTP status, and for
screened images the prediction's status, probability, decision, operating point and threshold, the prevalence the
probability was re-based to (``--prevalence``; None: as calibrated, so ``pneumoscan monitor`` can undo it), and
``facts``: what drift monitoring needs of the result, as every route records it (``pipeline.Screened.facts``:
guard distance, input statistics, size, format, the DICOM categories modality, manufacturer, view, photometric,
and an age band, never an age); the latency in ms. A request the server refused before the app saw it (a
malformed or oversize head, headers too slow, the connection limit, plain HTTP sent to the HTTPS port) gets a line
too when its request line was read, with ``rejected`` saying why.

What it never holds: pixels, the client's file name, error messages (they quote the file name), patient
identifiers or any other DICOM header field. Writing is best effort: a full disk or a removed folder costs the
line, never the request; failures are counted (``pneumoscan_audit_failures_total``) and reported once per minute
on the server's log.
"""

from __future__ import annotations

import json
import logging
import logging.handlers
import time
from datetime import datetime, timezone
from pathlib import Path

from ..errors import PneumoscanError

logger = logging.getLogger("pneumoscan.serve")

DEFAULT_MAX_BYTES = 100 * 2**20
DEFAULT_BACKUPS = 10
FIELDS = ("time", "request_id", "method", "route", "key", "client", "upload_sha256", "upload_bytes",
          "model_sha256", "status", "prediction", "probability", "decision", "operating_point", "threshold",
          "prevalence", "facts", "latency_ms", "rejected")


class _Handler(logging.handlers.RotatingFileHandler):
    def __init__(self, *args, on_error, **kwargs):
        super().__init__(*args, **kwargs)
        self._on_error = on_error

    def handleError(self, record):  # noqa: N802 (logging's name)
        self._on_error()  # no traceback on stderr, no exception into the request


class AuditLog:
    def __init__(self, path: str | Path, *, max_bytes: int = DEFAULT_MAX_BYTES, backups: int = DEFAULT_BACKUPS,
                 on_failure=None):
        self.path = Path(path)
        self.failures = 0
        self.on_failure = on_failure
        self._last_report = 0.0
        try:
            self._handler = _Handler(self.path, maxBytes=max_bytes, backupCount=backups, encoding="utf-8",
                                     on_error=self._failed)
        except OSError as exc:
            raise PneumoscanError(f"{path}: cannot open the audit log ({exc.strerror or exc})") from None
        self._handler.setFormatter(logging.Formatter("%(message)s"))

    def _failed(self) -> None:
        self.failures += 1
        if self.on_failure is not None:
            self.on_failure()
        now = time.monotonic()
        if now - self._last_report > 60:
            self._last_report = now
            logger.error("pneumoscan: could not write the audit log %s (%d line(s) lost so far)",
                         self.path, self.failures)

    def write(self, entry: dict) -> None:
        """Best effort, whatever goes wrong."""
        try:
            line = {k: entry.get(k) for k in FIELDS}
            line["time"] = datetime.fromtimestamp(entry.get("time", time.time()), timezone.utc).isoformat(
                timespec="milliseconds").replace("+00:00", "Z")
            record = logging.makeLogRecord({"msg": json.dumps(line, separators=(",", ":")), "levelno": logging.INFO,
                                            "levelname": "INFO"})
            self._handler.handle(record)
        except Exception:  # noqa: BLE001 (an audit failure must never fail the request)
            self._failed()

    def close(self) -> None:
        self._handler.close()
