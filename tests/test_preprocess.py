"""Preprocessing.standardize and .equalize: per-image intensity standardisation removes exposure and contrast
differences, histogram equalisation gamma too; both are saved with the model and stay finite on degenerate
images."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import synthetic_xray

from pneumoscan.preprocess import Preprocessing


def _u8(x: torch.Tensor) -> torch.Tensor:
    """Back to 256 gray levels, the levels histogram equalisation works on."""
    return (x * 255).round().to(torch.uint8)


@pytest.fixture
def image() -> torch.Tensor:
    """(1, 32, 32) float in [0, 1], as augmentation hands it to normalize."""
    prep = Preprocessing(size=32)
    return torch.from_numpy(prep.to_uint8(synthetic_xray(64, seed=3, opacity=0.4)))[None].float() / 255


def test_standardize_removes_exposure_and_contrast_differences(image):
    prep = Preprocessing(size=32, standardize=(0.5, 0.25))
    other_machine = image * 0.6 + 0.1  # another exposure and window: a linear change, no clipping
    assert (prep.normalize(image) - prep.normalize(other_machine)).abs().max() < 1e-4
    plain = Preprocessing(size=32)
    assert (plain.normalize(image) - plain.normalize(other_machine)).abs().max() > 0.1


def test_standardized_input_has_the_target_mean_and_spread(image):
    prep = Preprocessing(size=32, channels=1, mean=(0.0,), std=(1.0,), standardize=(0.5, 0.25))
    x = prep.normalize(image)
    assert float(x.mean()) == pytest.approx(0.5, abs=1e-5)
    assert float(x.std()) == pytest.approx(0.25, abs=1e-4)


def test_uint8_and_float_inputs_standardize_alike(image):
    prep = Preprocessing(size=32, standardize=(0.5, 0.25))
    as_uint8 = (image * 255).round().to(torch.uint8)
    assert (prep.normalize(as_uint8) - prep.normalize(as_uint8.float() / 255)).abs().max() < 1e-5


def test_equalize_also_removes_a_gamma_difference(image):
    gamma = image.pow(1.5)  # a monotone, non-linear change of the film's response
    standardized = Preprocessing(size=32, standardize=(0.5, 0.25))
    equalized = Preprocessing(size=32, standardize=(0.5, 0.25), equalize=True)
    gap_standardized = (standardized.normalize(_u8(image)) - standardized.normalize(_u8(gamma))).abs().mean()
    gap_equalized = (equalized.normalize(_u8(image)) - equalized.normalize(_u8(gamma))).abs().mean()
    assert gap_equalized < gap_standardized / 3


def test_equalize_works_per_image_in_a_batch(image):
    prep = Preprocessing(size=32, equalize=True)
    pair = torch.cat([image, image * 0.5])
    assert (prep.normalize(pair)[1] - prep.normalize(image * 0.5)[0]).abs().max() < 1e-6


def test_standardize_region_ignores_borders_and_labels_at_the_edges(image):
    framed = image.clone()
    framed[..., :3, :] = 1.0  # a burnt-in white label strip and a black collimation edge
    framed[..., :, -3:] = 0.0
    centre = slice(5, 27)
    for region, moved in ((0.7, False), (1.0, True)):
        prep = Preprocessing(size=32, standardize=(0.5, 0.25), standardize_region=region)
        gap = (prep.normalize(image) - prep.normalize(framed))[..., centre, centre].abs().max()
        assert (gap > 1e-2) == moved, region


def test_standardize_region_outside_zero_to_one_is_refused():
    with pytest.raises(ValueError, match="standardize_region"):
        Preprocessing(standardize=(0.5, 0.25), standardize_region=0.0)


def test_standardize_keeps_a_blank_image_finite():
    prep = Preprocessing(size=8, standardize=(0.5, 0.25), equalize=True)
    assert torch.isfinite(prep.normalize(torch.zeros(2, 8, 8, dtype=torch.uint8))).all()


def test_standardize_is_saved_with_the_model_and_read_back():
    prep = Preprocessing(size=32, standardize=(0.5, 0.25), equalize=True, standardize_region=0.7)
    assert Preprocessing.from_dict(json.loads(json.dumps(prep.to_dict()))) == prep
    old = Preprocessing.from_dict({"size": 32})  # model files written before the keys
    assert old.standardize is None and not old.equalize and old.standardize_region == 1.0


def test_standardize_with_a_nonpositive_spread_is_refused():
    with pytest.raises(ValueError, match="standardize"):
        Preprocessing(standardize=(0.5, 0.0))


def test_standardize_region_without_standardize_is_refused_not_ignored():
    with pytest.raises(ValueError, match="standardize_region only applies with standardize"):
        Preprocessing(size=32, standardize_region=0.7)
