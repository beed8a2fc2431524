"""Training-time augmentation on uint8 (1, H, W) tensors, built from torchvision.transforms.v2."""

from __future__ import annotations

import torch
from torchvision.transforms import v2

from .config import AugmentConfig


class RandomGamma(torch.nn.Module):
    """Random gamma on a float image in [0, 1]: exposure/processing differences between X-ray machines."""

    def __init__(self, low: float, high: float):
        super().__init__()
        self.low, self.high = low, high

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        gamma = float(torch.empty(1).uniform_(self.low, self.high))
        return image.clamp(0, 1).pow(gamma)


class AtThreads(torch.nn.Module):
    """Runs ``transform`` with torch at ``threads`` intra-op threads (then back to the caller's count).

    Training produces its batches at one thread (``train.one_thread``): the per-image ops are too small for a
    fork/join over the cores to pay. A reduction's result depends on how many threads split it, though, so the one
    reduction of the augmentation, ColorJitter's contrast (the image mean), runs at the count training had always
    used; that keeps every augmented image bit-identical to earlier runs.
    """

    def __init__(self, transform: torch.nn.Module, threads: int):
        super().__init__()
        self.transform, self.threads = transform, threads

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        before = torch.get_num_threads()
        if before == self.threads:
            return self.transform(image)
        torch.set_num_threads(self.threads)
        try:
            return self.transform(image)
        finally:
            torch.set_num_threads(before)


def build_augment(cfg: AugmentConfig, size: int, *, reduction_threads: int | None = None) -> v2.Compose | None:
    """uint8 (1, H, W) -> float (1, size, size) in [0, 1]; None when disabled.

    ``reduction_threads``: the thread count ColorJitter's contrast mean is computed at (``AtThreads``); None: the
    caller's count at the time."""
    if not cfg.enabled:
        return None
    # zoom_out 1 keeps older recipes' random stream and nearest interpolation exactly as they were; a zoom-out
    # shrinks the image, which nearest would alias, so it interpolates bilinearly
    zoom = cfg.zoom_out < 1
    steps: list = [
        v2.RandomResizedCrop(size, scale=cfg.scale, ratio=cfg.ratio, antialias=True),
        v2.RandomAffine(degrees=cfg.degrees, translate=(cfg.translate, cfg.translate),
                        scale=(cfg.zoom_out, 1.0) if zoom else None,
                        interpolation=v2.InterpolationMode.BILINEAR if zoom else v2.InterpolationMode.NEAREST),
    ]
    if cfg.hflip_p > 0:
        steps.append(v2.RandomHorizontalFlip(cfg.hflip_p))
    if cfg.jpeg_p > 0:
        steps.append(v2.RandomApply([v2.JPEG((40, 95))], p=cfg.jpeg_p))
    steps += [
        v2.ToDtype(torch.float32, scale=True),
        AtThreads(v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast), reduction_threads)
        if reduction_threads else v2.ColorJitter(brightness=cfg.brightness, contrast=cfg.contrast),
        RandomGamma(*cfg.gamma),
        v2.RandomApply([v2.GaussianBlur(5, sigma=(0.3, 1.5))], p=cfg.blur_p),
        v2.RandomAdjustSharpness(2.0, p=cfg.sharpen_p),
    ]
    if cfg.noise_std > 0:
        steps.append(v2.GaussianNoise(sigma=cfg.noise_std, clip=True))
    return v2.Compose(steps)
