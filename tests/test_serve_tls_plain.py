"""The HTTPS port of ``pneumoscan serve`` and clients that do not speak TLS to it, over real sockets with a real
(self-signed) certificate: plain HTTP is answered with a 400 naming the https:// address, counted and audited;
failed handshakes (TLS 1.0/1.1) are counted; the connection deadlines hold before and during the handshake; and
HTTPS is served as before meanwhile."""

from __future__ import annotations

import contextlib
import logging
import shutil
import ssl
import subprocess
import threading
import time

import httpx
import pytest
from test_serve_service import _connect, _read_until_closed, audit_lines, metric_samples, self_signed

from pneumoscan.serve import create_app, serve_in_thread

HEADER_TIMEOUT = 3.0
KEEP_ALIVE = 1.0


@pytest.fixture
def https(tiny_model, tmp_path):
    """An HTTPS server with short connection deadlines and an audit log; yields (url, audit file, trusting
    client)."""
    cert, key = self_signed(tmp_path)
    audit = tmp_path / "audit.jsonl"
    app = create_app(tiny_model, audit_log=audit)
    with serve_in_thread(app, ssl_certfile=cert, ssl_keyfile=key, header_timeout=HEADER_TIMEOUT,
                         keep_alive=KEEP_ALIVE) as url, \
            httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=30) as client:
        yield url, audit, client


def rejections(client: httpx.Client, url: str) -> dict[str, float]:
    """``pneumoscan_protocol_rejections_total`` by reason, read over HTTPS."""
    samples = metric_samples(client.get(f"{url}/metrics").text)
    return {dict(labels)["reason"]: value for (name, labels), value in samples.items()
            if name == "pneumoscan_protocol_rejections_total"}


def plain_request(url: str, data: bytes) -> bytes:
    sock = _connect(url)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):
        sock.sendall(data)
    answer = _read_until_closed(sock)
    sock.close()
    return answer


def test_plain_http_on_the_https_port_gets_a_400_naming_https_and_is_counted_and_audited(https):
    url, audit, client = https
    answer = plain_request(url, b"GET /healthz?api_key=psk_in_the_url HTTP/1.1\r\nHost: evil.example\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")  # _read_until_closed returned: the server closed the connection
    lines = head.decode("ascii").split("\r\n")
    assert lines[0] == "HTTP/1.1 400 Bad Request"
    assert "connection: close" in lines and "content-type: text/plain; charset=utf-8" in lines
    assert body.decode("ascii") == f"this port speaks HTTPS: use {url}/\n"  # the socket's address, not the Host

    assert rejections(client, url) == {"plain_http_on_tls": 1}
    assert client.get(f"{url}/healthz").json()["status"] == "ok"  # HTTPS is served as before
    rejected = [line for line in audit_lines(audit, 3) if line["rejected"]]
    assert [(r["method"], r["route"], r["status"], r["rejected"]) for r in rejected] == [
        ("GET", "/healthz", 400, "plain_http_on_tls")]
    assert "psk_in_the_url" not in audit.read_text()  # the query is never audited


