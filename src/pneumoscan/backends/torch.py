"""The PyTorch backend: the network as trained, under one precision setting.

``forward`` is the one scoring function of pneumoscan. Training fits its calibration and thresholds through it
(``TorchBackend(net, prep, precision).forward``), and the model file records that precision, so prediction
computes exactly the numbers the thresholds were chosen on.

In float32, ``forward`` runs an inference copy of the network with every BatchNorm folded into the convolution
before it (``fold_batchnorm``): in eval mode a BatchNorm is a fixed per-channel affine map, so folding it changes
nothing but float rounding (logits within ~1e-5), and it was a third of the CPU time of a batch. Under bfloat16
the network runs as trained: folded weights rounded to bf16 change decisions on validation (5 of 1043 differ from
float32's, against 7 as trained, but not the same ones; `benchmarks/speed_fidelity.py --bf16`), so folding there
would not be a pure speed change. ``network`` stays the module as trained, for Grad-CAM, AdaBN
and training.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_weights

from ..errors import PneumoscanError
from ..models import logits_and_features
from ..preprocess import Preprocessing
from . import PRECISIONS


def tta_views(batch: torch.Tensor) -> list[torch.Tensor]:
    """Test-time augmentation: the image, a 6% zoom-in and two 4% horizontal shifts (edge-replicated)."""
    size = batch.shape[-1]
    crop = round(size * 0.94)
    off = (size - crop) // 2
    zoom = F.interpolate(batch[..., off:off + crop, off:off + crop], size=(size, size), mode="bilinear",
                         align_corners=False, antialias=True)
    shift = round(size * 0.04)
    padded = F.pad(batch, (shift, shift, 0, 0), mode="replicate")
    return [batch, zoom, padded[..., :, :size], padded[..., :, 2 * shift:]]


def fold_batchnorm(network: nn.Module) -> nn.Module:
    """An eval-mode copy of ``network`` with each BatchNorm folded into the convolution registered just before it
    (``torch.nn.utils.fusion.fuse_conv_bn_weights``); timm's BatchNormAct2d keeps its activation.

    torch.fx cannot trace timm's same-padding convolutions, so pairs are found by registration order, which is
    execution order in timm's and torchvision's conv-BN blocks: tests/test_models.py proves the folded copy gives
    the original's outputs for every architecture in the registry.
    """
    folded = copy.deepcopy(network).eval()
    for parent in list(folded.modules()):
        names = list(parent._modules)
        for first, second in zip(names, names[1:], strict=False):
            conv, bn = parent._modules[first], parent._modules[second]
            if (isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d) and bn.running_mean is not None
                    and conv.out_channels == bn.num_features):
                conv.weight, conv.bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean,
                                                              bn.running_var, bn.eps, bn.weight, bn.bias)
                parent._modules[second] = (nn.Sequential(bn.drop, bn.act) if hasattr(bn, "act") and hasattr(bn, "drop")
                                           else nn.Identity())
    return folded.requires_grad_(False)


class TorchBackend:
    """A PyTorch network plus its preprocessing; ``forward`` takes uint8 images as decoding produces them."""

    name = "torch"
    gradcam = True

    def __init__(self, network: nn.Module, preprocessing: Preprocessing, precision: str = "float32"):
        if precision not in PRECISIONS:
            raise PneumoscanError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.network = network
        self.preprocessing = preprocessing
        self.precision = precision
        self.runtime = f"PyTorch {precision}"
        self._inference: nn.Module | None = None
        self._folded_from: tuple = ()
        self._tensors: list[torch.Tensor] | None = None

    def _state_version(self) -> tuple:
        # Every in-place change of a tensor (an optimiser step, AdaBN's running statistics, load_state_dict) bumps
        # its version counter, so this tells when the folded copy no longer matches the network.
        # (~0.1 ms for a few hundred tensors; walking the module tree each call cost 20 times that.)
        if self._tensors is None:
            self._tensors = [*self.network.parameters(), *self.network.buffers()]
        return tuple(t._version for t in self._tensors)

    def inference_network(self) -> nn.Module:
        """What ``forward`` runs: in float32 the BatchNorm-folded copy, made again whenever the network's weights
        or statistics changed (a training epoch, AdaBN); under bfloat16 the network itself."""
        if self.precision == "bfloat16":
            return self.network
        version = self._state_version()
        if self._inference is None or version != self._folded_from:
            self._folded_from = version
            with torch.no_grad():
                self._inference = fold_batchnorm(self.network).to(memory_format=torch.channels_last)
        return self._inference

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @torch.no_grad()
    def forward(self, images: torch.Tensor, *, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, S, S) or (N, 1, S, S) -> (logits (N, 2), features (N, D)), both float32 on the CPU.

        Views for test-time augmentation are built on the normalised batch and their logits averaged in float32;
        the features (for the guard) are those of the image as given.
        """
        if images.dtype != torch.uint8:
            raise TypeError(f"the scoring function takes uint8 images, got {images.dtype}")
        network = self.inference_network()
        was_training = network.training
        network.eval()
        batch = self.preprocessing.normalize(images.to(self.device))
        views = tta_views(batch) if tta else [batch]
        # channels_last: oneDNN's preferred layout on CPU (~1.5x faster convolutions), always on so that training's
        # threshold fitting and prediction run the same kernels
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            logits, feats = logits_and_features(network, views[0].contiguous(memory_format=torch.channels_last))
            logits = logits.float()
            for view in views[1:]:
                out, _ = logits_and_features(network, view.contiguous(memory_format=torch.channels_last))
                logits = logits + out.float()
        network.train(was_training)
        return (logits / len(views)).cpu(), feats.float().cpu()
