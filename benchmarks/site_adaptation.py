"""Site adaptation, measured honestly: the settings are chosen on validation, the test split is used once.

Two modes:

``validation``: chooses AdaBN's BatchNorm layers on the bundled model's own validation split (the patient-grouped
fold 0 of Kermany train it was calibrated on), clean and under fixed acquisition shifts from
``pneumoscan.evaluate``. The validation images are split by patient into halves; each method adapts on one half
(a seeded subset of ``--per-half`` images) and scores the other; the scores are pooled.

    python benchmarks/site_adaptation.py validation --data ../shared/data/chest_xray \\
        --json docs/results/site_adaptation/validation.json

``test``: the official test split as a new site, by the rule in docs/experiments.md. The split is cut by patient
into two stratified halves (seeded; written to ``halves.csv``). Each method adapts on half A and scores half B and
vice versa, and the scores are pooled, so every test image is scored by a model adapted without it; the
unlabelled method never sees a label, the labelled one sees the labels of its adaptation half only. Then the same
with 25, 50, 100 and 200 adaptation images (seeded draws) and all of each half, plotted. Finally ``pneumoscan
adapt`` itself is timed on one half's files.

    python benchmarks/site_adaptation.py test --data ../shared/data/chest_xray --out docs/results/site_adaptation
"""

from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from pneumoscan import load_model
from pneumoscan.adapt import (
    Adapted,
    AdaptError,
    Site,
    adapt_unlabelled,
    em_thresholds,
    load_site,
    recalibrate,
    site_from_images,
)
from pneumoscan.calibrate import softmax_pneumonia
from pneumoscan.data.layout import list_split, patient_id
from pneumoscan.data.sources import FolderSource
from pneumoscan.metrics import (
    confidence_intervals,
    expected_calibration_error,
    operating_point,
    roc_auc,
)

SHIFTS = ("none", "gamma 1.5", "zoom out 0.85")
SIZES = (25, 50, 100, 200)
DRAWS = 3
SEED = 0


def halves(labels: np.ndarray, groups: list[str], seed: int = SEED) -> np.ndarray:
    """0/1 half of every image: two patient-grouped folds, stratified by class (scikit-learn), seeded."""
    from sklearn.model_selection import StratifiedGroupKFold

    folds = StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=seed)
    half = np.zeros(len(labels), dtype=int)
    _, second = next(folds.split(np.zeros(len(labels)), labels, groups))
    half[second] = 1
    return half


def figures(y: np.ndarray, p: np.ndarray, screening: np.ndarray, balanced: np.ndarray, groups) -> dict:
    """Pooled figures of cross-fitted scores: each image decided at the thresholds of the model that scored it."""
    points = {}
    for name, decided in (("screening", screening), ("balanced", balanced)):
        # operating_point takes one threshold; decisions already made per half: threshold 0.5 on 0/1 decisions
        points[name] = operating_point(y, decided.astype(float), 0.5)
    ci = confidence_intervals(y, p, groups, points)
    return {"n": int(len(y)), "auc": roc_auc(y, p), "ece": expected_calibration_error(y, p),
            "screening": {"sensitivity": points["screening"].sensitivity,
                          "specificity": points["screening"].specificity,
                          "tp": points["screening"].tp, "fn": points["screening"].fn,
                          "tn": points["screening"].tn, "fp": points["screening"].fp},
            "balanced": {"accuracy": points["balanced"].accuracy, "sensitivity": points["balanced"].sensitivity,
                         "specificity": points["balanced"].specificity},
            "ci": {"auc": ci["auc"], "ece": ci["ece"], "screening": ci["screening"], "balanced": ci["balanced"]}}


def score(adapted: Adapted, site: Site, logits: torch.Tensor | None = None) -> dict:
    """Probabilities and decisions of ``site`` under an adapted model (or the base, wrapped)."""
    if logits is None:
        logits = adapted.scores(site)[0]
    p = adapted.probability(logits)
    t = adapted.record.thresholds
    return {"p": p, "screening": p >= t["screening"], "balanced": p >= t["balanced"]}


METHODS = ("base", "unlabelled", "unlabelled, em thresholds", "labelled", "unlabelled+labelled")