def test_curl_over_plain_http_is_told_to_use_https(https):
    url, audit, client = https
    if shutil.which("curl") is None:
        pytest.skip("the curl command is not installed")
    plain = url.replace("https://", "http://")
    done = subprocess.run(["curl", "-sS", "-i", "--max-time", "20", f"{plain}/v1/model"], capture_output=True,
                          text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("HTTP/1.1 400 Bad Request")
    assert done.stdout.endswith(f"\n\nthis port speaks HTTPS: use {url}/\n")  # (text mode: CRLF read as LF)
    assert rejections(client, url) == {"plain_http_on_tls": 1}
    line = next(r for r in audit_lines(audit, 2) if r["rejected"])
    assert (line["method"], line["route"]) == ("GET", "/v1/model")


def test_a_request_without_a_request_line_is_answered_and_counted_but_not_audited(https):
    url, audit, client = https
    answer = plain_request(url, b"hello there\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n") and answer.endswith(b"use " + url.encode() + b"/\n")
    assert rejections(client, url) == {"plain_http_on_tls": 1}
    assert [r for r in audit_lines(audit, 1) if r["rejected"]] == []  # nothing to audit: no method, no path


@pytest.mark.skipif(shutil.which("openssl") is None, reason="the openssl command is not installed")
@pytest.mark.parametrize("version", ["-tls1", "-tls1_1"])
def test_an_old_tls_client_is_refused_and_counted(https, version):
    url, _, client = https
    port = url.rsplit(":", 1)[1]
    # SECLEVEL=0: OpenSSL 3 would otherwise refuse to offer TLS 1.0/1.1 itself, and no handshake would be tried
    done = subprocess.run(["openssl", "s_client", version, "-cipher", "DEFAULT@SECLEVEL=0", "-connect",
                           f"127.0.0.1:{port}"], stdin=subprocess.DEVNULL, capture_output=True, text=True,
                          timeout=30)
    assert done.returncode != 0
    assert "Cipher is (NONE)" in done.stdout or "Cipher    : 0000" in done.stdout  # no session was set up
    assert client.get(f"{url}/healthz").status_code == 200
    assert rejections(client, url) == {"tls_handshake": 1}


def test_https_is_answered_while_a_plain_http_client_is_half_way_through_its_head(https):
    url, audit, client = https
    silent = _connect(url)  # holds a connection open without a byte
    slow = _connect(url)
    slow.sendall(b"POST /v1/predict HTTP/1.1\r\n")  # the request line, the headers still to come
    assert client.get(f"{url}/healthz").json()["status"] == "ok"
    assert client.get(f"{url}/v1/model").status_code == 200
    slow.sendall(b"Host: 127.0.0.1\r\n\r\n")
    assert _read_until_closed(slow).startswith(b"HTTP/1.1 400 Bad Request\r\n")
    slow.close()
    silent.close()
    assert rejections(client, url) == {"plain_http_on_tls": 1}


def test_a_silent_connection_is_closed_after_the_keep_alive_timeout_without_being_counted(https):
    url, _, client = https
    start = time.monotonic()
    silent = _connect(url)
    assert _read_until_closed(silent) == b""  # closed without a word: there was no request to answer
    silent.close()
    assert KEEP_ALIVE - 0.1 < time.monotonic() - start < HEADER_TIMEOUT
    assert rejections(client, url) == {}


def test_a_stalled_handshake_is_closed_at_the_header_deadline_and_counted(https):
    url, _, client = https
    start = time.monotonic()
    stalled = _connect(url)
    stalled.sendall(b"\x16\x03\x01")  # the start of a TLS record, then nothing
    assert _read_until_closed(stalled) == b""
    stalled.close()
    assert HEADER_TIMEOUT - 0.1 < time.monotonic() - start < HEADER_TIMEOUT + 2
    assert rejections(client, url) == {"header_timeout": 1}


def test_the_header_deadline_counts_from_the_connection_not_from_the_end_of_a_slow_handshake(https, tmp_path):
    """A client that takes two thirds of the header deadline over its handshake and then trickles its request
    head gets its 408 when the deadline, counted from connecting, passes."""
    url, audit, client = https
    context = ssl.create_default_context(cafile=str(tmp_path / "cert.pem"))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    start = time.monotonic()
    sock = _connect(url)
    with contextlib.suppress(ssl.SSLWantReadError):
        tls.do_handshake()
    hello = outgoing.read()
    sock.sendall(hello[:5])  # the record header of the ClientHello, then a pause
    sock.settimeout(HEADER_TIMEOUT * 2 / 3)
    with pytest.raises(TimeoutError):
        sock.recv(1)  # the server waits for the rest (and has not closed the connection)
    sock.settimeout(10)
    sock.sendall(hello[5:])
    while True:  # the rest of the handshake, driven by hand
        try:
            tls.do_handshake()
            break
        except ssl.SSLWantReadError:
            sock.sendall(outgoing.read())
            incoming.write(sock.recv(65536))
    sock.sendall(outgoing.read())
    tls.write(b"GET /healthz HTTP/1.1\r\n")  # the request line, and the headers never
    sock.sendall(outgoing.read())
    answer = b""
    while True:  # until the server's close_notify (TLS's end of the answer) or the connection's end
        try:
            chunk = tls.read(65536)
        except ssl.SSLWantReadError:
            received = sock.recv(65536)  # waits for the server (bounded by the socket's timeout)
            if not received:
                break
            incoming.write(received)
            continue
        except ssl.SSLZeroReturnError:
            break
        if not chunk:
            break
        answer += chunk
    elapsed = time.monotonic() - start
    sock.close()
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert elapsed < HEADER_TIMEOUT + 1.0, elapsed  # not HEADER_TIMEOUT after the handshake ended
    assert rejections(client, url) == {"header_timeout": 1}
    line = next(r for r in audit_lines(audit, 2) if r["rejected"])
    assert (line["rejected"], line["status"], line["route"]) == ("header_timeout", 408, "/healthz")


def test_the_verbose_banner_of_an_https_server_says_https(tiny_model, tmp_path):
    """uvicorn is not given the certificate (the server does the TLS itself), so its own "running on" line would
    say http://; the line an operator reads says https://."""
    import uvicorn

    from pneumoscan.serve.server import server_config

    cert, key = self_signed(tmp_path)
    config = server_config(create_app(tiny_model), port=0, ssl_certfile=cert, ssl_keyfile=key, log_level="info",
                           timeout_graceful_shutdown=5)  # configures logging: handlers are added after this
    said: list[str] = []
    running = threading.Event()

    class Capture(logging.Handler):
        def emit(self, record):
            said.append(self.format(record))
            if "running on" in record.getMessage():
                running.set()

    capture = Capture()
    logging.getLogger("uvicorn.error").addHandler(capture)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)  # binds itself, as `pneumoscan serve` does
    thread.start()
    try:
        assert running.wait(30), said
    finally:
        server.should_exit = True
        thread.join(30)
        logging.getLogger("uvicorn.error").removeHandler(capture)
    banner = next(line for line in said if "running on" in line)
    assert "https://127.0.0.1:" in banner, banner
