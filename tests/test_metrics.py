"""metrics.py against scikit-learn, and calibrate.py on synthetic data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, f1_score, precision_score, recall_score

from pneumoscan.calibrate import balanced_threshold, fit_temperature, screening_threshold, softmax_pneumonia
from pneumoscan.metrics import (
    classification_report,
    decide,
    expected_calibration_error,
    operating_point,
    pr_auc,
    roc_auc,
)


def scores(n: int = 2000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    p = np.clip(rng.normal(0.35 + 0.3 * y, 0.2), 0, 1)
    return y, p


@pytest.mark.parametrize("threshold", [0.1, 0.5, 0.62, 0.9])
def test_operating_point_counts_and_rates_match_sklearn(threshold):
    y, p = scores()
    pt = operating_point(y, p, threshold)
    pred = (p >= threshold).astype(int)
    assert [pt.tn, pt.fp, pt.fn, pt.tp] == confusion_matrix(y, pred).ravel().tolist()
    assert pt.sensitivity == pytest.approx(recall_score(y, pred))
    assert pt.specificity == pytest.approx(recall_score(1 - y, 1 - pred))
    assert pt.precision == pytest.approx(precision_score(y, pred))
    assert pt.f1 == pytest.approx(f1_score(y, pred))
    assert pt.accuracy == pytest.approx(np.mean(pred == y))


def test_decision_is_pneumonia_at_exactly_the_threshold():
    assert decide(np.array([0.49, 0.5, 0.51]), 0.5).tolist() == [0, 1, 1]


def test_ece_of_perfectly_calibrated_data_is_near_zero():
    rng = np.random.default_rng(1)
    p = rng.uniform(0, 1, 200_000)
    y = (rng.uniform(0, 1, p.size) < p).astype(int)  # P(y=1 | p) = p by construction
    assert expected_calibration_error(y, p) < 0.01
    assert expected_calibration_error(y, np.clip(p + 0.2, 0, 1)) > 0.1  # and it does see miscalibration


def test_classification_report_names_classes_and_figures():
    y, p = scores()
    text = classification_report(y, p, 0.5)
    for word in ("NORMAL", "PNEUMONIA", "precision", "recall", "f1-score", "support", "accuracy", "macro avg"):
        assert word in text
    recall = recall_score(y, p >= 0.5)
    assert f"{recall:.3f}" in text.splitlines()[3]  # the PNEUMONIA row


def logits_at_temperature(t: float, n: int = 20_000, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose true probabilities are softmax(logits / t): the fitted temperature must be t."""
    rng = np.random.default_rng(seed)
    margin = rng.normal(0, 3, n)
    logits = np.stack([np.zeros(n), margin], axis=1)
    y = (rng.uniform(0, 1, n) < softmax_pneumonia(logits, t)).astype(int)
    return logits, y


@pytest.mark.parametrize("t", [0.5, 1.0, 2.5])
def test_fit_temperature_recovers_a_known_temperature(t):
    logits, y = logits_at_temperature(t)
    assert fit_temperature(logits, y) == pytest.approx(t, rel=0.08)


def test_screening_threshold_reaches_target_sensitivity_and_is_conservative():
    y, p = scores(4000, seed=3)
    t = screening_threshold(y, p, target_sensitivity=0.95, confidence=0.95)
    sens = operating_point(y, p, t).sensitivity
    assert sens >= 0.95
    positives = np.sort(p[y == 1])
    empirical = positives[int(np.floor(0.05 * len(positives)))]  # the plain 95%-sensitivity threshold
    assert t <= empirical  # the confidence bound only ever lowers the threshold
    # on fresh data from the same distribution the target still holds
    y2, p2 = scores(4000, seed=4)
    assert operating_point(y2, p2, t).sensitivity >= 0.94


def test_screening_threshold_without_positives_is_an_error():
    with pytest.raises(ValueError, match="no pneumonia cases"):
        screening_threshold(np.zeros(5, int), np.linspace(0, 1, 5), 0.98)


