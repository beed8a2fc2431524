"""What is chosen after training, on validation only: a temperature and two operating thresholds.

Thresholds live in calibrated-probability space (temperature scaling keeps the ranking, so AUC is unchanged).
The scores they are fitted on come through the screening stage (``stage_scores``), so training, the export check
and adapt fit on the numbers every route computes.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy import optimize, stats

from . import pipeline
from .constants import BATCH_SIZE


def stage_scores(model, images: np.ndarray | torch.Tensor, names: Sequence[str] | None = None, *,
                 batch_size: int = BATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor, list[pipeline.Screened]]:
    """(logits (N, 2), features (N, D), the stage's results) of uint8 network inputs (N, S, S) that already
    passed the image checks (training's caches, a site's kept images): ``pipeline.from_array`` items through
    ``pipeline.decide`` a batch at a time, so they are scored by the arithmetic every route uses (the
    BatchNorm-folded float32 copy, or the record's bfloat16)."""
    images = np.asarray(images)
    names = [str(i) for i in range(len(images))] if names is None else list(names)
    op = ("custom", 0.5)  # fitting needs the scores, not a decision
    results: list[pipeline.Screened] = []
    for start in range(0, len(images), batch_size):
        items = [pipeline.from_array(name, image)
                 for name, image in zip(names[start:start + batch_size], images[start:start + batch_size],
                                        strict=True)]
        results += pipeline.decide(model, items, op)
    if not results:
        return torch.zeros((0, 2)), torch.zeros((0, 0)), []
    return torch.stack([r.logits for r in results]), torch.stack([r.features for r in results]), results


def softmax_pneumonia(logits: np.ndarray, temperature: float = 1.0, bias: float = 0.0) -> np.ndarray:
    """Probability of class 1 from (N, 2) logits: sigmoid((z1 - z0) / temperature + bias).

    With bias 0 this is the softmax at that temperature.
    """
    z = torch.as_tensor(logits, dtype=torch.float64)
    return torch.sigmoid((z[:, 1] - z[:, 0]) / temperature + bias).numpy()


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature minimising validation negative log-likelihood (Guo et al. 2017)."""
    logits_t = torch.as_tensor(logits, dtype=torch.float64)
    y_t = torch.as_tensor(y, dtype=torch.long)

    def nll(log_t: float) -> float:
        return float(torch.nn.functional.cross_entropy(logits_t / np.exp(log_t), y_t))

    result = optimize.minimize_scalar(nll, bounds=(np.log(0.05), np.log(20.0)), method="bounded")
    return float(np.exp(result.x))


def fit_calibration(logits: np.ndarray, y: np.ndarray, *, smoothed: bool = False) -> tuple[float, float]:
    """(temperature, bias) minimising validation NLL of sigmoid((z1 - z0) / T + b): Platt scaling.

    A temperature alone cannot move probabilities up or down as a whole; the bias can, and it is needed because
    training draws both classes equally often (balanced sampler) while real data is not balanced. Both are
    monotonic, so AUC and the decisions at validation-chosen thresholds are unchanged.

    ``smoothed``: Platt's (1999) targets, (N+ + 1) / (N+ + 2) for positives and 1 / (N- + 2) for negatives, instead
    of 1 and 0. A few hundred scores that happen to separate perfectly (a fine-tuned site model's) would otherwise
    drive the temperature to its bound and every probability to 0 or 1.
    """
    z = torch.as_tensor(logits, dtype=torch.float64)
    margin = (z[:, 1] - z[:, 0]).numpy()
    target = np.asarray(y, dtype=np.float64)
    if smoothed:
        positives, negatives = target.sum(), len(target) - target.sum()
        target = np.where(target > 0.5, (positives + 1) / (positives + 2), 1 / (negatives + 2))

    def nll(params: np.ndarray) -> float:
        s = margin / np.exp(params[0]) + params[1]
        return float(np.mean(np.logaddexp(0.0, s) - target * s))

    result = optimize.minimize(nll, x0=np.zeros(2), method="Nelder-Mead", options={"xatol": 1e-6, "fatol": 1e-9})
    log_t, bias = result.x
    bounded = float(np.clip(log_t, np.log(0.05), np.log(20.0)))
    if bounded != log_t:  # perfectly separated validation runs T to 0; the bias must fit the temperature kept
        bias = optimize.minimize_scalar(lambda b: nll(np.array([bounded, b])), bounds=(-1e3, 1e3),
                                        method="bounded").x
    return float(np.exp(bounded)), float(bias)


def prior_shift(fitted_prevalence: float, prevalence: float) -> float:
    """Log-odds to add so calibrated probabilities fitted at one pneumonia prevalence hold at another.

    For a calibrated posterior, a change of class priors multiplies the posterior odds by the ratio of the prior
    odds (Saerens et al. 2002), so only the intercept moves: decisions at thresholds moved the same way, and the
    ranking, are unchanged.
    """
    for name, value in (("prevalence", prevalence), ("fitted prevalence", fitted_prevalence)):
        if not 0.0 < value < 1.0:
            raise ValueError(f"{name} must be strictly between 0 and 1, got {value}")
    return float(np.log(prevalence / (1 - prevalence)) - np.log(fitted_prevalence / (1 - fitted_prevalence)))


def prior_estimate(p: np.ndarray, fitted: float) -> float:
    """The pneumonia share of unlabelled images from their calibrated probabilities ``p``, fitted at share
    ``fitted`` (Saerens et al. 2002): the share s maximising the likelihood prod(s * a + (1 - s) * b), with
    a = p / fitted and b = (1 - p) / (1 - fitted). Saerens' EM (re-weight the posteriors by the prior ratio,
    average, repeat) stops where the likelihood's slope sum((a - b) / (s * a + (1 - s) * b)) is zero, so the
    root of that slope is EM's answer, found in a few steps where EM can take hundreds near 0 or 1. Computed
    here for every caller: the drift monitor's window share, and adapt's re-basing (its EM has this fixed point).

    Probabilities are kept 1e-9 from 0 and 1 (one certain answer cannot pin the share) and the share within
    [1e-6, 1 - 1e-6] (the likelihood's maximum is an end when the slope keeps one sign); NaN for no images.
    """
    if not 0.0 < fitted < 1.0:
        raise ValueError(f"fitted prevalence must be strictly between 0 and 1, got {fitted}")
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
    if len(p) == 0:
        return float("nan")
    a, b = p / fitted, (1 - p) / (1 - fitted)

    def slope(share: float) -> float:
        return float(np.sum((a - b) / (share * a + (1 - share) * b)))

    low_end, high_end = 1e-6, 1 - 1e-6
    if slope(low_end) <= 0:
        return low_end
    if slope(high_end) >= 0:
        return high_end
    return float(optimize.brentq(slope, low_end, high_end, xtol=1e-9))


def screening_threshold(y: np.ndarray, p: np.ndarray, target_sensitivity: float, confidence: float = 0.95) -> float:
    """The highest threshold whose sensitivity is >= target with ``confidence`` (one-sided Clopper-Pearson).

    Taking the plain empirical threshold reproduces the validation sensitivity only on average; on the shifted
    Kermany test set it fell from 98% to 94%. Requiring the lower confidence bound to reach the target leaves a
    margin that shrinks as the validation set grows.
    """
    positives = np.sort(np.asarray(p)[np.asarray(y) == 1])
    n = len(positives)
    if n == 0:
        raise ValueError("validation has no pneumonia cases; cannot choose a screening threshold")
    misses = 0  # positives allowed below the threshold
    for k in range(n):
        lower = stats.beta.ppf(1 - confidence, n - k, k + 1) if k < n else 0.0
        if lower < target_sensitivity:
            break
        misses = k
    # Decision is p >= threshold: put the threshold at the (misses)-th lowest positive score.
    return float(positives[misses])


def balanced_threshold(y: np.ndarray, p: np.ndarray) -> float:
    """Youden's J: the threshold maximising sensitivity + specificity - 1."""
    from sklearn.metrics import roc_curve  # training-side only: monitoring and screening do not load it

    fpr, tpr, thresholds = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    return float(min(thresholds[best], 1.0))


def fit_decision_rule(logits: np.ndarray, y: np.ndarray, target_sensitivity: float,
                      confidence: float = 0.95, *, smoothed: bool = False) -> tuple[float, float, dict[str, float]]:
    """(temperature, bias, {"screening", "balanced"} thresholds) fitted on validation logits: everything a model
    file stores to turn logits into decisions, for one network or an ensemble's averaged log-odds. ``smoothed``:
    see ``fit_calibration``."""
    temperature, bias = fit_calibration(logits, y, smoothed=smoothed)
    p = softmax_pneumonia(logits, temperature, bias)
    thresholds = {"screening": screening_threshold(y, p, target_sensitivity, confidence),
                  "balanced": balanced_threshold(y, p)}
    return temperature, bias, thresholds
