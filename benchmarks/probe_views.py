"""Do frozen ImageNet features of an X-ray and of its augmented view agree? A linear probe fitted on each, scored on both.

Why LP-FT (``linear_probe: true``, experiment 13) fits its probe on clean and augmented views together: fitted on
one kind alone, a logistic regression on the frozen EfficientNet-Lite0 features ranks the other kind poorly.
Subsets of the patient-grouped split every recipe uses (split seed 0): training images to fit the probe, validation
images to score it, each clean and with one draw of the default recipe's augmentation. Nothing here touches test.

Usage: python benchmarks/probe_views.py [--data ../shared/data/chest_xray] [--train 1200] [--val 300]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler

from pneumoscan.augment import build_augment
from pneumoscan.config import load_config
from pneumoscan.data.cache import decode_cache
from pneumoscan.data.layout import list_split, patient_split
from pneumoscan.models import create_model
from pneumoscan.train import CachedImages, infer, preprocessing_for, setup_runtime

ROOT = Path(__file__).resolve().parents[1]


def features(net, images, labels, augment, prep, rt) -> np.ndarray:
    loader = torch.utils.data.DataLoader(CachedImages(images, labels, augment), batch_size=64)
    return infer(net, (x for x, _ in loader), prep, rt, amp=True, channels_last=False)[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "chest_xray")
    parser.add_argument("--train", type=int, default=1200, help="training images the probe is fitted on")
    parser.add_argument("--val", type=int, default=300, help="validation images it is scored on")
    args = parser.parse_args()

    cfg = load_config(ROOT / "configs" / "default.yaml")
    prep = preprocessing_for(cfg)
    train_s, val_s = patient_split(list_split(args.data, "train"), cfg.val_fraction, cfg.validation_seed)
    rng = np.random.default_rng(0)
    subsets = {}
    for name, samples, n in (("train", train_s, args.train), ("val", val_s, args.val)):
        chosen = [samples[i] for i in rng.choice(len(samples), n, replace=False)]
        images, kept, _ = decode_cache(chosen, prep, desc=name, progress=False)
        subsets[name] = (images, np.array([s.label for s in kept]))
    torch.manual_seed(0)
    augment = build_augment(cfg.augment, prep.size)
    net = create_model(cfg.arch, pretrained="imagenet").eval()
    rt = setup_runtime("auto")
    feats = {(name, view): features(net, *subsets[name], aug, prep, rt)
             for name in subsets for view, aug in (("clean", None), ("augmented", augment))}
    ty, vy = subsets["train"][1], subsets["val"][1]
    fits = {"clean": (feats["train", "clean"], ty), "augmented": (feats["train", "augmented"], ty),
            "both": (np.concatenate([feats["train", "clean"], feats["train", "augmented"]]), np.concatenate([ty, ty]))}
    print(f"EfficientNet-Lite0 ImageNet features, probe C 0.01; {len(ty)} training and {len(vy)} validation images")
    print(f"{'probe fitted on':<18} {'val AUC, clean':>15} {'val AUC, augmented':>19}")
    for name, (x, y) in fits.items():
        scaler = StandardScaler().fit(x)
        probe = LogisticRegression(C=0.01, class_weight="balanced", max_iter=3000).fit(scaler.transform(x), y)
        aucs = [roc_auc_score(vy, probe.decision_function(scaler.transform(feats["val", view])))
                for view in ("clean", "augmented")]
        print(f"{name:<18} {aucs[0]:15.4f} {aucs[1]:19.4f}")


if __name__ == "__main__":
    main()
