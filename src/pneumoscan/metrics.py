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
