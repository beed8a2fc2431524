"""Grad-CAM heatmaps: where in the X-ray the network found evidence of pneumonia.

The map is always for the PNEUMONIA class (index 1), whatever the decision; which images get one is
``wants_heatmap``'s rule (by default only those decided PNEUMONIA). It comes from the maintained ``grad-cam``
package on the arch's last spatial feature map (``models.cam_layer``). ``gradcams`` / ``gradcam_overlays`` explain
a batch with one forward and one backward pass (grad-cam sums the batch's class scores before its one backward),
which is what makes heatmaps affordable at scoring speed; ``gradcam`` / ``gradcam_overlay`` are a batch of one.
``annotate`` gives a picture its legend (the result, a colour scale, "AI-generated (pneumoscan ...)") so that it
explains itself where no page surrounds it (a DICOM Secondary Capture).

State and threads: Grad-CAM registers hooks and runs a backward pass. Doing that on ``model.network`` would let a
concurrent inference call in another thread (the server) feed its activations into our hooks, and would leave
gradients behind. So each model gets a private copy of its network for explanations (made once, in eval mode, with
its parameters' gradients switched off; autograd records from the explained layer on, see
``_graph_starts_here``), and one lock per model serialises explanations. ``model.network`` itself is never touched.
"""

from __future__ import annotations

import copy
import hashlib
import threading
import weakref
from collections.abc import Sequence
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
        self.layer.register_forward_hook(_graph_starts_here)  # before grad-cam's own hooks, which see its output
        self.lock = threading.Lock()


def _graph_starts_here(module, args, output: torch.Tensor) -> torch.Tensor:
    """The explained layer's output as a fresh leaf that requires grad: autograd records only the layers after it
    (pooling and the classifier). Grad-CAM needs the gradient at this layer and nowhere before it, so the layers
    before run as in inference (no graph kept, no backward through them): an explanation then costs about one
    scoring pass instead of a full forward and backward. Activations and gradients at the layer are unchanged."""
    return output.detach().requires_grad_(True)


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


GRADCAM_BATCH = 16  # images per forward and backward: the backward keeps every activation, so memory grows with it


def _gray(image: np.ndarray) -> np.ndarray:
    if image.ndim != 2:
        raise ValueError(f"expected a grayscale (H, W) image, got shape {image.shape}")
    return image


def _cams(model, inputs: np.ndarray) -> np.ndarray:
    """PNEUMONIA Grad-CAM of uint8 network inputs (N, S, S) -> (N, S, S) maps in [0, 1], one forward and one
    backward for the whole batch (grad-cam sums the N class scores before its single backward; each image's map
    uses only its own activations and gradients, as the network is in eval mode). The backward runs only from the
    class scores to the explained layer (``_graph_starts_here``)."""
    from pytorch_grad_cam import GradCAM
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    explainer = _explainer(model)
    device = next(explainer.network.parameters()).device
    batch = model.preprocessing.normalize(torch.from_numpy(inputs)).to(device)
    with explainer.lock, torch.enable_grad(), GradCAM(model=explainer.network, target_layers=[explainer.layer]) as cam:
        return cam(input_tensor=batch, targets=[ClassifierOutputTarget(PNEUMONIA)] * len(inputs))


