"""Evaluate a model on a labelled split: every figure at every stored operating point, in one pass."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from . import pipeline
from .data.labels import LabelledSet
from .data.layout import list_split
from .data.sources import SITE, FolderSource, LabelsSource, MedMNISTSource, open_source
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
    guard_rejected: int  # images refused as outside the training population (not in the figures)
    errors: list[str] = field(default_factory=list)  # the messages of unreadable images (not in the figures)
    # labelled site data: one line per CSV row or file left out before scoring (data.labels), naming it
    left_out: list[str] = field(default_factory=list)
    # every image the screening stage refused, as predict would have: status -> [{"path", "message"}]
    refused: dict[str, list[dict]] = field(default_factory=dict)
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
            "errors": self.errors, "left_out": self.left_out, "refused": self.refused,
            "refused_counts": {status: len(items) for status, items in self.refused.items()},
            **{name: p.to_dict() for name, p in self.points.items()},
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


# the stage's statuses that carry no probability, in words
REFUSED = {"not_xray": "not a frontal chest X-ray", "outside_population": "outside the intended population",
           "out_of_distribution": "outside the training population", "error": "unreadable"}


def evaluate(model: Model, data_dir: str | Path | LabelledSet, split: str | None = None, *, tta: bool = False,
             batch_size: int = BATCH_SIZE) -> Evaluation:
    """Score the calibrated probabilities of every image of ``split`` against its label.

    ``data_dir`` is a Kaggle-layout folder (``split`` defaults to test), a MedMNIST .npz, or labelled site data (a
    labels CSV or a folder with NORMAL/ and PNEUMONIA/, or the ``LabelledSet`` already read from one): all of it is
    the split ``site``, and the bootstrap keeps each patient's images together (``data.labels`` says how patients
    are found). ``validation`` is the model's run's own validation split (its split.csv), whatever the source.

    Every image goes through the screening stage (``pipeline``) with predict's checks: the figures count only
    the images predict would have answered (status ok); those it refuses (not a chest X-ray, outside the
    training population, unreadable) are listed in ``refused`` by status, apart from the figures, so a colour
    photo in a labelled folder cannot become a false positive. Images from an .npz have no file to check, so
    only the feature guard can refuse them.
    """
    run = RunFolder.of_model(model.path) if split == VALIDATION else None
    if run is not None:
        source = run.source()
    elif isinstance(data_dir, LabelledSet):
        source = LabelsSource(data_dir.given or data_dir.root, data_dir)
    else:
        source = open_source(data_dir)
    split = split or (SITE if isinstance(source, LabelsSource) else "test")
    left_out = source.labelled.problems if isinstance(source, LabelsSource) and split != VALIDATION else []
    where = source.labelled.name if isinstance(source, LabelsSource) and split != VALIDATION else data_dir
    patient_of: dict[str, str] = {}
    if isinstance(source, (FolderSource, LabelsSource)):
        screened, label_of, patient_of = _screen_files(model, source, data_dir, split, batch_size, tta)
    else:
        screened, label_of = _screen_npz(model, data_dir, split, batch_size, tta)
    labels, logits, groups = [], [], []
    refused: dict[str, list[dict]] = {status: [] for status in REFUSED}
    for item in screened:
        pred = item.prediction
        if pred.status != "ok":
            refused[pred.status].append({"path": pred.path, "message": pred.message})
            continue
        labels.append(label_of[pred.path])
        logits.append(item.logits)
        groups.append(patient_of.get(pred.path, pred.path))
    if not labels:
        counts = ", ".join(f"{len(v)} {REFUSED[k]}" for k, v in refused.items() if v) or "no image found"
        raise EvaluationError(f"{where}: no image in the {split} split could be judged ({counts})")
    y = np.array(labels)
    stacked = torch.stack(logits)
    p = model.probability(stacked).numpy()
    raw = model.probability(stacked, calibrated=False).numpy()
    order = sorted(model.thresholds, key=lambda k: (k != "screening", k))  # screening first, as clinicians read it
    points = {name: operating_point(y, p, model.thresholds[name]) for name in order}
    reports = {name: classification_report(y, p, model.thresholds[name]) for name in order}
    # no patient ids in an .npz: every image is its own patient
    intervals = confidence_intervals(y, p, groups if patient_of else None, points)
    errors = [r["message"] for r in refused["error"]]
    return Evaluation(split, len(y), roc_auc(y, p), pr_auc(y, p), expected_calibration_error(y, p),
                      expected_calibration_error(y, raw), points, reports, tta, len(refused["out_of_distribution"]),
                      errors, list(left_out), refused, y, p, raw, intervals)


VALIDATION = "validation"  # the run's own patient-grouped validation split (split.csv), not the official val


def _validation_samples(model: Model) -> list:
    """The validation subset the model's thresholds and calibration were chosen on, from its run folder."""
    run = RunFolder.of_model(model.path)
    if run is None:
        raise EvaluationError(f"{model.path}: --split {VALIDATION} needs the model's run directory (no split.csv "
                              "beside the model file)")
    return run.split()[1]


