"""Prediction speed and memory, end to end (file on disk -> probability), on the Kermany test originals.

Prints
  1. batch 1: median / p90 latency of ``Model.predict(path)`` per image
  2. batched: images/second of ``Model.predict_files`` (threaded decode overlapping the network)
  3. breakdown per image: decode (JPEG draft fast path and full resolution), preprocess (resize + normalise),
     network (batch of --batch-size)
  4. the fast path's accuracy cost: ROC AUC with draft decode and the model's precision (bf16 autocast where the
     CPU has it) vs full-resolution decode + the training resize in float32 (must differ by < 0.002), the largest
     probability difference and the screening decisions changed
  5. peak RSS of a ``pneumoscan predict`` run over a folder of --rss-files files (symlinks under /tmp pointing
     at the test images, repeated; nothing is copied)

Usage: nice -n 19 python benchmarks/bench_predict.py --model runs/default [--data ../shared/data/chest_xray]
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

import numpy as np
import torch

from pneumoscan.predict import BATCH_SIZE

REPO = Path(__file__).resolve().parents[1]


def test_files(data: Path) -> tuple[list[Path], np.ndarray]:
    files, labels = [], []
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        found = sorted(p for p in (data / "test" / name).iterdir() if p.suffix.lower() in (".jpeg", ".jpg", ".png"))
        files += found
        labels += [label] * len(found)
    return files, np.array(labels)


def latency(model, files: list[Path], count: int) -> tuple[float, float]:
    model.predict(files[0])  # warm-up: first-call allocations are not what a server sees
    times = []
    for path in files[:count]:
        start = time.perf_counter()
        model.predict(path)
        times.append(time.perf_counter() - start)
    return float(np.median(times) * 1000), float(np.percentile(times, 90) * 1000)


def throughput(model, files: list[Path], batch_size: int) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    results = list(model.predict_files(files, batch_size=batch_size))
    seconds = time.perf_counter() - start
    bad = [r.message for r in results if r.status == "error"]
    if bad:
        print(f"warning: {len(bad)} unreadable: {bad[0]}", file=sys.stderr)
    return len(files) / seconds, np.array([np.nan if r.probability is None else r.probability for r in results])


def breakdown(model, reference, files: list[Path], batch_size: int) -> dict:
    """Sequential, one stage at a time, so each stage's cost is measured alone (single decode thread)."""
    from pneumoscan.data.images import read_image

    prep = model.preprocessing
    timing = {"decode_fast": 0.0, "decode_full": 0.0, "preprocess": 0.0, "network": 0.0}
    fast, full = [], []
    for path in files:
        t0 = time.perf_counter()
        image = read_image(path, reduce_to=prep.size)
        t1 = time.perf_counter()
        fast.append(prep.to_uint8(image))
        t2 = time.perf_counter()
        full_image = read_image(path)
        t3 = time.perf_counter()
        full.append(prep.to_uint8(full_image))
        timing["decode_fast"] += t1 - t0
        timing["preprocess"] += t2 - t1
        timing["decode_full"] += t3 - t2
    probs = {}
    for name, images, net in (("fast", fast, model), ("full", full, reference)):
        out = []
        for i in range(0, len(images), batch_size):
            t0 = time.perf_counter()
            batch = prep.normalize(torch.from_numpy(np.stack(images[i:i + batch_size])))
            t1 = time.perf_counter()
            logits, _ = net.forward(batch)
            t2 = time.perf_counter()
            if name == "fast":
                timing["preprocess"] += t1 - t0
                timing["network"] += t2 - t1
            out.append(model.probability(logits).numpy())
        probs[name] = np.concatenate(out)
    per_image = {k: 1000 * v / len(files) for k, v in timing.items()}
    return {"ms": per_image, "probs": probs}


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
    parser.add_argument("--model", default=str(REPO / "runs" / "default"), help="run directory or model file")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="default: the package's")
    parser.add_argument("--latency-images", type=int, default=100, help="images timed one at a time")
    parser.add_argument("--rss-files", type=int, default=10_000, help="0 skips the memory run")
    parser.add_argument("--precision", default="auto", help="auto | float32 | bfloat16 (the reference is float32)")
    args = parser.parse_args(argv)

    from sklearn.metrics import roc_auc_score

    from pneumoscan import load_model

    model = load_model(args.model, precision=args.precision)
    reference = load_model(args.model, precision="float32")
    files, labels = test_files(Path(args.data))
    print(f"model {model.name} ({model.meta['arch']}, {model.preprocessing.size} px, sha256 {model.sha256[:12]}); "
          f"{len(files)} test images at original resolution; network on {model.runtime}")
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads, load avg "
          f"{os.getloadavg()[0]:.1f}\n")

    median, p90 = latency(model, files, args.latency_images)
    print(f"batch 1   Model.predict(path): median {median:.1f} ms, p90 {p90:.1f} ms per image "
          f"({args.latency_images} images), {1000 / median:.1f} images/s")
    rate, _ = throughput(model, files, args.batch_size)
    print(f"batched   Model.predict_files(batch {args.batch_size}): {rate:.1f} images/s over {len(files)} images")

    parts = breakdown(model, reference, files, args.batch_size)
    ms = parts["ms"]
    print(f"\nper image, sequential stages: decode {ms['decode_fast']:.1f} ms (JPEG draft) vs {ms['decode_full']:.1f} ms "
          f"(full resolution); preprocess {ms['preprocess']:.1f} ms; network {ms['network']:.1f} ms "
          f"(batch {args.batch_size})")
    fast, full = parts["probs"]["fast"], parts["probs"]["full"]
    auc_fast, auc_full = roc_auc_score(labels, fast), roc_auc_score(labels, full)
    verdict = "OK" if abs(auc_fast - auc_full) < 0.002 else "TOO LARGE"
    print(f"ROC AUC: draft decode + {model.precision} {auc_fast:.4f}, full decode + training resize + float32 "
          f"{auc_full:.4f}, "
          f"difference {auc_fast - auc_full:+.4f} ({verdict}; limit 0.002); "
          f"max |probability difference| {np.abs(fast - full).max():.4f}, "
          f"screening decisions changed {int(((fast >= model.thresholds['screening']) != (full >= model.thresholds['screening'])).sum())}")

    if args.rss_files:
        rss, cli_rate, code = peak_rss(args.model, files, args.rss_files, args.batch_size, args.precision)
        print(f"\n`pneumoscan predict` over {args.rss_files} files (symlinks): peak RSS {rss:.0f} MiB, "
              f"{cli_rate:.1f} images/s including start-up, exit code {code}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
