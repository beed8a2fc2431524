"""Issue 26's evaluation of ``pneumoscan monitor``: false alarms on in-distribution streams, time to alarm under
simulated drifts and on the official test split, and whether the drift score tracks the damage.

Every setting is fixed in docs/experiments.md ("Drift monitoring without labels"), written before any stream was
scored; its second run (the threshold simulated at the references' effective sizes by patient, judged on new
patient halves) by the rule at that section's end. Each stream is screened once through the stage
(``pipeline.prepare`` + ``pipeline.decide``, or ``pipeline.screen`` for files) and its results cached under
``--cache``; a re-run only re-judges.

    python benchmarks/drift.py --data ../shared/data/chest_xray --out docs/results/drift
    python benchmarks/drift.py --diagnose   # patients and each figure's design effect, from the cached results
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import sys
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from pneumoscan import monitor, pipeline
from pneumoscan.data.images import DecodedImage, decode
from pneumoscan.data.layout import list_split, patient_id
from pneumoscan.metrics import expected_calibration_error, roc_auc
from pneumoscan.monitor.statistics import _finite
from pneumoscan.predict import load_model
from pneumoscan.run import RunFolder

ROOT = Path(__file__).resolve().parent.parent
RUN = ROOT / "docs" / "results" / "default_run"
WINDOW = 100
RATE = 0.01
DRIFT_IMAGES = 300
RESAMPLED_WINDOWS = 2000
NEW_HALVES = (1, 2, 3)  # StratifiedGroupKFold random states of the second run's streams (not chosen on)
BATCH = 32


# --- the drifts, on decoded pixels in [0, 1] ---------------------------------------------------------------------------

def _contrast(x: np.ndarray, factor: float) -> np.ndarray:
    return np.clip(x.mean() + factor * (x - x.mean()), 0, 1)


def _blur(x: np.ndarray, sigma: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    return gaussian_filter(x, sigma)


def _noise(x: np.ndarray, sigma: float, seed: int) -> np.ndarray:
    return np.clip(x + np.random.default_rng(seed).normal(0, sigma, x.shape), 0, 1)


def _resize(x: np.ndarray, factor: float) -> np.ndarray:
    from PIL import Image

    h, w = x.shape
    small = Image.fromarray((x * 255).round().astype(np.uint8)).resize(
        (max(1, round(w * factor)), max(1, round(h * factor))), Image.BILINEAR)
    return np.asarray(small, dtype=np.float32) / 255.0


def _jpeg(x: np.ndarray, quality: int) -> np.ndarray:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray((x * 255).round().astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return np.asarray(Image.open(io.BytesIO(buffer.getvalue())).convert("L"), dtype=np.float32) / 255.0


def _rotate(x: np.ndarray, degrees: float) -> np.ndarray:
    from PIL import Image

    image = Image.fromarray((x * 255).round().astype(np.uint8)).rotate(degrees, resample=Image.BILINEAR, fillcolor=0)
    return np.asarray(image, dtype=np.float32) / 255.0


def _pad(x: np.ndarray, keep: float) -> np.ndarray:
    h, w = x.shape
    inner = _resize(x, keep)
    out = np.zeros_like(x)
    top, left = (h - inner.shape[0]) // 2, (w - inner.shape[1]) // 2
    out[top:top + inner.shape[0], left:left + inner.shape[1]] = inner
    return out


DRIFTS = {
    "gamma 0.67": lambda x, i: x ** 0.67,
    "gamma 1.5": lambda x, i: x ** 1.5,
    "contrast 0.7": lambda x, i: _contrast(x, 0.7),
    "contrast 1.3": lambda x, i: _contrast(x, 1.3),
    "blur sigma 1.2": lambda x, i: _blur(x, 1.2),
    "blur sigma 2.5": lambda x, i: _blur(x, 2.5),
    "noise 8/255": lambda x, i: _noise(x, 8 / 255, i),
    "noise 20/255": lambda x, i: _noise(x, 20 / 255, i),
    "half resolution": lambda x, i: _resize(x, 0.5),
    "quarter resolution": lambda x, i: _resize(x, 0.25),
    "JPEG quality 25": lambda x, i: _jpeg(x, 25),
    "JPEG quality 10": lambda x, i: _jpeg(x, 10),
    "rotated 10 degrees": lambda x, i: _rotate(x, 10),
    "rotated 90 degrees": lambda x, i: _rotate(x, 90),
    "padded to 70%": lambda x, i: _pad(x, 0.7),
    "MONOCHROME1 not inverted": lambda x, i: 1.0 - x,
}
MIX_SHARES = (0.05, 0.10, 0.25)
PREVALENCES = (0.20, 0.95)


def drifted(image: DecodedImage, op, index: int) -> DecodedImage:
    """The decoded image with its pixels changed, as a route would have received it."""
    data = np.clip(op(image.pixels.astype(np.float64), index), 0, 1).astype(np.float32)
    as8 = (data * 255).round().astype(np.uint8)
    return replace(image, data=as8, width=as8.shape[1], height=as8.shape[0])


def non_xray_images(count: int = 40, seed: int = 0) -> list[DecodedImage]:
    """Seeded random crops (60-100% of the side) of the photographs and maps matplotlib ships as sample data."""
    import matplotlib.cbook as cbook
    from PIL import Image

    with cbook.get_sample_data("grace_hopper.jpg") as f:
        photo = np.asarray(Image.open(f).convert("RGB"), dtype=np.float32) / 255.0
    maps = []
    for name, key in (("topobathy.npz", "topo"), ("jacksboro_fault_dem.npz", "elevation")):
        z = np.asarray(cbook.get_sample_data(name)[key], dtype=np.float32)  # an NpzFile already
        maps.append((z - z.min()) / (z.max() - z.min()))
    sources = [("photo colour", photo), ("photo gray", photo.mean(axis=2)), ("map", maps[0]), ("map", maps[1])]
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        kind, array = sources[i % len(sources)]
        h, w = array.shape[:2]
        side = rng.uniform(0.6, 1.0)
        ch, cw = int(h * side), int(w * side)
        top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        crop = (array[top:top + ch, left:left + cw] * 255).round().astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(crop).save(buffer, "JPEG", quality=95)  # the format of the stream it joins
        out.append(decode(buffer.getvalue(), name=f"non-xray-{i}-{kind}"))
    return out


# --- scoring, cached -------------------------------------------------------------------------------------------------

class Cache:
    def __init__(self, folder: Path, model):
        self.folder = folder / model.sha256[:12]
        self.folder.mkdir(parents=True, exist_ok=True)

    def get(self, name: str, key: str, compute):
        path = self.folder / f"{hashlib.sha256((name + key).encode()).hexdigest()[:16]}.json"
        if path.is_file():
            return json.loads(path.read_text())
        started = time.perf_counter()
        value = compute()
        print(f"  scored {name}: {len(value)} images in {time.perf_counter() - started:.0f} s", file=sys.stderr)
        path.write_text(json.dumps(value))
        return value


def score_decoded(model, images: list[DecodedImage]) -> list[dict]:
    """The facts of decoded images through the whole stage (checks, network, guard, threshold)."""
    op = model.resolve_threshold("screening")
    facts = []
    for start in range(0, len(images), BATCH):
        items = [pipeline.prepare(model, image, image.name) for image in images[start:start + BATCH]]
        facts += [s.facts() for s in pipeline.decide(model, items, op)]
    return facts


def score_files(model, paths: list[str]) -> list[dict]:
    return [s.facts() for s in pipeline.screen(model, paths, batch_size=BATCH)]


# --- figures of a stream ------------------------------------------------------------------------------------------------

def damage_figures(facts: list[dict], labels: list[int]) -> dict:
    """AUC and ECE of the model on the labelled images it answered (the monitor never sees these)."""
    pairs = [(f["probability"], y) for f, y in zip(facts, labels, strict=True) if y is not None and f["status"] == "ok"]
    if not pairs:
        return {"auc": math.nan, "ece": math.nan, "answered": 0}
    p, y = np.array([a for a, _ in pairs]), np.array([b for _, b in pairs])
    return {"auc": roc_auc(y, p), "ece": expected_calibration_error(y, p), "answered": len(pairs)}


def judge_stream(facts: list[dict], ref: monitor.Reference, null: monitor.NullModel) -> dict:
    rows = [monitor.normalise(f) for f in facts]
    report = monitor.monitor(rows, ref, size=WINDOW, null=null, false_alarm_rate=RATE)
    first = next((w for w in report.windows if w.alarm), None)
    scores = [w.score for w in report.windows if w.score is not None]
    return {"windows": [{"label": w.label, "n": w.n, "score": w.score, "threshold": w.threshold, "alarm": w.alarm,
                         "p_values": w.p_values, "pneumonia_share": w.pneumonia_share,
                         "rejected": w.rejection["any"][0]} for w in report.windows],
            "images_until_alarm": int(first.label.split("-")[1]) if first else None,
            "mean_score": float(np.mean(scores)) if scores else math.nan}


def resampled_false_alarms(facts: list[dict], ref, null, seed: int) -> dict:
    rows = [monitor.normalise(f) for f in facts]
    rng = np.random.default_rng(seed)
    samples = {k: ref.sample(k) for k in monitor.CONTINUOUS}
    share = ref.share()
    threshold = null.threshold(WINDOW)
    alarms = 0
    by_test: dict[str, int] = {}  # the test with the smallest p in each alarming window
    for _ in range(RESAMPLED_WINDOWS):
        pick = rng.choice(len(rows), size=WINDOW, replace=False)
        w = monitor.judge([rows[i] for i in pick], ref, threshold=threshold, reference_samples=samples,
                          reference_share=share, intervals=False)
        alarms += w.alarm
        if w.alarm:
            test = min(w.p_values, key=w.p_values.get)
            by_test[test] = by_test.get(test, 0) + 1
    whole = monitor.judge(rows, ref, intervals=False)  # all of the stream's half against the reference at once
    from scipy import stats

    ci = stats.binomtest(alarms, RESAMPLED_WINDOWS).proportion_ci(0.95, method="exact")
    return {"windows": RESAMPLED_WINDOWS, "alarms": alarms, "rate": alarms / RESAMPLED_WINDOWS,
            "ci": [float(ci.low), float(ci.high)], "alarms_by_test": by_test, "whole_half_p_values": whole.p_values}


def halves(samples, random_state: int = 0) -> tuple[list[int], list[int]]:
    """(half A, half B) by patient: the first fold's test part is half B."""
    from sklearn.model_selection import StratifiedGroupKFold

    labels = np.array([s.label for s in samples])
    groups = [s.patient for s in samples]
    _, second = next(StratifiedGroupKFold(n_splits=2, shuffle=True, random_state=random_state).split(
        np.zeros(len(labels)), labels, groups))
    b = set(second.tolist())
    return [i for i in range(len(samples)) if i not in b], sorted(b)


