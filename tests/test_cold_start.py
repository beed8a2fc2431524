"""A one-image ``pneumoscan predict`` starts without timm: the model file's EfficientNet-Lite is built from
``pneumoscan.models.EfficientNetLite``, which must be timm's network to the bit, in eval and in training mode.

(timm's import pulls torchvision and through its ``ops`` ``torch._dynamo`` and sympy, the larger part of a cold
start; benchmarks/cold_start.py measures it.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from conftest import save_gray, synthetic_xray

from pneumoscan.models import ARCHS, EfficientNetLite, network_for_weights

LITE = sorted(arch for arch, spec in ARCHS.items() if spec.lite is not None)
# What screening one image with the bundled model must not import: the network builder's timm and what it drags
# in, and the libraries only other commands or options need.
NOT_IMPORTED = ("timm", "torchvision", "torch._dynamo", "sympy", "huggingface_hub", "matplotlib", "scipy",
                "sklearn", "pandas", "onnxruntime", "pyarrow", "ray", "pydicom", "pytorch_grad_cam")


def _timm_network(arch: str, num_classes: int = 2) -> torch.nn.Module:
    import timm

    return timm.create_model(ARCHS[arch].timm_name, pretrained=False, num_classes=num_classes)


def _randomise_batchnorm(net: torch.nn.Module) -> None:
    """Statistics and affine parameters far from the identity, so a misplaced or mis-configured layer shows."""
    with torch.no_grad():
        for module in net.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.uniform_(-0.5, 0.5)
                module.running_var.uniform_(0.5, 2.0)
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.2, 0.2)


def test_screening_one_image_imports_neither_timm_nor_what_other_commands_need(tmp_path):
    image = save_gray(tmp_path / "chest.png", synthetic_xray(256, 1))
    script = (
        "import json, sys\n"
        "from pneumoscan.cli import main\n"
        f"code = main(['predict', {str(image)!r}, '--quiet'])\n"
        f"print(json.dumps({{'code': code, 'loaded': [m for m in {NOT_IMPORTED!r} if m in sys.modules]}}))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    row, report = done.stdout.strip().splitlines()
    assert row.startswith(str(image) + "\t")
    assert json.loads(report) == {"code": 0, "loaded": []}


@pytest.mark.parametrize("arch", LITE)
def test_efficientnet_lite_without_timm_has_timms_tensors_in_timms_order(arch):
    ours, theirs = network_for_weights(arch, 2).state_dict(), _timm_network(arch).state_dict()
    assert [(name, tensor.shape) for name, tensor in ours.items()] == [
        (name, tensor.shape) for name, tensor in theirs.items()]


@pytest.mark.parametrize("arch", LITE)
def test_efficientnet_lite_without_timm_computes_timms_outputs_bit_for_bit(arch):
    from pneumoscan.backends.torch import fold_batchnorm
    from pneumoscan.models import logits_and_features

    torch.manual_seed(0)
    theirs = _timm_network(arch).eval()
    _randomise_batchnorm(theirs)
    ours = network_for_weights(arch, 2).eval()
    assert isinstance(ours, EfficientNetLite)
    ours.load_state_dict(theirs.state_dict())
    for size in ((224, 224), (97, 131)):  # odd sizes: TensorFlow "same" padding is asymmetric there
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            for mine, reference in zip(logits_and_features(ours, x), logits_and_features(theirs, x), strict=True):
                assert torch.equal(mine, reference)
            folded_ours, folded_theirs = fold_batchnorm(ours), fold_batchnorm(theirs)
            assert torch.equal(folded_ours(x), folded_theirs(x))


@pytest.mark.parametrize("arch", LITE)
def test_efficientnet_lite_without_timm_trains_as_timms_does(arch):
    """Fine-tuning and AdaBN run on the loaded network: batch statistics, their running averages and the
    gradients must be timm's too."""
    torch.manual_seed(1)
    theirs = _timm_network(arch).train()
    ours = network_for_weights(arch, 2).train()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 3, 64, 64)
    target = torch.tensor([0, 1, 1, 0])
    for net in (ours, theirs):
        torch.nn.functional.cross_entropy(net(x), target).backward()
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values(),
                                                 strict=True))
    for (name, mine), (_, reference) in zip(ours.named_parameters(), theirs.named_parameters(), strict=True):
        assert torch.equal(mine.grad, reference.grad), name


def test_the_bundled_model_scores_as_it_did_when_built_by_timm():
    from pneumoscan.backends.torch import TorchBackend
    from pneumoscan.predict import load_model

    model = load_model(device="cpu")
    reference = _timm_network(model.record.arch, len(model.classes))
    reference.load_state_dict(model.network.state_dict())
    reference = reference.to(memory_format=torch.channels_last).eval()
    theirs = TorchBackend(reference, model.preprocessing, model.backend.precision)
    size = model.preprocessing.size
    images = torch.stack([torch.as_tensor(model.prepare(model.decode(synthetic_xray(320, seed)))[0])
                          for seed in range(3)])
    assert images.shape == (3, size, size)
    for tta in (False, True):
        for mine, reference_out in zip(model.backend.forward(images, tta=tta), theirs.forward(images, tta=tta),
                                       strict=True):
            assert torch.equal(mine, reference_out)


def test_predict_called_in_process_leaves_the_callers_garbage_collection_alone(tmp_path, tiny_model_path, capsys):
    """The command freezes objects for the interpreter's exit only: a program calling ``main`` goes on
    collecting everything."""
    import gc

    from pneumoscan.cli import main

    image = save_gray(tmp_path / "chest.png", synthetic_xray(64, 2))
    frozen = gc.get_freeze_count()
    assert main(["predict", str(image), "--model", str(tiny_model_path), "--quiet"]) == 0
    assert capsys.readouterr().out.startswith(str(image) + "\t")
    assert gc.get_freeze_count() == frozen


def _wait_policy_after_predict(images: list, model, batch_size: int, environ: dict | None = None) -> str | None:
    """OMP_WAIT_POLICY as a fresh ``pneumoscan predict`` process left it once torch was loaded."""
    import os

    script = (
        "import json, os, sys\n"
        "from pneumoscan.cli import main\n"
        f"code = main(['predict', *{[str(i) for i in images]!r}, '--model', {str(model)!r}, '--quiet', "
        f"'--batch-size', '{batch_size}'])\n"
        "assert code == 0 and 'torch' in sys.modules\n"
        "print(json.dumps(os.environ.get('OMP_WAIT_POLICY')))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | (environ or {})
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_openmp_threads_sleep_in_a_run_of_one_batch_and_keep_the_default_otherwise(tmp_path, tiny_model_path):
    images = [save_gray(tmp_path / f"chest{i}.png", synthetic_xray(64, i)) for i in range(2)]
    assert _wait_policy_after_predict(images, tiny_model_path, batch_size=2) == "PASSIVE"
    assert _wait_policy_after_predict(images, tiny_model_path, batch_size=1) is None
    assert _wait_policy_after_predict(images[:1], tiny_model_path, 2, {"OMP_WAIT_POLICY": "ACTIVE"}) == "ACTIVE"
