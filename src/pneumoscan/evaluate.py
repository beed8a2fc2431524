"""Evaluate a model on a labelled split: every figure at every stored operating point, in one pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import pipeline
from .data.layout import list_split, patient_id
from .data.sources import FolderSource, MedMNISTSource, open_source
from .errors import PneumoscanError
from .metrics import (
    OperatingPoint,
    classification_report,
    confidence_intervals,
    expected_calibration_error,
    operating_point,
    pr_auc,
    roc_auc,
)
from .predict import BATCH_SIZE, Model
from .run import RunFolder


class EvaluationError(PneumoscanError):
    pass


@dataclass
class Evaluation:
    split: str
    n: int
    auc: float
    pr_auc: float
    ece: float  # of the calibrated (temperature-scaled) probability
    ece_uncalibrated: float  # the same logits at temperature 1
    points: dict[str, OperatingPoint]
    reports: dict[str, str]
    tta: bool
    guard_rejected: int  # labelled X-rays the guard would have refused (scored here all the same)
    errors: list[str] = field(default_factory=list)
    labels: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    probabilities: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    # the same logits at temperature 1: the report's reliability diagram shows what calibration changed
    probabilities_uncalibrated: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    # 95% intervals (metrics.confidence_intervals): auc, pr_auc, ece by patient bootstrap; per operating point
    # sensitivity, specificity, accuracy by Clopper-Pearson
    intervals: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready; undefined figures (e.g. precision with no positive decision) are None, because
        json.dumps would write NaN, which strict JSON parsers reject."""
        return _json_safe({
            "split": self.split, "n": self.n, "auc": self.auc, "pr_auc": self.pr_auc, "ece": self.ece,
            "ece_uncalibrated": self.ece_uncalibrated, "tta": self.tta, "guard_rejected": self.guard_rejected,
            "errors": self.errors, **{name: p.to_dict() for name, p in self.points.items()},
            "intervals": {k: list(v) if isinstance(v, tuple) else
                          ({m: list(i) for m, i in v.items()} if isinstance(v, dict) else v)
                          for k, v in self.intervals.items()},
        })


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def evaluate(model: Model, data_dir: str | Path, split: str = "test", *, tta: bool = False,
             batch_size: int = BATCH_SIZE) -> Evaluation:
    """Score the calibrated probabilities of every image of ``split`` against its folder label.

    Unreadable images are listed in ``errors`` and left out of the figures; guard rejections are counted but
    still scored, so the figures describe the classifier and the guard is measured on its own.
    """
    run = RunFolder.of_model(model.path) if split == VALIDATION else None
    source = run.source() if run is not None else open_source(data_dir)
    if isinstance(source, FolderSource):  # files go through the prediction path, its image checks included
        labels, logits, scores, errors, groups = _score_folder(model, data_dir, split, batch_size, tta)
    else:  # no patient ids in an .npz: every image is its own patient
        labels, logits, scores, errors = _score_npz(model, data_dir, split, batch_size, tta)
        groups = None
    if not labels:
        raise EvaluationError(f"{data_dir}: no readable image in the {split} split ({len(errors)} unreadable)")
    y = np.array(labels)
    stacked = torch.stack(logits)
    p = model.probability(stacked).numpy()
    raw = model.probability(stacked, calibrated=False).numpy()
    rejected = int(sum(s > model.guard.threshold for s in scores)) if model.guard is not None else 0
    order = sorted(model.thresholds, key=lambda k: (k != "screening", k))  # screening first, as clinicians read it
    points = {name: operating_point(y, p, model.thresholds[name]) for name in order}
    reports = {name: classification_report(y, p, model.thresholds[name]) for name in order}
    intervals = confidence_intervals(y, p, groups, points)
    return Evaluation(split, len(y), roc_auc(y, p), pr_auc(y, p), expected_calibration_error(y, p),
                      expected_calibration_error(y, raw), points, reports, tta, rejected, errors, y, p, raw,
                      intervals)


VALIDATION = "validation"  # the run's own patient-grouped validation split (split.csv), not the official val


def _validation_samples(model: Model) -> list:
    """The validation subset the model's thresholds and calibration were chosen on, from its run folder."""
    run = RunFolder.of_model(model.path)
    if run is None:
        raise EvaluationError(f"{model.path}: --split {VALIDATION} needs the model's run directory (no split.csv "
                              "beside the model file)")
    return run.split()[1]


def _score_folder(model: Model, data_dir, split: str, batch_size: int, tta: bool):
    """(labels, logits, guard scores, error messages, patient ids) for the image files of a Kaggle-layout split."""
    samples = _validation_samples(model) if split == VALIDATION else list_split(data_dir, split)
    label_of = {str(s.path): s.label for s in samples}
    labels, logits, scores, errors, groups = [], [], [], [], []
    for item in pipeline.screen(model, label_of, batch_size=batch_size, tta=tta):
        path = item.prediction.path
        if item.logits is None:
            errors.append(item.prediction.message)
            continue
        labels.append(label_of[path])
        logits.append(item.logits)
        scores.append(item.prediction.guard_score)
        groups.append(patient_id(Path(path).name))
    return labels, logits, scores, errors, groups


