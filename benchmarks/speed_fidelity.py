"""What issue 19's speed changes did to the answers: the bundled model's scores before and after, side by side.

Two changes compute slightly different numbers:
- the 8-bit resize: until issue 19 every image was copied to float32, resized by Pillow's float resampler and
  rounded to the uint8 network input; now 8-bit images stay uint8 and go through Pillow's 8-bit resampler (deeper
  ones are rounded to 8 bits first);
- BatchNorm folded into the convolutions (``backends.torch.fold_batchnorm``): the same affine maps, other float
  rounding.
This scores the same files three ways with the bundled model (torch, its recorded precision): before (float
resize, network as trained), 8-bit resize only, and both (what every route computes now), and prints per set
and step: the largest and mean probability change, the network-input pixels that differ, decision flips at the
screening and balanced operating points, the ROC AUC, and the CPU time of the float and the 8-bit resize.

Sets: the patient-grouped validation split the thresholds were fitted on (224 px train copies: no resize happens),
the 16 official val originals, and the test split's originals (a speed change is reported on test; nothing is
chosen on it).

    nice -n 19 python benchmarks/speed_fidelity.py [--data ../shared/data/chest_xray] [--limit N] [--bf16]

--bf16 adds the choice made for bfloat16, on validation only: screening and balanced decisions that differ from
float32's, with the network folded and as trained (``TorchBackend`` runs bfloat16 unfolded).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from pneumoscan import allocator

allocator.tune()  # as the command line does, before torch loads (PNEUMOSCAN_ALLOCATOR=default: off)
import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from pneumoscan.backends.torch import fold_batchnorm  # noqa: E402
from pneumoscan.config import TrainConfig  # noqa: E402
from pneumoscan.data.images import decode  # noqa: E402
from pneumoscan.data.layout import list_split, patient_split  # noqa: E402
from pneumoscan.predict import load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "chest_xray"


def float_resize(prep, pixels: np.ndarray) -> np.ndarray:
    """The resize every route used before issue 19: float32 in, Pillow's float resampler, rounded at the end."""
    if pixels.shape != (prep.size, prep.size):
        filters = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                   "area": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS}
        pixels = np.clip(np.asarray(Image.fromarray(pixels.astype(np.float32), "F").resize(
            (prep.size, prep.size), filters[prep.interpolation]), dtype=np.float32), 0.0, 1.0)
    return np.round(pixels * 255.0).astype(np.uint8)


def scores(model, images: list[np.ndarray], folded: bool, batch: int = 64) -> np.ndarray:
    """Probabilities from the network folded or as trained, at the backend's precision."""
    backend = model.backend
    if folded and getattr(backend, "_folded_for_bench", None) is None:
        backend._folded_for_bench = fold_batchnorm(backend.network).to(memory_format=torch.channels_last)
    network = backend._folded_for_bench if folded else backend.network
    backend.inference_network = lambda: network  # this instance only: forward runs the chosen network
    try:
        return np.concatenate([model.probability(model.score(np.stack(images[i:i + batch])).logits).numpy()
                               for i in range(0, len(images), batch)])
    finally:
        del backend.inference_network


