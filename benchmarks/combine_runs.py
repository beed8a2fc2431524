"""Do several finished runs do better together? Ensembles and weight averages, scored on validation only.

For runs trained on the same patient split (same split.csv), it scores the validation images as they are and
under the 11 fixed acquisition shifts of ``pneumoscan evaluate --shifts`` and prints, for each run, for the
ensemble of all runs (mean of the calibrated log-odds) and for the best ensembles of 2 and 3 runs, and, with
``--soup``, for the uniform weight average ("model soup", Wortsman et al. 2022) of all runs:
validation AUC and mean AUC under the shifts, the columns of docs/experiments.md's selection rule.
Nothing here reads the test split.

Usage: python benchmarks/combine_runs.py runs/fast4-seed1 runs/fast4 runs/default [--soup] [--precision bfloat16]
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

import numpy as np


def load_members(runs: list[Path], precision: str):
    """The runs' models, or None (said on stderr) when they do not share one split.csv: their validation images
    would differ."""
    from pneumoscan import load_model

    if len({(r / "split.csv").read_bytes() for r in runs}) != 1:
        print("the runs do not share one split.csv; their validation images differ", file=sys.stderr)
        return None
    return [load_model(r, precision=precision) for r in runs]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories sharing one split.csv")
    parser.add_argument("--precision", default="bfloat16", choices=["float32", "bfloat16", "auto"],
                        help="network precision (default bfloat16: the precision of the shifted columns)")
    parser.add_argument("--soup", action="store_true", help="also score the uniform average of the weights")
    args = parser.parse_args(argv)

    from pneumoscan.evaluate import shifted_logits, validation_images
    from pneumoscan.metrics import roc_auc

    runs = [Path(r) for r in args.runs]
    models = load_members(runs, args.precision)
    if models is None:
        return 2
    images, labels = validation_images(models[0])
    print(f"{len(labels)} validation images of {runs[0]}/split.csv, network {args.precision}", flush=True)

    scores: dict[str, dict[str, np.ndarray]] = {}  # run -> shift -> calibrated log-odds
    for run, model in zip(runs, models, strict=True):
        scores[run.name] = {name: model.log_odds(lg).numpy() for name, lg in shifted_logits(model, images)}
        print(f"scored {run.name}", file=sys.stderr, flush=True)

    def figures(per_shift: dict[str, np.ndarray]) -> tuple[float, float]:
        shifted = [roc_auc(labels, s) for name, s in per_shift.items() if name != "none"]
        return roc_auc(labels, per_shift["none"]), float(np.mean(shifted))

    def ensemble(names: tuple[str, ...]) -> dict[str, np.ndarray]:
        return {shift: np.mean([scores[n][shift] for n in names], axis=0) for shift in scores[names[0]]}

    rows = [(name, *figures(scores[name])) for name in scores]
    names = tuple(scores)
    for k in (2, 3):
        if len(names) > k:
            best = max(itertools.combinations(names, k), key=lambda c: figures(ensemble(c))[::-1])
            rows.append((f"best ensemble of {k}: " + " + ".join(best), *figures(ensemble(best))))
    if len(names) > 1:
        rows.append(("ensemble of all: " + " + ".join(names), *figures(ensemble(names))))
    if args.soup and len(names) > 1:
        soup = models[0]
        states = [m.network.state_dict() for m in models]
        averaged = {k: (sum(s[k].float() for s in states) / len(states)).to(v.dtype) if v.is_floating_point() else v
                    for k, v in states[0].items()}
        soup.network.load_state_dict(averaged)
        # a weight average has no calibration of its own; AUC needs none (it depends on the ranking only)
        per_shift = {name: soup.log_odds(lg, calibrated=False).numpy() for name, lg in shifted_logits(soup, images)}
        rows.append(("uniform weight average (soup) of all", *figures(per_shift)))

    width = max(len(r[0]) for r in rows)
    print(f"{'runs':<{width}}  validation AUC  mean AUC under shifts")
    for name, clean, shifted in rows:
        print(f"{name:<{width}}  {clean:14.4f}  {shifted:21.4f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
