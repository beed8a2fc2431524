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

RECORD_VERSION = 2  # 1: files before the record (no record_version, no precision); 2: precision recorded


class RecordError(PneumoscanError):
    pass


@dataclass(frozen=True)
class GuardSettings:
    threshold: float  # feature-distance limit, a high quantile of validation X-rays' scores
    quantile: float = 0.995
    min_side: int | None = None  # smallest image side screened; None: a quarter of the network input size


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
    record_version: int = RECORD_VERSION

    @property
    def fitted_prevalence(self) -> float | None:
        """Pneumonia share of the validation images the calibration was fitted on, when the file records it."""
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
            for key in ("temperature", "bias"):
                if key in values:
                    values[key] = float(values[key])
            if data.get("guard") is not None:
                values["guard"] = GuardSettings(**data["guard"])
            record = cls(**values, record_version=RECORD_VERSION)
        except (TypeError, ValueError, AttributeError) as exc:
            raise RecordError(f"{where}: malformed model record ({str(exc).splitlines()[0]})") from None
        if len(record.classes) != 2:
            raise RecordError(f"{where}: expected two classes (NORMAL, PNEUMONIA), got {list(record.classes)}")
        if record.precision not in ("float32", "bfloat16"):
            raise RecordError(f"{where}: unknown precision {record.precision!r}")
        return record

    @classmethod
    def from_json(cls, text: str, where: str = "model file") -> ModelRecord:
        try:
            return cls.from_dict(json.loads(text), where)
        except json.JSONDecodeError as exc:
            raise RecordError(f"{where}: corrupt model metadata ({exc})") from None
