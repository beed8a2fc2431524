"""Which part of the fast screening path moves answers: the bf16 network, the JPEG draft decode, or both?

For the run's validation split and the official test split (reporting only: nothing is chosen here), it scores
every image four ways (full or draft decode x float32 or bfloat16 network) and prints the ROC AUC, the screening
decisions that differ from the float32 full-decode reference, and the largest probability difference.

Usage: python benchmarks/fast_path_decisions.py --model runs/fast4-seed1 [--data ../shared/data/chest_xray]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]


def probabilities(model, images: list[np.ndarray], batch_size: int = 32) -> np.ndarray:
    out = []
    for i in range(0, len(images), batch_size):
        logits = model.forward_images(torch.from_numpy(np.stack(images[i:i + batch_size])))[0]
        out.append(model.probability(logits).numpy())
    return np.concatenate(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="run directory (its split.csv gives the validation split)")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    args = parser.parse_args(argv)

    from pneumoscan import load_model
    from pneumoscan.data.images import read_image
    from pneumoscan.data.layout import list_split
    from pneumoscan.evaluate import _validation_samples

    fp32 = load_model(args.model, precision="float32")
    bf16 = load_model(args.model, precision="bfloat16")
    prep, threshold = fp32.preprocessing, fp32.thresholds["screening"]
    print(f"model {fp32.name} (sha256 {fp32.sha256[:12]}), screening threshold {threshold:.4f}")
    for split, samples in (("validation", _validation_samples(fp32)), ("test", list_split(args.data, "test"))):
        y = np.array([s.label for s in samples])
        full = [prep.to_uint8(read_image(s.path)) for s in samples]
        draft = [prep.to_uint8(read_image(s.path, reduce_to=prep.size)) for s in samples]
        p = {"full fp32": probabilities(fp32, full), "full bf16": probabilities(bf16, full),
             "draft fp32": probabilities(fp32, draft), "draft bf16": probabilities(bf16, draft)}
        ref = p["full fp32"]
        for name, v in p.items():
            changed = int(((v >= threshold) != (ref >= threshold)).sum())
            print(f"{split:<10} {name:<11} AUC {roc_auc_score(y, v):.4f}  screening decisions changed: "
                  f"{changed} of {len(y)}  max |probability difference| {np.abs(v - ref).max():.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