def crossfit(model, sites: tuple[Site, Site], *, which: str = "trained", size: int | None = None, seed: int = 0,
             target: float | None = None, methods=METHODS, balance: bool = False) -> dict:
    """Adapt on each half (all of it, or ``size`` images drawn with ``seed``), score the other half, pool.

    Every method of one half shares its network passes: the unlabelled step's network scores the other half once,
    and the methods differ only in the record (calibration, thresholds) applied to those logits. Returns
    {method: pooled figures, or the refusal message}."""
    parts: dict = {m: [] for m in methods}
    refused: dict = {}
    for a, b in ((0, 1), (1, 0)):
        fit_site, eval_site = sites[a], sites[b]
        if size is not None:
            rng = np.random.default_rng([seed, a, size])
            fit_site = fit_site.subset(np.sort(rng.choice(len(fit_site), size=size, replace=False)))
        base = Adapted.of(model)
        runs: dict = {}
        if "base" in methods:
            runs["base"] = (base, eval_site.base_logits)
        if "labelled" in methods:
            try:
                runs["labelled"] = (recalibrate(model, fit_site, target_sensitivity=target), eval_site.base_logits)
            except AdaptError as exc:
                refused["labelled"] = str(exc)
        if any("unlabelled" in m for m in methods):
            try:
                adapted = adapt_unlabelled(model, fit_site, which=which, seed=seed, balance=balance)
            except AdaptError as exc:
                for m in methods:
                    if "unlabelled" in m:
                        refused[m] = str(exc)
                continue
            logits = adapted.scores(eval_site)[0]
            runs["unlabelled"] = (adapted, logits)
            parts.setdefault("em_prevalence", []).append(adapted.steps["unlabelled"]["prevalence"]["site"])
            if "unlabelled, em thresholds" in methods:
                em = replace(adapted, steps=dict(adapted.steps))
                rec = em.record
                q = softmax_pneumonia(adapted.site_logits.numpy(), rec.temperature, rec.bias)
                em.record = rec.with_(thresholds={**rec.thresholds,
                                                  **em_thresholds(q, rec.target_sensitivity or 0.98)})
                runs["unlabelled, em thresholds"] = (em, logits)
            if "unlabelled+labelled" in methods:
                both = replace(adapted, steps=dict(adapted.steps))
                try:
                    runs["unlabelled+labelled"] = (recalibrate(model, fit_site, target_sensitivity=target,
                                                               adapted=both, logits=adapted.site_logits), logits)
                except AdaptError as exc:
                    refused["unlabelled+labelled"] = str(exc)
        for method in methods:
            if method in runs:
                fitted, logits = runs[method]
                parts[method].append((eval_site, score(fitted, eval_site, logits)))
    out = {}
    for method in methods:
        if method in refused:
            out[method] = f"refused: {refused[method]}"
            continue
        got = parts[method]
        out[method] = figures(np.concatenate([site.labels for site, _ in got]),
                              np.concatenate([s["p"] for _, s in got]),
                              np.concatenate([s["screening"] for _, s in got]),
                              np.concatenate([s["balanced"] for _, s in got]),
                              [patient_id(Path(f).name) for site, _ in got for f in site.files])
    if "em_prevalence" in parts:
        out["em_prevalence_per_half"] = parts["em_prevalence"]
    return out


def _site_of_samples(model, samples, shift=None) -> Site:
    """Decoded images of labelled samples (as uint8 network inputs), optionally shifted, as a site."""
    from pneumoscan.data.sources import decode_samples

    cache = decode_samples(samples, model.preprocessing)
    images = torch.from_numpy(cache.images)
    if shift is not None:
        images = torch.stack([shift(im[None])[0] for im in images])
    return site_from_images(model, images, [str(s.path) for s in cache.samples],
                            [str(s.path) for s in cache.samples], cache.labels)


