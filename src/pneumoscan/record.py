"""The model record: everything a model file's JSON header says, as one typed, versioned, frozen value.

Written by training (and copied into ONNX files by export), read by every route. Fields that decide an answer
(preprocessing, calibration, thresholds, guard, precision) are typed; the training and validation summaries stay
plain JSON-ready dicts because nothing computes with them. Files written before a field existed still load:
their ``record_version`` is read (absent: 1) and a missing field takes the default documented here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

from .errors import PneumoscanError
from .preprocess import Preprocessing

# 1: files before the record (no record_version, no precision); 2: precision recorded; 3: ``prevalence`` (an
# adapted model's calibration prevalence as its own field; version-2 adapted files held it as fractional
# ``training.val_counts``, which ``fitted_prevalence`` still reads)
RECORD_VERSION = 3


class RecordError(PneumoscanError):
    pass


@dataclass(frozen=True)
class GuardSettings:
    threshold: float  # feature-distance limit, a high quantile of validation X-rays' scores
    quantile: float = 0.995
    min_side: int | None = None  # smallest image side screened; None: a quarter of the network input size


@dataclass(frozen=True)
class Population:
    """Who the model is for, as far as a DICOM header can tell: images of patients outside these ages are
    answered "outside_population" with no probability on every route. An image without an age (a JPEG, a
    DICOM without PatientAge or dates) is not judged by it."""

    min_age_years: float | None = None  # inclusive
    max_age_years: float | None = None  # exclusive: [1, 6) is "ages 1 to 5"
    description: str = ""

    def check(self, age_years: float | None) -> str | None:
        """Why a patient of this age is outside the population, or None (inside, or age unknown)."""
        if age_years is None:
            return None
        low, high = self.min_age_years, self.max_age_years
        if (low is not None and age_years < low) or (high is not None and age_years >= high):
            return f"patient age {_age_text(age_years)} is outside {self.description or self.bounds()}"
        return None

    def bounds(self) -> str:
        low = "0" if self.min_age_years is None else f"{self.min_age_years:g}"
        return f"ages {low} to {'any' if self.max_age_years is None else f'under {self.max_age_years:g}'} years"


def _age_text(years: float) -> str:
    if years >= 2:
        return f"{years:.0f} years"
    return f"{years * 12:.0f} months"


@dataclass(frozen=True)
class ModelRecord:
    name: str
    arch: str
    classes: tuple[str, ...]
    preprocessing: Preprocessing
    thresholds: dict[str, float]
    temperature: float = 1.0
    bias: float = 0.0  # absent in files written before Platt scaling
    # The network arithmetic the calibration and thresholds were fitted on, and therefore the one prediction uses
    # by default. Files before record version 2 were fitted in float32.
    precision: str = "float32"
    target_sensitivity: float | None = None
    guard: GuardSettings | None = None
    validation: dict = field(default_factory=dict)
    training: dict = field(default_factory=dict)
    version: str = ""  # pneumoscan version that wrote the file
    created: str = ""
    storage: str = "float32"  # how the weights are stored in the file (the bundled model: float16)
    source_sha256: str | None = None  # ONNX files: the model file they were exported from
    quantization: dict | None = None  # ONNX int8 files: how they were quantised
    adaptation: dict | None = None  # site-adapted files (pneumoscan adapt): what was refit, on which images, from which base
    # The pneumonia share the calibration holds at, when it is not the validation split's (``training.val_counts``):
    # a site-adapted model's EM estimate or labelled sample. None: as fitted on validation.
    prevalence: float | None = None
    population: Population | None = None  # the intended population (ages); None: not recorded, not checked
    drift_reference: dict | None = None  # monitor.Reference.to_dict() of the validation results; None: not recorded
    record_version: int = RECORD_VERSION

    @property
    def fitted_prevalence(self) -> float | None:
        """Pneumonia share the calibration holds at: the record's ``prevalence`` (adapted models), else that of the
        validation images it was fitted on, when the file records them."""
        if self.prevalence is not None:
            return self.prevalence
        counts = self.training.get("val_counts")
        return counts[1] / sum(counts) if counts and sum(counts) and 0 < counts[1] < sum(counts) else None

    @property
    def min_side(self) -> int:
        """Smallest image side screened (56 px for 224 px models, 16 px for 64 px MedMNIST models)."""
        if self.guard is not None and self.guard.min_side is not None:
            return int(self.guard.min_side)
        return self.preprocessing.size // 4

    def with_(self, **changes) -> ModelRecord:
        return replace(self, **changes)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["classes"] = list(self.classes)
        out["preprocessing"] = self.preprocessing.to_dict()
        if self.guard is not None and self.guard.min_side is None:
            out["guard"].pop("min_side")
        return {k: v for k, v in out.items() if v is not None}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict, where: str = "model file") -> ModelRecord:
        """Read any record version up to this one; unknown keys of a known version are an error."""
        data = dict(data)
        version = int(data.pop("record_version", 1))
        if version > RECORD_VERSION:
            raise RecordError(f"{where}: model record version {version} was written by a newer pneumoscan "
                              f"(this one reads up to {RECORD_VERSION}); upgrade pneumoscan")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise RecordError(f"{where}: unknown model record key(s) {', '.join(unknown)}")
        missing = [k for k in ("name", "arch", "classes", "preprocessing", "thresholds") if k not in data]
        if missing:
            raise RecordError(f"{where}: model record lacks {', '.join(missing)}")
        try:
            values: dict[str, Any] = dict(data)
            values["classes"] = tuple(str(c) for c in data["classes"])
            values["preprocessing"] = Preprocessing.from_dict(data["preprocessing"])
            values["thresholds"] = {str(k): float(v) for k, v in data["thresholds"].items()}
            for key in ("temperature", "bias", "prevalence"):
                if key in values:
                    values[key] = float(values[key])
            if data.get("guard") is not None:
                values["guard"] = GuardSettings(**data["guard"])
            if data.get("population") is not None:
                values["population"] = Population(**data["population"])
            record = cls(**values, record_version=RECORD_VERSION)
        except (TypeError, ValueError, AttributeError) as exc:
            raise RecordError(f"{where}: malformed model record ({str(exc).splitlines()[0]})") from None
        if len(record.classes) != 2:
            raise RecordError(f"{where}: expected two classes (NORMAL, PNEUMONIA), got {list(record.classes)}")
        if record.prevalence is not None and not 0 < record.prevalence < 1:
            raise RecordError(f"{where}: prevalence must be in (0, 1), got {record.prevalence}")
        if record.precision not in ("float32", "bfloat16"):
            raise RecordError(f"{where}: unknown precision {record.precision!r}")
        return record

    @classmethod
    def from_json(cls, text: str, where: str = "model file") -> ModelRecord:
        try:
            return cls.from_dict(json.loads(text), where)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{where}: corrupt model metadata ({exc})") from None
