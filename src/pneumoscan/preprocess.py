"""The single definition of how an image array becomes a network input.

``Preprocessing`` is saved inside every model file; training, evaluation, prediction, ONNX export and the server
all build their inputs through it, so inference can never drift from training. The image is squashed (not
cropped or padded) to ``size`` x ``size`` because that is how the Kermany 224 px training copies were made.

``standardize`` optionally rescales each image's intensities to a fixed mean and spread before the fixed
normalisation: exposure, windowing and contrast differ between X-ray machines and hospitals, and a per-image
standardisation removes the linear part of that shift by construction instead of asking the network to learn it.
It lives in ``normalize``, after augmentation, so training sees the same inputs as inference, and it is traced into
the ONNX graph. (Histogram equalisation and central-region statistics lost on validation and were removed; model
files that record them switched off still load.)
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from PIL import Image

from .errors import PneumoscanError

_PIL_FILTERS = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC,
                "area": Image.Resampling.BOX, "lanczos": Image.Resampling.LANCZOS}

# The (mean, std) that config key ``standardize`` rescales every image to: a mid-gray mean and a spread of a quarter
# of the range, round values near those of a typical Kermany film, so an ImageNet stem sees familiar input ranges.
STANDARD_INTENSITY = (0.5, 0.25)

# Options removed after they lost on validation: key -> (neutral value, experiment of docs/experiments.md, last
# commit with the option). Model files (preprocessing) and training configs (config.REMOVED, which extends this
# table) that record one at its neutral value still load. The table lives here, not in ``config``, so that loading a
# model file never imports the training configuration (nor YAML).
REMOVED: dict[str, tuple[object, str, str]] = {
    "equalize": (False, "experiment 9", "184cb07"),
    "standardize_region": (1.0, "experiment 10", "184cb07"),
}
REMOVED_KEYS = frozenset(REMOVED)  # recorded by model files written before their removal


def removed_option(key: str, value: object, table: dict[str, tuple[object, str, str]] = REMOVED) -> str | None:
    """Why ``key: value`` cannot be used (None: the key is not a removed option, or it is at its neutral value)."""
    if key not in table:
        return None
    neutral, experiment, commit = table[key]
    if isinstance(value, bool) == isinstance(neutral, bool) and value == neutral:  # 0 and 0.0 alike, not false
        return None
    return (f"{key} was removed after it lost on validation ({experiment} in docs/experiments.md); "
            f"git checkout {commit} to rerun it")


@dataclass(frozen=True)
class Preprocessing:
    size: int = 224
    interpolation: str = "bilinear"  # PIL filter used to squash the original to size x size (antialiased)
    channels: int = 3  # the gray image is repeated to match ImageNet-pretrained stems
    mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    std: tuple[float, ...] = (0.5, 0.5, 0.5)
    standardize: tuple[float, float] | None = None  # (mean, std) each image is rescaled to, in [0, 1] units; None: off

    def __post_init__(self) -> None:
        if self.interpolation not in _PIL_FILTERS:
            raise ValueError(f"interpolation must be one of {sorted(_PIL_FILTERS)}, got {self.interpolation!r}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean and std need one value per channel")
        if self.standardize is not None and (len(self.standardize) != 2 or self.standardize[1] <= 0):
            raise ValueError(f"standardize must be (mean, std) with std > 0, got {self.standardize!r}")

    def to_uint8(self, image: np.ndarray) -> np.ndarray:
        """Gray image, uint8 (H, W) or float (H, W) in [0, 1] -> the uint8 (size, size) network input.

        A float image is first rounded to 8 bits, then every image is resized in 8 bits. So the same pixels give
        the same network input whatever the file's depth (an 8-bit JPEG, its 16-bit PNG copy, a DICOM holding
        it), and an 8-bit image is never copied to float: Pillow's 8-bit resampler is ~3x faster than its float
        one, and the result differs from resizing in float then rounding by at most one gray level on a few
        pixels. The network input is 8-bit in every route, so rounding first loses nothing it could see.
        """
        if image.dtype != np.uint8:
            scaled = np.clip(image, 0.0, 1.0, dtype=np.float32)
            scaled *= 255.0
            scaled += 0.5  # round half up: one pass fewer than np.round, the same on every value but exact halves
            image = scaled.astype(np.uint8)
        if image.shape == (self.size, self.size):
            return image if image.flags.writeable else image.copy()  # decoded pixels can be read-only
        resized = Image.fromarray(np.ascontiguousarray(image), mode="L").resize(
            (self.size, self.size), _PIL_FILTERS[self.interpolation])
        return np.array(resized, dtype=np.uint8)  # a writable copy: torch.from_numpy wants to own what it wraps

    def normalize(self, batch: torch.Tensor) -> torch.Tensor:
        """(N, size, size) or (N, 1, size, size), uint8 or float in [0, 1] -> (N, channels, size, size) float32."""
        if batch.dtype == torch.uint8:
            batch = batch.float().div_(255.0)
        if batch.ndim == 3:
            batch = batch.unsqueeze(1)
        if self.standardize is not None:
            target_mean, target_std = self.standardize
            mean = batch.mean(dim=(-3, -2, -1), keepdim=True)
            std = batch.std(dim=(-3, -2, -1), keepdim=True).clamp_min(1e-3)  # a blank image stays finite
            batch = (batch - mean) / std * target_std + target_mean
        batch = batch.expand(-1, self.channels, -1, -1)
        mean = torch.tensor(self.mean, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=batch.dtype, device=batch.device).view(1, -1, 1, 1)
        return (batch - mean) / std

    def apply(self, image: np.ndarray) -> torch.Tensor:
        """One image array -> one (channels, size, size) tensor."""
        return self.normalize(torch.from_numpy(self.to_uint8(image))[None])[0]

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Preprocessing:
        """From a model file's record. Removed options are dropped at their neutral value and refused otherwise:
        the network was trained on inputs this code can no longer compute."""
        data = dict(data)
        for key in REMOVED_KEYS & set(data):
            reason = removed_option(key, data.pop(key))
            if reason:
                raise PneumoscanError(f"preprocessing: {reason}")
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown preprocessing key(s): {', '.join(sorted(unknown))}")
        values = dict(data)
        for key in ("mean", "std", "standardize"):
            if values.get(key) is not None:
                values[key] = tuple(float(v) for v in values[key])
        return cls(**values)
