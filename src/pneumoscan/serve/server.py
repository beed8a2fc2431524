"""The HTTP server around the app: uvicorn, with the connection bounds a hospital network needs.

uvicorn gives most of them as settings: ``timeout_keep_alive`` (idle connections between requests),
``limit_concurrency`` (beyond that many open connections plus requests in flight, requests get 503) and
``h11_max_incomplete_event_size`` (the largest request head). What it lacks is a deadline for the request head
itself: its keep-alive timer runs only after a response, so a client that trickles its headers a byte at a time,
or opens a connection and sends nothing, holds it for ever. ``GuardedH11Protocol`` adds that (``header_timeout``,
counted from the connection's start or from the previous response) and the idle timeout on a new connection, and
reports every rejection uvicorn makes before the app sees a request (malformed or oversize request heads, the
head deadline, the connection limit) to ``on_reject`` (metrics and, where a request line was read, the audit).
With TLS on, ``tls.PeekTls`` takes each connection first, so that plain HTTP sent to the HTTPS port is answered
and reported too; the connection then reaches ``GuardedH11Protocol`` as with uvicorn's own TLS.

Logged request lines never carry a query string's secrets: ``RedactQuery`` keeps the API's own parameters and
replaces every other value (an ``api_key=...`` a client put in the URL) before any handler formats the line.
"""

from __future__ import annotations

import copy
import json
import logging
import re
from collections.abc import Callable
from urllib.parse import parse_qsl, quote

import h11
import uvicorn
from uvicorn.config import LOGGING_CONFIG
from uvicorn.protocols.http.h11_impl import DEFAULT_MAX_INCOMPLETE_EVENT_SIZE, H11Protocol

from .limits import DEFAULT_HEADER_TIMEOUT, DEFAULT_KEEP_ALIVE, DEFAULT_MAX_CONNECTIONS, DEFAULT_MAX_HEADER_KB
from .tls import peek_tls_class, tls_context

REQUEST_LINE = re.compile(rb"([A-Z]{1,16}) (\S{1,2048}) HTTP/\d\.\d")
LOGGED_PARAMS = frozenset({"threshold", "heatmap", "heatmaps", "preview"})  # the API's own query parameters
REDACTED = "[redacted]"

OnReject = Callable[[str, int | None, "tuple[str, str] | None", "str | None"], None]
# on_reject(reason, status sent or None, (method, path) when a request line was read, client address)

_STATUS = {400: "Bad Request", 408: "Request Timeout", 431: "Request Header Fields Too Large",
           503: "Service Unavailable"}
_MESSAGES = {
    "malformed": (400, "malformed HTTP request"),
    "header_too_large": (431, "request line and headers are larger than the {limit} byte limit"),
    "header_timeout": (408, "request headers not received within {seconds:g} s"),
}


def redact_query(target: str) -> str:
    """``path?query`` with the value of every parameter that is not one of the API's own replaced."""
    path, sep, query = target.partition("?")
    if not sep:
        return target
    pairs = parse_qsl(query, keep_blank_values=True)
    if not pairs:
        return f"{path}?{REDACTED}"
    kept = [f"{quote(k, safe='')}={quote(v, safe='')}" if k in LOGGED_PARAMS and not v.startswith("psk_")
            else f"{quote(k, safe='')}={REDACTED}" for k, v in pairs]
    return f"{path}?{'&'.join(kept)}"


class RedactQuery(logging.Filter):
    """On the ``uvicorn.access`` logger: the request line's query values are redacted before any handler runs."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) and "?" in args[2]:
            record.args = (*args[:2], redact_query(args[2]), *args[3:])
        return True


class HttpsBanner(logging.Filter):
    """On ``uvicorn.error``: with TLS on, uvicorn listens without ``ssl=`` (``tls.PeekTls`` does the TLS), so its
    "Uvicorn running on http://..." line would name the wrong scheme; it is put right here."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Uvicorn running on") and isinstance(record.args, tuple) and record.args:
            record.args = ("https", *record.args[1:])
        return True


