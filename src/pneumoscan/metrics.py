"""Pure functions from (labels, probabilities) to the figures clinicians and ML engineers read.

Inputs are numpy arrays: ``y`` 0/1 (1 = pneumonia), ``p`` probability of pneumonia. Built on scikit-learn.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
from sklearn import metrics as skm

from .data.layout import CLASSES


@dataclass(frozen=True)
class OperatingPoint:
    threshold: float
    accuracy: float
    sensitivity: float  # pneumonia recall
    specificity: float  # normal recall
    precision: float  # pneumonia positive predictive value
    npv: float
    f1: float
    tn: int
    fp: int
    fn: int
    tp: int

    def to_dict(self) -> dict:
        return asdict(self)


def _ratio(a: int, b: int) -> float:
    return float(a) / b if b else float("nan")


def decide(p: np.ndarray, threshold: float) -> np.ndarray:
    """The decision rule used everywhere: pneumonia when p >= threshold."""
    return (np.asarray(p) >= threshold).astype(int)


def operating_point(y: np.ndarray, p: np.ndarray, threshold: float) -> OperatingPoint:
    pred = decide(p, threshold)
    tn, fp, fn, tp = (int(v) for v in skm.confusion_matrix(y, pred, labels=[0, 1]).ravel())
    precision = _ratio(tp, tp + fp)
    sensitivity = _ratio(tp, tp + fn)
    f1 = 2 * precision * sensitivity / (precision + sensitivity) if precision + sensitivity > 0 else 0.0
    return OperatingPoint(float(threshold), _ratio(tp + tn, len(y)), sensitivity, _ratio(tn, tn + fp), precision,
                          _ratio(tn, tn + fn), f1, tn, fp, fn, tp)


def roc_auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(skm.roc_auc_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def pr_auc(y: np.ndarray, p: np.ndarray) -> float:
    return float(skm.average_precision_score(y, p)) if len(np.unique(y)) == 2 else float("nan")


def classification_report(y: np.ndarray, p: np.ndarray, threshold: float) -> str:
    """The familiar scikit-learn text report (precision/recall/F1/support, accuracy, macro/weighted avg)."""
    return skm.classification_report(y, decide(p, threshold), labels=[0, 1], target_names=list(CLASSES),
                                     digits=3, zero_division=0)


def expected_calibration_error(y: np.ndarray, p: np.ndarray, bins: int = 15) -> float:
    """ECE of the pneumonia probability over equal-width bins (weighted mean |accuracy - confidence|)."""
    y = np.asarray(y, dtype=float)
    p = np.asarray(p, dtype=float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        mask = index == b
        if mask.any():
            ece += mask.mean() * abs(y[mask].mean() - p[mask].mean())
    return float(ece)


# --- 95% confidence intervals ---------------------------------------------------------------------------------------
# 624 test images cannot separate two models 0.003 AUC apart: every reported figure carries its interval. Rates at
# an operating point are binomial proportions (exact Clopper-Pearson). AUC, PR AUC and ECE have no closed form, so
# they are bootstrapped; the resampling unit is the patient, because one patient's images are not independent.
CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 1000


def clopper_pearson(k: int, n: int, confidence: float = CONFIDENCE) -> tuple[float, float]:
    """Exact two-sided interval for a binomial proportion k / n; (nan, nan) when n is 0."""
    from scipy import stats

    if n <= 0:
        return float("nan"), float("nan")
    alpha = 1.0 - confidence
    lower = 0.0 if k <= 0 else float(stats.beta.ppf(alpha / 2, k, n - k + 1))
    upper = 1.0 if k >= n else float(stats.beta.ppf(1 - alpha / 2, k + 1, n - k))
    return lower, upper


def bootstrap_weights(groups, n: int, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> np.ndarray:
    """(resamples, n) image weights of a bootstrap by group: each resample draws as many groups as there are,
    with replacement, and an image counts as often as its group was drawn. ``groups`` None: by image."""
    ids = np.arange(n) if groups is None else np.unique(np.asarray(groups), return_inverse=True)[1].ravel()
    n_groups = int(ids.max()) + 1 if n else 0
    rng = np.random.default_rng(seed)
    drawn = rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=resamples) if n_groups else \
        np.zeros((resamples, 0))
    return drawn[:, ids].astype(np.float64)


def weighted_auc(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC (ties count one half) of each row of image weights (R, N): the Mann-Whitney statistic with every
    image counted ``weight`` times; nan where a row has no positive or no negative."""
    values, index = np.unique(np.asarray(p, dtype=np.float64), return_inverse=True)
    y = np.asarray(y).astype(bool)
    pos = _by_value(weights * y, index.ravel(), len(values))
    neg = _by_value(weights * ~y, index.ravel(), len(values))
    below = np.cumsum(neg, axis=1) - neg
    total = pos.sum(1) * neg.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, (pos * (below + 0.5 * neg)).sum(1) / total, np.nan)