def _screen_files(model: Model, source, data_dir, split: str, batch_size: int, tta: bool):
    """(the stage's results, label per path, patient per path) for the image files of a Kaggle-layout split, of
    labelled site data, or of the run's validation split."""
    if split == VALIDATION:
        samples = _validation_samples(model)
    elif isinstance(source, LabelsSource):
        samples = source.samples(split)
    else:
        samples = list_split(data_dir, split)  # the paths as given, as the refused lines print them
    label_of = {str(s.path): s.label for s in samples}
    patient_of = {str(s.path): s.patient or str(s.path) for s in samples}
    return pipeline.screen(model, label_of, batch_size=batch_size, tta=tta), label_of, patient_of


def _screen_npz(model: Model, path, split: str, batch_size: int, tta: bool):
    """The same for a source held as arrays (a MedMNIST .npz): an official split, or the run's validation split,
    resized by the model's own Preprocessing, each image named by its split and index."""
    if split == VALIDATION:
        images, labels = validation_images(model)
    else:
        cache = open_source(path).images(split, model.preprocessing)
        images, labels = cache.images, cache.labels
    names = [f"{split}[{i}]" for i in range(len(images))]
    label_of = dict(zip(names, (int(v) for v in np.asarray(labels).reshape(-1)), strict=True))
    return _decide_arrays(model, names, images, batch_size, tta), label_of


def _decide_arrays(model: Model, names: list[str], images: np.ndarray, batch_size: int, tta: bool = False):
    """The stage's results for uint8 network inputs already at the model's size, a batch per ``decide`` call."""
    op = model.resolve_threshold("screening")  # the figures use the logits at every threshold; any op will do
    for start in range(0, len(images), batch_size):
        items = [pipeline.from_array(name, image)
                 for name, image in zip(names[start:start + batch_size], images[start:start + batch_size],
                                        strict=True)]
        yield from pipeline.decide(model, items, op, tta=tta)


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
    names = [str(i) for i in range(len(images))]
    for name, op in ops.items():
        shifted = np.stack([op(torch.from_numpy(im)[None])[0].numpy() for im in images]) if len(images) else images
        yield name, torch.stack([item.logits for item in _decide_arrays(model, names, shifted, batch_size)])


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


def mean_of_shifts(results: list[ShiftResult]) -> dict[str, float]:
    """The figures averaged over the shifted versions (every result but the first, "none"): one number per figure
    for comparing recipes."""
    shifted = results[1:]
    return {"auc": float(np.mean([r.auc for r in shifted])),
            "screening_sensitivity": float(np.mean([r.screening.sensitivity for r in shifted])),
            "screening_specificity": float(np.mean([r.screening.specificity for r in shifted])),
            "balanced_accuracy": float(np.mean([r.balanced_accuracy for r in shifted]))}


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
