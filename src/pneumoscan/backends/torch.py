"""The PyTorch backend: the network as trained, under one precision setting.

``forward`` is the one scoring function of pneumoscan. Training fits its calibration and thresholds through it
(``TorchBackend(net, prep, precision).forward``), and the model file records that precision, so prediction
computes exactly the numbers the thresholds were chosen on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

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
        was_training = self.network.training
        self.network.eval()
        batch = self.preprocessing.normalize(images.to(self.device))
        views = tta_views(batch) if tta else [batch]
        # channels_last: oneDNN's preferred layout on CPU (~1.5x faster convolutions), always on so that training's
        # threshold fitting and prediction run the same kernels
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            logits, feats = logits_and_features(self.network, views[0].contiguous(memory_format=torch.channels_last))
            logits = logits.float()
            for view in views[1:]:
                out, _ = logits_and_features(self.network, view.contiguous(memory_format=torch.channels_last))
                logits = logits + out.float()
        self.network.train(was_training)
        return (logits / len(views)).cpu(), feats.float().cpu()
