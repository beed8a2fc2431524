"""What resizing in 8 bits changed: the bundled model's answers with the float resize it replaced, side by side.

Until issue 19 every image was copied to float32 and resized with Pillow's float resampler, then rounded to the
uint8 network input. Now 8-bit images stay uint8 and are resized by Pillow's 8-bit resampler (deeper ones are
rounded to 8 bits first). This script scores the same files both ways with the bundled model (torch, its recorded
precision) and prints, per set: the largest probability change, the number of pixels of the network input that
differ, how many decisions flip at the screening and balanced operating points, and the ROC AUC both ways.

Sets: the patient-grouped validation split the thresholds were fitted on (224 px train copies: no resize happens,
so nothing may change), the 16 official val originals, and the test split's originals (a speed change is reported
on test, nothing is chosen on it).

    nice -n 19 python benchmarks/resize_fidelity.py [--data ../shared/data/chest_xray] [--limit N]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.metrics import roc_auc_score

from pneumoscan.config import TrainConfig
from pneumoscan.data.images import decode
from pneumoscan.data.layout import list_split, patient_split
from pneumoscan.predict import load_model

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


def compare(model, paths: list[Path], labels: list[int], batch: int = 32) -> dict:
    prep = model.preprocessing
    probs = {"before": [], "after": []}
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
        for key, images in (("before", old), ("after", new)):
            probs[key].append(model.probability(model.score(np.stack(images)).logits).numpy())
    before, after = np.concatenate(probs["before"]), np.concatenate(probs["after"])
    flips = {op: int(((before >= t) != (after >= t)).sum()) for op, t in model.thresholds.items()}
    auc = ((roc_auc_score(labels, before), roc_auc_score(labels, after)) if len(set(labels)) == 2
           else (float("nan"), float("nan")))
    return {"images": len(paths), "auc": auc, "cpu_ms": {k: v / len(paths) * 1e3 for k, v in cpu.items()}, "max_change": float(np.abs(before - after).max()),
            "mean_change": float(np.abs(before - after).mean()),
            "pixels_changed_per_image": pixels_changed / len(paths), "flips": flips}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=DATA)
    parser.add_argument("--limit", type=int, default=0, help="at most this many files per set (0: all)")
    args = parser.parse_args()
    model = load_model()
    cfg = TrainConfig()
    _, val = patient_split(list_split(args.data, "train"), cfg.val_fraction, cfg.validation_seed)
    sets = {"validation (224 px, thresholds fitted here)": val,
            "official val originals": list_split(args.data, "val"),
            "test originals (reported, nothing chosen)": list_split(args.data, "test")}
    print(f"model {model.name} ({model.runtime}), thresholds {model.thresholds}\n")
    print("| set | images | max prob. change | mean change | input pixels changed / image | decision flips "
          "| ROC AUC float resize -> 8-bit | CPU ms/image: decode (8-bit), float copy + resize -> 8-bit resize |")
    print("|---|---:|---:|---:|---:|---|---|---|")
    for label, samples in sets.items():
        samples = samples[: args.limit or None]
        r = compare(model, [Path(s.path) for s in samples], [s.label for s in samples])
        flips = ", ".join(f"{op} {n}" for op, n in r["flips"].items())
        print(f"| {label} | {r['images']} | {r['max_change']:.4f} | {r['mean_change']:.5f} | "
              f"{r['pixels_changed_per_image']:.1f} of {model.preprocessing.size ** 2} | {flips} | "
              f"{r['auc'][0]:.4f} -> {r['auc'][1]:.4f} | {r['cpu_ms']['decode']:.2f}, "
              f"{r['cpu_ms']['before']:.2f} -> {r['cpu_ms']['after']:.2f} |")


if __name__ == "__main__":
    main()