def log_config(*, https: bool = False) -> dict:
    """uvicorn's own logging configuration with ``RedactQuery`` on the access logger (and ``HttpsBanner``)."""
    config = copy.deepcopy(LOGGING_CONFIG)
    config["filters"] = {"redact_query": {"()": RedactQuery}, "https_banner": {"()": HttpsBanner}}
    config["loggers"]["uvicorn.access"]["filters"] = ["redact_query"]
    if https:
        config["loggers"]["uvicorn.error"]["filters"] = ["https_banner"]
    return config


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a deadline on the request head and a report of every rejection."""

    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    on_reject: OnReject | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._head_timer = None  # set while the connection waits for a request head
        self._head = bytearray()  # the request head being received, up to the limit
        limit = self.config.h11_max_incomplete_event_size
        self.max_head = DEFAULT_MAX_INCOMPLETE_EVENT_SIZE if limit is None else limit
        self.head_since: float | None = None  # loop time the first head's deadline counts from (None: connected)

    # --- connection life -------------------------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        # a new connection that sends nothing is idle like one between requests
        self.timeout_keep_alive_task = self.loop.call_later(self.timeout_keep_alive, self.timeout_keep_alive_handler)
        self._sync_deadline()

    def connection_lost(self, exc) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self.transport.is_closing():
            return  # refused: whatever else arrives is not read
        if self._head_timer is not None and self._head_limit_passed(data):
            self._refuse("header_too_large")
            return
        limit = self.limit_concurrency
        over = limit is not None and (len(self.connections) >= limit or len(self.tasks) >= limit)
        before = self.cycle
        super().data_received(data)
        self._sync_deadline()
        if over and self.cycle is not before:  # uvicorn answered this request 503 itself
            self._report("connection_limit", 503)

    def _head_limit_passed(self, data: bytes) -> bool:
        """Keep the request head as it arrives (for a rejection's audit line) and say whether it is past the
        limit: h11 bounds only a head still incomplete, so one that arrives whole in a single read would pass."""
        room = self.max_head + 4 - len(self._head)
        if room > 0:
            self._head += data[:room]
        end = self._head.find(b"\r\n\r\n")
        return end > self.max_head or (end == -1 and len(self._head) > self.max_head)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._sync_deadline()  # the next request's head has the same deadline

    # --- the head deadline ------------------------------------------------------------------------------------
    def _sync_deadline(self) -> None:
        """The deadline runs exactly while the connection waits for a request head: h11 expects a new request
        (after a response, once any unread body of the last one has gone by) and no request is being answered."""
        waiting = self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete)
        if waiting and self._head_timer is None and not self.transport.is_closing():
            self._head.clear()
            since, self.head_since = self.head_since or self.loop.time(), None
            self._head_timer = self.loop.call_at(since + self.header_timeout, self._head_timed_out)
        elif not waiting:
            self._disarm()  # a request's head arrived complete: the app's own timeouts take over

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing():
            self._refuse("header_timeout")

    # --- rejections -------------------------------------------------------------------------------------------
    def send_400_response(self, msg: str) -> None:
        """uvicorn's answer to a request head h11 cannot parse, as JSON like every refusal, and reported."""
        self._disarm()
        self._refuse("malformed")

    def _refuse(self, reason: str) -> None:
        self._disarm()
        status, text = _MESSAGES[reason]
        message = text.format(limit=self.max_head, seconds=self.header_timeout)
        body = json.dumps({"error": message}).encode("ascii")
        head = (f"HTTP/1.1 {status} {_STATUS[status]}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode("ascii")
        # a client that sent nothing at all gets nothing back: there was no request to answer
        if reason != "header_timeout" or self._head:
            self.transport.write(head + body)
        self.transport.close()
        self._report(reason, status)

    def _report(self, reason: str, status: int | None) -> None:
        self.report(reason, status, head=bytes(self._head), client=self.client[0] if self.client else None)

    def report(self, reason: str, status: int | None, *, head: bytes, client: str | None) -> None:
        """``on_reject`` with the request line of ``head`` (method and path, no query) when it has one."""
        if self.on_reject is None:
            return
        match = REQUEST_LINE.match(head)
        line = (match.group(1).decode("ascii"), match.group(2).decode("ascii", "replace").split("?")[0]) \
            if match else None
        try:
            self.on_reject(reason, status, line, client)
        except Exception:  # noqa: BLE001 (a report must never break the connection handling)
            logging.getLogger("pneumoscan.serve").exception("pneumoscan: reporting a rejection failed")


def protocol_class(*, header_timeout: float, on_reject: OnReject | None) -> type[GuardedH11Protocol]:
    """The protocol of one server, with its deadline and its report."""
    return type("GuardedH11Protocol", (GuardedH11Protocol,),
                {"header_timeout": header_timeout, "on_reject": staticmethod(on_reject) if on_reject else None})


def server_config(app, *, host: str = "127.0.0.1", port: int = 8000, ssl_certfile=None, ssl_keyfile=None,
                  header_timeout: float = DEFAULT_HEADER_TIMEOUT, keep_alive: float = DEFAULT_KEEP_ALIVE,
                  max_connections: int = DEFAULT_MAX_CONNECTIONS, max_header_kb: int = DEFAULT_MAX_HEADER_KB,
                  log_level: str = "warning", timeout_graceful_shutdown: float | None = None) -> uvicorn.Config:
    """The uvicorn configuration of ``pneumoscan serve`` (and of the tests' servers): one place for every bound."""
    service = getattr(app.state, "service", None)
    http = protocol_class(header_timeout=header_timeout, on_reject=service.rejected if service else None)
    if ssl_certfile:  # uvicorn is not told: PeekTls does the TLS, so that plain HTTP can be answered
        http = peek_tls_class(http, tls_context(str(ssl_certfile), str(ssl_keyfile)))
    return uvicorn.Config(
        app, host=host, port=port, lifespan="on", log_config=log_config(https=bool(ssl_certfile)),
        log_level=log_level, http=http, timeout_keep_alive=keep_alive, limit_concurrency=max_connections,
        h11_max_incomplete_event_size=max_header_kb * 1024, timeout_graceful_shutdown=timeout_graceful_shutdown)
