"""Grad-CAM explanations: shape and range, overlays, file naming, model state and the CLI's --heatmaps."""

from __future__ import annotations

import copy
import threading

import numpy as np
import pytest
import torch
from conftest import save_gray, synthetic_xray
from PIL import Image

from pneumoscan import explain, load_model
from pneumoscan.cli import main
from pneumoscan.models import cam_layer


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
    # the textbook Grad-CAM: a plain copy of the network, the graph from the input through every layer (explain
    # records from the explained layer on only; the activations and gradients there are the same)
    net = copy.deepcopy(evidence_model.network).eval()
    batch = prep.normalize(small).requires_grad_(True)
    with torch.enable_grad(), GradCAM(model=net, target_layers=[cam_layer(net, evidence_model.record.arch)]) as cam:
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
        with Image.open(png) as picture:  # the 64 px overlay with its legend (result, colour scale, AI label)
            assert picture.mode == "RGB" and picture.size[0] >= 64 and picture.size[1] > 64
            assert picture.info["Software"].startswith("pneumoscan Grad-CAM")


# ---- batched Grad-CAM ----------------------------------------------------------------------------------------


def varied_images() -> list[np.ndarray]:
    """Sizes, aspects and depths a batch mixes: float and uint8, square and not, smaller and larger than the
    network input."""
    return [synthetic_xray(64, seed=1),
            synthetic_xray(120, seed=2, opacity=0.5)[:, 10:100],
            np.round(synthetic_xray(96, seed=3) * 255).astype(np.uint8),
            synthetic_xray(40, seed=4, opacity=0.3),
            synthetic_xray(200, seed=5)[20:180, :]]


@pytest.fixture
def passes(evidence_model, monkeypatch):
    """Counts the explainer network's forward passes and the backward passes run while explaining."""
    counts = {"forward": 0, "backward": 0}
    net = explain._explainer(evidence_model).network
    handle = net.register_forward_hook(lambda *_: counts.__setitem__("forward", counts["forward"] + 1))
    backward = torch.Tensor.backward

    def counting_backward(self, *args, **kwargs):
        counts["backward"] += 1
        return backward(self, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "backward", counting_backward)
    yield counts
    handle.remove()


def test_batched_heatmaps_equal_single_image_heatmaps(evidence_model):
    """Tolerance 1e-4 on maps in [0, 1]: a batch changes only the summation order inside the convolutions."""
    images = varied_images()
    single = [explain.gradcam(evidence_model, image) for image in images]
    batched = explain.gradcams(evidence_model, images, batch_size=3)  # a full batch and a partial one
    assert [h.shape for h in batched] == [image.shape for image in images]
    for one, many in zip(single, batched, strict=True):
        assert many.dtype == np.float32 and np.abs(one - many).max() < 1e-4
    assert max(float(h.max()) for h in batched) > 0.5  # the maps are not trivially zero


def test_a_batch_takes_one_forward_and_one_backward_pass(evidence_model, passes):
    explain.gradcams(evidence_model, varied_images(), batch_size=8)
    assert passes == {"forward": 1, "backward": 1}
    passes.update(forward=0, backward=0)
    explain.gradcams(evidence_model, varied_images(), batch_size=2)
    assert passes == {"forward": 3, "backward": 3}  # 2 + 2 + 1


def test_batched_overlays_equal_single_overlays(evidence_model):
    """Equal up to one step of the colour map: a map value within 1e-4 of a bin edge of the 256-entry jet table
    may fall in the neighbouring bin, which moves a channel by up to 3 levels at the overlay's opacity."""
    images = varied_images()
    single = [explain.gradcam_overlay(evidence_model, image, max_side=100) for image in images]
    batched = explain.gradcam_overlays(evidence_model, images, max_side=100, batch_size=4)
    for one, many in zip(single, batched, strict=True):
        assert one.size == many.size and many.mode == "RGB"
        diff = np.abs(np.asarray(one, np.int16) - np.asarray(many, np.int16))
        assert diff.max() <= 3 and (diff > 0).mean() < 0.01
    assert [p.size for p in batched] == [(64, 64), (75, 100), (96, 96), (40, 40), (100, 80)]  # capped at 100
    assert explain.gradcam_overlays(evidence_model, []) == []


