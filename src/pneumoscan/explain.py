"""Grad-CAM heatmaps: where in the X-ray the network found evidence of pneumonia.

The map is always for the PNEUMONIA class (index 1), whatever the decision, so a NORMAL result still shows what
little the network found suspicious. It comes from the maintained ``grad-cam`` package on the arch's last spatial
feature map (``models.cam_layer``).

State and threads: Grad-CAM registers hooks and runs a backward pass. Doing that on ``model.network`` would let a
concurrent inference call in another thread (the server) feed its activations into our hooks, and would leave
gradients behind. So each model gets a private copy of its network for explanations (made once, in eval mode, with
its parameters' gradients switched off; the gradient flows from the input instead), and one lock per model
serialises explanations. ``model.network`` itself is never touched.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import weakref
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from .models import cam_layer

PNEUMONIA = 1
OVERLAY_ALPHA = 0.55  # opacity of the colour map where the heatmap is 1; it fades to 0 with the heatmap
HEATMAP_MAX_SIDE = 1024  # longest side of a heatmap picture: enough to read, bounded memory and time

_registry_lock = threading.Lock()
_explainers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class _Explainer:
    def __init__(self, model) -> None:
        self.network = copy.deepcopy(model.network).eval()
        self.network.requires_grad_(False)
        self.layer = cam_layer(self.network, model.record.arch)
        self.lock = threading.Lock()


def _explainer(model) -> _Explainer:
    with _registry_lock:
        explainer = _explainers.get(model)
        if explainer is None:
            explainer = _explainers[model] = _Explainer(model)
        return explainer


HEATMAP_RULES = ("positive", "all")  # which screened images get a heatmap; "positive" is the default everywhere


def wants_heatmap(prediction, rule: str = "positive") -> bool:
    """The one rule every route (CLI --heatmaps, the HTTP service and page, the DICOM node) applies: a map only
    for an image the model judged, and by default only when it decided PNEUMONIA. On a NORMAL image the map
    still lights up somewhere (the neck, the mediastinum), which invites a reader to see a finding the model
    did not make."""
    if rule not in HEATMAP_RULES:
        raise ValueError(f"heatmap rule must be one of {', '.join(HEATMAP_RULES)}, got {rule!r}")
    if prediction.status != "ok":
        return False
    return rule == "all" or prediction.decision == "PNEUMONIA"


def display_copy(pixels: np.ndarray, max_side: int = HEATMAP_MAX_SIDE) -> np.ndarray:
    """The image at most ``max_side`` a side (antialiased): what people look at, at a bounded cost."""
    height, width = pixels.shape
    scale = max_side / max(height, width)
    if scale >= 1:
        return np.asarray(pixels, dtype=np.float32)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    small = Image.fromarray(np.asarray(pixels, dtype=np.float32), mode="F").resize(size, Image.Resampling.BILINEAR,
                                                                               reducing_gap=3.0)
    return np.clip(np.asarray(small, dtype=np.float32), 0.0, 1.0)


def gradcam(model, pixels: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Grad-CAM of the PNEUMONIA class for a float (H, W) image in [0, 1] -> float32 heatmap in [0, 1] of ``size``
    (height, width; default the image's own shape).

    The network sees exactly the uint8 input that scoring gives it (``Model.prepare``'s resize and rounding).
    """
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    if pixels.ndim != 2:
        raise ValueError(f"expected a grayscale (H, W) image, got shape {pixels.shape}")
    explainer = _explainer(model)
    device = next(explainer.network.parameters()).device
    small = torch.from_numpy(model.preprocessing.to_uint8(pixels))[None]
    batch = model.preprocessing.normalize(small).to(device).requires_grad_(True)
    with explainer.lock, torch.enable_grad(), GradCAM(model=explainer.network, target_layers=[explainer.layer]) as cam:
        heat = cam(input_tensor=batch, targets=[ClassifierOutputTarget(PNEUMONIA)])[0]
    # The network saw the image squashed to a square; squash the map back to the image's own shape.
    height, width = size or pixels.shape
    resized = Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F").resize((width, height),
                                                                                     Image.Resampling.BILINEAR)
    return np.clip(np.nan_to_num(np.asarray(resized, dtype=np.float32)), 0.0, 1.0)


def overlay(image: np.ndarray, heatmap: np.ndarray, *, colormap: str = "jet") -> Image.Image:
    """RGB picture of the gray X-ray with the colour-mapped heatmap blended in where the heatmap is high."""
    from matplotlib import colormaps

    gray = np.repeat(np.clip(image, 0.0, 1.0)[..., None], 3, axis=2)
    colour = colormaps[colormap](heatmap)[..., :3]
    alpha = OVERLAY_ALPHA * heatmap[..., None]
    blended = (1.0 - alpha) * gray + alpha * colour
    return Image.fromarray(np.round(blended * 255.0).astype(np.uint8), "RGB")


def gradcam_overlay(model, pixels: np.ndarray, max_side: int = HEATMAP_MAX_SIDE) -> Image.Image:
    """The X-ray with its PNEUMONIA Grad-CAM overlaid, as a PIL RGB image at most ``max_side`` a side.

    Working at a bounded resolution keeps a 7000 px scan's heatmap in megabytes rather than gigabytes.
    """
    display = display_copy(pixels, max_side)
    return overlay(display, gradcam(model, pixels, display.shape))


def heatmap_path(path: str | Path, out_dir: str | Path) -> Path:
    """``out_dir/<stem>.png`` unless that file was written for another input, then ``<stem>-<hash>.png``.

    The source of each PNG is recorded in its metadata, so inputs with the same stem from different folders get
    distinct, reproducible names, and re-running over the same inputs overwrites rather than piles up.
    """
    source = str(Path(path).resolve())
    out_dir = Path(out_dir)
    plain = out_dir / f"{Path(path).stem}.png"
    if not plain.exists() or _png_source(plain) == source:
        return plain
    digest = hashlib.sha256(source.encode()).hexdigest()[:8]
    return out_dir / f"{Path(path).stem}-{digest}.png"


def _png_source(path: Path) -> str | None:
    try:
        with Image.open(path) as png:
            return png.info.get("Source")
    except OSError:
        return None


_save_lock = threading.Lock()


def save_heatmap(model, path: str | Path, out_dir: str | Path) -> Path:
    """Write the Grad-CAM overlay of the image file ``path`` into ``out_dir``; returns the PNG's path."""
    picture = gradcam_overlay(model, model.decode(path).pixels)
    info = PngImagePlugin.PngInfo()
    info.add_text("Source", str(Path(path).resolve()))
    info.add_text("Software", f"pneumoscan Grad-CAM, class {model.classes[PNEUMONIA]}, model {model.sha256[:12]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _save_lock:  # choosing the name and claiming it must not interleave between threads
        target = heatmap_path(path, out_dir)
        picture.save(target, pnginfo=info)
    return target
