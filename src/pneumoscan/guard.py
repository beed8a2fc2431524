"""May this input be scored? Cheap checks that it can be a frontal chest radiograph, then the feature guard.

Two different statements come out of here, and messages keep them apart:
- ``image_check``: the DICOM header or the image itself says it is no frontal chest radiograph (a CT slice, a
  lateral view, a colour photo, a strip, a blank or two-level image);
- the feature guard: it may well be a chest X-ray, but its features are far from this model's training X-rays
  (another population or acquisition), so the model does not judge it.

The feature guard reuses what the network already computes: the pooled penultimate features. Their training distribution is
summarised by a PCA (mean, top components, per-component variance) plus the variance of the residual; an input's
score is its Mahalanobis distance inside the PCA subspace plus its normalised distance from it (the classic
"PCA + reconstruction error" novelty score). The threshold is a high quantile of the scores of held-out
validation X-rays, so about (1 - quantile) of real X-rays are rejected by construction.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .modelfile import GUARD_PREFIX

if TYPE_CHECKING:
    from .data.images import DecodedImage

# Cheap checks on what the feature-space guard sees badly (benchmarks/guard_eval.py measures both): radiographs
# are gray, have contrast, are not thumbnails and are not strips. Colour photos, icons and face crops otherwise
# land inside the tail of the X-rays' feature distribution.
MAX_COLOURFULNESS = 15.0  # Hasler-Suesstrunk "slightly colourful"; gray X-rays, also as RGB JPEGs, score 0
MIN_CONTRAST = 0.03  # std of the network input in [0, 1]; X-rays are around 0.2, flat or blank images near 0
MAX_ASPECT = 3.0  # longer / shorter side; the Kermany originals reach 2.6
# Share of the network input held by its two most frequent gray levels: validation X-rays reach 0.28 (black
# borders), drawings, masks and charts 0.9 and more (benchmarks/guard_eval.py --two-level).
MAX_TWO_LEVEL_SHARE = 0.6
# DICOM Modality defined terms (PS3.3 C.7.3.1.1.1) under which a projection chest radiograph is stored:
# computed and digital radiography, film digitised as RG, and OT for secondary captures of films.
RADIOGRAPH_MODALITIES = {"CR", "DX", "RG", "OT"}
CHEST_BODY_PARTS = ("CHEST", "THORAX", "LUNG", "TORAX", "PECHO", "BRUST")  # substrings; sites localise this tag
LATERAL_VIEWS = {"LL", "RL", "LAT", "LATERAL", "LLD", "RLD"}  # ViewPosition terms of lateral (decubitus) views

NOT_XRAY = "not a frontal chest X-ray"
OUTSIDE_POPULATION = ("outside this model's training population (it may be a chest X-ray, but unlike the "
                      "pediatric X-rays the model was trained on)")


def dicom_header_check(decoded: DecodedImage) -> str | None:
    """Why a DICOM's own header says it is no frontal chest radiograph, or None.

    The header is the most reliable evidence there is: a CT or MR slice can look X-ray-like to the network, but
    its Modality says what it is. Missing tags are not held against an image (many exports leave them empty).
    """
    header = decoded.dicom
    if header is None:
        return None
    if header.modality is not None and header.modality not in RADIOGRAPH_MODALITIES:
        return (f"DICOM Modality is {header.modality}; chest radiographs are "
                f"{', '.join(sorted(RADIOGRAPH_MODALITIES))}")
    if header.body_part is not None and not any(part in header.body_part for part in CHEST_BODY_PARTS):
        return f"DICOM BodyPartExamined is {header.body_part}, not the chest"
    if header.view is not None and header.view in LATERAL_VIEWS:
        return f"DICOM ViewPosition is {header.view}, a lateral view; the model reads frontal (PA/AP) views"
    return None


def two_level_share(small: np.ndarray) -> float:
    """Share of a uint8-valued image held by its two most frequent gray levels (high for drawings and masks)."""
    counts = np.bincount(np.asarray(small, dtype=np.uint8).ravel(), minlength=256)
    return float(np.sort(counts)[-2:].sum()) / small.size


def image_check(decoded: DecodedImage, small: np.ndarray, min_side: int) -> str | None:
    """Why an input cannot be a frontal chest X-ray, from its header and cheap statistics, or None.

    ``small``: the uint8 network input made from ``decoded``; ``min_side``: the model's smallest side.
    """
    if (reason := dicom_header_check(decoded)) is not None:
        return reason
    if decoded.colourfulness > MAX_COLOURFULNESS:
        return f"colour image (colourfulness {decoded.colourfulness:.0f})"
    width, height = decoded.width or small.shape[1], decoded.height or small.shape[0]
    if min(width, height) < min_side:
        return f"image is {width}x{height} pixels, below the {min_side} px minimum"
    if max(width, height) > MAX_ASPECT * min(width, height):
        return f"image is {width}x{height} pixels, too elongated for a chest radiograph"
    if float(small.std()) / 255.0 < MIN_CONTRAST:
        return "image is blank or nearly uniform"
    if (share := two_level_share(small)) > MAX_TWO_LEVEL_SHARE:
        return f"{share:.0%} of the image is two gray levels (a drawing, mask or binary scan)"
    return None


def guard_reason(score: float, threshold: float) -> str:
    """The feature guard's measured reason, for an input it rejects."""
    return f"features far from the training X-rays: distance {score:.2f}, limit {threshold:.2f}"


@dataclass
class Guard:
    mean: torch.Tensor  # (D,)
    components: torch.Tensor  # (K, D), orthonormal rows
    variances: torch.Tensor  # (K,)
    residual_variance: torch.Tensor  # () mean squared residual per dimension
    threshold: float

    @classmethod
    def fit(cls, train_features: torch.Tensor, val_features: torch.Tensor, *, components: int = 32,
            quantile: float = 0.995) -> Guard:
        x = train_features.double()
        mean = x.mean(0)
        centred = x - mean
        k = min(components, x.shape[0] - 1, x.shape[1])
        _, s, v = torch.linalg.svd(centred, full_matrices=False)
        comps = v[:k]
        variances = (s[:k] ** 2) / (x.shape[0] - 1)
        residual = centred - centred @ comps.T @ comps
        residual_variance = residual.pow(2).mean().clamp_min(1e-12)
        guard = cls(mean.float(), comps.float(), variances.float().clamp_min(1e-12), residual_variance.float(), 0.0)
        guard.threshold = float(np.quantile(guard.score(val_features).numpy(), quantile))
        return guard

    def score(self, feats: torch.Tensor) -> torch.Tensor:
        """Higher = less like the training X-rays. (N, D) -> (N,)"""
        centred = feats.float() - self.mean
        z = centred @ self.components.T
        inside = (z.pow(2) / self.variances).sum(1)
        residual = centred - z @ self.components
        outside = residual.pow(2).sum(1) / self.residual_variance
        dims = self.components.shape[0] + (self.mean.shape[0] - self.components.shape[0])
        return (inside + outside) / dims

    def accepts(self, feats: torch.Tensor) -> torch.Tensor:
        return self.score(feats) <= self.threshold

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{GUARD_PREFIX}mean": self.mean, f"{GUARD_PREFIX}components": self.components,
                f"{GUARD_PREFIX}variances": self.variances,
                f"{GUARD_PREFIX}residual_variance": self.residual_variance.reshape(1)}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], threshold: float) -> Guard:
        g = {k.removeprefix(GUARD_PREFIX): v for k, v in tensors.items()}
        return cls(g["mean"], g["components"], g["variances"], g["residual_variance"].reshape(()), threshold)
