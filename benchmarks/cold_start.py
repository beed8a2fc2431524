"""Cold start of a one-image ``pneumoscan predict``: a fresh process per run, wall and CPU seconds.

Each variant is a new ``python`` process, so every import, the model load and the first forward pass count, as
for a user typing the command. Variants run interleaved (A B C A B C ...), so load from other jobs falls on all
of them alike; CPU seconds (user + sys of the child, from ``os.wait4``) say less about that load than wall.
Compiled bytecode is cached as in an installed package (an untimed first run of each variant writes it, into a
temporary folder, so the checkouts are left alone; PYTHONDONTWRITEBYTECODE is dropped for the children).

Variants
  import torch         ``python -c "import torch"``: the floor of the PyTorch backend
  predict              ``python -m pneumoscan.cli predict IMAGE --quiet`` with this checkout
  predict (--compare)  the same with another version's ``src`` folder first on PYTHONPATH, e.g. the commit before
                       a change: ``git archive COMMIT src | tar -x -C /tmp/before`` then ``--compare /tmp/before/src``
  predict onnx         ``... --backend onnx --model MODEL.onnx`` when ``--onnx MODEL.onnx`` is given (make one with
                       ``pneumoscan export --onnx MODEL.onnx``)
  predict NAME=VALUE   this checkout with one more environment variable, for each ``--env NAME=VALUE``

Usage: python benchmarks/cold_start.py [--data ../shared/data/chest_xray] [--runs 5] [--compare DIR/src ...]
       [--onnx model.onnx] [--env NAME=VALUE ...] [--importtime FILE]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

IMAGE = "test/PNEUMONIA/person78_bacteria_378.jpeg"


def run_once(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """(wall seconds, CPU seconds user + sys) of one child process; a failure stops the benchmark."""
    start = time.perf_counter()
    child = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    wall = time.perf_counter() - start
    child.returncode = os.waitstatus_to_exitcode(status)
    error = child.stderr.read().decode(errors="replace").strip()
    child.stderr.close()
    if child.returncode != 0:
        raise SystemExit(f"cold_start: {' '.join(command)} exited {child.returncode}: {error[-500:]}")
    return wall, usage.ru_utime + usage.ru_stime


def variants(args: argparse.Namespace, image: Path, pycache: str) -> dict[str, tuple[list[str], dict[str, str]]]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONDONTWRITEBYTECODE")}
    env["PYTHONPYCACHEPREFIX"] = pycache
    predict = [sys.executable, "-m", "pneumoscan.cli", "predict", str(image), "--quiet"]
    out = {"import torch": ([sys.executable, "-c", "import torch"], env),
           "predict": (predict, env)}
    for other in args.compare:
        out[f"predict ({other})"] = (predict, {**env, "PYTHONPATH": str(other)})
    if args.onnx:
        out["predict onnx"] = ([*predict, "--backend", "onnx", "--model", str(args.onnx)], env)
    for setting in args.env:
        name, _, value = setting.partition("=")
        out[f"predict {setting}"] = (predict, {**env, name: value})
    return out


def summary(values: list[float]) -> str:
    return f"{min(values):.2f} to {max(values):.2f} (median {statistics.median(values):.2f})"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/chest_xray"))
    parser.add_argument("--image", type=Path, help=f"the image to screen (default: DATA/{IMAGE})")
    parser.add_argument("--runs", type=int, default=5, help="runs per variant, interleaved (default 5)")
    parser.add_argument("--compare", type=Path, action="append", default=[], metavar="SRC",
                        help="another version's src folder to run alongside (repeatable)")
    parser.add_argument("--onnx", type=Path, metavar="MODEL.onnx", help="also time --backend onnx on this file")
    parser.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                        help="also time predict with this environment variable set (repeatable)")
    parser.add_argument("--importtime", type=Path, metavar="FILE",
                        help="also write `python -X importtime` of one predict run (this checkout) to FILE")
    args = parser.parse_args(argv)
    image = args.image or args.data / IMAGE
    for path, what in ((image, "image"), *((src, "--compare folder") for src in args.compare),
                       (args.onnx, "--onnx file")):
        if path is not None and not path.exists():
            print(f"cold_start: {path}: {what} not found", file=sys.stderr)
            return 2
    for setting in args.env:
        if "=" not in setting or not setting.split("=")[0]:
            print(f"cold_start: --env {setting}: expected NAME=VALUE", file=sys.stderr)
            return 2

    with tempfile.TemporaryDirectory(prefix="cold-start-pycache-") as pycache:
        return measure(args, image, variants(args, image, pycache))


def measure(args: argparse.Namespace, image: Path, runs: dict[str, tuple[list[str], dict[str, str]]]) -> int:
    for command, env in runs.values():  # once untimed: bytecode compiled, libraries in the page cache
        run_once(command, env)
    wall: dict[str, list[float]] = {name: [] for name in runs}
    cpu: dict[str, list[float]] = {name: [] for name in runs}
    load_before = os.getloadavg()[0]
    for _ in range(args.runs):
        for name, (command, env) in runs.items():
            w, c = run_once(command, env)
            wall[name].append(w)
            cpu[name].append(c)
    load_after = os.getloadavg()[0]

    print(f"{platform.processor() or platform.machine()}, {len(os.sched_getaffinity(0))} cores, Python "
          f"{platform.python_version()}, torch {metadata.version('torch')}; load average {load_before:.1f} before, "
          f"{load_after:.1f} after; {args.runs} runs each, interleaved; image {image}")
    print()
    print("| variant | wall seconds | CPU seconds (user + sys) |")
    print("|---|---|---|")
    for name in runs:
        print(f"| {name} | {summary(wall[name])} | {summary(cpu[name])} |")
    if args.importtime:
        command, env = runs["predict"]
        with open(args.importtime, "w") as sink:
            subprocess.run([command[0], "-X", "importtime", *command[1:]], env=env, stdout=subprocess.DEVNULL,
                           stderr=sink, check=True)
        print(f"\nimport times of one predict run: {args.importtime}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
