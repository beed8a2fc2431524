"""CPU inference speed of one model on every backend, on the same images, in one run; prints markdown tables.

Backends: PyTorch float32, PyTorch bfloat16 (where the CPU has native bf16, or with --bf16), onnxruntime fp32 and
onnxruntime int8 (static QDQ), each behind the same ``Backend.forward`` (uint8 batch -> logits, features).
Network-only rows time ``backend.forward`` on already decoded and resized uint8 images at batch 1 (per-image
latency) and batch --batch. End-to-end rows time ``Model.predict_files``: file -> decode -> checks -> network ->
guard -> probability, batched. A second table counts each backend's statuses on the same files (ok, not_xray,
out_of_distribution, error), and how many images the PyTorch float32 model accepts that another backend rejects:
the int8 export moves the guard's limit by the int8 features' score shift, so that count should be 0 on real
X-rays.

    nice -n 19 python benchmarks/bench_inference.py [--model MODEL] [--images ../shared/data/chest_xray/test]
    python benchmarks/bench_inference.py --quick       (8 images, few calls: a smoke run, still exports ONNX)

Then the physical limit: the network's FLOPs per image (counted by ``torch.utils.flop_counter`` on the PyTorch
network, 2 per multiply-add), the CPU's peak from its ISA flags and clock (fp32 FMA, bf16 and int8 dot-product or
AMX units), and the share of that peak each backend's best network-only rate reaches; and the CPU time decoding
and preprocessing one file takes on one core, which bounds end to end on these cores: every image costs its
decode plus its share of the network, on the same cores.

PyTorch's OpenMP threads keep their default wait policy, as under ``pneumoscan predict`` (only the services set
OMP_WAIT_POLICY=PASSIVE, ``cli.SERVICE_COMMANDS``); onnxruntime sessions are opened without spinning
(``backends.onnx.open_session``).

Reading test images here is fine: only speed and guard agreement are measured, nothing is chosen on them. The int8
model is made as ``pneumoscan export --int8 --data DATA`` makes it (``export.int8_inputs``): calibrated on
training images, its guard limit moved by the median int8-minus-float guard score of those calibration images and
of validation images (the run's, or DATA/val), never of the images it is timed on.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

from pneumoscan import allocator

allocator.tune()  # as the command line does, before torch loads (PNEUMOSCAN_ALLOCATOR=default: off)
import numpy as np  # noqa: E402
import torch  # noqa: E402

from pneumoscan.predict import DEFAULT_MODEL  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "chest_xray"
STATUSES = ("ok", "not_xray", "out_of_distribution", "error")


def image_files(folder: Path, n: int) -> list[Path]:
    """Up to n images spread over the sorted folder (both classes)."""
    from pneumoscan.data.layout import IMAGE_SUFFIXES

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        sys.exit(f"bench_inference: no images under {folder}")
    if len(files) <= n:
        return files
    return [files[i] for i in np.linspace(0, len(files) - 1, n).round().astype(int)]


WARMUP = 2  # calls of time_calls before it starts the clock


def time_calls(fn, batches: list, warmup: int = WARMUP) -> np.ndarray:
    """Seconds per call of fn(batch), after warm-up calls."""
    for batch in batches[:warmup]:
        fn(batch)
    times = []
    for batch in batches:
        start = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - start)
    return np.array(times)


def batches_of(images: np.ndarray, size: int, count: int) -> list[torch.Tensor]:
    """``count`` uint8 batches of ``size`` images, cycling through the images."""
    index = np.arange(size * count) % len(images)
    return [torch.from_numpy(np.ascontiguousarray(images[index[i * size : (i + 1) * size]])) for i in range(count)]


def onnx_models(model, args, images: np.ndarray, workdir: Path) -> tuple[Path, Path, str]:
    """(fp32 .onnx, int8 .onnx, how the int8 file was made): reused with --onnx, else exported here."""
    from pneumoscan.export import export_onnx, int8_inputs, quantize_int8

    if args.onnx:
        fp32_path = Path(args.onnx)
    else:
        fp32_path = export_onnx(model, workdir / "model.onnx", images=images[:8],
                                checked_on=f"{min(8, len(images))} timed images").path
    int8_path = fp32_path.with_name(fp32_path.stem + ".int8.onnx")
    if int8_path.is_file():
        return fp32_path, int8_path, f"reused {int8_path}"
    calibration, val_images, val_labels, where = int8_inputs(model, args.data)
    calibration = calibration[: args.calibration_images]
    result = quantize_int8(fp32_path, calibration=calibration, val_images=val_images, val_labels=val_labels,
                           validated_on=where, out=workdir / "model.int8.onnx")
    how = (f"{result.method} int8, calibrated on {len(calibration)} training images, guard limit refitted on "
           f"int8 features of those and of {where}; validation AUC {result.auc_fp32:.4f} -> {result.auc_int8:.4f}, screening decisions "
           f"changed {result.decisions_changed}, max |probability difference| {result.max_probability_diff:.3f}")
    return fp32_path, result.path, how


def cpu_peak() -> tuple[float, dict[str, float], str]:
    """(clock GHz, peak operations/s per core by arithmetic, how): from /proc/cpuinfo's flags and clock.

    Per cycle and core: fp32 16 lanes x 2 (FMA) x 2 FMA units with AVX-512 (8 lanes with AVX2); bf16 1024 with
    AMX, 128 with AVX512_BF16; int8 2048 with AMX, 256 with AVX512_VNNI, 128 with AVX-VNNI. The number of FMA units
    is not in the flags: two is the server Xeon/EPYC figure, so this is an upper bound.
    """
    flags, mhz = set(), 0.0
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("cpu MHz") and not mhz:
                mhz = float(line.split(":", 1)[1])
    except OSError:
        return 0.0, {}, "no /proc/cpuinfo"
    ghz = mhz / 1000
    fp32 = 64 if "avx512f" in flags else 32 if "fma" in flags else 8
    bf16 = 1024 if "amx_bf16" in flags else 128 if "avx512_bf16" in flags else fp32
    int8 = (2048 if "amx_int8" in flags else 256 if "avx512_vnni" in flags else 128 if "avx_vnni" in flags
            else 64 if "avx2" in flags else 32)
    per_cycle = {"fp32": fp32, "bf16": bf16, "int8": int8}
    how = ", ".join(f"{k} {v}/cycle" for k, v in per_cycle.items()) + f" at {ghz:.2f} GHz (cpu MHz)"
    return ghz, {k: v * ghz * 1e9 for k, v in per_cycle.items()}, how


def network_flops(model) -> float:
    """FLOPs of one image through the network (2 per multiply-add), counted by PyTorch's flop counter."""
    from torch.utils.flop_counter import FlopCounterMode

    image = torch.zeros(1, model.preprocessing.size, model.preprocessing.size, dtype=torch.uint8)
    with FlopCounterMode(display=False) as counter:
        model.backend.forward(image)
    return float(counter.get_total_flops())


