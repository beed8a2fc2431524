"""Out-of-distribution guard: is this input like the chest X-rays the network was trained on?

It reuses what the network already computes: the pooled penultimate features. Their training distribution is
summarised by a PCA (mean, top components, per-component variance) plus the variance of the residual; an input's
score is its Mahalanobis distance inside the PCA subspace plus its normalised distance from it (the classic
"PCA + reconstruction error" novelty score). The threshold is a high quantile of the scores of held-out
validation X-rays, so about (1 - quantile) of real X-rays are rejected by construction.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .modelfile import GUARD_PREFIX


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
