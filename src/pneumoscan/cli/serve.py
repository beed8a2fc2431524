"""``pneumoscan serve`` and ``pneumoscan keys``: their options and what they do.

Kept light: nothing here imports torch, FastAPI or uvicorn until a command runs, so ``pneumoscan --help`` stays
fast.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
from pathlib import Path

from ..durable import SERVICE_UMASK, parse_umask
from ..errors import PneumoscanError
from ..serve.limits import (
    DEFAULT_CONCURRENCY,
    DEFAULT_DRIFT_WINDOW,
    DEFAULT_HEADER_TIMEOUT,
    DEFAULT_KEEP_ALIVE,
    DEFAULT_MAX_BATCH,
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_MAX_HEADER_KB,
    DEFAULT_MAX_PENDING,
    DEFAULT_MAX_UPLOAD_MB,
    DEFAULT_UPLOAD_TIMEOUT,
    DEFAULT_WINDOW_MS,
)

MAX_BATCH_LIMIT = 256
MIN_DRIFT_WINDOW = 20  # monitor.MIN_WINDOW: fewer results are not judged (kept here: --help imports no numpy)
MAX_DRIFT_WINDOW = 100_000
OPEN_REFUSED = ("refusing to serve {host} without API keys: anyone who can reach the port could screen images; "
                "pass --api-keys FILE (make one with `pneumoscan keys add NAME --file FILE`), or --allow-open if "
                "an open service on this address is intended")
SERVE_DESCRIPTION = """\
HTTP API (/v1/predict, /v1/model, /metrics, /healthz) and a web page for screening single images.

Access: with --api-keys every /v1/ route, /metrics and the API schema (/openapi.json, unless --public-docs) need
'Authorization: Bearer KEY' (401 otherwise); /healthz, the page and its files stay open, and the page asks for the
key. Without keys the server only listens on a loopback address unless --allow-open says an open service is
intended. With --ssl-certfile/--ssl-keyfile it speaks HTTPS only (plain HTTP gets a 400 naming the https://
address), and tells browsers so (HSTS).

Connections: a client must finish sending its request line and headers within --header-timeout seconds of
connecting (or of its previous answer) and keep them under --max-header-kb; an idle connection closes after
--keep-alive seconds; beyond --max-connections open connections plus requests in flight, requests get 503. An
upload's body must arrive within --upload-timeout seconds (408) and stay under --max-upload-mb (413). Refused
connections are counted in /metrics (pneumoscan_protocol_rejections_total) and audited when a request line was
read. Logged request lines (--verbose) keep only the API's own query parameters; other values are redacted.

Load: uploads are decoded by --concurrency threads; the network runs in one batcher thread that scores the images
arriving within --batch-window-ms of each other as one call of at most --max-batch images, on --threads threads
that sleep between operators instead of spinning (they share the cores with the decoding). At most --max-pending
screening requests are in progress (uploading, decoding or queued); beyond that the answer is 503 with
Retry-After: 1.

Audit: --audit-log FILE gets one JSON line per request (time, request id also sent as X-Request-ID, key name,
client address, upload sha256 and size, model sha256, status, prediction, latency), never pixels, file names or
DICOM patient fields; it rotates at --audit-max-mb, keeping --audit-backups old files.

Drift: for a model with a drift reference (the bundled one, and every model trained or adapted since drift
monitoring), /metrics carries pneumoscan_drift_* gauges over the last --drift-window screened images (the figures
of `pneumoscan monitor`, computed in a thread of their own, off the request path; alert on
pneumoscan_drift_alarm == 1).