def decode_ms(model, files: list[Path]) -> float:
    """CPU milliseconds per file to decode, check and resize it, on one core (after one warm-up pass)."""
    for path in files[:8]:
        model.prepare(model.decode(path))
    start = time.process_time()
    for path in files:
        model.prepare(model.decode(path))
    return (time.process_time() - start) / len(files) * 1e3


ARITHMETIC = {"PyTorch float32": "fp32", "PyTorch bfloat16": "bf16", "onnxruntime fp32": "fp32",
              "onnxruntime int8": "int8"}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(DEFAULT_MODEL), help="model file or run dir (default: bundled)")
    parser.add_argument("--images", default=str(DATA / "test"), help="folder of images to time on")
    parser.add_argument("--data", default=str(DATA),
                        help="data root for the int8 file's calibration (train) and guard refit (val), as "
                             "`pneumoscan export --int8 --data`; a run directory as --model uses its own split")
    parser.add_argument("--calibration-images", type=int, default=None,
                        help="int8 calibration images (default: export's, 128)")
    parser.add_argument("--onnx", help="reuse this exported fp32 .onnx (and its .int8.onnx) instead of exporting")
    parser.add_argument("-n", type=int, default=256, help="images (default 256)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="default: all cores")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the batched rows (default 32)")
    parser.add_argument("--batches", type=int, default=8, help="timed batches of --batch (default 8)")
    parser.add_argument("--single", type=int, default=64, help="timed batch-1 calls (default 64)")
    parser.add_argument("--bf16", action="store_true",
                        help="time PyTorch bfloat16 even without native bf16 (emulated, slow)")
    parser.add_argument("--backends", default="torch,onnx", help="torch, onnx or both (default both)")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: -n 8 --batch 8 --batches 1 --single 2 --calibration-images 16")
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.batch, args.batches, args.single = min(args.n, 8), min(args.batch, 8), 1, min(args.single, 2)
        args.calibration_images = args.calibration_images or 16
    kinds = {k.strip() for k in args.backends.split(",") if k.strip()}
    if not kinds or kinds - {"torch", "onnx"}:
        parser.error(f"--backends: torch, onnx or both, got {args.backends!r}")

    from pneumoscan import load_model
    from pneumoscan.export import read_images
    from pneumoscan.models import cpu_has_bf16

    torch.set_num_threads(args.threads)
    model = load_model(args.model, precision="float32")
    files = image_files(Path(args.images), args.n)
    images, _ = read_images(files, model.preprocessing)  # uint8 (N, S, S), as predict_files decodes them

    models: dict[str, object] = {}
    int8_how = ""
    with tempfile.TemporaryDirectory(prefix="bench_inference_") as tmp:
        if "torch" in kinds:
            models["PyTorch float32"] = model
            if cpu_has_bf16() or args.bf16:
                models["PyTorch bfloat16"] = load_model(args.model, precision="bfloat16")
        if "onnx" in kinds:
            from pneumoscan.export import load_onnx_model

            fp32_path, int8_path, int8_how = onnx_models(model, args, images, Path(tmp))
            models["onnxruntime fp32"] = load_onnx_model(fp32_path, threads=args.threads)
            models["onnxruntime int8"] = load_onnx_model(int8_path, threads=args.threads)

        rows, faults = [], {}
        for name, m in models.items():
            for batch_size, count in ((1, args.single), (args.batch, args.batches)):
                batches = batches_of(images, batch_size, count)
                before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
                seconds = time_calls(m.backend.forward, batches)
                # page faults: new memory the kernel mapped in (pneumoscan.allocator is about these)
                faults[name, batch_size] = ((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
                                            / (batch_size * (count + WARMUP)))  # warm-up calls included
                rows.append((name, batch_size, batch_size / seconds.mean(), *np.percentile(seconds * 1e3, [50, 95])))

        statuses: dict[str, list[str]] = {}
        best = {name: max(r[2] for r in rows if r[0] == name) for name in models}
        for name, m in models.items():
            list(m.predict_files(files[: args.batch], batch_size=args.batch))  # warm-up: thread pool, allocations
            start = time.perf_counter()
            statuses[name] = [p.status for p in m.predict_files(files, batch_size=args.batch)]
            rate = len(files) / (time.perf_counter() - start)
            rows.append((f"end to end, {name}", args.batch, rate, float("nan"), float("nan")))
        decode_cost = decode_ms(model, files)
        flops = network_flops(model)

    size = model.preprocessing.size
    print(f"model {model.name} ({model.record.arch}, {size}x{size}, sha256 {model.sha256[:12]}); "
          f"{len(files)} images from {args.images}")
    print(f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}, "
          f"onnxruntime {__import__('onnxruntime').__version__}, native bf16 {'yes' if cpu_has_bf16() else 'no'}, "
          f"load average {os.getloadavg()[0]:.1f}; allocator {allocator.tune()}")
    if int8_how:
        print(f"int8 file: {int8_how}")
    print()
    print("| backend | batch | images/s | p50 ms/batch | p95 ms/batch | of network-only | page faults/image |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for name, batch, rate, p50, p95 in rows:
        lat = "| - | - |" if np.isnan(p50) else f"| {p50:.1f} | {p95:.1f} |"
        share = f"{rate / best[name[len('end to end, '):]]:.0%}" if name.startswith("end to end, ") else "-"
        fault = f"{faults[name, batch]:.0f}" if (name, batch) in faults else "-"
        print(f"| {name} | {batch} | {rate:.1f} {lat} {share} | {fault} |")

    ghz, peaks, how = cpu_peak()
    cores = args.threads
    print(f"\nphysical limit: the network costs {flops / 1e9:.3f} GFLOPs per image "
          f"(torch.utils.flop_counter); peak per core {how}; decoding, checking and resizing costs "
          f"{decode_cost:.2f} CPU ms per file on one core\n")
    print("| backend | best network-only images/s | GFLOP/s | share of the CPU's peak | network CPU ms/image "
          "| end-to-end bound on these cores |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, rate in best.items():
        peak = peaks.get(ARITHMETIC.get(name, "fp32"), 0.0) * cores
        share = f"{rate * flops / peak:.1%} of {peak / 1e12:.2f} T" if peak else "-"
        network_ms = cores / rate * 1e3
        bound = cores / (network_ms + decode_cost) * 1e3
        print(f"| {name} | {rate:.1f} | {rate * flops / 1e9:.1f} | {share} | {network_ms:.2f} | "
              f"{bound:.1f} ({bound / rate:.0%}) |")

    reference = next(iter(statuses))
    print(f"\nstatuses on the same {len(files)} files (rejected vs {reference}: accepted there, not here)\n")
    print("| backend | guard limit | " + " | ".join(STATUSES) + f" | rejected vs {reference} |")
    print("|---|---:|" + "---:|" * (len(STATUSES) + 1))
    for name, found in statuses.items():
        guard = models[name].guard
        limit = f"{guard.threshold:.3f}" if guard is not None else "-"
        lost = sum(r == "ok" and s != "ok" for r, s in zip(statuses[reference], found, strict=True))
        print(f"| {name} | {limit} | " + " | ".join(str(found.count(s)) for s in STATUSES) + f" | {lost} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
