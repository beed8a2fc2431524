"""Grad-CAM explanations: shape and range, overlays, file naming, model state and the CLI's --heatmaps."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import save_gray, synthetic_xray
from PIL import Image

from pneumoscan import explain, load_model
from pneumoscan.cli import main


@pytest.fixture(scope="module")
def evidence_model(tiny_model_path):
    """The tiny model with a PNEUMONIA logit that grows with every pooled feature, so Grad-CAM is non-trivial."""
    model = load_model(tiny_model_path)
    head = model.network.get_classifier()
    with torch.no_grad():
        head.weight[1].fill_(0.05)
        head.weight[0].fill_(-0.05)
    return model


def test_heatmap_is_in_unit_range_at_the_image_resolution(evidence_model):
    image = synthetic_xray(120)[:, 10:100]  # not square: the map must be squashed back to 120 x 90
    heat = explain.gradcam(evidence_model, image)
    assert heat.shape == (120, 90)
    assert heat.dtype == np.float32
    assert heat.min() >= 0.0 and heat.max() <= 1.0
    assert heat.max() > 0.5  # min-max scaled: a positive map reaches (nearly) 1 somewhere
    assert np.isfinite(heat).all()


def test_heatmap_of_untrained_model_is_still_a_valid_map(tiny_model):
    heat = explain.gradcam(tiny_model, synthetic_xray(64))
    assert heat.shape == (64, 64)
    assert heat.min() >= 0.0 and heat.max() <= 1.0


def test_heatmap_explains_pneumonia_even_when_the_network_says_normal(evidence_model):
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    image = synthetic_xray(64, seed=3)
    prep = evidence_model.preprocessing
    small = torch.from_numpy(prep.to_uint8(image))[None]  # the very input scoring gives the network
    logits = evidence_model.score(small).logits
    assert logits[0, 1] > logits[0, 0]  # the rigged head predicts PNEUMONIA; explaining class 0 would differ
    net = explain._explainer(evidence_model).network
    batch = prep.normalize(small).requires_grad_(True)
    with torch.enable_grad(), GradCAM(model=net, target_layers=[explain._explainer(evidence_model).layer]) as cam:
        expected = cam(input_tensor=batch, targets=[ClassifierOutputTarget(1)])[0]
    heat = explain.gradcam(evidence_model, image)
    assert np.allclose(heat, np.clip(expected, 0, 1), atol=1e-5)


def test_overlay_is_rgb_at_the_image_size(evidence_model):
    image = synthetic_xray(96)[:80, :]
    picture = explain.gradcam_overlay(evidence_model, image)
    assert picture.mode == "RGB"
    assert picture.size == (96, 80)  # PIL sizes are (width, height)


def test_overlay_of_a_large_image_is_bounded_to_the_working_resolution(evidence_model):
    image = np.tile(synthetic_xray(500), (6, 8))  # 3000 x 4000
    picture = explain.gradcam_overlay(evidence_model, image)
    assert picture.size == (1024, 768)  # the longest side capped at HEATMAP_MAX_SIDE, the aspect kept


def test_overlay_keeps_the_xray_where_the_heatmap_is_zero():
    image = synthetic_xray(32)
    picture = explain.overlay(image, np.zeros_like(image))
    assert np.array_equal(np.asarray(picture)[..., 0], np.round(image * 255).astype(np.uint8))


def test_explaining_leaves_the_model_unchanged(evidence_model):
    net = evidence_model.network
    before = {k: v.clone() for k, v in net.state_dict().items()}
    flags = [p.requires_grad for p in net.parameters()]
    hooks = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in net.modules())
    explain.gradcam(evidence_model, synthetic_xray(64))
    assert not net.training
    assert all(p.grad is None for p in net.parameters())
    assert [p.requires_grad for p in net.parameters()] == flags
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in net.modules()) == hooks
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.is_grad_enabled()  # the caller's grad mode is restored
    with torch.no_grad():
        explain.gradcam(evidence_model, synthetic_xray(64))
        assert not torch.is_grad_enabled()


def test_concurrent_explanations_agree_with_sequential_ones(evidence_model):
    images = [synthetic_xray(64, seed=s, opacity=0.3 * (s % 2)) for s in range(4)]
    expected = [explain.gradcam(evidence_model, im) for im in images]
    results: dict[int, np.ndarray] = {}

    def work(i: int) -> None:
        evidence_model.predict(images[i])  # inference on the shared network at the same time
        results[i] = explain.gradcam(evidence_model, images[i])

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, heat in enumerate(expected):
        assert np.allclose(results[i], heat, atol=1e-5)


def test_saved_heatmap_is_named_after_the_input(evidence_model, tmp_path):
    src = save_gray(tmp_path / "in" / "patient7.jpeg", synthetic_xray(64))
    out = explain.save_heatmap(evidence_model, src, tmp_path / "maps")
    assert out == tmp_path / "maps" / "patient7.png"
    with Image.open(out) as png:
        assert png.mode == "RGB" and png.size == (64, 64)
        assert png.info["Source"] == str(src.resolve())
    assert explain.save_heatmap(evidence_model, src, tmp_path / "maps") == out  # a rerun overwrites


def test_same_stem_from_different_folders_gets_distinct_stable_names(evidence_model, tmp_path):
    a = save_gray(tmp_path / "a" / "scan.png", synthetic_xray(64, seed=1))
    b = save_gray(tmp_path / "b" / "scan.png", synthetic_xray(64, seed=2))
    c = save_gray(tmp_path / "b" / "scan.jpeg", synthetic_xray(64, seed=3))
    out = tmp_path / "maps"
    first = [explain.save_heatmap(evidence_model, p, out) for p in (a, b, c)]
    assert first[0].name == "scan.png"
    assert len({p.name for p in first}) == 3
    assert all(p.name.startswith("scan-") for p in first[1:])
    assert [explain.save_heatmap(evidence_model, p, out) for p in (a, b, c)] == first
    assert len(list(out.iterdir())) == 3


def test_cli_predict_with_heatmaps_writes_one_png_per_screened_image(tiny_model_path, tmp_path, capsys):
    inputs = tmp_path / "in"
    save_gray(inputs / "one.jpeg", synthetic_xray(64, seed=1))
    save_gray(inputs / "sub" / "two.png", synthetic_xray(64, seed=2), "RGB")
    (inputs / "broken.png").write_text("not an image")
    maps = tmp_path / "maps"
    code = main(["predict", str(inputs), "--model", str(tiny_model_path), "--heatmaps", str(maps), "--heatmap-rule",
                 "all", "--quiet"])
    assert code == 1  # the broken file is an error row, and gets no heatmap
    assert sorted(p.name for p in maps.iterdir()) == ["one.png", "two.png"]
    for png in maps.iterdir():
        with Image.open(png) as picture:
            assert picture.mode == "RGB" and picture.size == (64, 64)
