"""``pneumoscan dicom listen | pull``: the argparse setup, wired into the main parser by ``add_dicom_command``.

Torch-free at import (``pneumoscan --help`` must stay fast): the model and pynetdicom load inside the commands.
"""

from __future__ import annotations

import argparse
import logging
import sys

from ..errors import PneumoscanError


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


def cmd_listen(args: argparse.Namespace) -> int:
    import signal

    from ..dicom.node import Destination

    forward = Destination.parse(args.forward) if args.forward else None
    if forward is None and args.out is None:
        raise PneumoscanError("give --forward AET@HOST:PORT and/or --out DIR: results must go somewhere")
    try:
        import highdicom  # noqa: F401
        import pynetdicom  # noqa: F401
    except ImportError as exc:
        raise PneumoscanError(f"the DICOM node needs the dicom extra (pip install 'pneumoscan[dicom]'): {exc}") from None
    from ..dicom.node import Node
    from ..predict import load_model

    _logging(args.verbose)
    model = load_model(args.model, precision=args.precision)
    node = Node(model, spool=args.spool, ae_title=args.ae_title, host=args.host, port=args.port, forward=forward,
                out=args.out, max_instance_bytes=int(args.max_instance_mb * 2**20), batch_size=args.batch_size,
                retry_max=args.retry_max, heatmaps=not args.no_heatmaps, threshold=args.threshold)
    logging.getLogger("pneumoscan.dicom").info("model %s (sha256 %s)", model.name, model.sha256)
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
    from ..dicom.pull import pull
    from ..predict import load_model
    from .output import row as _row

    _logging(False)
    model = load_model(args.model, precision=args.precision)
    print(f"pneumoscan: model {model.name} (sha256 {model.sha256})", file=sys.stderr)
    failed = 0
    for item in pull(model, args.dicomweb, args.study, store=args.store, batch_size=args.batch_size,
                     threshold=args.threshold):
        if isinstance(item.outcome, str):
            failed += 1
            print(f"{item.sop_instance_uid}\t-\tERROR\t{item.outcome}", flush=True)
            continue
        stored = f"\tstored {len(item.outcome.results)} result(s)" if item.stored else ""
        print(_row(item.outcome.prediction) + stored, flush=True)
    return 1 if failed else 0


def add_dicom_command(sub) -> None:
    """Add ``dicom listen`` and ``dicom pull`` to the main parser's subparsers."""
    from .args import number_type

    positive_int = number_type(int, lambda v: v > 0, "a number above 0")
    positive_float = number_type(float, lambda v: 0 < v < float("inf"), "a number above 0")
    port = number_type(int, lambda v: 0 <= v <= 65535, "a TCP port from 0 to 65535 (0: any free one)")
    dicom = sub.add_parser("dicom", help="DICOM node for a PACS: receive X-rays, send SR and heatmap back")
    commands = dicom.add_subparsers(dest="dicom_command", required=True)

    p = commands.add_parser(
        "listen", help="DICOM Storage SCP: screen what a PACS sends, send results back",
        description="Receive CR, DX and Secondary Capture images by C-STORE (uncompressed, JPEG, JPEG-LS, "
                    "JPEG 2000, RLE), answer once each is safely in the spool, screen them, and send a "
                    "Structured Report and a Grad-CAM Secondary Capture into the same study to --forward "
                    "and/or write them under --out. Results for a destination that is down wait in the spool "
                    "and are retried. Instances not assessed (not a frontal chest X-ray, outside the model's "
                    "population, unreadable pixels) get an SR saying why.")
    p.add_argument("--port", type=port, default=11112)
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default: every interface)")
    p.add_argument("--ae-title", type=_ae_title, default="PNEUMOSCAN", help="this node's AE title")
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
    p.add_argument("--no-heatmaps", action="store_true", help="SR only, no Grad-CAM Secondary Capture")
    p.add_argument("--verbose", action="store_true", help="pynetdicom's association log too")
    _model_options(p)
    p.set_defaults(func=cmd_listen)

    p = commands.add_parser("pull", help="screen a study from a DICOMweb server (QIDO-RS/WADO-RS, STOW-RS back)")
    p.add_argument("--dicomweb", required=True, metavar="URL", help="DICOMweb root, e.g. http://pacs:8042/dicom-web")
    p.add_argument("--study", required=True, metavar="UID", help="Study Instance UID")
    p.add_argument("--store", action="store_true", help="store the SR and Secondary Capture back by STOW-RS")
    p.add_argument("--batch-size", type=positive_int, default=8, metavar="N")
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


def dicom_out(folder: str | None, model):
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

    return DicomOut(Path(folder), Screener(model))
