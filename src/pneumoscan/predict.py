"""Screening with a trained model: ``Model`` (load, score, decide) and the Python API behind every route.

How an image becomes a decision lives in one place, ``pneumoscan.pipeline`` (decode -> checks -> uint8 input ->
``Model.score`` -> calibrated probability -> guard -> threshold); ``Model.predict`` and ``Model.predict_files``
wrap it for one image and for any number of files.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from . import pipeline
from .backends import Backend
from .constants import BATCH_SIZE, PRECISIONS
from .data.images import MAX_PIXELS, DecodedImage, ImageReadError, Source, decode
from .errors import PneumoscanError
from .guard import NOT_XRAY, OUTSIDE_POPULATION, Guard, guard_reason, image_check
from .modelfile import GUARD_PREFIX, read_model_file, resolve_model_path, sha256_file
from .pipeline import STATUSES, Prediction  # noqa: F401 (the API names them here too)
from .record import ModelRecord, Population

DEFAULT_MODEL = Path(__file__).parent / "weights" / "default.safetensors"
DEFAULT_NAME = "pneumoscan-default"
# The bundled model file's sha256, known to the code itself: an edited copy (a threshold changed in its JSON
# header, say) still parses, and would otherwise load under the bundled model's name.
BUNDLED_SHA256 = "15a183a60113de2bebb96d8bc7cc9f307248bed6cc56f7de9370a7da9d4d570f"
# The bundled model's intended population, from its model card: trained and tested on children aged 1 to 5, with
# adults, neonates and older children out of scope. Its file predates the record's population field, and
# rewriting it would change the sha256 every published result names, so the code supplies it, keyed on that sha256
# (an ONNX export of it records the population itself).
BUNDLED_POPULATION = Population(1.0, 6.0, "the ages 1 to 5 years the model was trained and tested on")


class Scores(NamedTuple):
    """What the network says about a batch: raw logits (N, 2), calibrated log-odds (N,), features, guard (N,)."""

    logits: torch.Tensor
    log_odds: torch.Tensor
    features: torch.Tensor
    guard: torch.Tensor


class Model:
    """A loaded pneumoscan model: a backend (torch or onnx) + its record (calibration, thresholds) + guard."""

    def __init__(self, record: ModelRecord, backend: Backend, guard: Guard | None, path: Path, sha256: str, *,
                 max_pixels: int = MAX_PIXELS):
        self.record = record
        self.backend = backend
        self.guard = guard
        self.path = Path(path)
        self.sha256 = sha256
        self.max_pixels = max_pixels
        self.bias = record.bias
        self.thresholds: dict[str, float] = dict(record.thresholds)
        self.prevalence: float | None = None  # set by ``set_prevalence``; None: as fitted on validation

    # --- what the model is -------------------------------------------------------------------------------------
    @property
    def name(self) -> str:
        return self.record.name

    @property
    def preprocessing(self):
        return self.record.preprocessing

    @property
    def classes(self) -> list[str]:
        return list(self.record.classes)

    @property
    def temperature(self) -> float:
        return self.record.temperature

    @property
    def runtime(self) -> str:
        return self.backend.runtime

    @property
    def network(self) -> torch.nn.Module:
        """The PyTorch network, for Grad-CAM; only backends with ``gradcam`` have one."""
        if not self.backend.gradcam:
            raise PneumoscanError("this model runs on onnxruntime and has no PyTorch network (needed for Grad-CAM "
                                  "heatmaps); load the .safetensors model file with the torch backend")
        return self.backend.network

    @property
    def fitted_prevalence(self) -> float | None:
        return self.record.fitted_prevalence

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
        from .calibrate import prior_shift  # scipy: screening never needs it otherwise

        try:
            shift = prior_shift(fitted, float(prevalence))
        except ValueError as exc:
            raise PneumoscanError(str(exc)) from None
        self.bias = self.record.bias + shift
        self.thresholds = {k: float(torch.sigmoid(torch.logit(torch.tensor(v, dtype=torch.float64)) + shift))
                           for k, v in self.record.thresholds.items()}
        self.prevalence = float(prevalence)

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

    # --- the scoring path --------------------------------------------------------------------------------------
    def log_odds(self, logits: torch.Tensor, *, calibrated: bool = True) -> torch.Tensor:
        """Log-odds of pneumonia from (N, 2) logits, with the temperature and bias fitted on validation (or
        none): the scale on which ensemble members are averaged."""
        margin = (logits[:, 1] - logits[:, 0]).float()
        return margin / self.temperature + self.bias if calibrated else margin

    def probability(self, logits: torch.Tensor, *, calibrated: bool = True) -> torch.Tensor:
        """Probability of pneumonia from (N, 2) logits (calibrated, or the plain softmax)."""
        return torch.sigmoid(self.log_odds(logits, calibrated=calibrated))

    def score(self, images: torch.Tensor | np.ndarray, *, tta: bool = False) -> Scores:
        """The one scoring function: uint8 network inputs (N, S, S) -> logits, calibrated log-odds, features and
        guard scores. Every route ends here."""
        images = torch.as_tensor(images)
        logits, feats = self.backend.forward(images, tta=tta)
        guard = self.guard.score(feats) if self.guard is not None else torch.zeros(len(logits))
        return Scores(logits, self.log_odds(logits), feats, guard)

    def prepare(self, decoded: DecodedImage) -> tuple[np.ndarray, str | None]:
        """(uint8 network input (S, S), why the checks say it is no frontal chest X-ray or None)."""
        small = self.preprocessing.to_uint8(decoded.data)
        return small, image_check(decoded, small, self.record.min_side)

    def decode(self, source: Source | DecodedImage | np.ndarray, name: str | None = None) -> DecodedImage:
        return decode(source, name=name, max_pixels=self.max_pixels)

    def result(self, path: str, logits: torch.Tensor, guard_score: float, op: tuple[str, float],
               reason: str | None = None) -> Prediction:
        """The decision for one scored image: the checks first, then the feature guard, then the threshold."""
        name, value = op
        if reason is not None:
            return Prediction(path, None, None, name, value, "not_xray",
                              f"{NOT_XRAY}: {reason}; no probability reported", guard_score)
        if self.guard is not None and guard_score > self.guard.threshold:
            why = guard_reason(guard_score, self.guard.threshold)
            return Prediction(path, None, None, name, value, "out_of_distribution",
                              f"{OUTSIDE_POPULATION}: {why}; no probability reported", guard_score)
        probability = float(self.probability(logits[None])[0])
        decision = self.classes[1] if probability >= value else self.classes[0]
        return Prediction(path, probability, decision, name, value, "ok", "", guard_score)

    def predict(self, source: Source | DecodedImage | np.ndarray, *, threshold: str | float = "screening",
                tta: bool = False, name: str | None = None) -> Prediction:
        """Screen one image: a path, the file's bytes, a ``DecodedImage``, or a float (H, W) array in [0, 1]
        (an array has no header, so only the DICOM header check is skipped).

        A file that cannot be read raises ``ImageReadError``; ``predict_files`` turns that into a row instead.
        """
        op = self.resolve_threshold(threshold)
        item = pipeline.prepare(self, source, name)
        if item.error is not None:
            raise ImageReadError(item.error)
        return pipeline.decide(self, [item], op, tta=tta)[0].prediction

    def predict_files(self, paths: Iterable[str | Path], *, threshold: str | float = "screening",
                      batch_size: int = BATCH_SIZE, tta: bool = False, workers: int | None = None,
                      on_prepared=None) -> Iterator[Prediction]:
        """Screen many files through the pipeline stage (``pipeline.screen``), one Prediction each, in order;
        unreadable ones come back with status "error" and the reason."""
        for screened in pipeline.screen(self, (str(p) for p in paths), threshold=threshold,
                                        batch_size=batch_size, tta=tta, workers=workers, on_prepared=on_prepared):
            yield screened.prediction


def load_model(path: str | Path | None = None, *, device: str = "auto", backend: str = "torch",
               precision: str = "auto", prevalence: float | None = None, max_pixels: int = MAX_PIXELS,
               threads: int | None = None) -> Model:
    """Load a model file or run directory; None loads the bundled default model.

    backend "onnx" runs the network on onnxruntime and needs an .onnx file from ``pneumoscan export``.
    precision (torch backend): "auto" computes in the arithmetic the model's calibration and thresholds were
    fitted on (its record; float32 for the bundled model), so answers are the ones validation chose them on, on
    every machine. "bfloat16" is 1.5-2.2x faster on CPUs with native bf16, with answers that differ slightly.
    prevalence: the pneumonia share where the model is used, to re-base its probabilities (``Model.set_prevalence``).
    max_pixels: larger images are refused before decoding.
    device (torch backend): "auto" (the first CUDA GPU when PyTorch sees one, else the CPU), "cpu", "cuda" or
    "cuda:N"; onnxruntime runs on the CPU.
    """
    if precision not in PRECISIONS:
        raise PneumoscanError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if max_pixels < 1:
        raise PneumoscanError(f"the pixel limit must be positive, got {max_pixels}")
    if backend == "onnx":
        from .backends.onnx import load_onnx

        if device not in ("auto", "cpu"):
            raise PneumoscanError(f"device {device}: the onnx backend runs on the CPU (onnxruntime); use the "
                                  "torch backend (the .safetensors model) for a GPU")
        if path is None:
            raise PneumoscanError("the onnx backend needs an .onnx model file and none is bundled: make one with "
                                  "`pneumoscan export --onnx model.onnx`, then pass --model model.onnx")
        path = Path(path)
        net_backend, record, guard = load_onnx(path, threads=threads)
        if record.name == DEFAULT_NAME and record.source_sha256 != BUNDLED_SHA256:
            raise PneumoscanError(f"{path}: claims to be the bundled model {DEFAULT_NAME} but was not exported "
                                  "from it (its source sha256 differs): refusing a modified copy")
        if record.source_sha256 == BUNDLED_SHA256 and record.population is None:
            record = record.with_(population=BUNDLED_POPULATION)
        model = Model(record, net_backend, guard, path, sha256_file(path), max_pixels=max_pixels)
    elif backend == "torch":
        model = _load_torch(path, device=device, precision=precision, max_pixels=max_pixels)
    else:
        raise PneumoscanError(f"backend must be 'torch' or 'onnx', got {backend!r}")
    model.set_prevalence(prevalence)
    return model


def read_record(path: str | Path) -> tuple[dict[str, torch.Tensor], ModelRecord]:
    """(tensors, typed record) of a ``.safetensors`` model file."""
    tensors, meta = read_model_file(path)
    return tensors, ModelRecord.from_dict(meta, str(path))


def _torch_device(device: str) -> torch.device:
    """auto -> the first CUDA GPU when PyTorch sees one, else the CPU; a GPU asked for but absent is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        chosen = torch.device(device)
    except (RuntimeError, TypeError):
        raise PneumoscanError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}") from None
    if chosen.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise PneumoscanError(f"device {device}: PyTorch sees no CUDA GPU on this machine; use --device cpu "
                                  "(or auto)")
        if chosen.index is not None and chosen.index >= count:
            raise PneumoscanError(f"device {device}: this machine has {count} CUDA GPU(s), cuda:0 to "
                                  f"cuda:{count - 1}")
    elif chosen.type != "cpu":
        raise PneumoscanError(f"device must be auto, cpu, cuda or cuda:N, got {device!r}")
    return chosen


