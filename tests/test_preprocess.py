"""Preprocessing.standardize: per-image intensity standardisation removes exposure and contrast differences, is
saved with the model and stays finite on degenerate images. Removed options (equalize, standardize_region) load
from old model files only at their neutral values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import synthetic_xray

from pneumoscan.preprocess import Preprocessing


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


def test_standardize_keeps_a_blank_image_finite():
    prep = Preprocessing(size=8, standardize=(0.5, 0.25))
    assert torch.isfinite(prep.normalize(torch.zeros(2, 8, 8, dtype=torch.uint8))).all()


def test_standardize_is_saved_with_the_model_and_read_back():
    prep = Preprocessing(size=32, standardize=(0.5, 0.25))
    assert Preprocessing.from_dict(json.loads(json.dumps(prep.to_dict()))) == prep
    old = Preprocessing.from_dict({"size": 32})  # model files written before the key
    assert old.standardize is None


def test_standardize_with_a_nonpositive_spread_is_refused():
    with pytest.raises(ValueError, match="standardize"):
        Preprocessing(standardize=(0.5, 0.0))


def test_removed_options_recorded_at_their_neutral_value_load_and_are_dropped():
    recorded = {"size": 32, "standardize": [0.5, 0.25], "equalize": False, "standardize_region": 1.0}
    assert Preprocessing.from_dict(recorded) == Preprocessing(size=32, standardize=(0.5, 0.25))
    assert "equalize" not in Preprocessing().to_dict() and "standardize_region" not in Preprocessing().to_dict()


@pytest.mark.parametrize(("key", "value"), [("equalize", True), ("standardize_region", 0.7)])
def test_a_model_file_trained_with_a_removed_option_is_refused_in_one_line(key, value):
    from pneumoscan.errors import PneumoscanError

    with pytest.raises(PneumoscanError, match=rf"^preprocessing: {key} was removed .*git checkout [0-9a-f]{{7}}"):
        Preprocessing.from_dict({"size": 32, "standardize": [0.5, 0.25], key: value})


def test_the_bundled_model_file_still_loads_with_its_recorded_preprocessing():
    from pneumoscan.modelfile import read_model_file

    meta = read_model_file(Path(__file__).parents[1] / "src/pneumoscan/weights/default.safetensors")[1]
    prep = Preprocessing.from_dict(meta["preprocessing"])
    assert prep.size == 224 and prep.standardize == (0.5, 0.25)


def test_preprocessing_imports_neither_the_training_config_nor_yaml():
    """A model file's preprocessing is read at every model load; the training configuration is not needed there."""
    import subprocess
    import sys

    code = ("import sys\nsys.modules['yaml'] = None\nimport pneumoscan.preprocess as p\n"
            "p.Preprocessing.from_dict({'size': 64, 'equalize': False})\n"
            "print('pneumoscan.config' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