def _score_npz(model: Model, path, split: str, batch_size: int, tta: bool):
    """The same for a source held as arrays (a MedMNIST .npz): an official split, or the run's validation split,
    resized by the model's own Preprocessing."""
    if split == VALIDATION:
        images, labels = validation_images(model)
    else:
        cache = open_source(path).images(split, model.preprocessing)
        images, labels = cache.images, cache.labels
    logits, scores = [], []
    for start in range(0, len(images), batch_size):
        scored = model.score(torch.from_numpy(images[start:start + batch_size]), tta=tta)
        logits += list(scored.logits)
        scores += scored.guard.tolist()
    return labels.tolist(), logits, scores, []


# --- robustness to acquisition shift ------------------------------------------------------------------------------
# A validation split carved from train shares the training images' acquisition, so nearly every recipe scores
# ~0.997 AUC on it while the official test split (another acquisition) scores lower. Scoring the same validation
# images under fixed, deterministic acquisition changes gives recipes a way to differ on validation data alone:
# the selection rule of docs/experiments.md. Each shift acts on the uint8 network input (1, S, S).

def _shift_ops(size: int) -> dict:
    from torchvision.transforms.v2 import functional as TF

    def zoom(factor: float):
        def op(x):
            if factor < 1:  # zoom out: the radiograph shrinks inside an edge-replicated border
                inner = round(size * factor)
                small = TF.resize(x, [inner, inner], antialias=True)
                pad = size - inner
                return torch.nn.functional.pad(small.float(), (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2),
                                               mode="replicate").round().to(torch.uint8)
            return TF.resize(TF.center_crop(x, [round(size / factor)] * 2), [size, size], antialias=True)
        return op

    def noise(x):
        g = torch.Generator().manual_seed(0)
        return (x.float() + torch.randn(x.shape, generator=g) * 8.0).clamp(0, 255).round().to(torch.uint8)

    return {
        "gamma 0.67": lambda x: TF.adjust_gamma(x, 0.67),
        "gamma 1.5": lambda x: TF.adjust_gamma(x, 1.5),
        "contrast 0.7": lambda x: TF.adjust_contrast(x.expand(3, -1, -1), 0.7)[:1],
        "contrast 1.3": lambda x: TF.adjust_contrast(x.expand(3, -1, -1), 1.3)[:1],
        "blur sigma 1.2": lambda x: TF.gaussian_blur(x, [7, 7], [1.2, 1.2]),
        "sharpen 2": lambda x: TF.adjust_sharpness(x, 2.0),
        "half resolution": lambda x: TF.resize(TF.resize(x, [size // 2] * 2, antialias=True), [size, size]),
        "jpeg quality 25": lambda x: TF.jpeg(x, 25),
        "zoom out 0.85": zoom(0.85),
        "zoom in 1.15": zoom(1.15),
        "noise 8/255": noise,
    }


@dataclass
class ShiftResult:
    shift: str
    auc: float
    screening: OperatingPoint
    balanced_accuracy: float  # accuracy at the balanced threshold


def shifted_logits(model: Model, images: np.ndarray, *, batch_size: int = BATCH_SIZE):
    """(shift name, logits (N, 2)) for uint8 network inputs (N, S, S) as given ("none") and under each shift."""
    ops = {"none": lambda x: x, **_shift_ops(model.preprocessing.size)}
    for name, op in ops.items():
        logits = []
        for start in range(0, len(images), batch_size):
            batch = torch.stack([op(torch.from_numpy(im)[None]) for im in images[start:start + batch_size]])
            logits.append(model.score(batch[:, 0]).logits)
        yield name, torch.cat(logits)


def evaluate_shifts(model: Model, images: np.ndarray, labels: np.ndarray, *,
                    batch_size: int = BATCH_SIZE) -> list[ShiftResult]:
    """Scores of uint8 network inputs (N, S, S) as given ("none") and under each fixed acquisition shift."""
    results = []
    for name, logits in shifted_logits(model, images, batch_size=batch_size):
        p = model.probability(logits).numpy()
        balanced = operating_point(labels, p, model.thresholds["balanced"])
        results.append(ShiftResult(name, roc_auc(labels, p), operating_point(labels, p, model.thresholds["screening"]),
                                   balanced.accuracy))
    return results


def validation_images(model: Model, data_dir: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """uint8 network inputs and labels of the model's own validation split (its run folder's split.csv, found from
    any working directory), or the official val split of a MedMNIST .npz given as ``data_dir``."""
    source = open_source(data_dir) if data_dir is not None else None
    if isinstance(source, MedMNISTSource):
        cache = source.images("val", model.preprocessing)
        return cache.images, cache.labels
    run = RunFolder.of_model(model.path)
    if run is None:
        raise EvaluationError(f"{model.path}: the validation split needs the model's run directory (no split.csv "
                              "beside the model file)")
    return run.validation_images(model.preprocessing)