def _load_torch(path: str | Path | None, *, device: str, precision: str, max_pixels: int) -> Model:
    from .backends.torch import TorchBackend
    from .models import network_for_weights

    if path is not None and Path(path).suffix.lower() == ".onnx":
        raise PneumoscanError(f"{path}: an ONNX model file: add --backend onnx to run it "
                              "(in Python: load_model(path, backend='onnx'))")
    device = _torch_device(device)
    path = DEFAULT_MODEL if path is None else resolve_model_path(path)
    if path == DEFAULT_MODEL and not path.is_file():
        raise PneumoscanError(f"{path}: the bundled default model is missing from this installation")
    tensors, record = read_record(path)
    sha256 = sha256_file(path)
    if record.name == DEFAULT_NAME and sha256 != BUNDLED_SHA256:
        raise PneumoscanError(f"{path}: claims to be the bundled model {DEFAULT_NAME} but its sha256 {sha256[:12]} "
                              f"is not the bundled file's {BUNDLED_SHA256[:12]}: refusing a modified copy")
    guard_tensors = {k: v for k, v in tensors.items() if k.startswith(GUARD_PREFIX)}
    weights = {k: v for k, v in tensors.items() if not k.startswith(GUARD_PREFIX)}
    network = network_for_weights(record.arch, len(record.classes))
    try:
        network.load_state_dict(weights)
    except RuntimeError as exc:
        raise PneumoscanError(f"{path}: weights do not fit {record.arch} ({str(exc).splitlines()[0][:200]})") from None
    guard = None
    if guard_tensors and record.guard is not None:
        guard = Guard.from_tensors(guard_tensors, record.guard.threshold)
    network = network.to(device, memory_format=torch.channels_last).eval()
    backend = TorchBackend(network, record.preprocessing, record.precision if precision == "auto" else precision)
    if sha256 == BUNDLED_SHA256 and record.population is None:
        record = record.with_(population=BUNDLED_POPULATION)
    return Model(record, backend, guard, path, sha256, max_pixels=max_pixels)
