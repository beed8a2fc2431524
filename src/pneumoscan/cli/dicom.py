"""``pneumoscan dicom listen | pull``: the argparse setup, wired into the main parser by ``add_dicom_command``.

Torch-free at import (``pneumoscan --help`` must stay fast): the model and pynetdicom load inside the commands.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import PneumoscanError

HEATMAP_CHOICES = ("positive", "all", "none")  # dicom.screen's; kept here so --help imports no numpy


def _ae_title(text: str) -> str:
    if not 1 <= len(text) <= 16 or not text.isascii() or "\\" in text or not text.strip():
        raise argparse.ArgumentTypeError(f"an AE title is 1 to 16 ASCII characters, got {text!r}")
    return text


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr)
    # pynetdicom at INFO narrates every association; its warnings and errors still show
    logging.getLogger("pynetdicom").setLevel(logging.INFO if verbose else logging.WARNING)
    logging.getLogger("highdicom").setLevel(logging.WARNING)  # it narrates every attribute module it copies
    logging.getLogger("dicomweb_client").setLevel(logging.WARNING)  # and this every request


OPEN_REFUSED = ("refusing to listen on {host} without an allow-list: any machine that can reach the port could "
                "send patient data to be screened and answered into the PACS; pass --allow-ae AE[@HOST] (or "
                "--allow-ae-file FILE), or --allow-open if an open node on this address is intended")


def cmd_listen(args: argparse.Namespace) -> int:
    import os
    import signal

    from ..dicom.access import AllowList, tls_context
    from ..dicom.forward import Destination
    from ..durable import SERVICE_UMASK, parse_umask
    from .serve import is_loopback

    # everything that can be refused without the model is refused first, in one line
    forward = Destination.parse(args.forward) if args.forward else None
    if forward is None and args.out is None:
        raise PneumoscanError("give --forward AET@HOST:PORT and/or --out DIR: results must go somewhere")
    allow = AllowList.load(args.allow_ae or (), args.allow_ae_file or ())
    if not allow and not args.allow_open and not is_loopback(args.host):
        raise PneumoscanError(OPEN_REFUSED.format(host=args.host))
    try:
        umask = SERVICE_UMASK if args.umask is None else parse_umask(args.umask)
    except ValueError as exc:
        raise PneumoscanError(f"--umask: {exc}") from None
    tls = tls_context(args.tls_cert, args.tls_key, args.tls_ca)
    try:
        import highdicom  # noqa: F401
        import pynetdicom  # noqa: F401
    except ImportError as exc:
        raise PneumoscanError(f"the DICOM node needs the dicom extra (pip install 'pneumoscan[dicom]'): {exc}") from None
    from ..dicom.node import Node
    from ..predict import load_model

    os.umask(umask)  # the spool and the results hold patient data: owner-only unless --umask says otherwise
    _logging(args.verbose)
    model = load_model(args.model, device=args.device, precision=args.precision)
    heatmaps = "none" if args.no_heatmaps else args.heatmaps
    node = Node(model, spool=args.spool, ae_title=args.ae_title, host=args.host, port=args.port, forward=forward,
                out=args.out, max_instance_bytes=int(args.max_instance_mb * 2**20), batch_size=args.batch_size,
                retry_max=args.retry_max, heatmaps=heatmaps, threshold=args.threshold, allow=allow, tls=tls,
                results_log=args.results_log, metrics_port=args.metrics_port, drift_window=args.drift_window)
    logging.getLogger("pneumoscan.dicom").info("model %s (sha256 %s) on %s; umask %03o", model.name, model.sha256,
                                               model.runtime, umask)
    signal.signal(signal.SIGTERM, lambda *_: node._stop.set())
    node.start()
    try:
        node.wait()
    except KeyboardInterrupt:
        pass
    finally:
        node.stop()
    return 0


def cmd_pull(args: argparse.Namespace) -> int:
    try:
        import dicomweb_client  # noqa: F401
        import highdicom  # noqa: F401
    except ImportError as exc:
        raise PneumoscanError(f"dicom pull needs the dicom extra (pip install 'pneumoscan[dicom]'): {exc}") from None
    from ..dicom.pull import pull
    from ..predict import load_model
    from .output import row as _row

    _logging(False)
    model = load_model(args.model, precision=args.precision)
    print(f"pneumoscan: model {model.name} (sha256 {model.sha256})", file=sys.stderr)
    failed = 0
    for item in pull(model, args.dicomweb, args.study, store=args.store, batch_size=args.batch_size,
                     threshold=args.threshold, heatmaps=args.heatmaps):
        if isinstance(item.outcome, str):
            failed += 1
            print(f"{item.sop_instance_uid}\t-\tERROR\t{item.outcome}", flush=True)
            continue
        stored = f"\tstored {len(item.outcome.results)} result(s)" if item.stored else ""
        print(_row(item.outcome.prediction) + stored, flush=True)
    return 1 if failed else 0


def add_dicom_command(sub) -> None:
    """Add ``dicom listen`` and ``dicom pull`` to the main parser's subparsers."""
    from .args import add_device_option, number_type

    positive_int = number_type(int, lambda v: v > 0, "a number above 0")
    positive_float = number_type(float, lambda v: 0 < v < float("inf"), "a number above 0")
    port = number_type(int, lambda v: 0 <= v <= 65535, "a TCP port from 0 to 65535 (0: any free one)")
    drift_window = number_type(int, lambda v: v == 0 or 20 <= v <= 100_000,
                               "0 or a whole number from 20 to 100000")  # monitor.MIN_WINDOW: no numpy at --help
    dicom = sub.add_parser("dicom", help="DICOM node for a PACS: receive X-rays, send SR and heatmap back")
    commands = dicom.add_subparsers(dest="dicom_command", required=True)

    p = commands.add_parser(
        "listen", help="DICOM Storage SCP: screen what a PACS sends, send results back",
        description="Receive CR, DX and Secondary Capture images by C-STORE (uncompressed, JPEG, JPEG-LS, "
                    "JPEG 2000, RLE) from the senders of the allow-list, answer once each is safely in the spool, "
                    "screen them, and send a Structured Report (and, where --heatmaps says, a Grad-CAM Secondary "
                    "Capture) into the same study to --forward and/or write them under --out. Results for a "
                    "destination that is down wait in the spool and are retried. Instances not analysed (no pixel "
                    "data, unreadable pixels, not a frontal chest X-ray, outside the model's intended population) "
                    "get an SR saying why. Objects that are no image (SR, presentation states, ...) and "
                    "pneumoscan's own results are answered Success and never screened.")
    p.add_argument("--port", type=port, default=11112)
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default: this machine only; another address needs --allow-ae or "
                        "--allow-open)")
    p.add_argument("--ae-title", type=_ae_title, default="PNEUMOSCAN", help="this node's AE title")
    p.add_argument("--allow-ae", action="append", metavar="AE[@HOST]",
                   help="take associations only from this calling AE title (from HOST only, an address or a "
                        "name, when given); repeatable. Anyone else is rejected: calling AE title not recognised")
    p.add_argument("--allow-ae-file", action="append", metavar="FILE",
                   help="more allowed senders, one AE or AE@HOST a line ('#' comments); repeatable")
    p.add_argument("--allow-open", action="store_true",
                   help="listen on a non-loopback address without an allow-list (an open node, on purpose)")
    p.add_argument("--tls-cert", metavar="PEM", help="DICOM TLS: this node's certificate (chain), with --tls-key")
    p.add_argument("--tls-key", metavar="PEM", help="DICOM TLS: the private key of --tls-cert")
    p.add_argument("--tls-ca", metavar="PEM",
                   help="DICOM TLS: senders must present a certificate signed by this CA (mutual TLS)")
    p.add_argument("--forward", metavar="AET@HOST:PORT", help="C-STORE results to this DICOM node (the PACS)")
    p.add_argument("--out", metavar="DIR", help="also write results as OUT/<study UID>/<SOP UID>.dcm")
    p.add_argument("--spool", default="pneumoscan-spool", metavar="DIR",
                   help="where received instances and undelivered results wait (default ./pneumoscan-spool)")
    p.add_argument("--max-instance-mb", type=positive_float, default=100.0, metavar="N",
                   help="larger instances are refused with status 0xA700 (default 100)")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N",
                   help="instances screened per forward pass (default 8)")
    p.add_argument("--retry-max", type=positive_float, default=60.0, metavar="SECONDS",
                   help="longest wait between delivery attempts to a destination that is down (default 60)")
    p.add_argument("--heatmaps", choices=HEATMAP_CHOICES, default="positive",
                   help="which instances get a Grad-CAM Secondary Capture: positive (default: those decided "
                        "PNEUMONIA), all judged ones, or none")
    p.add_argument("--no-heatmaps", action="store_true", help="the same as --heatmaps none")
    p.add_argument("--umask", metavar="OCTAL",
                   help="file creation mask for the spool and results (default 077: owner-only)")
    p.add_argument("--results-log", metavar="FILE",
                   help="one JSON line per screened instance (SOP Instance UID, model sha256, the figures drift "
                        "monitoring reads; no patient attribute) for `pneumoscan monitor` (default "
                        "SPOOL/results.jsonl)")
    p.add_argument("--metrics-port", type=port, default=None, metavar="PORT",
                   help="serve Prometheus /metrics on this port of --host: instances by status and the drift "
                        "gauges pneumoscan_drift_* (default: off)")
    p.add_argument("--drift-window", type=drift_window, default=200, metavar="N",
                   help="the drift gauges cover the last N screened instances (default 200; 0: none; a model "
                        "without a drift reference has none)")
    add_device_option(p)
    p.add_argument("--verbose", action="store_true", help="pynetdicom's association log too")
    _model_options(p)
    p.set_defaults(func=cmd_listen)

    p = commands.add_parser("pull", help="screen a study from a DICOMweb server (QIDO-RS/WADO-RS, STOW-RS back)")
    p.add_argument("--dicomweb", required=True, metavar="URL", help="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    p.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    p.add_argument("--store", action="store_true", help="store the SR and Secondary Capture back by STOW-RS")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N")
    p.add_argument("--heatmaps", choices=HEATMAP_CHOICES, default="positive",
                   help="which instances get a Grad-CAM Secondary Capture (default: those decided PNEUMONIA)")
    _model_options(p)
    p.set_defaults(func=cmd_pull)