def test_balanced_threshold_maximises_youden_j():
    y, p = scores()
    t = balanced_threshold(y, p)
    j = lambda thr: operating_point(y, p, thr).sensitivity + operating_point(y, p, thr).specificity - 1  # noqa: E731
    grid = np.unique(p)
    assert j(t) == pytest.approx(max(j(g) for g in grid[:: max(1, len(grid) // 400)]), abs=0.01)
    assert 0.4 < t < 0.6  # the two score distributions cross at 0.5


def test_prior_shift_moves_the_odds_by_the_ratio_of_prior_odds():
    from pneumoscan.calibrate import prior_shift

    assert prior_shift(0.75, 0.75) == 0.0
    assert math.exp(prior_shift(0.75, 0.25)) == pytest.approx((0.25 / 0.75) / (0.75 / 0.25))
    for bad in (0.0, 1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="prevalence must be strictly between 0 and 1"):
            prior_shift(0.75, bad)


# --- 95% confidence intervals ---------------------------------------------------------------------------------------

def test_clopper_pearson_matches_known_values_and_edges():
    from pneumoscan.metrics import clopper_pearson

    low, high = clopper_pearson(5, 10)
    assert (low, high) == pytest.approx((0.187086, 0.812914), abs=1e-6)  # standard table value
    assert clopper_pearson(0, 10) == pytest.approx((0.0, 1 - 0.025 ** 0.1))
    assert clopper_pearson(10, 10) == pytest.approx((0.025 ** 0.1, 1.0))
    assert all(math.isnan(v) for v in clopper_pearson(0, 0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_weighted_statistics_equal_sklearn_on_the_resample_they_stand_for(seed):
    from sklearn.metrics import average_precision_score, roc_auc_score

    from pneumoscan.metrics import (
        bootstrap_weights,
        weighted_auc,
        weighted_average_precision,
        weighted_ece,
    )

    y, p = scores(300, seed)
    p = np.round(p, 2)  # ties, as real probabilities have
    groups = np.random.default_rng(seed).integers(0, 120, len(y))
    weights = bootstrap_weights(groups, len(y), resamples=4, seed=seed)
    for w in weights:
        # every member of a drawn patient counts as often as the patient was drawn
        assert all(len(set(w[groups == g])) == 1 for g in np.unique(groups))
        take = np.repeat(np.arange(len(y)), w.astype(int))
        assert weighted_auc(y, p, w[None])[0] == pytest.approx(roc_auc_score(y[take], p[take]))
        assert weighted_average_precision(y, p, w[None])[0] == pytest.approx(average_precision_score(y[take], p[take]))
        assert weighted_ece(y, p, w[None])[0] == pytest.approx(expected_calibration_error(y[take], p[take]))


def test_patient_bootstrap_is_wider_than_image_bootstrap_when_patients_repeat_images():
    from pneumoscan.metrics import confidence_intervals

    y, p = scores(200, 3)
    # every patient has five identical images: the information is that of 200 images, not 1000
    y5, p5, groups = np.repeat(y, 5), np.repeat(p, 5), np.repeat(np.arange(200), 5)
    by_patient = confidence_intervals(y5, p5, groups, {})
    by_image = confidence_intervals(y5, p5, None, {})
    width = {k: v["auc"][1] - v["auc"][0] for k, v in (("patient", by_patient), ("image", by_image))}
    assert width["patient"] > 1.6 * width["image"]
    assert by_patient["groups"] == 200 and by_image["groups"] == 1000
    low, high = by_patient["auc"]
    assert low < roc_auc(y5, p5) < high


def test_confidence_intervals_cover_every_figure_and_are_reproducible():
    from pneumoscan.metrics import confidence_intervals

    y, p = scores(400, 4)
    points = {"screening": operating_point(y, p, 0.3), "balanced": operating_point(y, p, 0.5)}
    ci = confidence_intervals(y, p, np.arange(len(y)) // 2, points)
    assert ci == confidence_intervals(y, p, np.arange(len(y)) // 2, points)  # seeded
    for key, value in (("auc", roc_auc(y, p)), ("pr_auc", pr_auc(y, p)), ("ece", expected_calibration_error(y, p))):
        assert ci[key][0] <= value <= ci[key][1], key
    for name, point in points.items():
        for figure in ("sensitivity", "specificity", "accuracy"):
            low, high = ci[name][figure]
            assert 0 <= low <= getattr(point, figure) <= high <= 1


def test_true_auc_is_covered_about_95_percent_of_the_time():
    """Coverage of the patient bootstrap on 60 simulated studies whose population AUC is known (binormal)."""
    from scipy.stats import norm

    from pneumoscan.metrics import confidence_intervals

    true_auc = norm.cdf(1.0 / np.sqrt(2))  # positives N(1, 1), negatives N(0, 1)
    hits = 0
    for seed in range(60):
        rng = np.random.default_rng(100 + seed)
        y = rng.integers(0, 2, 150)
        p = 1 / (1 + np.exp(-(rng.normal(0, 1, 150) + y)))
        low, high = confidence_intervals(y, p, None, {}, resamples=300, seed=seed)["auc"]
        hits += low <= true_auc <= high
    assert 50 <= hits <= 60  # 57 expected; binomial spread at 60 trials