def independent(ref: monitor.Reference) -> monitor.Reference:
    """The reference as the first run judged it: its images counted as independent (no patients known)."""
    return replace(ref, patients=None, effective=None)


def false_alarm_pair(clean, samples, reference: list[int], stream: list[int], seed: int, prior: float,
                     what: str) -> dict:
    """2000 windows from ``stream`` against the reference of ``reference`` (with its patients), under the rule
    (effective sizes) and, on the same windows, as the first run judged them (independent images)."""
    ref = monitor.build_reference([clean[i] for i in reference], prior=prior,
                                  patients=[samples[i].patient for i in reference], source=what)
    rows = [clean[i] for i in stream]
    return {"reference_images": len(reference), "reference_patients": ref.patients, "effective": ref.effective,
            "stream_images": len(stream), "seed": seed,
            "threshold": monitor.NullModel(ref, false_alarm_rate=RATE).threshold(WINDOW),
            "threshold_independent": monitor.NullModel(independent(ref), false_alarm_rate=RATE).threshold(WINDOW),
            "rule": resampled_false_alarms(rows, ref, monitor.NullModel(ref, false_alarm_rate=RATE), seed),
            "independent": resampled_false_alarms(rows, independent(ref),
                                                  monitor.NullModel(independent(ref), false_alarm_rate=RATE), seed)}