def _fit(heat: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """The network saw the image squashed to a square; squash the map back to (height, width)."""
    height, width = size
    resized = Image.fromarray(np.asarray(heat, dtype=np.float32), mode="F").resize((width, height),
                                                                                     Image.Resampling.BILINEAR)
    return np.clip(np.nan_to_num(np.asarray(resized, dtype=np.float32)), 0.0, 1.0)


def gradcams(model, images: Sequence[np.ndarray], sizes: Sequence[tuple[int, int] | None] | None = None, *,
             batch_size: int = GRADCAM_BATCH) -> list[np.ndarray]:
    """Grad-CAM of the PNEUMONIA class for many gray (H, W) images (uint8, or float in [0, 1]) -> one float32
    heatmap in [0, 1] each, of its ``sizes`` entry (height, width; default the image's own shape).

    One forward and one backward per ``batch_size`` images, instead of one each: the per-call overhead (hooks,
    graph, small-batch convolutions) is most of an explanation's cost. Each network input is exactly the uint8
    input that scoring gives it (``Model.prepare``'s resize and rounding).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    images = [_gray(np.asarray(image)) for image in images]
    sizes = list(sizes) if sizes is not None else [None] * len(images)
    if len(sizes) != len(images):
        raise ValueError(f"{len(images)} images but {len(sizes)} sizes")
    heats: list[np.ndarray] = []
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        inputs = np.stack([model.preprocessing.to_uint8(image) for image in chunk])
        for image, size, heat in zip(chunk, sizes[start:start + batch_size], _cams(model, inputs), strict=True):
            heats.append(_fit(heat, size or image.shape))
    return heats


def gradcam(model, pixels: np.ndarray, size: tuple[int, int] | None = None) -> np.ndarray:
    """Grad-CAM of the PNEUMONIA class for one float (H, W) image in [0, 1] -> float32 heatmap in [0, 1] of
    ``size`` (height, width; default the image's own shape). A batch of one of ``gradcams``."""
    return gradcams(model, [pixels], [size])[0]


def overlay(image: np.ndarray, heatmap: np.ndarray, *, colormap: str = "jet") -> Image.Image:
    """RGB picture of the gray X-ray with the colour-mapped heatmap blended in where the heatmap is high."""
    from matplotlib import colormaps

    gray = np.repeat(np.clip(image, 0.0, 1.0)[..., None], 3, axis=2)
    colour = colormaps[colormap](heatmap)[..., :3]
    alpha = OVERLAY_ALPHA * heatmap[..., None]
    blended = (1.0 - alpha) * gray + alpha * colour
    return Image.fromarray(np.round(blended * 255.0).astype(np.uint8), "RGB")


def _unit(image: np.ndarray) -> np.ndarray:
    """float (H, W) in [0, 1] of a uint8 or float gray image."""
    image = np.asarray(image)
    return image.astype(np.float32) / np.float32(255.0) if image.dtype == np.uint8 else image


def gradcam_overlays(model, images: Sequence[np.ndarray], max_side: int = HEATMAP_MAX_SIDE, *,
                     batch_size: int = GRADCAM_BATCH) -> list[Image.Image]:
    """Each X-ray (gray (H, W), uint8 or float in [0, 1]) with its PNEUMONIA Grad-CAM overlaid, as PIL RGB images
    at most ``max_side`` a side; the maps come from ``gradcams``, one forward and backward per batch."""
    displays = [display_copy(_unit(_gray(np.asarray(image))), max_side) for image in images]
    heats = gradcams(model, images, [display.shape for display in displays], batch_size=batch_size)
    return [overlay(display, heat) for display, heat in zip(displays, heats, strict=True)]


def gradcam_overlay(model, pixels: np.ndarray, max_side: int = HEATMAP_MAX_SIDE) -> Image.Image:
    """The X-ray with its PNEUMONIA Grad-CAM overlaid, as a PIL RGB image at most ``max_side`` a side.

    Working at a bounded resolution keeps a 7000 px scan's heatmap in megabytes rather than gigabytes.
    """
    return gradcam_overlays(model, [pixels], max_side)[0]


def ai_label() -> str:
    """What every heatmap and result object says about its maker."""
    from . import __version__

    return f"AI-generated (pneumoscan {__version__})"


def legend_lines(prediction) -> list[str]:
    """The text a heatmap carries: the result (decision and probability at the operating point, or why there is
    none), what the colours are, and that a machine made it."""
    if prediction.status != "ok":
        result = f"pneumoscan: NOT ASSESSED ({prediction.status})"
    else:
        result = (f"pneumoscan: {prediction.decision}  probability {prediction.probability:.3f}  "
                  f"({prediction.operating_point} threshold {prediction.threshold:.3f})")
    return [result, "Grad-CAM: where the network found evidence of PNEUMONIA",
            f"{ai_label()}; screening aid, not a diagnosis"]


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: a fixed bitmap font
        return ImageFont.load_default()


def _wrap(line: str, width_of, room: float) -> list[str]:
    """``line`` broken at spaces into rows at most ``room`` wide (a single word wider than that keeps its row)."""
    rows: list[str] = []
    for word in line.split(" "):
        if rows and width_of(f"{rows[-1]} {word}") <= room:
            rows[-1] = f"{rows[-1]} {word}"
        else:
            rows.append(word)
    return rows or [""]


def annotate(picture: Image.Image, lines: Sequence[str], *, colormap: str = "jet") -> Image.Image:
    """``picture`` (an overlay) with ``lines`` of text on a black band above it and a colour scale on its right
    (the colour of 0 at the bottom, "low", to 1 at the top, "high"), so the picture explains itself wherever it
    travels: a Secondary Capture in a PACS has no legend beside it."""
    from matplotlib import colormaps
    from PIL import ImageDraw

    size = max(12, picture.width // 40)
    font = _font(size)
    pad = size // 2
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(measure.textlength(word, font=font) for word in ("high", "low"))
    bar_width = size
    strip = pad + bar_width + pad + int(label_width) + pad
    width = picture.width + strip
    rows = [(i, row) for i, line in enumerate(lines)
            for row in _wrap(line, lambda text: measure.textlength(text, font=font), width - 2 * pad)]
    band = pad + len(rows) * (size + pad) + pad
    canvas = Image.new("RGB", (width, picture.height + band), (0, 0, 0))
    canvas.paste(picture.convert("RGB"), (0, band))
    draw = ImageDraw.Draw(canvas)
    for n, (i, row) in enumerate(rows):
        draw.text((pad, pad + n * (size + pad)), row, fill=(255, 255, 0) if i == 0 else (255, 255, 255), font=font)
    top, bottom = band + pad, band + picture.height - pad
    if bottom - top >= 2:
        ramp = colormaps[colormap](np.linspace(1.0, 0.0, bottom - top))[:, :3]  # the top row is the highest value
        bar = np.repeat(np.round(ramp * 255.0).astype(np.uint8)[:, None, :], bar_width, axis=1)
        canvas.paste(Image.fromarray(np.ascontiguousarray(bar), "RGB"), (picture.width + pad, top))
        x = picture.width + pad + bar_width + pad
        draw.text((x, top), "high", fill=(255, 255, 255), font=font)
        draw.text((x, bottom - size), "low", fill=(255, 255, 255), font=font)
    return canvas


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


def save_heatmap(model, path: str | Path, out_dir: str | Path, prediction=None, *,
                 pixels: np.ndarray | None = None) -> Path:
    """Write the Grad-CAM overlay of the image file ``path`` into ``out_dir``; returns the PNG's path. Given the
    image's ``prediction``, the picture carries its legend (``annotate``: result, colour scale, AI label);
    given its decoded ``pixels`` (the stage's), the file is not decoded again."""
    picture = gradcam_overlay(model, model.decode(path).pixels if pixels is None else pixels)
    if prediction is not None:
        picture = annotate(picture, legend_lines(prediction))
    info = PngImagePlugin.PngInfo()
    info.add_text("Source", str(Path(path).resolve()))
    info.add_text("Software", f"pneumoscan Grad-CAM, class {model.classes[PNEUMONIA]}, model {model.sha256[:12]}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with _save_lock:  # choosing the name and claiming it must not interleave between threads
        target = heatmap_path(path, out_dir)
        picture.save(target, pnginfo=info)
    return target
