"""``calibrate.prior_estimate``, the one estimate of a site's pneumonia share from unlabelled calibrated
probabilities (adapt's re-basing, the drift monitor's share): it is the answer of Saerens et al.'s (2002) EM
iteration, found by root-finding on the likelihood's slope instead of iterating."""

from __future__ import annotations

import math

import numpy as np
import pytest

from pneumoscan import monitor
from pneumoscan.calibrate import prior_estimate

BUNDLED_PRIOR = 775 / 1043  # the validation share the bundled model's calibration was fitted at


def saerens_em(p: np.ndarray, fitted: float, *, tol: float = 1e-13, max_iter: int = 1_000_000) -> tuple[float, int]:
    """The EM iteration as Saerens et al. write it (re-weight the posteriors by the prior ratio, average,
    repeat), run until the share moves less than ``tol``: (share, iterations)."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
    share = fitted
    for i in range(1, max_iter + 1):
        a = share / fitted * p
        b = (1 - share) / (1 - fitted) * (1 - p)
        new = float(np.mean(a / (a + b)))
        if abs(new - share) < tol:
            return new, i
        share = new
    raise AssertionError(f"EM did not settle in {max_iter} iterations")


@pytest.fixture(scope="module")
def validation_probabilities() -> np.ndarray:
    """The bundled model's calibrated probabilities on its 1043 validation X-rays, as its drift reference keeps
    them (201 quantiles, expanded to the reference's size)."""
    return monitor.bundled_reference().sample("probability")


def site(probabilities: np.ndarray, share: float, n: int, seed: int) -> np.ndarray:
    """A site of ``n`` images whose pneumonia share is about ``share``: real probabilities drawn from the
    validation images the model leans to pneumonia on (p >= 0.5) and those it leans to normal on."""
    rng = np.random.default_rng(seed)
    leaning = probabilities[probabilities >= 0.5]
    normal = probabilities[probabilities < 0.5]
    k = int(round(share * n))
    return np.concatenate([rng.choice(leaning, k), rng.choice(normal, n - k)])


@pytest.mark.parametrize("fitted", [BUNDLED_PRIOR, 0.5, 0.3])
@pytest.mark.parametrize("share", [0.1, 0.3, 0.5, 0.74, 0.9])
def test_prior_estimate_equals_the_em_iterations_answer_on_real_validation_probabilities(
        validation_probabilities, share, fitted):
    p = site(validation_probabilities, share, 400, seed=int(share * 100))
    em, iterations = saerens_em(p, fitted)
    estimate = prior_estimate(p, fitted)
    assert 1e-6 < estimate < 1 - 1e-6  # inside the range: the root of the slope, not an end
    assert estimate == pytest.approx(em, abs=1e-6), (iterations, estimate, em)


def test_prior_estimate_of_the_whole_validation_set_at_its_own_prior_is_that_prior(validation_probabilities):
    estimate = prior_estimate(validation_probabilities, BUNDLED_PRIOR)
    assert estimate == pytest.approx(saerens_em(validation_probabilities, BUNDLED_PRIOR)[0], abs=1e-6)
    assert abs(estimate - BUNDLED_PRIOR) < 0.02  # a calibrated model's share on its own validation


def test_prior_estimate_stops_at_its_range_end_where_em_runs_towards_0(validation_probabilities):
    confident_normals = np.sort(validation_probabilities)[:100]
    em, _ = saerens_em(confident_normals, BUNDLED_PRIOR)
    assert prior_estimate(confident_normals, BUNDLED_PRIOR) == 1e-6
    assert 0 <= em <= 1e-6


def test_prior_estimate_of_no_images_is_nan_and_a_fitted_share_outside_0_1_is_refused():
    assert math.isnan(prior_estimate(np.zeros(0), 0.5))
    for fitted in (0.0, 1.0, 1.5):
        with pytest.raises(ValueError, match="fitted prevalence must be strictly between 0 and 1"):
            prior_estimate(np.array([0.2, 0.8]), fitted)


def test_the_monitors_window_share_and_reference_share_are_this_estimate(validation_probabilities):
    p = site(validation_probabilities, 0.3, 200, seed=7)
    assert monitor.em_share(p, BUNDLED_PRIOR)[0] == prior_estimate(p, BUNDLED_PRIOR)
    ref = monitor.bundled_reference()
    assert ref.share() == prior_estimate(ref.sample("probability"), ref.prior)