def pooled(pairs: list[dict], key: str) -> dict:
    from scipy import stats

    alarms, windows = sum(p[key]["alarms"] for p in pairs), sum(p[key]["windows"] for p in pairs)
    ci = stats.binomtest(alarms, windows).proportion_ci(0.95, method="exact")
    return {"alarms": alarms, "windows": windows, "rate": alarms / windows, "ci": [float(ci.low), float(ci.high)],
            "pair_rates": [p[key]["rate"] for p in pairs]}


def diagnose(samples, clean) -> None:
    """Patients and each figure's ICC and design effect by patient, as the rule's diagnosis quotes them."""
    from pneumoscan.monitor.reference import design_effect

    half_a, half_b = halves(samples)
    for name, idx in (("all validation", list(range(len(samples)))), ("half A", half_a), ("half B", half_b)):
        ids = [samples[i].patient for i in idx]
        per = Counter(Counter(ids).values())
        print(f"{name}: {len(idx)} images of {len(set(ids))} patients; patients by images each "
              f"{dict(sorted(per.items()))}")
        for key in monitor.CONTINUOUS:
            pairs = [(clean[i][key], samples[i].patient) for i in idx if clean[i][key] is not None]
            values, groups = np.array([v for v, _ in pairs]), [g for _, g in pairs]
            m = sum(c * c for c in Counter(groups).values()) / len(groups)
            deff = design_effect(values, groups)
            icc = (deff - 1) / (m - 1) if m > 1 else 0.0
            print(f"  {key:12s} {len(values):5d} values  ICC {icc:.3f}  m {m:.2f}  design effect {deff:.2f}  "
                  f"effective size {len(values) / deff:.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray"),
                        help="Kaggle-layout folder (its test split is the real shift)")
    parser.add_argument("--out", default=str(ROOT / "docs" / "results" / "drift"))
    parser.add_argument("--cache", default="/tmp/pneumoscan-drift-cache", help="scored streams, per model")
    parser.add_argument("--no-test", action="store_true", help="leave the official test split out")
    parser.add_argument("--diagnose", action="store_true",
                        help="print the patients and each figure's design effect by patient, then stop")
    args = parser.parse_args(argv)
    started = time.perf_counter()

    model = load_model()
    cache = Cache(Path(args.cache), model)
    samples = RunFolder(RUN).split()[1]
    paths = [str(s.path) for s in samples]
    labels = [int(s.label) for s in samples]
    half_a, half_b = halves(samples)
    order_b = [half_b[i] for i in np.random.default_rng(0).permutation(len(half_b))]
    print(f"validation: {len(samples)} images; half A (reference) {len(half_a)}, half B (stream) {len(half_b)}",
          file=sys.stderr)

    clean = cache.get("validation", "|".join(paths), lambda: score_files(model, paths))
    if args.diagnose:
        diagnose(samples, clean)
        return 0
    prior = model.record.fitted_prevalence
    ref_a = monitor.build_reference([clean[i] for i in half_a], prior=prior, model_sha256=model.sha256,
                                    source=f"half A of the validation split ({len(half_a)} images)",
                                    patients=[samples[i].patient for i in half_a])
    ref_b = monitor.build_reference([clean[i] for i in half_b], prior=prior, model_sha256=model.sha256,
                                    source=f"half B of the validation split ({len(half_b)} images)",
                                    patients=[samples[i].patient for i in half_b])
    null_a = monitor.NullModel(ref_a, false_alarm_rate=RATE)
    null_b = monitor.NullModel(ref_b, false_alarm_rate=RATE)

    results: dict = {"model_sha256": model.sha256, "window": WINDOW, "false_alarm_rate": RATE,
                     "rule": "second run: the threshold simulated at the references' effective sizes by patient",
                     "threshold_window_100": null_a.threshold(WINDOW),
                     "threshold_window_100_independent": monitor.NullModel(
                         independent(ref_a), false_alarm_rate=RATE).threshold(WINDOW),
                     "reference_a": {"images": ref_a.n, "patients": ref_a.patients, "effective": ref_a.effective},
                     "streams": {}}
    # --- false alarms --------------------------------------------------------------------------------------------
    stream_b = [clean[i] for i in order_b]
    results["in_distribution_stream"] = judge_stream(stream_b, ref_a, null_a)
    # the halves that motivated the rule (random_state 0), under it
    results["false_alarms_resampled"] = resampled_false_alarms([clean[i] for i in half_b], ref_a, null_a, seed=1)
    results["false_alarms_swapped"] = resampled_false_alarms([clean[i] for i in half_a], ref_b, null_b, seed=2)
    # the streams the rule was not chosen on: new patient halves, both ways, under the rule and the first run's
    pairs = []
    for state in NEW_HALVES:
        new_a, new_b = halves(samples, state)
        for reference, stream_half, seed, way in ((new_a, new_b, 10 * state + 1, "reference A, windows from B"),
                                                   (new_b, new_a, 10 * state + 2, "reference B, windows from A")):
            pair = {"random_state": state, "way": way, **false_alarm_pair(
                clean, samples, reference, stream_half, seed, prior, f"half of random_state {state}")}
            pairs.append(pair)
            print(f"random_state {state}, {way}: rule {pair['rule']['alarms']} / independent "
                  f"{pair['independent']['alarms']} of {RESAMPLED_WINDOWS} windows alarm", file=sys.stderr)
    results["false_alarms_new_halves"] = {"pairs": pairs, "rule": pooled(pairs, "rule"),
                                          "independent": pooled(pairs, "independent")}

    # --- drifted streams -------------------------------------------------------------------------------------------
    subset = order_b[:DRIFT_IMAGES]
    sub_labels = [labels[i] for i in subset]
    base = damage_figures([clean[i] for i in subset], sub_labels)
    base_all_b = damage_figures(stream_b, [labels[i] for i in order_b])
    results["clean_subset"] = base
    results["clean_half_b"] = base_all_b
    decoded: list[DecodedImage] | None = None

    def stream(name, facts, stream_labels, baseline, extra=None):
        figures = damage_figures(facts, stream_labels)
        entry = {**judge_stream(facts, ref_a, null_a), **figures, "images": len(facts),
                 "auc_drop": baseline["auc"] - figures["auc"], "ece_rise": figures["ece"] - baseline["ece"],
                 **(extra or {})}
        entry["damage"] = max(entry["auc_drop"] / 0.02, entry["ece_rise"] / 0.05)
        entry["damaging"] = bool(entry["auc_drop"] >= 0.02 or entry["ece_rise"] >= 0.05)
        results["streams"][name] = entry
        alarm = entry["images_until_alarm"]
        print(f"{name:28s} alarm after {alarm if alarm else 'none':>5} images; mean score {entry['mean_score']:6.2f}; "
              f"AUC {figures['auc']:.4f} ({-entry['auc_drop']:+.4f}) ECE {figures['ece']:.3f} "
              f"({entry['ece_rise']:+.3f})", file=sys.stderr)

    stream("clean (first 300 of half B)", [clean[i] for i in subset], sub_labels, base)
    for name, op in DRIFTS.items():
        def compute(op=op):
            nonlocal decoded
            if decoded is None:
                decoded = [model.decode(paths[i], paths[i]) for i in subset]
            return score_decoded(model, [drifted(image, op, k) for k, image in enumerate(decoded)])
        facts = cache.get(f"drift {name}", "|".join(paths[i] for i in subset), compute)
        stream(name, facts, sub_labels, base)

    rng = np.random.default_rng(0)
    positives = [i for i in order_b if labels[i] == 1]
    negatives = [i for i in order_b if labels[i] == 0]
    for share in PREVALENCES:
        k = round(DRIFT_IMAGES * share)
        pick = list(rng.choice(positives, k)) + list(rng.choice(negatives, DRIFT_IMAGES - k))
        pick = [pick[j] for j in rng.permutation(len(pick))]
        stream(f"prevalence {share:.0%}", [clean[i] for i in pick], [labels[i] for i in pick], base)

    others = cache.get("non-xray", "matplotlib sample data v1", lambda: score_decoded(model, non_xray_images()))
    rng = np.random.default_rng(0)
    for share in MIX_SHARES:
        count = round(DRIFT_IMAGES * share)
        where = set(rng.choice(DRIFT_IMAGES, count, replace=False).tolist())
        chosen = iter(rng.choice(len(others), count, replace=len(others) < count).tolist())
        facts, mixed_labels, accepted = [], [], 0
        for j, i in enumerate(subset):
            if j in where:
                f = others[next(chosen)]
                facts.append(f)
                mixed_labels.append(None)
                accepted += f["status"] == "ok"
            else:
                facts.append(clean[i])
                mixed_labels.append(labels[i])
        stream(f"non-X-ray mix {share:.0%}", facts, mixed_labels, base,
               {"non_xray": count, "non_xray_answered_ok": accepted})
    results["non_xray_statuses"] = {s: sum(f["status"] == s for f in others) for s in pipeline.STATUSES}

    # --- the real shift ----------------------------------------------------------------------------------------------
    if not args.no_test:
        test = list_split(args.data, "test")
        order = np.random.default_rng(0).permutation(len(test))
        test_paths = [str(test[i].path) for i in order]
        facts = cache.get("test split", "|".join(test_paths), lambda: score_files(model, test_paths))
        stream("official test split", facts, [int(test[i].label) for i in order], base_all_b,
               {"patients": len({patient_id(Path(p).name) for p in test_paths})})

    # --- does the score track the damage? ------------------------------------------------------------------------
    from scipy import stats

    drifts = {k: v for k, v in results["streams"].items() if not k.startswith("clean")}
    score = [v["mean_score"] for v in drifts.values()]
    results["spearman"] = {what: float(stats.spearmanr(score, [v[what] for v in drifts.values()]).statistic)
                           for what in ("damage", "auc_drop", "ece_rise")}
    damaging = {k: v for k, v in drifts.items() if v["damaging"]}
    results["goals"] = {
        "false_alarms_at_most_1pct": results["false_alarms_new_halves"]["rule"]["rate"] <= RATE,
        "damaging_flagged_within_200": {k: bool(v["images_until_alarm"] and v["images_until_alarm"] <= 200)
                                        for k, v in damaging.items()},
        "test_split_flagged": (results["streams"].get("official test split", {}).get("images_until_alarm")
                               is not None) if not args.no_test else None,
    }
    results["seconds"] = time.perf_counter() - started
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(_finite(results), indent=1) + "\n")
    (out / "table.md").write_text(table(results))
    plot(results, out / "drift.png")
    print(table(results))
    print(f"wrote {out / 'results.json'}, {out / 'table.md'}, {out / 'drift.png'} ({results['seconds']:.0f} s)")
    return 0


