"""Backends compute the network: uint8 image batch in, (logits, pooled features) out.

Every route (training's threshold fitting, ``evaluate``, ``predict``, the server, the export check, the DICOM node)
scores images through a backend's ``forward``, so thresholds are fitted on exactly the arithmetic that uses them.
A backend says what it can do (``gradcam``) instead of callers probing for attributes.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..preprocess import Preprocessing

PRECISIONS = ("float32", "bfloat16")


@runtime_checkable
class Backend(Protocol):
    """What computes the network for a ``Model``."""

    name: str  # "torch" | "onnx"
    runtime: str  # human-readable: "PyTorch float32", "onnxruntime int8", ...
    preprocessing: Preprocessing
    gradcam: bool  # whether ``network`` is a PyTorch module Grad-CAM can hook

    def forward(self, images: torch.Tensor, *, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images (N, S, S) -> (float32 logits (N, 2), float32 pooled features (N, D))."""
        ...
