"""Report, once, the test figures of an ensemble chosen on validation by benchmarks/combine_runs.py.

The ensemble averages its members' calibrated log-odds. Exactly as ``pneumoscan train`` does for one network, its
own calibration (Platt) and its screening and balanced thresholds are fitted on the members' shared validation
split; the official test split is then scored with them. Nothing is chosen on test. The members' own test
figures are printed beside it, at their own thresholds.

Usage: python benchmarks/ensemble_test.py runs/fast4-seed1 runs/default [--data ../shared/data/chest_xray]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def as_logits(z: np.ndarray) -> np.ndarray:
    """(N, 2) logits whose margin is the ensemble's mean log-odds, the form calibrate.py's functions take."""
    return np.stack([np.zeros_like(z), z], axis=1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories sharing one split.csv")
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--precision", default="auto", choices=["float32", "bfloat16", "auto"])
    args = parser.parse_args(argv)

    from combine_runs import load_members  # the sibling script: same member loading and split check

    from pneumoscan.calibrate import fit_decision_rule, softmax_pneumonia
    from pneumoscan.data.sources import open_source
    from pneumoscan.evaluate import shifted_logits, validation_images
    from pneumoscan.metrics import operating_point, roc_auc

    runs = [Path(r) for r in args.runs]
    models = load_members(runs, args.precision)
    if models is None:
        return 2
    config = models[0].record.training["config"]

    # validation: the ensemble's calibration and thresholds, fitted as train.py fits a single network's
    images, val_y = validation_images(models[0])
    val_z = np.mean([m.log_odds(next(shifted_logits(m, images))[1]).numpy() for m in models], axis=0)  # unshifted
    temperature, bias, thresholds = fit_decision_rule(as_logits(val_z), val_y, config["target_sensitivity"],
                                                      config["threshold_confidence"])
    val_p = softmax_pneumonia(as_logits(val_z), temperature, bias)

    # test, once: every member's logits, then the ensemble at its validation-fitted calibration and thresholds
    test = {}
    for run, model in zip(runs, models, strict=True):
        cache = open_source(args.data).images("test", model.preprocessing)  # decoded as predict decodes files
        if cache.skipped:
            print(f"ensemble_test: {len(cache.skipped)} unreadable test images", file=sys.stderr)
            return 1
        test[run.name] = (cache.labels, next(shifted_logits(model, cache.images))[1])  # the unshifted logits
    test_y = next(iter(test.values()))[0]
    test_z = np.mean([m.log_odds(test[r.name][1]).numpy() for r, m in zip(runs, models, strict=True)], axis=0)
    test_p = softmax_pneumonia(as_logits(test_z), temperature, bias)

    print(f"test split: {len(test_y)} images; network {models[0].runtime}")
    print(f"{'model':<40} {'AUC':>6}  {'screening thr  sens   spec':>27}  {'balanced thr  acc (sens / spec)':>33}")

    def row(name: str, y, p, thr: dict) -> None:
        s, b = operating_point(y, p, thr["screening"]), operating_point(y, p, thr["balanced"])
        print(f"{name:<40} {roc_auc(y, p):6.4f}  {thr['screening']:13.3f} {s.sensitivity:6.3f} {s.specificity:6.3f}"
              f"  {thr['balanced']:12.3f} {b.accuracy:6.3f} ({b.sensitivity:.3f} / {b.specificity:.3f})")

    for run, model in zip(runs, models, strict=True):
        y, logits = test[run.name]
        row(run.name, y, model.probability(logits).numpy(), model.thresholds)
    row("ensemble: " + " + ".join(r.name for r in runs), test_y, test_p, thresholds)
    val_auc = roc_auc(val_y, val_p)
    print(f"ensemble validation: AUC {val_auc:.4f}, T={temperature:.2f}, bias={bias:+.2f}, thresholds "
          f"screening {thresholds['screening']:.3f}, balanced {thresholds['balanced']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
