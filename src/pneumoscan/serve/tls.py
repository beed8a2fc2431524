"""HTTPS that answers a plain-HTTP client (a 400 naming the https:// address, as nginx's 497 does) and counts it.

Why hand-written: given ``ssl=``, ``loop.create_server`` (what uvicorn calls) puts asyncio's TLS layer under every
connection before any protocol sees it; a client that speaks plain HTTP fails the handshake inside asyncio, which
closes the socket without a word and tells no one, and uvicorn offers no hook before the handshake. So with TLS on
the server listens without ``ssl=`` and ``PeekTls`` takes each new connection first. It peeks at the first byte,
leaving it in the socket (asyncio's transports cannot peek, and ``add_reader`` refuses a descriptor a transport
owns, so it peeks through a duplicate of the descriptor while the transport's own reading is paused):

- 0x16, a TLS handshake record: ``loop.start_tls`` does the handshake, then the connection belongs to the HTTP
  protocol (``server.GuardedH11Protocol``), as with uvicorn's own TLS. A handshake that fails (TLS 1.0 or 1.1, a
  client that rejects the certificate) is counted as ``tls_handshake``, never logged with a traceback.
- anything else: once the request head is in (or the header deadline passes), a plain-text 400 that names the
  https:// address of the socket (never the client's Host header), then close; counted as ``plain_http_on_tls``
  and audited with its request line.

The connection bounds hold from the first byte: a connection that sends nothing is closed after the keep-alive
timeout, as in plain HTTP, and the header deadline counts from the connection's start through the handshake to
the end of the first request's head.
"""

from __future__ import annotations

import asyncio
import socket
import ssl

TLS_HANDSHAKE = 0x16  # the content type of a TLS record carrying a handshake message (a ClientHello)


def tls_context(certfile, keyfile) -> ssl.SSLContext:
    """The server's TLS settings: uvicorn's (``create_ssl_context`` with its defaults), TLS 1.2 at least."""
    from uvicorn.config import SSL_PROTOCOL_VERSION, create_ssl_context

    context = create_ssl_context(certfile=certfile, keyfile=keyfile, password=None, ssl_version=SSL_PROTOCOL_VERSION,
                                 cert_reqs=ssl.CERT_NONE, ca_certs=None, ciphers=None)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class PeekTls(asyncio.Protocol):
    """One connection to the HTTPS port, until its first byte has said what it speaks."""

    http_class: type[asyncio.Protocol]  # server.GuardedH11Protocol (not imported: server imports this module)
    context: ssl.SSLContext

    def __init__(self, **kwargs):
        self.http = self.http_class(**kwargs)  # uvicorn's factory arguments: the protocol the connection ends in
        self.loop = self.http.loop
        self.transport: asyncio.Transport | None = None
        self.started = 0.0
        self._peer: socket.socket | None = None  # the duplicate descriptor peeked through
        self._timer: asyncio.TimerHandle | None = None
        self._plain: bytearray | None = None  # a plain-HTTP request's head, once the first byte said so
        self._early = bytearray()  # data that came out of TLS before the HTTP protocol took the connection
        self._handshake: asyncio.Task | None = None
        self._lost = False

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.started = self.loop.time()
        transport.pause_reading()  # the first byte stays in the socket, for the TLS layer to read
        own = transport.get_extra_info("socket")
        try:
            self._peer = socket.fromfd(own.fileno(), own.family, own.type)
        except OSError:  # out of descriptors: refused like any connection the process cannot take
            transport.close()
            return
        self._peer.setblocking(False)
        self.loop.add_reader(self._peer, self._peek)
        self._timer = self.loop.call_later(min(self.http.timeout_keep_alive, self.http.header_timeout), self._silent)

    def _peek(self) -> None:
        try:
            first = self._peer.recv(1, socket.MSG_PEEK)
        except BlockingIOError:
            return
        except OSError:
            first = b""
        self._stop_peeking()
        if not first:  # closed or reset before a byte came: there is nothing to answer
            self.transport.close()
        elif first[0] == TLS_HANDSHAKE:
            self._handshake = self.loop.create_task(self._start_tls())
        else:
            self._plain = bytearray()
            self._timer = self.loop.call_at(self.started + self.http.header_timeout, self._answer_plain)
            self.transport.resume_reading()

    def _silent(self) -> None:
        """Nothing came: closed like an idle connection; counted when the header deadline was the nearer bound."""
        self._timer = None
        self._stop_peeking()
        self.transport.close()
        if self.http.header_timeout <= self.http.timeout_keep_alive:
            self._report("header_timeout", None)

    def _stop_peeking(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self._peer is not None:
            self.loop.remove_reader(self._peer)
            self._peer.close()
            self._peer = None

    # --- TLS ----------------------------------------------------------------------------------------------------
    async def _start_tls(self) -> None:
        deadline = self.started + self.http.header_timeout
        try:
            tls = await self.loop.start_tls(self.transport, self, self.context, server_side=True,
                                            ssl_handshake_timeout=max(deadline - self.loop.time(), 0.001))
        except Exception:  # noqa: BLE001 (any failed handshake: asyncio has closed the connection already)
            self._report("header_timeout" if self.loop.time() >= deadline else "tls_handshake", None)
            return
        if self._lost:
            return
        tls.set_protocol(self.http)
        self.http.head_since = self.started  # the first request's header deadline counts from the connection
        self.http.connection_made(tls)
        if self._early:
            self.http.data_received(bytes(self._early))

    # --- plain HTTP, or data before the HTTP protocol took over -------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self._plain is None:
            self._early += data
            return
        if self.transport.is_closing():
            return
        room = self.http.max_head + 4 - len(self._plain)
        self._plain += data[:max(room, 0)]
        if b"\r\n\r\n" in self._plain or len(self._plain) > self.http.max_head:
            self._answer_plain()

    def eof_received(self) -> None:
        if self._plain is not None:
            self._answer_plain()

    def _answer_plain(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport.is_closing():
            return
        host, port = self.transport.get_extra_info("sockname")[:2]
        address = f"[{host}]" if ":" in host else host
        text = f"this port speaks HTTPS: use https://{address}:{port}/\n".encode("ascii")
        head = (f"HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain; charset=utf-8\r\n"
                f"content-length: {len(text)}\r\nconnection: close\r\n\r\n").encode("ascii")
        self.transport.write(head + text)
        self.transport.close()
        self._report("plain_http_on_tls", 400)

    def _report(self, reason: str, status: int | None) -> None:
        peer = self.transport.get_extra_info("peername") if self.transport else None
        self.http.report(reason, status, head=bytes(self._plain or b""), client=peer[0] if peer else None)

    def connection_lost(self, exc) -> None:
        self._lost = True
        self._stop_peeking()


def peek_tls_class(http_class: type[asyncio.Protocol], context: ssl.SSLContext) -> type[PeekTls]:
    """The protocol of one HTTPS server: uvicorn builds it as it would build ``http_class``."""
    return type("PeekTls", (PeekTls,), {"http_class": http_class, "context": context})