def run_validation(args) -> dict:
    from pneumoscan.evaluate import _shift_ops

    model = load_model(args.model)
    cfg = model.record.training.get("config") or {}
    source = FolderSource(args.data)
    _, val = source.training_split(cfg.get("val_fraction", 0.2), cfg.get("split_seed", 0), 0)
    y = np.array([s.label for s in val])
    half = halves(y, [s.patient for s in val])
    rng = np.random.default_rng(SEED)
    chosen = [np.sort(rng.choice(np.flatnonzero(half == h), size=args.per_half, replace=False)) for h in (0, 1)]
    ops = {"none": None, **_shift_ops(model.preprocessing.size)}
    results: dict = {"model": model.name, "sha256": model.sha256, "validation_images": len(val),
                     "per_half": args.per_half, "shifts": {}}
    for shift in args.shifts:
        started = time.perf_counter()
        sites = tuple(_site_of_samples(model, [val[i] for i in idx], ops[shift]) for idx in chosen)
        row = {}
        for which, balance in (("none", False), ("trained", False), ("trained", True), ("all", True)):
            methods = ("base", "unlabelled", "unlabelled, em thresholds") if which == "none" else \
                ("unlabelled", "unlabelled, em thresholds")
            got = crossfit(model, sites, which=which, methods=methods, balance=balance)
            name = f"AdaBN {which}" + (" class-balanced" if balance else "")
            for method in methods:
                row[method if method == "base" else f"{name}: {method}"] = got[method]
        results["shifts"][shift] = row
        for k, v in row.items():
            print(f"{shift} | {k}: {_line(v)}", flush=True)
        print(f"{shift}: {time.perf_counter() - started:.0f} s", flush=True)
    methods = next(iter(results["shifts"].values())).keys()
    results["mean_auc"] = {m: float(np.mean([r[m]["auc"] for r in results["shifts"].values()])) for m in methods}
    print("mean AUC over conditions: " + ", ".join(f"{m} {v:.4f}" for m, v in results["mean_auc"].items()))
    return results