def _model_options(p: argparse.ArgumentParser) -> None:
    from ..constants import PRECISIONS

    p.add_argument("--model", help="model file or run directory (default: the bundled model)")
    p.add_argument("--threshold", default="screening", help="screening | balanced | a number in (0, 1)")
    p.add_argument("--precision", choices=PRECISIONS, default="auto")


def add_dicom_out_option(p: argparse.ArgumentParser) -> None:
    """``pneumoscan predict --dicom-out DIR``."""
    p.add_argument("--dicom-out", metavar="DIR",
                   help="for every DICOM input, write its Structured Report and Grad-CAM Secondary Capture as "
                        "DIR/<Study UID>/<SOP UID>.dcm (needs the dicom extra)")


def dicom_out(folder: str | None, model, heatmaps: str = "positive"):
    """A callable writing the SR and SC for each Prediction of a DICOM input under ``folder``; None without one."""
    if not folder:
        return None
    try:
        import highdicom  # noqa: F401 - fails early without the dicom extra

        from ..dicom.screen import Screener
    except ImportError as exc:
        raise PneumoscanError(f"--dicom-out needs the dicom extra (pip install 'pneumoscan[dicom]'): {exc}") from None
    from pathlib import Path

    from ..dicom.predict_out import DicomOut

    return DicomOut(Path(folder), Screener(model, heatmaps=heatmaps))