def weighted_average_precision(y: np.ndarray, p: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Average precision (scikit-learn's PR AUC: sum of recall steps times precision) of each row of weights."""
    values, index = np.unique(np.asarray(p, dtype=np.float64), return_inverse=True)
    y = np.asarray(y).astype(bool)
    pos = _by_value(weights * y, index.ravel(), len(values))[:, ::-1]  # descending thresholds
    neg = _by_value(weights * ~y, index.ravel(), len(values))[:, ::-1]
    tp, fp = np.cumsum(pos, axis=1), np.cumsum(neg, axis=1)
    total = tp[:, -1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        precision = np.where(tp + fp > 0, tp / (tp + fp), 0.0)
        ap = (pos / total * precision).sum(1)
        return np.where((total[:, 0] > 0) & (fp[:, -1] > 0), ap, np.nan)


def weighted_ece(y: np.ndarray, p: np.ndarray, weights: np.ndarray, bins: int = 15) -> np.ndarray:
    """``expected_calibration_error`` of each row of weights: sum over bins of |sum w y - sum w p| / sum w."""
    p = np.asarray(p, dtype=np.float64)
    index = np.clip(np.digitize(p, np.linspace(0.0, 1.0, bins + 1)[1:-1]), 0, bins - 1)
    gap = _by_value(weights * (np.asarray(y, dtype=np.float64) - p), index, bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.abs(gap).sum(1) / weights.sum(1)


def _by_value(weights: np.ndarray, index: np.ndarray, size: int) -> np.ndarray:
    """(R, N) per-image weights summed into (R, size) bins by ``index``."""
    out = np.zeros((weights.shape[0], size))
    np.add.at(out.T, index, weights.T)
    return out


def percentile_interval(values: np.ndarray, confidence: float = CONFIDENCE) -> tuple[float, float]:
    values = np.asarray(values)[np.isfinite(values)]
    if not len(values):
        return float("nan"), float("nan")
    alpha = 1.0 - confidence
    return float(np.quantile(values, alpha / 2)), float(np.quantile(values, 1 - alpha / 2))


def point_intervals(point: OperatingPoint, confidence: float = CONFIDENCE) -> dict[str, tuple[float, float]]:
    """Clopper-Pearson intervals of an operating point's sensitivity, specificity and accuracy."""
    return {"sensitivity": clopper_pearson(point.tp, point.tp + point.fn, confidence),
            "specificity": clopper_pearson(point.tn, point.tn + point.fp, confidence),
            "accuracy": clopper_pearson(point.tp + point.tn, point.tp + point.tn + point.fp + point.fn, confidence)}


def confidence_intervals(y: np.ndarray, p: np.ndarray, groups, points: dict[str, OperatingPoint], *,
                         resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE,
                         seed: int = 0) -> dict:
    """Every figure's interval: {"auc", "pr_auc", "ece": (lo, hi) by patient bootstrap, <operating point>:
    {"sensitivity", "specificity", "accuracy": (lo, hi) Clopper-Pearson}, "confidence", "resamples",
    "groups": the number of patients resampled}."""
    weights = bootstrap_weights(groups, len(y), resamples=resamples, seed=seed)
    out: dict = {
        "confidence": confidence, "resamples": resamples,
        "groups": int(len(np.unique(np.asarray(groups)))) if groups is not None else int(len(y)),
        "auc": percentile_interval(weighted_auc(y, p, weights), confidence),
        "pr_auc": percentile_interval(weighted_average_precision(y, p, weights), confidence),
        "ece": percentile_interval(weighted_ece(y, p, weights), confidence),
    }
    for name, point in points.items():
        out[name] = point_intervals(point, confidence)
    return out