def test_gradcams_refuses_a_colour_image_and_mismatched_sizes(evidence_model):
    with pytest.raises(ValueError, match="grayscale"):
        explain.gradcams(evidence_model, [np.zeros((8, 8, 3), np.float32)])
    with pytest.raises(ValueError, match="2 images but 1 sizes"):
        explain.gradcams(evidence_model, [synthetic_xray(32), synthetic_xray(32)], [(32, 32)])


# ---- the legend a heatmap carries -----------------------------------------------------------------------------


def test_legend_states_the_result_the_colours_and_the_ai_label():
    from pneumoscan import __version__
    from pneumoscan.pipeline import Prediction

    positive = explain.legend_lines(Prediction("x", 0.8125, "PNEUMONIA", "screening", 0.3, "ok"))
    assert positive[0] == "pneumoscan: PNEUMONIA  probability 0.812  (screening threshold 0.300)"
    assert any("Grad-CAM" in line for line in positive)
    assert positive[-1].startswith(f"AI-generated (pneumoscan {__version__})")
    refused = explain.legend_lines(Prediction("x", None, None, "screening", 0.3, "not_xray", "lateral"))
    assert refused[0] == "pneumoscan: NOT ASSESSED (not_xray)" and "probability" not in refused[0]


def test_annotated_heatmap_has_a_colour_scale_and_text_band():
    from matplotlib import colormaps

    picture = Image.fromarray(np.full((300, 200, 3), 90, np.uint8), "RGB")
    lines = ["pneumoscan: PNEUMONIA  probability 0.812  (screening threshold 0.300)", "AI-generated (pneumoscan)"]
    out = np.asarray(explain.annotate(picture, lines))
    band = out.shape[0] - 300
    assert band > 0 and out.shape[1] > 200
    assert np.array_equal(out[band:, :200], np.asarray(picture))  # the picture is kept, unchanged
    assert (out[:band] > 0).any()  # text drawn on the band (narrow picture: the long line wraps, not cut off)
    scale = out[band:, 200:]
    columns = np.where((scale.reshape(-1, 3) > 0).any(axis=1).reshape(scale.shape[:2]).sum(axis=0) > 250)[0]
    bar = scale[:, columns[0] + 1]  # a column inside the colour bar
    top, bottom = bar[np.nonzero(bar.any(axis=1))[0][[0, -1]]]
    jet = colormaps["jet"]
    assert np.abs(top.astype(int) - np.round(np.asarray(jet(1.0)[:3]) * 255)).max() <= 3  # high at the top
    assert np.abs(bottom.astype(int) - np.round(np.asarray(jet(0.0)[:3]) * 255)).max() <= 3  # low at the bottom


def test_saved_heatmap_with_its_prediction_carries_the_legend(evidence_model, tmp_path):
    from pneumoscan.pipeline import Prediction

    src = save_gray(tmp_path / "in" / "child.png", synthetic_xray(64))
    pred = Prediction(str(src), 0.9, "PNEUMONIA", "screening", 0.3, "ok")
    out = explain.save_heatmap(evidence_model, src, tmp_path / "maps", pred)
    with Image.open(out) as png:
        assert png.width > 64 and png.height > 64


def test_resnet_heatmaps_equal_textbook_gradcam(tmp_path):
    """The other arch family (the explained layer is a residual block, not a batch norm): the recorded-from-the-
    layer maps, single and batched, equal Grad-CAM with the graph from the input."""
    from conftest import make_model_file
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    model = load_model(make_model_file(tmp_path / "resnet.safetensors", arch="resnet18"), precision="float32")
    images = [synthetic_xray(64, seed=s, opacity=0.4 * (s % 2)) for s in range(3)]
    net = copy.deepcopy(model.network).eval()
    batch = model.preprocessing.normalize(torch.from_numpy(np.stack([model.preprocessing.to_uint8(i)
                                                                     for i in images]))).requires_grad_(True)
    with torch.enable_grad(), GradCAM(model=net, target_layers=[cam_layer(net, "resnet18")]) as cam:
        expected = cam(input_tensor=batch, targets=[ClassifierOutputTarget(1)] * 3)
    for got in (explain.gradcams(model, images), [explain.gradcam(model, i) for i in images]):
        for heat, want in zip(got, expected, strict=True):
            assert np.abs(heat - np.clip(want, 0, 1)).max() < 1e-4