def table(results: dict) -> str:
    ref = results["reference_a"]
    lines = [f"Window {results['window']} results; alarm threshold {results['threshold_window_100']:.2f} "
             f"(false-alarm rate {results['false_alarm_rate']:g}), simulated at half A's effective sizes by patient "
             f"({ref['images']} images of {ref['patients']} patients: "
             + ", ".join(f"{k} {v:g}" for k, v in ref["effective"].items())
             + f"); {results['threshold_window_100_independent']:.2f} with its images counted as independent.", "",
             "False alarms on new patient halves (the streams the rule was not chosen on), 2000 windows of 100 each:",
             "", "| random_state | pair | reference: images, patients | threshold | windows that alarm | "
             "rate [95% CI] | images independent: threshold, rate [95% CI] |", "|---:|---|---:|---:|---:|---:|---:|"]
    new = results["false_alarms_new_halves"]
    for p in new["pairs"]:
        r, i = p["rule"], p["independent"]
        lines.append(f"| {p['random_state']} | {p['way']} | {p['reference_images']}, {p['reference_patients']} | "
                     f"{p['threshold']:.2f} | {r['alarms']} | {r['rate']:.4f} [{r['ci'][0]:.4f}, {r['ci'][1]:.4f}] | "
                     f"{p['threshold_independent']:.2f}, {i['rate']:.4f} [{i['ci'][0]:.4f}, {i['ci'][1]:.4f}] |")
    r, i = new["rule"], new["independent"]
    lines += [f"| all six | pooled | | | {r['alarms']} of {r['windows']} | {r['rate']:.4f} [{r['ci'][0]:.4f}, "
              f"{r['ci'][1]:.4f}] | {i['rate']:.4f} [{i['ci'][0]:.4f}, {i['ci'][1]:.4f}] |", "",
              "The halves that motivated the rule (random_state 0), under it:", ""]
    for key, label in (("false_alarms_resampled", "reference half A, windows from half B"),
                       ("false_alarms_swapped", "reference half B, windows from half A")):
        f = results[key]
        lines.append(f"- In-distribution, {label}: {f['alarms']} of {f['windows']} windows alarm "
                     f"({f['rate']:.4f}, 95% CI {f['ci'][0]:.4f}-{f['ci'][1]:.4f}); smallest p in those windows: "
                     + ", ".join(f"{k} {v}" for k, v in sorted(f["alarms_by_test"].items(), key=lambda kv: -kv[1]))
                     + "; the whole half against the reference: "
                     + ", ".join(f"{k} p={v:.3f}" for k, v in f["whole_half_p_values"].items()) + ".")
    ind = results["in_distribution_stream"]
    lines.append(f"- In-distribution stream (all of half B in order): "
                 f"{sum(w['alarm'] for w in ind['windows'])} of {len(ind['windows'])} windows alarm; scores "
                 + ", ".join(f"{w['score']:.2f}" for w in ind["windows"] if w["score"] is not None) + ".")
    lines += ["", "| stream | images | images until alarm | scores per window | AUC (change) | ECE (change) | "
              "damage | damaging |", "|---|---:|---:|---|---:|---:|---:|---|"]
    for name, s in results["streams"].items():
        scores = " / ".join(f"{w['score']:.1f}{'*' if w['alarm'] else ''}" for w in s["windows"] if w["score"] is not None)
        lines.append(f"| {name} | {s['images']} | {s['images_until_alarm'] or 'none'} | {scores} | "
                     f"{s['auc']:.4f} ({-s['auc_drop']:+.4f}) | {s['ece']:.3f} ({s['ece_rise']:+.3f}) | "
                     f"{s['damage']:.2f} | {'yes' if s['damaging'] else 'no'} |")
    sp = results["spearman"]
    lines += ["", "\\* the window alarms.", "",
              f"Spearman rank correlation of the mean score with the damage across the {len(results['streams']) - 1} "
              f"drifted streams: {sp['damage']:.2f} (AUC drop {sp['auc_drop']:.2f}, ECE rise {sp['ece_rise']:.2f}).",
              ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    streams = {k: v for k, v in results["streams"].items() if not k.startswith("clean")}
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5.5))
    for name, s in streams.items():
        colour = "tab:red" if s["damaging"] else "tab:blue"
        left.scatter(s["damage"], s["mean_score"], color=colour)
        left.annotate(name, (s["damage"], s["mean_score"]), fontsize=6, xytext=(3, 2), textcoords="offset points")
    left.axhline(results["threshold_window_100"], color="grey", linestyle="--", label="alarm threshold")
    left.axvline(1.0, color="grey", linestyle=":", label="damage 1 (AUC -0.02 or ECE +0.05)")
    left.set_xscale("symlog", linthresh=0.5)
    left.set_yscale("symlog", linthresh=10)
    left.set_xlabel("damage: max(AUC drop / 0.02, ECE rise / 0.05)")
    left.set_ylabel("mean drift score over windows of 100")
    left.legend(fontsize=8)
    left.set_title(f"score vs damage (Spearman {results['spearman']['damage']:.2f}); red: damaging")
    names = list(streams)
    first = [s["images_until_alarm"] or 0 for s in streams.values()]
    right.barh(names, first, color=["tab:red" if s["damaging"] else "tab:blue" for s in streams.values()])
    right.axvline(200, color="grey", linestyle="--", label="goal: 200 images")
    right.set_xlabel("images until the first alarm (0: none)")
    right.tick_params(axis="y", labelsize=7)
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
