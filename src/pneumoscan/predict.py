"""Screening with a trained model: the Python API behind ``pneumoscan predict`` and the server.

file -> read_image -> Preprocessing -> network -> logits / temperature -> probability -> threshold -> decision,
with the guard's verdict on the same forward pass. ``predict_files`` streams any number of files through a
bounded queue of decoded images, so memory does not grow with the folder, and decoding overlaps inference.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .data.images import ImageReadError, Source, read_image
from .errors import PneumoscanError
from .guard import Guard
from .modelfile import GUARD_PREFIX, read_model_file, resolve_model_path, sha256_file
from .models import cpu_has_bf16, create_model, logits_and_features
from .preprocess import Preprocessing

DEFAULT_MODEL = Path(__file__).parent / "weights" / "default.safetensors"
# 16 images per forward pass: on a CPU nearly as fast as 32, and the peak memory of a run stays near 1.2 GB
# instead of 1.6 GB (measured with benchmarks/bench_predict.py).
BATCH_SIZE = 16
NOT_XRAY_MESSAGE = "not a frontal chest X-ray (outside the training distribution); no probability reported"

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


@dataclass(frozen=True)
class Prediction:
    """One screened image. ``status``: ok | not_xray | error; probability and decision are None unless ok."""

    path: str
    probability: float | None
    decision: str | None
    operating_point: str
    threshold: float
    status: str
    message: str = ""
    guard_score: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


class Model:
    """A loaded pneumoscan model: network + preprocessing + temperature + thresholds + guard."""

    def __init__(self, network: torch.nn.Module, meta: dict, guard: Guard | None, path: Path, sha256: str,
                 precision: str = "float32"):
        self.network = network.eval()
        self.precision = precision  # float32 | bfloat16 (autocast of the network only; see load_model)
        self.runtime = f"PyTorch {precision}"  # what computes the network, as reports and /v1/model show it
        self.meta = meta
        self.guard = guard
        self.path = path
        self.sha256 = sha256
        self.preprocessing = Preprocessing.from_dict(meta["preprocessing"])
        self.temperature = float(meta.get("temperature", 1.0))
        self.bias = float(meta.get("bias", 0.0))  # absent in files written before Platt scaling
        self.thresholds: dict[str, float] = {k: float(v) for k, v in meta["thresholds"].items()}
        self.classes: list[str] = list(meta["classes"])
        self.prevalence: float | None = None  # set by ``set_prevalence``; None: as fitted on validation

    @property
    def fitted_prevalence(self) -> float | None:
        """Pneumonia share of the validation images the calibration was fitted on, when the file records it."""
        counts = self.meta.get("training", {}).get("val_counts")
        return counts[1] / sum(counts) if counts and sum(counts) and 0 < counts[1] < sum(counts) else None

    def set_prevalence(self, prevalence: float | None) -> None:
        """Re-base calibrated probabilities to the pneumonia prevalence where the model is used.

        The calibration bias was fitted on validation images, whose prevalence (74% pneumonia for Kermany) is rarely
        a clinic's. The log-odds shift moves the bias and the named thresholds together, so every decision stays
        the same; only the probabilities, and numeric thresholds a caller passes, mean the new prevalence.
        """
        if prevalence is None:
            return
        fitted = self.fitted_prevalence
        if fitted is None:
            raise PneumoscanError(f"{self.path}: the model file does not record the prevalence its calibration "
                                  "was fitted at (training.val_counts), so it cannot be re-based")
        # imported here: calibrate pulls in scipy, which screening never needs
        from .calibrate import prior_shift

        try:
            shift = prior_shift(fitted, float(prevalence))
        except ValueError as exc:
            raise PneumoscanError(str(exc)) from None
        self.bias = float(self.meta.get("bias", 0.0)) + shift
        self.thresholds = {k: float(torch.sigmoid(torch.logit(torch.tensor(float(v), dtype=torch.float64)) + shift))
                           for k, v in self.meta["thresholds"].items()}
        self.prevalence = float(prevalence)

    @property
    def name(self) -> str:
        return str(self.meta.get("name", self.path.stem))

    def resolve_threshold(self, threshold: str | float) -> tuple[str, float]:
        """('screening'|'balanced'|'custom', value) from a name or a number in (0, 1)."""
        if isinstance(threshold, str) and threshold in self.thresholds:
            return threshold, self.thresholds[threshold]
        try:
            value = float(threshold)
        except (TypeError, ValueError):
            raise PneumoscanError(
                f"threshold must be one of {', '.join(self.thresholds)} or a number in (0, 1), got {threshold!r}"
            ) from None
        if not 0.0 < value < 1.0:
            raise PneumoscanError(f"threshold must be in (0, 1), got {value}")
        return "custom", value

    @torch.no_grad()
    def forward(self, batch: torch.Tensor, *, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised batch (N, C, S, S) -> (logits averaged over TTA views (N, 2), guard score (N,))."""
        # channels_last: same float32 arithmetic, ~1.5x faster convolutions on CPU (oneDNN's preferred layout)
        views = [v.contiguous(memory_format=torch.channels_last) for v in (tta_views(batch) if tta else [batch])]
        with torch.autocast(batch.device.type, dtype=torch.bfloat16, enabled=self.precision == "bfloat16"):
            logits, feats = logits_and_features(self.network, views[0])
            logits = logits.float()  # TTA views are summed in float32 whatever the network's precision
            for view in views[1:]:
                logits = logits + logits_and_features(self.network, view)[0].float()
        scores = self.guard.score(feats.float()) if self.guard is not None else torch.zeros(len(batch))
        return logits / len(views), scores  # the guard judges the image as given, not its TTA views

    def forward_images(self, images: torch.Tensor, *, tta: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Like ``forward``, from images (N, [1,] S, S), uint8 or float in [0, 1]: the ONNX backend overrides this
        because its graph normalises inside."""
        return self.forward(self.preprocessing.normalize(images), tta=tta)

    def log_odds(self, logits: torch.Tensor, *, calibrated: bool = True) -> torch.Tensor:
        """Log-odds of pneumonia from (N, 2) logits, with the temperature and bias fitted on validation (or
        none): the scale on which ensemble members are averaged."""
        margin = (logits[:, 1] - logits[:, 0]).float()
        return margin / self.temperature + self.bias if calibrated else margin

    def probability(self, logits: torch.Tensor, *, calibrated: bool = True) -> torch.Tensor:
        """Probability of pneumonia from (N, 2) logits; calibrated with the temperature and bias fitted on
        validation, or the plain softmax when ``calibrated`` is False."""
        return torch.sigmoid(self.log_odds(logits, calibrated=calibrated))

    @property
    def min_side(self) -> int:
        """Smallest image side screened; optional meta key guard.min_side, by default a quarter of the input size
        (56 px for 224 px models, 16 px for 64 px MedMNIST models whose inputs are 28 px)."""
        return int(self.meta.get("guard", {}).get("min_side", self.preprocessing.size // 4))

    def image_check(self, small: np.ndarray, info: dict) -> str | None:
        """Why an image cannot be a chest X-ray from cheap statistics, or None. ``small``: the uint8 network input;
        ``info``: what ``read_image`` reported (size, colourfulness)."""
        if (reason := dicom_header_check(info)) is not None:
            return reason
        if info.get("colourfulness", 0.0) > MAX_COLOURFULNESS:
            return f"colour image (colourfulness {info['colourfulness']:.0f})"
        width, height = info.get("width", small.shape[1]), info.get("height", small.shape[0])
        if min(width, height) < self.min_side:
            return f"image is {width}x{height} pixels, below the {self.min_side} px minimum"
        if max(width, height) > MAX_ASPECT * min(width, height):
            return f"image is {width}x{height} pixels, too elongated for a chest radiograph"
        if float(small.std()) / 255.0 < MIN_CONTRAST:
            return "image is blank or nearly uniform"
        if (share := two_level_share(small)) > MAX_TWO_LEVEL_SHARE:
            return f"{share:.0%} of the image is two gray levels (a drawing, mask or binary scan)"
        return None

    def _result(self, path: str, probability: float, score: float, op: tuple[str, float],
                reason: str | None = None) -> Prediction:
        name, value = op
        if reason is not None:
            return Prediction(path, None, None, name, value, "not_xray", f"{NOT_XRAY_MESSAGE}: {reason}", score)
        if self.guard is not None and score > self.guard.threshold:
            return Prediction(path, None, None, name, value, "not_xray", NOT_XRAY_MESSAGE, score)
        decision = self.classes[1] if probability >= value else self.classes[0]
        return Prediction(path, probability, decision, name, value, "ok", "", score)

    def predict(self, source: Source | np.ndarray, *, threshold: str | float = "screening",
                tta: bool = False, name: str | None = None) -> Prediction:
        """Screen one image: a path, the file's bytes, or a float (H, W) array in [0, 1].

        A file that cannot be read raises ``ImageReadError``; ``predict_files`` turns that into a row instead.
        """
        op = self.resolve_threshold(threshold)
        info: dict = {}
        if isinstance(source, np.ndarray):
            image, label = source, name or "<array>"
        else:
            image = read_image(source, name=name, reduce_to=self.preprocessing.size, info=info)
            label = name or ("<bytes>" if isinstance(source, bytes | bytearray) else str(source))
        resized = self.preprocessing.resize(image)
        reason = self.image_check(np.round(resized * 255.0), info)
        logits, score = self.forward_images(torch.from_numpy(resized)[None], tta=tta)
        return self._result(label, float(self.probability(logits)[0]), float(score[0]), op, reason)

    def score_files(self, paths: Iterable[str | Path], *, batch_size: int = BATCH_SIZE, tta: bool = False,
                    workers: int | None = None) -> Iterator[Scored]:
        """(path, logits or None, guard score or None, error message or None) per file, in input order.

        Files are decoded ahead in threads (PIL releases the GIL), at most two batches in flight, so memory is
        bounded whatever the number of files and decoding overlaps the network.
        """
        prep = self.preprocessing

        def load(path: str) -> tuple[np.ndarray, str | None] | str:
            try:
                info: dict = {}
                small = prep.to_uint8(read_image(path, reduce_to=prep.size, info=info))
                return small, self.image_check(small, info)
            except ImageReadError as exc:
                return str(exc)

        pending: list[tuple[str, tuple | str]] = []
        with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
            for item in _bounded_map(pool, load, (str(p) for p in paths), ahead=2 * batch_size):
                pending.append(item)
                if len(pending) == batch_size:
                    yield from self._score_batch(pending, tta)
                    pending = []
            yield from self._score_batch(pending, tta)

    def _score_batch(self, pending: list[tuple[str, tuple | str]], tta: bool) -> Iterator[Scored]:
        images = [d[0] for _, d in pending if not isinstance(d, str)]
        if images:
            logits, scores = self.forward_images(torch.from_numpy(np.stack(images)), tta=tta)
        i = 0
        for path, decoded in pending:
            if isinstance(decoded, str):
                yield Scored(path, None, None, decoded)
            else:
                yield Scored(path, logits[i], float(scores[i]), None, decoded[1])
                i += 1

    def predict_files(self, paths: Iterable[str | Path], *, threshold: str | float = "screening",
                      batch_size: int = BATCH_SIZE, tta: bool = False, workers: int | None = None) -> Iterator[Prediction]:
        """Screen many files; unreadable ones come back with status "error" and the reason."""
        op = self.resolve_threshold(threshold)
        for item in self.score_files(paths, batch_size=batch_size, tta=tta, workers=workers):
            if item.error is not None:
                yield Prediction(item.path, None, None, op[0], op[1], "error", item.error)
            else:
                probability = float(self.probability(item.logits[None])[0])
                yield self._result(item.path, probability, item.guard_score, op, item.image_check)


def two_level_share(small: np.ndarray) -> float:
    """Share of a uint8-valued image held by its two most frequent gray levels (high for drawings and masks)."""
    counts = np.bincount(np.asarray(small, dtype=np.uint8).ravel(), minlength=256)
    return float(np.sort(counts)[-2:].sum()) / small.size


def dicom_header_check(info: dict) -> str | None:
    """Why a DICOM's own header says it is no frontal chest radiograph, or None.

    The header is the most reliable evidence there is: a CT or MR slice can look X-ray-like to the network, but
    its Modality says what it is. Missing tags are not held against an image (many exports leave them empty).
    """
    modality = info.get("modality")
    if modality is not None and modality not in RADIOGRAPH_MODALITIES:
        return f"DICOM Modality is {modality}; chest radiographs are {', '.join(sorted(RADIOGRAPH_MODALITIES))}"
    body_part = info.get("body_part")
    if body_part is not None and not any(part in body_part for part in CHEST_BODY_PARTS):
        return f"DICOM BodyPartExamined is {body_part}, not the chest"
    view = info.get("view")
    if view is not None and view in LATERAL_VIEWS:
        return f"DICOM ViewPosition is {view}, a lateral view; the model reads frontal (PA/AP) views"
    return None


class Scored(NamedTuple):
    path: str
    logits: torch.Tensor | None
    guard_score: float | None
    error: str | None
    image_check: str | None = None  # why cheap statistics say it is no chest X-ray (Model.image_check)


def _bounded_map(pool: ThreadPoolExecutor, fn, items: Iterable[str], ahead: int):
    """Like pool.map, in order, but never more than ``ahead`` results in flight (pool.map reads all input first)."""
    from collections import deque

    queue: deque = deque()
    for item in items:
        queue.append((item, pool.submit(fn, item)))
        if len(queue) >= ahead:
            path, future = queue.popleft()
            yield path, future.result()
    while queue:
        path, future = queue.popleft()
        yield path, future.result()


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


PRECISIONS = ("auto", "float32", "bfloat16")


def load_model(path: str | Path | None = None, *, device: str = "cpu", backend: str = "torch",
               precision: str = "auto", prevalence: float | None = None) -> Model:
    """Load a model file or run directory; None loads the bundled default model.

    backend "onnx" runs the network on onnxruntime and needs an .onnx file from ``pneumoscan export``.
    precision (torch backend): "auto" runs the network under bfloat16 autocast on CPUs with native bf16 (AVX512-BF16
    or AMX; 1.5-2.2x faster, answers checked in docs/benchmarks.md) and in float32 elsewhere.
    prevalence: the pneumonia share where the model is used, to re-base its probabilities (``Model.set_prevalence``).
    """
    model = _load(path, device=device, backend=backend, precision=precision)
    model.set_prevalence(prevalence)
    return model


def _load(path: str | Path | None, *, device: str, backend: str, precision: str) -> Model:
    if precision not in PRECISIONS:
        raise PneumoscanError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if backend == "onnx":
        from .export import load_onnx_model

        return load_onnx_model(DEFAULT_MODEL.with_suffix(".onnx") if path is None else path)
    if backend != "torch":
        raise PneumoscanError(f"backend must be 'torch' or 'onnx', got {backend!r}")
    path = DEFAULT_MODEL if path is None else resolve_model_path(path)
    if path == DEFAULT_MODEL and not path.is_file():
        raise PneumoscanError(f"{path}: the bundled default model is missing from this installation")
    tensors, meta = read_model_file(path)
    guard_tensors = {k: v for k, v in tensors.items() if k.startswith(GUARD_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(GUARD_PREFIX)}
    network = create_model(meta["arch"], pretrained="none", num_classes=len(meta["classes"]))
    network.load_state_dict(weights)
    guard = Guard.from_tensors(guard_tensors, float(meta["guard"]["threshold"])) if guard_tensors else None
    if precision == "auto":
        precision = "bfloat16" if torch.device(device).type == "cpu" and cpu_has_bf16() else "float32"
    return Model(network.to(device, memory_format=torch.channels_last), meta, guard, path, sha256_file(path),
                 precision)
