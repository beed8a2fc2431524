"""Find a Kaggle-layout chest X-ray dataset on disk and split it by patient.

Layout: ``DATA_DIR/{train,val,test}/{NORMAL,PNEUMONIA}/*.{jpeg,jpg,png}`` (class folders are matched
case-insensitively). Kermany file names carry the patient id, and one patient can have several images, so a
validation split carved out of train must keep each patient on one side: otherwise validation figures are
inflated by near-duplicate images of patients the network has already seen. A run records its split in split.csv
through ``pneumoscan.run.RunFolder``.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import PneumoscanError
from .images import SUFFIXES

CLASSES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
SPLITS: tuple[str, ...] = ("train", "val", "test")
IMAGE_SUFFIXES = SUFFIXES  # the accepted formats' file names (data.images, the one list)

# person1000_bacteria_2931.jpeg -> person1000 ; IM-0115-0001.jpeg -> IM-0115 ;
# NORMAL2-IM-0123-0001.jpeg -> NORMAL2-IM-0123
_PATIENT_PATTERNS = (re.compile(r"^(person\d+)_"), re.compile(r"^((?:NORMAL2-)?IM-\d+)-"))


class DatasetError(PneumoscanError):
    """The data folder is not usable; the message says what is wrong and where."""


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int  # index into CLASSES: 0 = NORMAL, 1 = PNEUMONIA
    patient: str


def kermany_patient(filename: str) -> str | None:
    """The patient id a Kermany file name carries, or None when the name has neither pattern."""
    for pattern in _PATIENT_PATTERNS:
        match = pattern.match(filename)
        if match:
            return match.group(1)
    return None


def patient_id(filename: str) -> str:
    """Patient id from a Kermany file name; an unknown pattern counts as its own patient."""
    return kermany_patient(filename) or Path(filename).stem


def _class_dirs(split_dir: Path) -> dict[str, Path]:
    found = {p.name.upper(): p for p in split_dir.iterdir() if p.is_dir()}
    missing = [c for c in CLASSES if c not in found]
    if missing:
        raise DatasetError(f"{split_dir}: missing class folder(s) {', '.join(missing)} (expected {'/'.join(CLASSES)})")
    return {c: found[c] for c in CLASSES}


def find_splits(data_dir: str | Path) -> list[str]:
    """The split folders present in ``data_dir`` (train/val/test, any case)."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found")
    present = {p.name.lower() for p in root.iterdir() if p.is_dir()}
    splits = [s for s in SPLITS if s in present]
    if not splits:
        raise DatasetError(f"{root}: no split folders found (expected {', '.join(SPLITS)} with NORMAL/PNEUMONIA inside)")
    return splits


def list_split(data_dir: str | Path, split: str) -> list[Sample]:
    """Every image of one split, sorted by path so the order never depends on the file system."""
    root = Path(data_dir)
    if not root.is_dir():
        raise DatasetError(f"{root}: data folder not found")
    candidates = [p for p in root.iterdir() if p.is_dir() and p.name.lower() == split.lower()]
    if not candidates:
        raise DatasetError(f"{root}: no '{split}' folder (expected {root}/{split}/NORMAL and {root}/{split}/PNEUMONIA)")
    samples: list[Sample] = []
    for label, (name, folder) in enumerate(_class_dirs(candidates[0]).items()):
        files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise DatasetError(f"{folder}: class {name} has no images (.jpeg/.jpg/.png/.dcm)")
        samples += [Sample(p, label, patient_id(p.name)) for p in files]
    return samples


def check_fold(val_fraction: float, fold: int) -> int:
    """The number of patient-grouped folds ``val_fraction`` cuts train into (0.2: 5), once ``fold`` is one of them."""
    if not 0.0 < val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in (0, 0.5), got {val_fraction}")
    n_splits = max(2, round(1.0 / val_fraction))
    if not 0 <= fold < n_splits:
        raise ValueError(f"fold must be in 0..{n_splits - 1} (val_fraction {val_fraction} makes {n_splits} "
                         f"patient-grouped folds), got {fold}")
    return n_splits


def patient_split(samples: list[Sample], val_fraction: float, seed: int,
                  fold: int = 0) -> tuple[list[Sample], list[Sample]]:
    """Split into (train, val) with every patient on one side, stratified by class, reproducible by seed.

    scikit-learn's StratifiedGroupKFold does the grouping and stratification; fold ``fold`` is validation. Fold 0
    is every run's default; runs over all folds are a patient-grouped k-fold cross-validation whose validation
    sets cover every training image once.
    """
    from sklearn.model_selection import StratifiedGroupKFold

    folds = StratifiedGroupKFold(n_splits=check_fold(val_fraction, fold), shuffle=True, random_state=seed)
    labels = np.array([s.label for s in samples])
    groups = np.array([s.patient for s in samples])
    splits = folds.split(np.zeros(len(samples)), labels, groups)
    train_idx, val_idx = next(itertools.islice(splits, fold, None))
    return [samples[i] for i in train_idx], [samples[i] for i in val_idx]
