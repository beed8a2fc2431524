"""Command-line layer: parse arguments, call the Python API, print. No logic of its own.

One module per command group (``data``, ``train`` (train, calibrate), ``evaluate``, ``predict``, ``export``,
``serve`` (serve, keys), ``dicom``, ``adapt``, ``monitor``); argument types in ``args`` (torch-free, like every module here at
import); what commands print and write in ``output``. This module builds the parser and runs a command.
"""

from __future__ import annotations

import argparse
import os
import sys

from .. import allocator
from ..errors import PneumoscanError
from .args import add_device_option, number_type, port_number, positive_float, positive_int  # noqa: F401
from .output import PREDICT_HEADER  # noqa: F401 (scripts and tests import it from here)
from .output import row as _row  # noqa: F401 (cli/dicom.py's pull prints rows with it)
from .predict import Inputs  # noqa: F401 (tests and benchmarks import it from here)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    from .adapt import add_adapt_command
    from .args import add_model_options
    from .data import add_data_command
    from .dicom import add_dicom_command
    from .evaluate import add_evaluate_command
    from .export import add_export_command
    from .monitor import add_monitor_command
    from .predict import add_predict_command
    from .serve import add_keys_command, add_serve_command
    from .train import add_calibrate_command, add_train_command

    parser = argparse.ArgumentParser(prog="pneumoscan", description="Pneumonia screening on chest X-rays.")
    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    add_data_command(sub)
    add_train_command(sub)
    add_calibrate_command(sub)
    add_evaluate_command(sub)
    add_predict_command(sub)
    add_export_command(sub)
    add_serve_command(sub, add_model_options)
    add_keys_command(sub)
    add_dicom_command(sub)
    add_adapt_command(sub)
    add_monitor_command(sub)
    return parser


def _quiet_decoder_warnings() -> None:
    """pydicom and Pillow warn (with a source line) about each malformed file they still read; the command line
    reports every file in its own row instead, so their warnings would only bury the rows."""
    import warnings

    for module in (r"pydicom(\..*)?", r"PIL(\..*)?"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)


# The services: request handling and decoding run in other threads on the cores the network uses, all the time.
# OpenMP's default is to spin a while after each parallel region, which takes those cores: on a quiet 2-core
# machine, 16 clients got 47.6 requests/s from `serve` (torch, batched) with threads that sleep at once and 13.8
# with spinning ones (benchmarks/bench_http.py, OMP_WAIT_POLICY=PASSIVE vs ACTIVE). Batch jobs (predict, evaluate)
# keep the default: there it was faster (47.5 vs 43.1 images/s end to end, 19 vs 45 ms at batch 1). Must be set
# before torch loads OpenMP, hence here, before any command imports torch.
SERVICE_COMMANDS = frozenset({"serve", "dicom"})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    allocator.tune()  # before any command imports torch: PyTorch reads THP_MEM_ALLOC_ENABLE once
    if args.command in SERVICE_COMMANDS and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _quiet_decoder_warnings()
    try:
        return args.func(args)
    except PneumoscanError as exc:
        print(f"pneumoscan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pneumoscan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0