Files: the server sets its umask to 077 (files it writes, the audit log and its rotated copies, are readable by
its own user only) unless --umask says otherwise."""


def add_serve_command(sub, add_model_options) -> argparse.ArgumentParser:
    """The ``serve`` subcommand, with the model options every answering command shares."""
    from .args import add_device_option, number_type, port_number, positive_float, positive_int

    def count(low: int, high: int):
        return number_type(int, lambda v: low <= v <= high, f"a whole number from {low} to {high}")

    drift_window = number_type(int, lambda v: v == 0 or MIN_DRIFT_WINDOW <= v <= MAX_DRIFT_WINDOW,
                               f"0 or a whole number from {MIN_DRIFT_WINDOW} to {MAX_DRIFT_WINDOW}")
    window_ms = number_type(float, lambda v: 0.0 <= v <= 1000.0, "a number of milliseconds from 0 to 1000")

    p = sub.add_parser("serve", help="HTTP API and web page for screening single images",
                       description=SERVE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="model file or run directory (default: the bundled model)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=port_number, default=8000, help="TCP port (default 8000)")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    add_device_option(p)
    p.add_argument("--max-upload-mb", type=positive_float, default=DEFAULT_MAX_UPLOAD_MB, metavar="MB",
                   help=f"larger uploads are refused with 413 (default {DEFAULT_MAX_UPLOAD_MB:g})")
    p.add_argument("--concurrency", type=positive_int, default=DEFAULT_CONCURRENCY,
                   help=f"uploads decoded at the same time (default {DEFAULT_CONCURRENCY})")
    p.add_argument("--threads", type=positive_int, default=None, metavar="N",
                   help="threads of one network call (default: all cores the process may use)")
    p.add_argument("--batch-window-ms", type=window_ms, default=DEFAULT_WINDOW_MS, metavar="MS",
                   help=f"how long the batcher waits for more images once one is ready, while other requests are "
                        f"still being decoded (default {DEFAULT_WINDOW_MS:g}; 0: only what is already queued)")
    p.add_argument("--max-batch", type=count(1, MAX_BATCH_LIMIT), default=DEFAULT_MAX_BATCH, metavar="N",
                   help=f"most images per network call (default {DEFAULT_MAX_BATCH}; 1: no batching)")
    p.add_argument("--max-pending", type=positive_int, default=DEFAULT_MAX_PENDING, metavar="N",
                   help=f"screening requests in progress at once; more get 503 with Retry-After "
                        f"(default {DEFAULT_MAX_PENDING}; each may hold up to --max-upload-mb)")
    p.add_argument("--upload-timeout", type=positive_float, default=DEFAULT_UPLOAD_TIMEOUT, metavar="S",
                   help=f"an upload not received within S seconds gets 408 (slow or stalled clients; default "
                        f"{DEFAULT_UPLOAD_TIMEOUT:g})")
    p.add_argument("--header-timeout", type=positive_float, default=DEFAULT_HEADER_TIMEOUT, metavar="S",
                   help=f"a connection whose request line and headers are not complete within S seconds of its "
                        f"start (or of its previous answer) is closed, with 408 if it sent anything "
                        f"(default {DEFAULT_HEADER_TIMEOUT:g})")
    p.add_argument("--keep-alive", type=positive_float, default=DEFAULT_KEEP_ALIVE, metavar="S",
                   help=f"an idle connection (new, or between requests) is closed after S seconds "
                        f"(default {DEFAULT_KEEP_ALIVE:g})")
    p.add_argument("--max-connections", type=positive_int, default=DEFAULT_MAX_CONNECTIONS, metavar="N",
                   help=f"beyond N open connections plus requests in flight, requests get 503 "
                        f"(default {DEFAULT_MAX_CONNECTIONS})")
    p.add_argument("--max-header-kb", type=count(1, 1024), default=DEFAULT_MAX_HEADER_KB, metavar="KB",
                   help=f"largest request line plus headers; larger ones get 431 and the connection is closed "
                        f"(default {DEFAULT_MAX_HEADER_KB})")
    p.add_argument("--api-keys", metavar="FILE", help="key file from `pneumoscan keys add`: /v1/, /metrics and "
                                                      "/openapi.json then need 'Authorization: Bearer KEY'")
    p.add_argument("--allow-open", action="store_true",
                   help="serve a non-loopback address without --api-keys (an open service, on purpose)")
    p.add_argument("--ssl-certfile", metavar="PEM", help="TLS certificate (chain); serve HTTPS with --ssl-keyfile")
    p.add_argument("--ssl-keyfile", metavar="PEM", help="TLS private key of --ssl-certfile")
    p.add_argument("--audit-log", metavar="FILE", help="append one JSON line per request to FILE (rotated)")
    p.add_argument("--audit-max-mb", type=positive_float, default=100.0, metavar="MB",
                   help="rotate the audit log at this size (default 100)")
    p.add_argument("--audit-backups", type=count(0, 10_000), default=10, metavar="N",
                   help="rotated audit files kept, FILE.1 ... FILE.N (default 10)")
    p.add_argument("--drift-window", type=drift_window, default=DEFAULT_DRIFT_WINDOW, metavar="N",
                   help=f"the drift gauges on /metrics (pneumoscan_drift_*) cover the last N screened images "
                        f"(default {DEFAULT_DRIFT_WINDOW}; 0: none; a model without a drift reference has none)")
    p.add_argument("--public-docs", action="store_true",
                   help="serve the API schema (/openapi.json) without a key when --api-keys is on")
    p.add_argument("--umask", type=umask_type, default=None, metavar="OCTAL",
                   help="file creation mask of the server (default 077: files it writes are owner-only)")
    p.add_argument("--verbose", action="store_true", help="log every request (query values other than the API's "
                                                          "own parameters redacted)")
    add_model_options(p)
    p.set_defaults(func=cmd_serve)
    return p


def umask_type(text: str) -> int:
    try:
        return parse_umask(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def add_keys_command(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("keys", help="API keys for `pneumoscan serve --api-keys FILE`",
                       description="Named API keys. The file holds only each key's sha256; `add` prints the key "
                                   "once, on stdout. A running server picks up changes within a second.")
    keys = p.add_subparsers(dest="keys_command", required=True)
    q = keys.add_parser("add", help="make a random key under NAME and print it once")
    q.add_argument("name")
    q.add_argument("--file", required=True, help="key file (created, owner-only, if missing)")
    q.set_defaults(func=cmd_keys)
    q = keys.add_parser("list", help="names and creation times (never the keys)")
    q.add_argument("--file", required=True)
    q.set_defaults(func=cmd_keys)
    q = keys.add_parser("remove", help="revoke the key named NAME")
    q.add_argument("name")
    q.add_argument("--file", required=True)
    q.set_defaults(func=cmd_keys)
    return p


def cmd_keys(args: argparse.Namespace) -> int:
    from ..serve import auth

    if args.keys_command == "add":
        key = auth.add_key(args.file, args.name)
        print(key)
        print(f"pneumoscan: key {args.name!r} added to {args.file}; it is shown only this once, the file keeps its "
              "hash", file=sys.stderr)
    elif args.keys_command == "list":
        keys = auth.read_keys(args.file)
        for stored in sorted(keys.values(), key=lambda k: k.name):
            print(f"{stored.name}\t{stored.created}\tsha256:{stored.sha256[:12]}")
        if not keys:
            print(f"pneumoscan: {args.file} holds no keys", file=sys.stderr)
    else:
        auth.remove_key(args.file, args.name)
        print(f"pneumoscan: key {args.name!r} removed from {args.file}", file=sys.stderr)
    return 0


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: whatever it resolves to, it is not known to be this machine only


def check_tls(certfile: str | None, keyfile: str | None) -> None:
    """Both or neither, and loadable: a one-line error now instead of uvicorn's traceback later."""
    if not certfile and not keyfile:
        return
    if not (certfile and keyfile):
        raise PneumoscanError("TLS needs both --ssl-certfile and --ssl-keyfile")
    import ssl

    for path in (certfile, keyfile):
        if not Path(path).is_file():
            raise PneumoscanError(f"{path}: TLS file not found")
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certfile, keyfile)
    except (ssl.SSLError, OSError) as exc:
        raise PneumoscanError(f"{certfile}, {keyfile}: not a usable TLS certificate and key "
                              f"({getattr(exc, 'reason', None) or exc})") from None