def run_test(args) -> dict:
    model = load_model(args.model)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    samples = list_split(args.data, "test")
    y = np.array([s.label for s in samples])
    half = halves(y, [s.patient for s in samples])
    with (out / "halves.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "label", "patient", "half"])
        for s, h in zip(samples, half, strict=True):
            w.writerow([f"test/{s.path.parent.name}/{s.path.name}", s.label, s.patient, "AB"[h]])
    started = time.perf_counter()
    sites = tuple(load_site(model, [samples[i].path for i in np.flatnonzero(half == h)],
                            [samples[i].label for i in np.flatnonzero(half == h)]) for h in (0, 1))
    results: dict = {"model": model.name, "sha256": model.sha256, "rule": "docs/experiments.md, site adaptation",
                     "halves": [len(s) for s in sites], "excluded": [s.excluded for s in sites],
                     "load_seconds": round(time.perf_counter() - started, 1), "bn_layers": args.bn_layers}
    print(f"halves {results['halves']} (left out {results['excluded']}), {results['load_seconds']} s", flush=True)
    t = time.perf_counter()
    methods = ("base", args.unlabelled, "labelled", "unlabelled+labelled")
    main = crossfit(model, sites, which=args.bn_layers, methods=methods, balance=args.balance)
    for method in methods:
        print(f"{method}: {_line(main[method])}", flush=True)
    print(f"cross-fit: {time.perf_counter() - t:.0f} s", flush=True)
    if args.also:  # declared in docs/experiments.md before the run: reported for information, chooses nothing
        which, balance = args.also.split(",")
        t = time.perf_counter()
        got = crossfit(model, sites, which=which, balance=balance == "balanced", methods=("unlabelled",))
        main[f"for information: AdaBN {which} {balance}"] = got["unlabelled"]
        main[f"for information: AdaBN {which} {balance} em prevalence"] = got.get("em_prevalence_per_half")
        print(f"for information, AdaBN {which} {balance}: {_line(got['unlabelled'])} "
              f"({time.perf_counter() - t:.0f} s)", flush=True)
    results["crossfit"] = main
    curve: dict = {}
    for size in (*[n for n in SIZES if n <= min(len(s) for s in sites)], None):
        for d in range(DRAWS) if size is not None else range(1):
            got = crossfit(model, sites, which=args.bn_layers, size=size, seed=d,
                           methods=(args.unlabelled, "labelled"), balance=args.balance)
            got95 = crossfit(model, sites, size=size, seed=d, target=0.95, methods=("labelled",))
            for key, r in ((args.unlabelled, got[args.unlabelled]), ("labelled", got["labelled"]),
                           ("labelled @0.95", got95["labelled"])):
                curve.setdefault(key, {}).setdefault(str(size or "all"), []).append(r)
                print(f"curve {key} n={size or 'all'} draw {d}: {_line(r)}", flush=True)
    results["curve"] = curve
    results["adapt_cli_seconds"] = time_cli(args, samples, half)
    print(f"pneumoscan adapt on half A's {int((half == 0).sum())} files: {results['adapt_cli_seconds']:.1f} s")
    plot(results, out / "site_curve.png")
    return results


def _line(r) -> str:
    if isinstance(r, str):
        return r
    return (f"AUC {r['auc']:.4f} screening {r['screening']['sensitivity']:.3f}/{r['screening']['specificity']:.3f} "
            f"balanced acc {r['balanced']['accuracy']:.3f} ECE {r['ece']:.3f}")


def time_cli(args, samples, half) -> float:
    """Wall time of ``pneumoscan adapt --images`` on half A's files (symlinked into a temporary folder)."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "site"
        folder.mkdir()
        for i in np.flatnonzero(half == 0):
            (folder / samples[i].path.name).symlink_to(samples[i].path.resolve())
        command = [sys.executable, "-m", "pneumoscan.cli", "adapt", "--images", str(folder), "--quiet",
                   "--bn-layers", args.bn_layers, "--out", str(Path(tmp) / "site.safetensors"),
                   "--thresholds", "em" if "em" in args.unlabelled else "keep",
                   *(["--bn-balance"] if args.balance else [])]
        if args.model:
            command[4:4] = ["--model", args.model]
        started = time.perf_counter()
        subprocess.run(command, check=True)
        return time.perf_counter() - started


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    base = results["crossfit"]["base"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for key, marker in zip(results["curve"], ("o", "s", "^"), strict=False):
        rows = results["curve"][key]
        for ax, get in ((axes[0], lambda r: r["auc"]), (axes[1], lambda r: r["screening"]["specificity"])):
            xs, ys = [], []
            for size, draws in rows.items():
                n = int(size) if size != "all" else int(np.mean(results["halves"]))
                for r in draws:
                    if not isinstance(r, str):
                        xs.append(n)
                        ys.append(get(r))
            if xs:
                ax.scatter(xs, ys, marker=marker, label=key, alpha=0.7)
                means = {x: np.mean([v for xx, v in zip(xs, ys, strict=True) if xx == x]) for x in sorted(set(xs))}
                ax.plot(list(means), list(means.values()), alpha=0.5)
    axes[0].axhline(base["auc"], color="gray", ls="--", label="unchanged model")
    axes[0].axhline(0.99, color="red", ls=":", label="goal 0.99")
    axes[1].axhline(base["screening"]["specificity"], color="gray", ls="--", label="unchanged model")
    axes[1].axhline(0.85, color="red", ls=":", label="goal 0.85 (unlabelled)")
    axes[1].axhline(0.90, color="darkred", ls=":", label="goal 0.90 (labelled)")
    from matplotlib.ticker import NullFormatter

    ticks = [*SIZES, int(np.mean(results["halves"]))]
    for ax, title in ((axes[0], "ROC AUC"), (axes[1], "screening specificity at the fitted threshold")):
        ax.set_xscale("log")
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("site images used for adaptation (per half)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    fig.suptitle("Kermany test split as a new site, cross-fitted by patient halves (labelled @0.98 refused "
                 "below 149 positives)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    v = sub.add_parser("validation")
    v.add_argument("--data", required=True)
    v.add_argument("--model")
    v.add_argument("--per-half", type=int, default=120)
    v.add_argument("--shifts", nargs="+", default=list(SHIFTS))
    v.add_argument("--json")
    pl = sub.add_parser("plot", help="redraw the curve from a test run's results.json")
    pl.add_argument("results")
    t = sub.add_parser("test")
    t.add_argument("--data", required=True)
    t.add_argument("--model")
    t.add_argument("--bn-layers", default="trained")
    t.add_argument("--balance", action="store_true")
    t.add_argument("--also", help="LAYERS,balanced|plain: one more unlabelled variant in the cross-fit, for information")
    t.add_argument("--unlabelled", default="unlabelled", choices=("unlabelled", "unlabelled, em thresholds"))
    t.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    if args.mode == "plot":
        plot(json.loads(Path(args.results).read_text()), Path(args.results).parent / "site_curve.png")
        return 0
    results = run_validation(args) if args.mode == "validation" else run_test(args)
    target = args.json if args.mode == "validation" else str(Path(args.out) / "results.json")
    if target:
        Path(target).parent.mkdir(parents=True, exist_ok=True)
        Path(target).write_text(json.dumps(results, indent=1, default=float) + "\n")
        print(f"wrote {target}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
