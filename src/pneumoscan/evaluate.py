"""Evaluate a model on a labelled split: every figure at every stored operating point, in one pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .data import medmnist
from .data.layout import list_split, read_split
from .errors import PneumoscanError
from .metrics import (
    OperatingPoint,
    classification_report,
    expected_calibration_error,
    operating_point,
    pr_auc,
    roc_auc,
)
from .predict import BATCH_SIZE, Model


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

    def to_dict(self) -> dict:
        """JSON-ready; undefined figures (e.g. precision with no positive decision) are None, because
        json.dumps would write NaN, which strict JSON parsers reject."""
        return _json_safe({
            "split": self.split, "n": self.n, "auc": self.auc, "pr_auc": self.pr_auc, "ece": self.ece,
            "ece_uncalibrated": self.ece_uncalibrated, "tta": self.tta, "guard_rejected": self.guard_rejected,
            "errors": self.errors, **{name: p.to_dict() for name, p in self.points.items()},
        })


def _json_safe(value):
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


def evaluate(model: Model, data_dir: str | Path, split: str = "test", *, tta: bool = False,
             batch_size: int = BATCH_SIZE) -> Evaluation:
    """Score the calibrated probabilities of every image of ``split`` against its folder label.

    Unreadable images are listed in ``errors`` and left out of the figures; guard rejections are counted but
    still scored, so the figures describe the classifier and the guard is measured on its own.
    """
    if medmnist.is_npz(data_dir):
        labels, logits, scores, errors = _score_npz(model, data_dir, split, batch_size, tta)
    else:
        labels, logits, scores, errors = _score_folder(model, data_dir, split, batch_size, tta)
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
    return Evaluation(split, len(y), roc_auc(y, p), pr_auc(y, p), expected_calibration_error(y, p),
                      expected_calibration_error(y, raw), points, reports, tta, rejected, errors, y, p, raw)


VALIDATION = "validation"  # the run's own patient-grouped validation split (split.csv), not the official val


def _validation_samples(model: Model) -> list:
    """The validation subset the model's thresholds and calibration were chosen on, from its run directory."""
    split_file = model.path.parent / "split.csv"
    if not split_file.is_file():
        raise EvaluationError(f"{model.path}: --split {VALIDATION} needs the model's run directory (no split.csv "
                              "beside the model file)")
    return read_split(split_file)[1]


def _score_folder(model: Model, data_dir, split: str, batch_size: int, tta: bool):
    """(labels, logits, guard scores, error messages) for the image files of a Kaggle-layout split."""
    samples = _validation_samples(model) if split == VALIDATION else list_split(data_dir, split)
    label_of = {str(s.path): s.label for s in samples}
    labels, logits, scores, errors = [], [], [], []
    for item in model.score_files(label_of, batch_size=batch_size, tta=tta):
        if item.error is not None:
            errors.append(item.error)
            continue
        labels.append(label_of[item.path])
        logits.append(item.logits)
        scores.append(item.guard_score)
    return labels, logits, scores, errors


def _score_npz(model: Model, path, split: str, batch_size: int, tta: bool):
    """The same for one official split of a MedMNIST .npz, resized by the model's own Preprocessing."""
    images, labels = medmnist.load_split(path, split, model.preprocessing)
    logits, scores = [], []
    for start in range(0, len(images), batch_size):
        batch = model.preprocessing.normalize(torch.from_numpy(images[start:start + batch_size]))
        out, score = model.forward(batch, tta=tta)
        logits += list(out)
        scores += score.tolist()
    return labels.tolist(), logits, scores, []
