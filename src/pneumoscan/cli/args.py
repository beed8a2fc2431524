"""Argument types and the option groups several commands share.

Torch-free and import-light on purpose: every command module and ``pneumoscan --help`` import this, and the help
must answer in well under a second (tests/test_cli_help.py).
"""

from __future__ import annotations

import argparse
import re

from ..constants import PRECISIONS


def number_type(parse, ok, expected: str):
    """An argparse type: ``parse`` the text and keep the value if ``ok``; anything else is a usage error saying
    what was expected (0 or a negative count would otherwise be accepted and fail or hang deep inside a run)."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    return convert


positive_int = number_type(int, lambda v: v >= 1, "a whole number of at least 1")  # counts: batch sizes, workers
positive_float = number_type(float, lambda v: 0 < v < float("inf"), "a number above 0")  # sizes, tolerances
port_number = number_type(int, lambda v: 1 <= v <= 65535, "a TCP port from 1 to 65535")

# explain.HEATMAP_RULES, named here so the parser needs no torch (tests/test_cli_help.py keeps the two equal)
HEATMAP_RULES = ("positive", "all")

DEVICE_HELP = ("where the PyTorch network runs: auto (default: the first CUDA GPU when PyTorch sees one, else the "
               "CPU), cpu, cuda or cuda:N")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


def device_name(text: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``; checked here so a typo is a usage error before any model loads
    (whether the GPU exists is known only once torch is imported, by ``load_model``)."""
    if not _DEVICE.fullmatch(text.strip().lower()):
        raise argparse.ArgumentTypeError(f"must be auto, cpu, cuda or cuda:N, got {text!r}")
    return text.strip().lower()


def add_device_option(parser: argparse.ArgumentParser) -> None:
    """``--device auto|cpu|cuda|cuda:N`` for a command that runs the network (auto = CUDA when available)."""
    parser.add_argument("--device", type=device_name, default="auto", metavar="DEVICE", help=DEVICE_HELP)


def add_model_options(p: argparse.ArgumentParser) -> None:
    """Options of every command that loads a model to answer with it."""
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="PyTorch network arithmetic: auto (the precision the model's thresholds were fitted in, "
                        "recorded in the model file: float32 for the bundled model) or bfloat16 (faster on CPUs "
                        "with native bf16; answers differ slightly from the fitted ones)")
    p.add_argument("--prevalence", type=float, default=None, metavar="P",
                   help="pneumonia share where the model is used (0-1): re-bases probabilities from the validation "
                        "prevalence they were calibrated at; decisions at the named thresholds do not change")
    p.add_argument("--max-megapixels", type=positive_float, default=50.0, metavar="MP",
                   help="larger images are refused before decoding, as possible decompression bombs (default 50 "
                        "MP; a 2752 px radiograph is 7.6 MP)")
