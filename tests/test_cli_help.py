"""`pneumoscan --help` answers at once: neither the package's root import nor the argument parser imports torch
(about 3 s of CPU), and what the parser shows (architectures, precisions, batch size) matches the modules that
do import it."""

from __future__ import annotations

import resource
import subprocess
import sys

import pytest

import pneumoscan
from pneumoscan import constants
from pneumoscan.cli import build_parser

SUBCOMMANDS = [["data", "summary"], ["data", "download"], ["train"], ["calibrate"], ["evaluate"], ["predict"],
               ["export"], ["serve"]]
HEAVY = ("torch", "timm", "torchvision", "onnxruntime", "matplotlib", "sklearn", "PIL", "pydicom", "numpy")

PROBE = f"""
import contextlib, io, sys
import pneumoscan, pneumoscan.cli
parser = pneumoscan.cli.build_parser()
for argv in {SUBCOMMANDS!r} + [[]]:
    with contextlib.redirect_stdout(io.StringIO()) as text:
        try:
            parser.parse_args(argv + ["--help"])
        except SystemExit as exc:
            assert exc.code == 0 and text.getvalue().startswith("usage: pneumoscan"), argv
print("imported:", *sorted({{m.split(".")[0] for m in sys.modules}} & set({HEAVY!r})))
"""


def _child_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def test_building_the_parser_and_every_help_imports_no_torch():
    proc = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "imported:"


@pytest.mark.parametrize("argv", [[], ["predict"], ["evaluate"], ["train"]], ids=["top", "predict", "evaluate",
                                                                              "train"])
def test_help_of_a_real_process_exits_0_in_well_under_a_second(argv):
    """CPU time of the child, not wall time, so a busy machine does not fail it; importing torch alone takes
    about 3 s of CPU."""
    before = _child_cpu_seconds()
    proc = subprocess.run([sys.executable, "-m", "pneumoscan.cli", *argv, "--help"], capture_output=True,
                          text=True, timeout=120)
    spent = _child_cpu_seconds() - before
    assert proc.returncode == 0 and proc.stdout.startswith("usage: pneumoscan"), proc.stderr
    assert spent < 1.0, f"--help took {spent:.2f} s of CPU"


def test_root_import_keeps_the_public_api():
    from pneumoscan import Model, Prediction, load_model, predict

    assert (Model, Prediction, load_model) == (predict.Model, predict.Prediction, predict.load_model)
    assert set(pneumoscan.__all__) <= set(dir(pneumoscan))
    with pytest.raises(AttributeError, match="no attribute 'nothing_here'"):
        pneumoscan.nothing_here  # noqa: B018


def test_arch_names_are_the_registry_and_train_help_lists_every_one(capsys):
    from pneumoscan.models import ARCHS

    assert list(constants.ARCH_NAMES) == list(ARCHS)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert " | ".join(ARCHS) in text


def test_parser_defaults_are_the_ones_prediction_uses():
    from pneumoscan import predict

    assert constants.PRECISIONS == predict.PRECISIONS
    assert constants.BATCH_SIZE == predict.BATCH_SIZE
    args = build_parser().parse_args(["predict", "x.png"])
    assert args.batch_size == predict.BATCH_SIZE and args.precision == "auto"


def test_names_the_parser_writes_out_are_the_ones_the_heavy_modules_use():
    from pneumoscan import explain
    from pneumoscan.cli import args, predict
    from pneumoscan.data import images

    assert args.HEATMAP_RULES == explain.HEATMAP_RULES
    assert predict.FORMAT_NAMES == images.FORMAT_NAMES


@pytest.mark.parametrize("command", ["predict", "evaluate"])
def test_commands_that_run_the_network_take_a_device(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([command, "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--device DEVICE" in text and "auto (default: the first CUDA GPU when PyTorch sees one" in text
    given = ["x"] if command == "predict" else ["--data", "d"]
    assert build_parser().parse_args([command, *given, "--device", "CUDA:1"]).device == "cuda:1"


def test_no_help_page_prints_a_doubled_percent_sign():
    """argparse formats help strings with %, so they write %%; descriptions are printed as written."""
    proc = subprocess.run([sys.executable, "-m", "pneumoscan.cli", "adapt", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "95% confidence" in proc.stdout and "%%" not in proc.stdout


@pytest.mark.parametrize("command", ["serve", "adapt", "train", "calibrate", "dicom listen"])
def test_every_other_command_that_runs_the_network_takes_a_device_too(command, capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args([*command.split(), "--help"])
    assert "--device" in capsys.readouterr().out
