"""Shared fixtures: tiny generated images and a small but structurally real model file.

Unit tests never need ../shared/data; integration tests use it and fail (not skip) under CI when it is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
KERMANY = SHARED_DATA / "chest_xray"

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


def synthetic_xray(size: int = 64, seed: int = 0, opacity: float = 0.0) -> np.ndarray:
    """A float (size, size) image in [0, 1] with two dark lung fields in a bright body, like a frontal CXR.

    ``opacity`` > 0 whitens part of the right lung (a crude pneumonia look-alike).
    """
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    body = np.exp(-(((xx - 0.5) / 0.42) ** 2 + ((yy - 0.55) / 0.55) ** 2) ** 2) * 0.8
    lungs = sum(np.exp(-(((xx - cx) / 0.14) ** 2 + ((yy - 0.5) / 0.25) ** 2) ** 2) for cx in (0.32, 0.68))
    image = body - 0.55 * lungs
    if opacity:
        image += opacity * np.exp(-(((xx - 0.32) / 0.1) ** 2 + ((yy - 0.6) / 0.12) ** 2))
    image += rng.normal(0, 0.02, image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def save_gray(path: Path, image: np.ndarray, mode: str = "L") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.round(image * 255).astype(np.uint8)
    Image.fromarray(data, "L").convert(mode).save(path)
    return path


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """DATA_DIR/{train,test}/{NORMAL,PNEUMONIA} with 12 patients per class (two images each) at 64 px."""
    root = tmp_path_factory.mktemp("tiny_dataset")
    for split, offset in (("train", 0), ("test", 1000)):
        for label, name in enumerate(("NORMAL", "PNEUMONIA")):
            for patient in range(12):
                for image_no in range(2):
                    seed = offset + label * 100 + patient * 2 + image_no
                    image = synthetic_xray(64, seed, opacity=0.5 * label)
                    fname = (f"person{offset + patient}_bacteria_{image_no}.jpeg" if label
                             else f"IM-{offset + patient:04d}-{image_no:04d}.jpeg")
                    save_gray(root / split / name / fname, image, "RGB")
    return root


def make_model_file(path: Path, arch: str = "efficientnet_lite0", size: int = 64, seed: int = 0,
                    **preprocessing) -> Path:
    """An untrained but complete model file: real network, preprocessing (plus any ``Preprocessing`` options),
    thresholds, temperature, guard."""
    from pneumoscan.guard import Guard
    from pneumoscan.modelfile import save_model_file
    from pneumoscan.models import arch_spec, create_model, features
    from pneumoscan.preprocess import Preprocessing

    torch.manual_seed(seed)
    spec = arch_spec(arch)
    net = create_model(arch, pretrained="none").eval()
    prep = Preprocessing(size=size, mean=spec.mean, std=spec.std, **preprocessing)
    with torch.no_grad():
        batch = torch.stack([prep.apply(synthetic_xray(size, s)) for s in range(40)])
        feats = features(net, batch)
    guard = Guard.fit(feats[:30], feats[30:], components=8, quantile=1.0)
    guard.threshold *= 1e6  # untrained features are not meaningful: accept everything in API tests
    meta = {
        "name": "tiny-test-model", "arch": arch, "classes": ["NORMAL", "PNEUMONIA"],
        "preprocessing": prep.to_dict(), "temperature": 1.5,
        "thresholds": {"screening": 0.3, "balanced": 0.5}, "target_sensitivity": 0.98,
        "guard": {"threshold": guard.threshold, "quantile": 1.0},
        "validation": {"n": 0, "auc": 0.5}, "training": {"note": "untrained test fixture", "val_counts": [25, 75]},
        "version": "test", "created": "2026-01-01T00:00:00Z",
    }
    save_model_file(path, {**net.state_dict(), **guard.to_tensors()}, meta)
    return path


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    return make_model_file(tmp_path_factory.mktemp("model") / "tiny.safetensors")


@pytest.fixture(scope="session")
def tiny_model(tiny_model_path):
    """float32 network whatever the CPU, so comparisons with ONNX and exact references hold on any machine
    (precision "auto" has its own tests)."""
    from pneumoscan import load_model

    return load_model(tiny_model_path, precision="float32")


@pytest.fixture
def kermany() -> Path:
    """The real dataset beside the repository; missing data fails under CI instead of silently skipping."""
    if not KERMANY.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{KERMANY} is missing: integration tests need ../shared/data in CI")
        pytest.skip(f"{KERMANY} not present")
    return KERMANY
