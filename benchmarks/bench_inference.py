"""CPU inference speed of one model on every backend, on the same images, in one run; prints a markdown table.

Network-only rows time the network on already preprocessed tensors (PyTorch eager fp32, channels_last, channels_last
+ bf16 autocast where the CPU has bf16, onnxruntime fp32 and int8) at batch 1 (per-image latency) and batch 32.
End-to-end rows time ``predict_files``: file -> decode -> resize -> network -> probability, batched.

    nice -n 19 python benchmarks/bench_inference.py --model runs/default --images ../shared/data/chest_xray/test

Reading test images here is fine: only speed is measured, nothing is chosen on them. The int8 model is calibrated
on training images (``--calibration``), never on the images it is timed on.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "src" / "pneumoscan" / "weights" / "default.safetensors"
DATA = ROOT.parent / "shared" / "data" / "chest_xray"


def image_files(folder: Path, n: int) -> list[Path]:
    """Up to n images spread over the sorted folder (both classes)."""
    from pneumoscan.data.layout import IMAGE_SUFFIXES

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        sys.exit(f"bench_inference: no images under {folder}")
    if len(files) <= n:
        return files
    return [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]


def time_calls(fn, batches: list, warmup: int = 2) -> np.ndarray:
    """Seconds per call of fn(batch), after warm-up calls."""
    for batch in batches[:warmup]:
        fn(batch)
    times = []
    for batch in batches:
        start = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - start)
    return np.array(times)


def batches_of(images: np.ndarray, size: int, count: int) -> list[np.ndarray]:
    """``count`` batches of ``size`` images, cycling through the images."""
    index = np.arange(size * count) % len(images)
    return [images[index[i * size : (i + 1) * size]] for i in range(count)]


def cpu_has_bf16() -> bool:
    try:
        return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())
    except AttributeError:
        return False


def torch_runner(model, *, channels_last: bool, bf16: bool):
    from pneumoscan.models import logits_and_features

    net = model.network.eval()
    if channels_last:
        net = net.to(memory_format=torch.channels_last)
    prep = model.preprocessing

    def prepare(batch: np.ndarray) -> torch.Tensor:
        x = prep.normalize(torch.from_numpy(batch))
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x

    def run(x: torch.Tensor) -> None:
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            logits_and_features(net, x)

    run.prepare = prepare
    return run


def onnx_runner(onnx_model):
    def run(batch: np.ndarray) -> None:
        onnx_model.session.run(None, {"image": batch})

    def prepare(batch: np.ndarray) -> np.ndarray:
        return onnx_model._feed(torch.from_numpy(batch))  # float [0, 1] (N, 1, S, S); the graph normalises

    run.prepare = prepare
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help=f"model file or run dir (default {DEFAULT_MODEL.relative_to(ROOT)})")
    parser.add_argument("--images", default=str(DATA / "test"), help="folder of images to time on")
    parser.add_argument(
        "--calibration", default=str(DATA / "train"), help="training images for int8 calibration"
    )
    parser.add_argument(
        "--onnx", help="reuse this exported fp32 .onnx (and its .int8.onnx) instead of exporting"
    )
    parser.add_argument("-n", type=int, default=256, help="images (default 256)")
    parser.add_argument(
        "--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores"
    )
    parser.add_argument("--batches", type=int, default=8, help="timed batches of 32 (default 8)")
    parser.add_argument("--single", type=int, default=64, help="timed batch-1 calls (default 64)")
    args = parser.parse_args()

    from pneumoscan import load_model
    from pneumoscan.export import export_onnx, load_onnx_model, quantize_int8, read_images

    model_path = args.model or (DEFAULT_MODEL if DEFAULT_MODEL.is_file() else None)
    if model_path is None:
        sys.exit(f"bench_inference: {DEFAULT_MODEL} is missing: pass --model MODEL_FILE_OR_RUN_DIR")
    torch.set_num_threads(args.threads)
    model = load_model(model_path, precision="float32")
    files = image_files(Path(args.images), args.n)
    images, _ = read_images(files, model.preprocessing)  # uint8 (N, S, S), as predict_files decodes them

    tmp = tempfile.TemporaryDirectory()
    if args.onnx:
        fp32_path = Path(args.onnx)
    else:
        fp32_path = export_onnx(model, Path(tmp.name) / "model.onnx", images=images[:8]).path
    int8_path = fp32_path.with_name(fp32_path.stem + ".int8.onnx")
    if not int8_path.is_file():
        calibration, _ = read_images(image_files(Path(args.calibration), 128), model.preprocessing)
        int8_path = quantize_int8(
            fp32_path,
            Path(tmp.name) / "model.int8.onnx",
            calibration=calibration,
            val_images=images[:2],
            val_labels=np.zeros(2, int),
        ).path
    onnx_fp32 = load_onnx_model(fp32_path, threads=args.threads)
    onnx_int8 = load_onnx_model(int8_path, threads=args.threads)

    runners = {
        "PyTorch eager fp32": torch_runner(model, channels_last=False, bf16=False),
        "PyTorch channels_last fp32": torch_runner(model, channels_last=True, bf16=False),
    }
    if cpu_has_bf16():
        runners["PyTorch channels_last + bf16 autocast"] = torch_runner(model, channels_last=True, bf16=True)
    runners["onnxruntime fp32"] = onnx_runner(onnx_fp32)
    runners["onnxruntime int8"] = onnx_runner(onnx_int8)

    rows = []
    for name, run in runners.items():
        for batch_size, count in ((1, args.single), (32, args.batches)):
            batches = [run.prepare(b) for b in batches_of(images, batch_size, count)]
            seconds = time_calls(run, batches)
            rows.append(
                (name, batch_size, batch_size / seconds.mean(), *np.percentile(seconds * 1e3, [50, 95]))
            )

    # a fresh PyTorch model: the network-only rows above converted theirs to channels_last in place
    end_to_end = (
        ("PyTorch channels_last fp32", load_model(model_path, precision="float32")),
        *((("PyTorch channels_last + bf16 autocast", load_model(model_path, precision="bfloat16")),)
          if cpu_has_bf16() else ()),
        ("onnxruntime fp32", onnx_fp32),
        ("onnxruntime int8", onnx_int8),
    )
    for name, m in end_to_end:
        list(m.predict_files(files[:32], batch_size=32))  # warm-up: thread pool, first-call allocations
        start = time.perf_counter()
        statuses = [p.status for p in m.predict_files(files, batch_size=32)]
        rate = len(statuses) / (time.perf_counter() - start)
        rows.append((f"end to end, {name} ({statuses.count('ok')} ok)", 32, rate, float("nan"), float("nan")))

    size = model.preprocessing.size
    print(
        f"model {model.name} ({model.meta['arch']}, {size}x{size}, sha256 {model.sha256[:12]}); "
        f"{len(files)} images from {args.images}"
    )
    print(
        f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
        f"onnxruntime {__import__('onnxruntime').__version__}, bf16 {'yes' if cpu_has_bf16() else 'no'}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )
    print()
    print("| backend | batch | images/s | p50 ms/batch | p95 ms/batch |")
    print("|---|---:|---:|---:|---:|")
    for name, batch, rate, p50, p95 in rows:
        lat = "| - | - |" if np.isnan(p50) else f"| {p50:.1f} | {p95:.1f} |"
        print(f"| {name} | {batch} | {rate:.1f} {lat}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
