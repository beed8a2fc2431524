"""The single definition of how an image array becomes a network input.

``Preprocessing`` is saved inside every model file; training, evaluation, prediction, ONNX export and the server
all build their inputs through it, so inference can never drift from training. The image is squashed (not
cropped or padded) to ``size`` x ``size`` because that is how the Kermany 224 px training copies were made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from PIL import Image

_PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                "area": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS}


@dataclass(frozen=True)
class Preprocessing:
    size: int = 224
    interpolation: str = "bilinear"  # PIL filter used to squash the original to size x size (antialiased)
    channels: int = 3  # the gray image is repeated to match ImageNet-pretrained stems
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)

    def __post_init__(self) -> None:
        if self.interpolation not in _PIL_FILTERS:
            raise ValueError(f"interpolation must be one of {sorted(_PIL_FILTERS)}, got {self.interpolation!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")

    def resize(self, image: np.ndarray) -> np.ndarray:
        """float32 (H, W) in [0, 1] -> float32 (size, size) in [0, 1]."""
        if image.shape == (self.size, self.size):
            return image.astype(np.float32, copy=False)
        resized = Image.fromarray(image.astype(np.float32, copy=False), mode="F").resize(
            (self.size, self.size), _PIL_FILTERS[self.interpolation]
        )
        return np.clip(np.asarray(resized, dtype=np.float32), 0.0, 1.0)

    def to_uint8(self, image: np.ndarray) -> np.ndarray:
        """Resized uint8 copy: the compact form kept in training caches and decode queues."""
        return np.round(self.resize(image) * 255.0).astype(np.uint8)

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, size, size) or (N, 1, size, size), uint8 or float in [0, 1] -> (N, channels, size, size) float32."""
        if batch.dtype == torch.uint8:
            batch = batch.float().div_(255.0)
        if batch.ndim == 3:
            batch = batch.unsqueeze(1)
        batch = batch.expand(-1, self.channels, -1, -1)
        mean = torch.tensor(self.mean, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
        return (batch - mean) / std

    def apply(self, image: np.ndarray) -> torch.Tensor:
        """One image array -> one (channels, size, size) tensor."""
        return self.normalize(torch.from_numpy(self.resize(image))[None])[0]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing key(s): {', '.join(sorted(unknown))}")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)
