"""Fine-tuning to a site, measured honestly: the settings are chosen on validation, the test split is used once.

The rules are in docs/experiments.md ("Fine-tuning to a site"), committed before this script first scored a test
image. Two modes:

``select``: the bundled model's own validation split (the patient-grouped fold 0 of Kermany train, which it never
trained on) is cut by patient into two halves (as benchmarks/site_adaptation.py cuts it); ``--per-half`` images are
drawn from each. Each candidate learning rate fine-tunes on one half and scores the other, both ways, clean and
under a fixed acquisition shift; the pooled figures decide by the rule.

    python benchmarks/site_finetune.py select --data ../shared/data/chest_xray --json docs/results/site_finetune/select.json

``test``: the official test split as a new site, cut into the same patient halves as the site-adaptation
experiment (docs/results/site_adaptation/halves.csv). Fine-tune on half A, score half B, and vice versa; pool.
Then the site-size curve (seeded draws of 25, 50, 100, 200 images and all of each half), the fine-tuned models'
validation AUC (the original site), their guard on the non-X-ray pictures of benchmarks/guard_eval.py, and the
unlabelled adaptation with its two threshold settings on the same halves. Every figure goes to results.json as it
is computed.

    python benchmarks/site_finetune.py test --data ../shared/data/chest_xray --out docs/results/site_finetune
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from site_adaptation import _site_of_samples, figures, halves

from pneumoscan import load_model
from pneumoscan.adapt import Adapted, AdaptError, Site, adapt_unlabelled, load_site
from pneumoscan.calibrate import softmax_pneumonia, stage_scores
from pneumoscan.data.layout import Sample
from pneumoscan.data.sources import FolderSource, decode_samples
from pneumoscan.finetune import FinetuneSettings, decision_rule, fit_network
from pneumoscan.metrics import roc_auc

CANDIDATE_LRS = (1e-4, 3e-4)
SHIFTS = ("none", "zoom out 0.85")
SIZES = (25, 50, 100, 200)
DRAWS = 3
TARGETS = (0.98, 0.95)


def _groups(site: Site, patient_of: dict[str, str]) -> list[str]:
    return [patient_of[f] for f in site.files]


def crossfit(model, sites: tuple[Site, Site], patient_of: dict[str, str], settings: FinetuneSettings, *,
             size: int | None = None, draw: int = 0, keep: list | None = None) -> dict:
    """Fine-tune on each half (all of it, or ``size`` images drawn with ``draw``), score the other half, pool.

    AUC needs no threshold, so it is reported at every size; the screening figures at each target only where the
    fitting half has the positives the sensitivity rule needs (else "refused")."""
    parts: dict = {"scores": [], "sites": [], "epochs": []}
    decided: dict = {t: [] for t in TARGETS}
    refused: dict = {}
    for a, b in ((0, 1), (1, 0)):
        fit_site, eval_site = sites[a], sites[b]
        if size is not None:
            rng = np.random.default_rng([draw, a, size])
            fit_site = fit_site.subset(np.sort(rng.choice(len(fit_site), size=size, replace=False)))
        started = time.perf_counter()
        fitted = fit_network(model, fit_site, _groups(fit_site, patient_of), settings)
        seconds = time.perf_counter() - started
        adapted = Adapted(fitted.network, model.record, None, model.sha256, network_changed=True)
        logits = adapted.scores(eval_site)[0]
        parts["scores"].append(logits)
        parts["sites"].append(eval_site)
        parts["epochs"].append({"epoch": fitted.epoch, "oof_auc": fitted.auc_by_epoch, "seconds": round(seconds, 1),
                                "images": len(fit_site), "patients": fitted.patients})
        for target in TARGETS:
            try:
                rule = decision_rule(model, fit_site, fitted, settings, target)
            except AdaptError as exc:
                refused[target] = str(exc)
                continue
            decided[target].append((rule, logits))
            if keep is not None and target == TARGETS[0]:
                keep.append(rule)
    y = np.concatenate([s.labels for s in parts["sites"]])
    groups = [patient_of[f] for s in parts["sites"] for f in s.files]
    out: dict = {"halves": parts["epochs"],
                 "auc": roc_auc(y, np.concatenate([softmax_pneumonia(z.numpy()) for z in parts["scores"]]))}
    for target in TARGETS:
        if target in refused or len(decided[target]) < 2:
            out[f"target {target}"] = f"refused: {refused.get(target, '')}"
            continue
        p = np.concatenate([rule.probability(z) for rule, z in decided[target]])
        scr = np.concatenate([rule.probability(z) >= rule.record.thresholds["screening"] for rule, z in decided[target]])
        bal = np.concatenate([rule.probability(z) >= rule.record.thresholds["balanced"] for rule, z in decided[target]])
        out[f"target {target}"] = figures(y, p, scr, bal, groups)
    return out


def base_figures(model, sites: tuple[Site, Site], patient_of: dict[str, str]) -> dict:
    """The unchanged model on the same images."""
    base = Adapted.of(model)
    y = np.concatenate([s.labels for s in sites])
    p = np.concatenate([base.probability(s.base_logits) for s in sites])
    t = model.record.thresholds
    return figures(y, p, p >= t["screening"], p >= t["balanced"], [patient_of[f] for s in sites for f in s.files])


def unlabelled(model, sites: tuple[Site, Site], patient_of: dict[str, str]) -> dict:
    """`adapt --images` on each half with both threshold settings, scored on the other half, pooled."""
    out: dict = {}
    for thresholds in ("em", "keep"):
        got = []
        for a, b in ((0, 1), (1, 0)):
            fit_site = replace(sites[a], labels=None)
            adapted = adapt_unlabelled(model, fit_site, thresholds=thresholds)
            got.append((adapted, sites[b]))
        y = np.concatenate([s.labels for _, s in got])
        p = np.concatenate([ad.probability(s.base_logits) for ad, s in got])
        scr = np.concatenate([ad.probability(s.base_logits) >= ad.record.thresholds["screening"] for ad, s in got])
        bal = np.concatenate([ad.probability(s.base_logits) >= ad.record.thresholds["balanced"] for ad, s in got])
        out[f"unlabelled, thresholds {thresholds}"] = figures(y, p, scr, bal,
                                                               [patient_of[f] for _, s in got for f in s.files])
    return out


def validation_split(model, data: str) -> list[Sample]:
    cfg = model.record.training.get("config") or {}
    return FolderSource(data).training_split(cfg.get("val_fraction", 0.2), cfg.get("split_seed", 0), 0)[1]


def _line(r) -> str:
    if isinstance(r, str):
        return r
    ci = r["ci"]
    return (f"AUC {r['auc']:.4f} [{ci['auc'][0]:.4f}, {ci['auc'][1]:.4f}] screening "
            f"{r['screening']['sensitivity']:.3f}/{r['screening']['specificity']:.3f} "
            f"balanced acc {r['balanced']['accuracy']:.3f} ECE {r['ece']:.3f}")


def _save(results: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=2, default=float))


def run_select(args) -> dict:
    from pneumoscan.evaluate import _shift_ops

    model = load_model(args.model)
    val = validation_split(model, args.data)
    y = np.array([s.label for s in val])
    half = halves(y, [s.patient for s in val])
    rng = np.random.default_rng(0)
    chosen = [np.sort(rng.choice(np.flatnonzero(half == h), size=args.per_half, replace=False)) for h in (0, 1)]
    patient_of = {str(s.path): s.patient for s in val}
    ops = {"none": None, **_shift_ops(model.preprocessing.size)}
    results: dict = {"model": model.name, "sha256": model.sha256, "per_half": args.per_half, "conditions": {}}
    json_path = Path(args.json)
    for shift in SHIFTS:
        sites = tuple(_site_of_samples(model, [val[i] for i in idx], ops[shift]) for idx in chosen)
        row: dict = {"unchanged": base_figures(model, sites, patient_of)}
        print(f"{shift} | unchanged: {_line(row['unchanged'])}", flush=True)
        for lr in CANDIDATE_LRS:
            started = time.perf_counter()
            got = crossfit(model, sites, patient_of, FinetuneSettings(lr=lr, epochs=args.epochs))
            row[f"lr {lr:g}"] = got
            print(f"{shift} | lr {lr:g}: AUC {got['auc']:.4f}; " + "; ".join(
                f"@{t}: {_line(got[f'target {t}'])}" for t in TARGETS)
                + f" ({time.perf_counter() - started:.0f} s)", flush=True)
            results["conditions"][shift] = row
            _save(results, json_path)
    results["mean_auc"] = {k: float(np.mean([results["conditions"][s][k]["auc"] for s in SHIFTS]))
                           for k in results["conditions"][SHIFTS[0]]}
    print("mean AUC over conditions: " + ", ".join(f"{k} {v:.4f}" for k, v in results["mean_auc"].items()))
    _save(results, json_path)
    return results


def run_test(args) -> dict:
    model = load_model(args.model)
    out = Path(args.out)
    json_path = out / "results.json"
    settings = FinetuneSettings(lr=args.lr)
    with open(args.halves, newline="") as f:
        rows = list(csv.DictReader(f))
    data = Path(args.data)
    paths = {h: [str(data / r["file"]) for r in rows if r["half"] == h] for h in "AB"}
    labels = {h: [int(r["label"]) for r in rows if r["half"] == h] for h in "AB"}
    patient_of = {str(data / r["file"]): r["patient"] for r in rows}
    started = time.perf_counter()
    sites = tuple(load_site(model, paths[h], labels[h]) for h in "AB")
    results: dict = {"model": model.name, "sha256": model.sha256, "rule": "docs/experiments.md, fine-tuning to a site",
                     "settings": asdict(settings),
                     "halves": [len(s) for s in sites], "excluded": [s.excluded for s in sites],
                     "load_seconds": round(time.perf_counter() - started, 1)}
    print(f"halves {results['halves']} (left out {results['excluded']})", flush=True)
    results["unchanged"] = base_figures(model, sites, patient_of)
    print(f"unchanged: {_line(results['unchanged'])}", flush=True)
    finetuned: list = []
    t = time.perf_counter()
    results["finetuned"] = crossfit(model, sites, patient_of, settings, keep=finetuned)
    print(f"fine-tuned: AUC {results['finetuned']['auc']:.4f}; " + "; ".join(
        f"@{t}: {_line(results['finetuned'][f'target {t}'])}" for t in TARGETS)
        + f" ({time.perf_counter() - t:.0f} s)", flush=True)
    _save(results, json_path)

    val = validation_split(model, args.data)
    cache = decode_samples(val, model.preprocessing)
    results["validation_auc"] = {"unchanged": roc_auc(cache.labels, softmax_pneumonia(
        stage_scores(Adapted.of(model).scoring_model(), cache.images)[0].numpy()))}
    for name, rule in zip(("fine-tuned on A", "fine-tuned on B"), finetuned, strict=False):
        logits = stage_scores(rule.scoring_model(), cache.images)[0]
        results["validation_auc"][name] = roc_auc(cache.labels, rule.probability(logits))
    print(f"validation AUC ({len(cache.labels)} images): {results['validation_auc']}", flush=True)
    results["guard_non_xray"] = guard_check(finetuned, out)
    _save(results, json_path)

    results["unlabelled"] = unlabelled(model, sites, patient_of)
    for k, v in results["unlabelled"].items():
        print(f"{k}: {_line(v)}", flush=True)
    _save(results, json_path)

    curve: dict = {}
    for size in (*SIZES, None):
        for draw in range(DRAWS) if size is not None else range(1):
            if size is None:
                got = results["finetuned"]
            else:
                got = crossfit(model, sites, patient_of, settings, size=size, draw=draw)
            curve.setdefault(str(size or "all"), []).append(got)
            print(f"curve n={size or 'all'} draw {draw}: AUC {got['auc']:.4f}; " + "; ".join(
                f"@{t}: {_line(got[f'target {t}'])}" for t in TARGETS), flush=True)
            results["curve"] = curve
            _save(results, json_path)
    return results


def guard_check(adapted: list, out: Path) -> dict:
    """Each fine-tuned model's guard on benchmarks/guard_eval.py's non-X-ray pictures (its --no-test sources)."""
    import tempfile

    import guard_eval

    found = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, rule in zip("AB", adapted, strict=False):
            path = Path(tmp) / f"finetuned_{name}.safetensors"
            rule.save(path)
            report = Path(tmp) / f"guard_{name}.json"
            guard_eval.main(["--model", str(path), "--no-test", "--json", str(report)])
            sources = json.loads(report.read_text())["sources"]
            non = {k: v for k, v in sources.items() if k not in ("run-val", "kermany-val")}
            found[f"fine-tuned on {name}"] = {"non_xray": sum(v["n"] for v in non.values()),
                                              "rejected": sum(v["rejected"] for v in non.values()),
                                              "kermany_val_rejected": sources.get("kermany-val", {}).get("rejected")}
    print(f"guard on non-X-ray pictures: {found}", flush=True)
    return found


def plot(results: dict, path: Path) -> None:
    """ROC AUC and screening specificity (target 0.95, where fitted) against the fitting images per half."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes = [k for k in results["curve"]]
    x = [int(k) if k != "all" else min(results["halves"]) for k in sizes]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for draws_x, key in zip(x, sizes, strict=True):
        aucs = [d["auc"] for d in results["curve"][key]]
        left.scatter([draws_x] * len(aucs), aucs, color="tab:blue", s=18)
        specs = [d["target 0.95"]["screening"]["specificity"] for d in results["curve"][key]
                 if not isinstance(d["target 0.95"], str)]
        right.scatter([draws_x] * len(specs), specs, color="tab:orange", s=18)
    left.plot(x, [np.mean([d["auc"] for d in results["curve"][k]]) for k in sizes], color="tab:blue",
              label="fine-tuned (mean of draws)")
    left.axhline(results["unchanged"]["auc"], color="gray", linestyle="--", label="unchanged model")
    left.set(xscale="log", xlim=(20, 400), xlabel="labelled site images per half", ylabel="pooled ROC AUC (other half)")
    right.axhline(results["unchanged"]["screening"]["specificity"], color="gray", linestyle="--",
                  label="unchanged model (target 0.98)")
    right.set(xscale="log", xlim=(20, 400), xlabel="labelled site images per half", ylabel="screening specificity, target 0.95")
    for ax in (left, right):
        ax.set_xticks(x, [str(v) for v in x])
        ax.minorticks_off()
        ax.legend(fontsize=8)
    fig.suptitle("Fine-tuning on the test split as a new site, cross-fitted by patient halves")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("select")
    s.add_argument("--data", required=True)
    s.add_argument("--model")
    s.add_argument("--per-half", type=int, default=220)
    s.add_argument("--json", required=True)
    s.add_argument("--epochs", type=int, default=FinetuneSettings().epochs, help="a smoke run only: fewer epochs")
    t = sub.add_parser("test")
    t.add_argument("--data", required=True)
    t.add_argument("--model")
    t.add_argument("--out", required=True)
    t.add_argument("--lr", type=float, required=True, help="the learning rate the select rule chose")
    t.add_argument("--halves", default="docs/results/site_adaptation/halves.csv")
    g = sub.add_parser("plot", help="site_curve.png from a test run's results.json")
    g.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.mode == "plot":
        out = Path(args.out)
        plot(json.loads((out / "results.json").read_text()), out / "site_curve.png")
        return 0
    torch.manual_seed(0)
    (run_select if args.mode == "select" else run_test)(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