def compare(model, paths: list[Path], labels: list[int], batch: int = 32) -> dict:
    prep = model.preprocessing
    probs = {"before": [], "8-bit resize": [], "after": []}
    pixels_changed = 0
    cpu = {"decode": 0.0, "before": 0.0, "after": 0.0}  # CPU seconds (this thread), robust to a busy machine
    for start in range(0, len(paths), batch):
        old, new = [], []
        for path in paths[start:start + batch]:
            t0 = time.thread_time()
            decoded = decode(path)
            t1 = time.thread_time()
            new.append(prep.to_uint8(decoded.data))
            t2 = time.thread_time()
            old.append(float_resize(prep, decoded.pixels))  # includes the float copy the old decode made
            t3 = time.thread_time()
            cpu["decode"] += t1 - t0
            cpu["after"] += t2 - t1
            cpu["before"] += t3 - t2
            pixels_changed += int((old[-1] != new[-1]).sum())
        probs["before"].append(scores(model, old, folded=False))
        probs["8-bit resize"].append(scores(model, new, folded=False))
        probs["after"].append(scores(model, new, folded=True))
    probs = {k: np.concatenate(v) for k, v in probs.items()}
    steps = {}
    for label, a, b in (("8-bit resize", "before", "8-bit resize"), ("BatchNorm folded", "8-bit resize", "after"),
                        ("both (now)", "before", "after")):
        before, after = probs[a], probs[b]
        auc = ((roc_auc_score(labels, before), roc_auc_score(labels, after)) if len(set(labels)) == 2
               else (float("nan"), float("nan")))
        steps[label] = {"auc": auc, "max_change": float(np.abs(before - after).max()),
                        "mean_change": float(np.abs(before - after).mean()),
                        "flips": {op: int(((before >= t) != (after >= t)).sum()) for op, t in model.thresholds.items()}}
    return {"images": len(paths), "steps": steps, "cpu_ms": {k: v / len(paths) * 1e3 for k, v in cpu.items()},
            "pixels_changed_per_image": pixels_changed / len(paths)}


def bf16_choice(model, samples) -> None:
    """Decisions of the bfloat16 network, folded and as trained, that differ from float32's, on validation."""
    images = [model.preprocessing.to_uint8(decode(s.path).data) for s in samples]
    reference = scores(model, images, folded=True)
    model.backend.precision = "bfloat16"
    try:
        rows = {"folded": scores(model, images, folded=True), "as trained": scores(model, images, folded=False)}
    finally:
        model.backend.precision = "float32"
    print(f"\nbfloat16 on validation ({len(images)} images), decisions that differ from float32:")
    for label, probs in rows.items():
        flips = ", ".join(f"{op} {int(((reference >= t) != (probs >= t)).sum())}" for op, t in model.thresholds.items())
        print(f"- network {label}: {flips}; max probability change {np.abs(probs - reference).max():.3f}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, default=0, help="at most this many files per set (0: all)")
    parser.add_argument("--bf16", action="store_true", help="also bfloat16 folded vs as trained, on validation")
    parser.add_argument("--sets", default="validation,val,test", help="which sets (default all three)")
    args = parser.parse_args(argv)
    model = load_model()
    cfg = TrainConfig()
    _, val = patient_split(list_split(args.data, "train"), cfg.val_fraction, cfg.validation_seed)
    sets = {"validation (224 px, thresholds fitted here)": val,
            "official val originals": list_split(args.data, "val"),
            "test originals (reported, nothing chosen)": list_split(args.data, "test")}
    print(f"model {model.name} ({model.runtime}), thresholds {model.thresholds}\n")
    print("| set | images | change | max prob. change | mean change | decision flips | ROC AUC before -> after |")
    print("|---|---:|---|---:|---:|---|---|")
    timing = []
    wanted = {k.strip() for k in args.sets.split(",")}
    for (label, samples), key in zip(sets.items(), ("validation", "val", "test"), strict=True):
        if key not in wanted:
            continue
        samples = samples[: args.limit or None]
        r = compare(model, [Path(s.path) for s in samples], [s.label for s in samples])
        for step, v in r["steps"].items():
            flips = ", ".join(f"{op} {n}" for op, n in v["flips"].items())
            print(f"| {label} | {r['images']} | {step} | {v['max_change']:.2g} | {v['mean_change']:.2g} | {flips} | "
                  f"{v['auc'][0]:.4f} -> {v['auc'][1]:.4f} |")
        timing.append((label, r))
    if args.bf16:
        bf16_choice(model, val[: args.limit or None])
    print("\n| set | network-input pixels changed by the 8-bit resize, per image | CPU ms per image: decode, "
          "float copy + float resize -> 8-bit resize |")
    print("|---|---:|---|")
    for label, r in timing:
        print(f"| {label} | {r['pixels_changed_per_image']:.1f} of {model.preprocessing.size ** 2} | "
              f"{r['cpu_ms']['decode']:.2f}, {r['cpu_ms']['before']:.2f} -> {r['cpu_ms']['after']:.2f} |")


if __name__ == "__main__":
    main()
