"""Prediction speed and memory, end to end (file on disk -> probability), on the Kermany test originals.

Prints
  1. batch 1: median / p90 latency of ``Model.predict(path)`` per image
  2. batched: images/second of ``Model.predict_files`` (threaded decode overlapping the network)
  3. breakdown per image, one stage at a time: decode (``decode``: full resolution, every format), preprocess
     (``Model.prepare``: resize to the network input + the image checks), network (``Model.score`` on a batch of
     --batch-size: normalisation, network, calibration, feature guard)
  4. precision: the network stage and the answers under float32 and bfloat16 on the same prepared images (ROC AUC,
     largest probability difference, screening decisions changed); float32 is the bundled model's recorded
     precision, bfloat16 is faster only on CPUs with native bf16 (AVX512-BF16 or AMX)
  5. peak RSS of a ``pneumoscan predict`` run over a folder of --rss-files files (symlinks under /tmp pointing
     at the test images, repeated; nothing is copied)

Usage: nice -n 19 python benchmarks/bench_predict.py [--model MODEL] [--data ../shared/data/chest_xray]
       python benchmarks/bench_predict.py --quick      (8 images, a few latency calls, 16 files for RSS: a smoke run)
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from pneumoscan import allocator

allocator.tune()  # as the command line does, before torch loads (PNEUMOSCAN_ALLOCATOR=default: off)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pneumoscan.constants import BATCH_SIZE  # noqa: E402
from pneumoscan.predict import DEFAULT_MODEL  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def spread(items: list, limit: int | None) -> list:
    """Up to ``limit`` items spread evenly over the (class-sorted) list, so both classes are represented."""
    if limit is None or len(items) <= limit:
        return list(items)
    return [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]


def test_files(data: Path, limit: int | None = None) -> tuple[list[Path], np.ndarray]:
    from pneumoscan.data.layout import list_split

    samples = spread(list_split(data, "test"), limit)
    return [s.path for s in samples], np.array([s.label for s in samples])


def latency(model, files: list[Path], count: int) -> tuple[float, float]:
    model.predict(files[0])  # warm-up: first-call allocations are not what a server sees
    times = []
    for i in range(count):
        start = time.perf_counter()
        model.predict(files[i % len(files)])
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000), float(np.percentile(times, 90) * 1000)


def throughput(model, files: list[Path], batch_size: int) -> float:
    start = time.perf_counter()
    results = list(model.predict_files(files, batch_size=batch_size))
    seconds = time.perf_counter() - start
    bad = [r.message for r in results if r.status == "error"]
    if bad:
        print(f"warning: {len(bad)} unreadable: {bad[0]}", file=sys.stderr)
    return len(files) / seconds


def prepare_all(model, files: list[Path]) -> tuple[np.ndarray, dict]:
    """uint8 network inputs of every file, timing decode and preprocess (single thread, one stage at a time)."""
    from pneumoscan.data.images import decode

    timing = {"decode": 0.0, "preprocess": 0.0}
    images = []
    for path in files:
        t0 = time.perf_counter()
        decoded = decode(path, max_pixels=model.max_pixels)
        t1 = time.perf_counter()
        small, _ = model.prepare(decoded)
        t2 = time.perf_counter()
        images.append(small)
        timing["decode"] += t1 - t0
        timing["preprocess"] += t2 - t1
    return np.stack(images), {k: 1000 * v / len(files) for k, v in timing.items()}


def network(model, images: np.ndarray, batch_size: int) -> tuple[float, np.ndarray]:
    """(ms per image of ``Model.score`` over batches of ``batch_size``, calibrated probabilities)."""
    model.score(images[:batch_size])  # warm-up
    seconds, out = 0.0, []
    for i in range(0, len(images), batch_size):
        start = time.perf_counter()
        scores = model.score(images[i:i + batch_size])
        seconds += time.perf_counter() - start
        out.append(torch.sigmoid(scores.log_odds).numpy())
    return 1000 * seconds / len(images), np.concatenate(out)


def peak_rss(model_arg: str, files: list[Path], count: int, batch_size: int,
             precision: str) -> tuple[float, float, int]:
    """(peak RSS MiB, images/s, exit code) of `pneumoscan predict` over ``count`` symlinks in a /tmp folder."""
    folder = Path(tempfile.mkdtemp(prefix="bench_predict_links_"))
    try:
        for i in range(count):
            source = files[i % len(files)]
            sub = folder / f"{i // 1000:02d}"
            sub.mkdir(exist_ok=True)
            (sub / f"{i:05d}_{source.name}").symlink_to(source.resolve())
        out_csv = folder.parent / f"{folder.name}.csv"
        command = [sys.executable, "-m", "pneumoscan.cli", "predict", str(folder), "--model", model_arg,
                   "--csv", str(out_csv), "--quiet", "--batch-size", str(batch_size), "--precision", precision]
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        start = time.perf_counter()
        proc = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - start
        peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # KiB on Linux; max over waited children
        if proc.returncode:
            print(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "", file=sys.stderr)
        rows = sum(1 for _ in out_csv.open()) - 1 if out_csv.exists() else 0
        out_csv.unlink(missing_ok=True)
        if rows != count:
            print(f"warning: CSV has {rows} rows for {count} files", file=sys.stderr)
        if peak <= before:
            print("warning: peak RSS may belong to an earlier child process", file=sys.stderr)
        return peak / 1024, count / seconds, proc.returncode
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="run directory or model file (default: bundled)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="default: the package's")
    parser.add_argument("--limit", type=int, help="test images used (spread over both classes; default all 624)")
    parser.add_argument("--latency-images", type=int, default=100, help="images timed one at a time")
    parser.add_argument("--rss-files", type=int, default=10_000, help="0 skips the memory run")
    parser.add_argument("--precision", default="auto", help="auto | float32 | bfloat16: stages 1, 2, 3 and 5")
    parser.add_argument("--no-precision-compare", action="store_true", help="skip stage 4 (float32 vs bfloat16)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: --limit 8 --latency-images 4 --rss-files 16 unless given")
    args = parser.parse_args(argv)
    if args.quick:
        args.limit = args.limit or 8
        args.latency_images = min(args.latency_images, 4)
        args.rss_files = min(args.rss_files, 16)

    from sklearn.metrics import roc_auc_score

    from pneumoscan import load_model
    from pneumoscan.models import cpu_has_bf16

    model = load_model(args.model, precision=args.precision)
    files, labels = test_files(Path(args.data), args.limit)
    print(f"model {model.name} ({model.record.arch}, {model.preprocessing.size} px, sha256 {model.sha256[:12]}, "
          f"recorded precision {model.record.precision}); {len(files)} test images at original resolution; "
          f"network on {model.runtime}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, native bf16 "
          f"{'yes' if cpu_has_bf16() else 'no'}, torch {torch.__version__} with {torch.get_num_threads()} threads, "
          f"load avg {os.getloadavg()[0]:.1f}; allocator {allocator.tune()}\n")

    median, p90 = latency(model, files, args.latency_images)
    print(f"batch 1   Model.predict(path): median {median:.1f} ms, p90 {p90:.1f} ms per image "
          f"({args.latency_images} images), {1000 / median:.1f} images/s")
    rate = throughput(model, files, args.batch_size)
    print(f"batched   Model.predict_files(batch {args.batch_size}): {rate:.1f} images/s over {len(files)} images")

    images, ms = prepare_all(model, files)
    net_ms, probs = network(model, images, args.batch_size)
    print(f"\nper image, sequential stages: decode {ms['decode']:.1f} ms (full resolution); preprocess "
          f"{ms['preprocess']:.1f} ms (resize + checks); network {net_ms:.1f} ms ({model.runtime}, "
          f"batch {args.batch_size})")

    if not args.no_precision_compare:
        other = "bfloat16" if model.backend.precision == "float32" else "float32"
        runs = {model.backend.precision: (net_ms, probs)}
        runs[other] = network(load_model(args.model, precision=other), images, args.batch_size)
        fp32, bf16 = runs["float32"][1], runs["bfloat16"][1]
        screening = model.thresholds["screening"]
        both = len(set(labels.tolist())) == 2
        for name, (ms_net, p) in runs.items():
            auc = f"ROC AUC {roc_auc_score(labels, p):.4f}" if both else "ROC AUC - (one class)"
            print(f"precision {name:<8}  network {ms_net:.1f} ms per image, {auc}")
        print(f"bfloat16 vs float32: max |probability difference| {np.abs(bf16 - fp32).max():.4f}, screening "
              f"decisions changed {int(((bf16 >= screening) != (fp32 >= screening)).sum())} of {len(files)}"
              + ("" if cpu_has_bf16() else " (no native bf16 on this CPU: bfloat16 is emulated, slower)"))

    if args.rss_files:
        rss, cli_rate, code = peak_rss(args.model, files, args.rss_files, args.batch_size, args.precision)
        print(f"\n`pneumoscan predict` over {args.rss_files} files (symlinks): peak RSS {rss:.0f} MiB, "
              f"{cli_rate:.1f} images/s including start-up, exit code {code}")
        if code:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