def network_threads(threads: int | None) -> int:
    """The network's thread count for serving (--threads, default all cores), set for torch; onnxruntime gets it
    through ``load_model(threads=)``.

    The threads sleep between operators rather than spin (``OMP_WAIT_POLICY=PASSIVE``, set by ``cli.main`` for
    the services before torch loads; onnxruntime's pool without spinning): spinning took the CPU the decoding
    threads and the event loop need on the same cores, several times the throughput under load on 2 cores.
    """
    import torch

    from ..backends.onnx import cpu_threads

    threads = threads or cpu_threads()
    torch.set_num_threads(threads)
    return threads


def cmd_serve(args: argparse.Namespace) -> int:
    # everything that can be refused without the model is refused first, in one line
    if not args.api_keys and not args.allow_open and not is_loopback(args.host):
        raise PneumoscanError(OPEN_REFUSED.format(host=args.host))
    check_tls(args.ssl_certfile, args.ssl_keyfile)
    try:
        import uvicorn

        from ..serve.app import create_app
        from ..serve.server import server_config
    except ImportError as exc:
        raise PneumoscanError(f"serving needs the [serve] extra (pip install 'pneumoscan[serve]'): {exc}") from None
    from ..serve.audit import AuditLog
    from ..serve.auth import KeyStore

    threads = network_threads(args.threads)
    keys = KeyStore(args.api_keys) if args.api_keys else None
    from ..predict import load_model

    limit = getattr(args, "max_megapixels", None)  # a model option of the main parser, when it has it
    model = load_model(args.model, backend=args.backend, device=args.device,
                       precision=args.precision, prevalence=args.prevalence, threads=threads,
                       **({"max_pixels": round(limit * 1e6)} if limit else {}))
    os.umask(SERVICE_UMASK if args.umask is None else args.umask)  # the durable.py policy, before any file opens
    audit = AuditLog(args.audit_log, max_bytes=int(args.audit_max_mb * 2**20), backups=args.audit_backups) \
        if args.audit_log else None
    app = create_app(model, max_upload_bytes=int(args.max_upload_mb * 2**20), max_concurrency=args.concurrency,
                     max_pending=args.max_pending, batch_window_ms=args.batch_window_ms, max_batch=args.max_batch,
                     upload_timeout=args.upload_timeout, api_keys=keys, audit_log=audit,
                     public_docs=args.public_docs, drift_window=args.drift_window)
    config = server_config(app, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile,
                           ssl_keyfile=args.ssl_keyfile, header_timeout=args.header_timeout,
                           keep_alive=args.keep_alive, max_connections=args.max_connections,
                           max_header_kb=args.max_header_kb, log_level="info" if args.verbose else "warning")
    scheme = "https" if args.ssl_certfile else "http"
    access = f"{len(keys.names)} API key(s)" if keys else "no API keys (open)"
    print(f"pneumoscan: serving {model.name} (sha256 {model.sha256[:12]}) on {scheme}://{args.host}:{args.port}/ "
          f"with {access}; batches of up to {args.max_batch} within {args.batch_window_ms:g} ms; "
          + (f"drift gauges over the last {args.drift_window} images" if app.state.service.drift is not None
             else "no drift gauges" + ("" if not args.drift_window else " (the model has no drift reference)")),
          file=sys.stderr)
    uvicorn.Server(config).run()
    return 0
