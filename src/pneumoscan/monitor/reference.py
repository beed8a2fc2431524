"""The reference a deployment is compared with: the model's answers on its validation images, kept as quantiles
and counts (``Reference``), built from results, found for a model (its record's, or the bundled file's beside
it) and read from a model file's header without loading its weights."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..calibrate import prior_estimate
from .fields import ABSENT, CATEGORIES, CONTINUOUS, MIN_WINDOW, NONE, MonitorError
from .records import normalise

REFERENCE_VERSION = 2
READABLE_VERSIONS = (1, 2)  # version 1 has no patients or effective sizes: its images count as independent
GRID = np.linspace(0.0, 1.0, 201)  # the quantile levels a reference stores for each continuous figure
BUNDLED_REFERENCE = Path(__file__).parent.parent / "weights" / "default.reference.json"


@dataclass(frozen=True)
class Reference:
    """What the model's answers looked like on its validation images, compactly: 201 quantiles of each
    continuous figure, the count of each status and of each header category. Stored in the model record
    (``drift_reference``) or, for the bundled model whose file cannot change, beside it.

    Images of one patient are alike (a patient's label is shared by all their images), so a reference of n
    images knows each figure's distribution only as well as ``effective[figure]`` independent images would; the
    alarm threshold's simulation redraws the reference at that size. No patient id is kept, only the two
    figures of the clustering."""

    n: int  # results it was computed from
    quantiles: dict[str, list[float]]  # figure -> values at GRID (empty when no result had the figure)
    counts: dict[str, int]  # figure -> how many results had it (the reference's n in its two-sample test)
    statuses: dict[str, int]  # status -> results
    categories: dict[str, dict[str, int]]  # header field -> value (or NONE) -> results
    prior: float  # pneumonia share the calibration holds at (EM's starting prior)
    model_sha256: str | None = None
    source: str = ""  # what it was computed from, in words
    version: int = REFERENCE_VERSION
    patients: int | None = None  # distinct patients of its images; None: not known (images counted independent)
    effective: dict[str, float] | None = None  # figure -> count / patients' design effect; None: the counts

    def __post_init__(self):
        if self.effective is None:  # independent images: the version-1 meaning, and a reference without ids
            object.__setattr__(self, "effective", {k: float(self.counts.get(k, 0)) for k in CONTINUOUS})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "reference") -> Reference:
        if not isinstance(data, dict):
            raise MonitorError(f"{where}: a drift reference must be a JSON object")
        version = data.get("version")
        if version not in READABLE_VERSIONS:
            raise MonitorError(f"{where}: drift reference version {version!r} is not one this pneumoscan reads "
                               f"({', '.join(map(str, READABLE_VERSIONS))})")
        try:
            ref = cls(n=int(data["n"]),
                      quantiles={k: [float(x) for x in data["quantiles"].get(k, [])] for k in CONTINUOUS},
                      counts={k: int(data["counts"].get(k, 0)) for k in CONTINUOUS},
                      statuses={str(k): int(v) for k, v in data["statuses"].items()},
                      categories={k: {str(v): int(c) for v, c in data["categories"].get(k, {}).items()}
                                  for k in CATEGORIES},
                      prior=float(data["prior"]), model_sha256=data.get("model_sha256"),
                      source=str(data.get("source", "")),
                      patients=None if data.get("patients") is None else int(data["patients"]),
                      effective=None if data.get("effective") is None else
                      {k: float(data["effective"].get(k, data["counts"].get(k, 0))) for k in CONTINUOUS})
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MonitorError(f"{where}: malformed drift reference ({type(exc).__name__}: {exc})") from None
        wrong = [k for k, e in ref.effective.items() if not (min(1, ref.counts[k]) <= e <= ref.counts[k])]
        if wrong:
            raise MonitorError(f"{where}: drift reference effective sizes of {', '.join(wrong)} are not between 1 "
                               "and the figure's count")
        if ref.patients is not None and not 1 <= ref.patients <= ref.n:
            raise MonitorError(f"{where}: drift reference has {ref.patients} patients for {ref.n} results")
        bad = [k for k, q in ref.quantiles.items() if q and (len(q) != len(GRID) or np.any(np.diff(q) < 0))]
        if bad:
            raise MonitorError(f"{where}: drift reference quantiles of {', '.join(bad)} are not {len(GRID)} "
                               "increasing values")
        if ref.n < MIN_WINDOW or ref.counts["probability"] < MIN_WINDOW or not 0 < ref.prior < 1:
            raise MonitorError(f"{where}: drift reference has too few results ({ref.n}) or a prior outside (0, 1)")
        return ref

    @classmethod
    def load(cls, path: str | Path) -> Reference:
        try:
            return cls.from_dict(json.loads(Path(path).read_text()), str(path))
        except OSError as exc:
            raise MonitorError(f"{path}: cannot read the drift reference ({exc.strerror or exc})") from None
        except json.JSONDecodeError as exc:
            raise MonitorError(f"{path}: not JSON ({exc})") from None

    def sample(self, figure: str) -> np.ndarray:
        """A pseudo-sample of the reference's size with its quantiles: what the two-sample tests compare with."""
        q, n = self.quantiles.get(figure) or [], self.counts.get(figure, 0)
        if not q or n == 0:
            return np.zeros(0)
        return np.interp((np.arange(n) + 0.5) / n, GRID, q)

    def share(self) -> float:
        """The pneumonia share EM finds on the reference itself (close to ``prior`` for a calibrated model)."""
        return prior_estimate(self.sample("probability"), self.prior)


def build_reference(facts: Iterable[dict], *, prior: float | None = None, model_sha256: str | None = None,
                    source: str = "", patients: Sequence[str] | None = None) -> Reference:
    """The reference of results (``Screened.facts()`` dicts). ``prior``: the pneumonia share the model's
    calibration holds at (``ModelRecord.fitted_prevalence``); None: the mean calibrated probability.
    ``patients``: one patient id per result, for the effective sizes (``design_effect``); None, or any id empty
    (a source without patients): the images count as independent. The ids are not kept."""
    facts = list(facts)
    if patients is not None:
        patients = list(patients)
        if len(patients) != len(facts):
            raise MonitorError(f"a drift reference needs one patient id per result: {len(patients)} ids for "
                               f"{len(facts)} results")
        if not all(patients):
            patients = None
    pairs = [(r, p) for r, p in zip((normalise(f) for f in facts), patients or [None] * len(facts), strict=True)
             if r is not None]
    rows = [r for r, _ in pairs]
    values = {k: np.array([r[k] for r in rows if r[k] is not None], dtype=np.float64) for k in CONTINUOUS}
    if len(values["probability"]) < MIN_WINDOW:
        raise MonitorError(f"a drift reference needs at least {MIN_WINDOW} results with a probability, got "
                           f"{len(values['probability'])}")
    if prior is None:
        prior = float(values["probability"].mean())
    quantiles = {k: ([round(float(x), 6) for x in _quantiles(v)] if len(v) else []) for k, v in values.items()}
    effective, count = None, None
    if patients is not None:
        count = len({p for _, p in pairs})
        effective = {}
        for k, v in values.items():
            ids = [p for r, p in pairs if r[k] is not None]
            effective[k] = round(float(len(v) / design_effect(v, ids)), 1) if len(v) else 0.0
    return Reference(n=len(rows), quantiles=quantiles, counts={k: len(v) for k, v in values.items()},
                     statuses=dict(Counter(r["status"] for r in rows)),
                     categories={k: dict(Counter(r[k] or NONE for r in rows if r[k] != ABSENT)) for k in CATEGORIES},
                     prior=float(prior), model_sha256=model_sha256, source=source, patients=count,
                     effective=effective)


def design_effect(values: np.ndarray, groups: Sequence[str]) -> float:
    """Kish's design effect of a mean over clustered values, 1 + (m - 1) ICC: m = sum of squared cluster sizes /
    values, the ICC the one-way ANOVA estimate (unbalanced clusters' n0), clipped to [0, 1]. 1 when every value
    is its own cluster or there is one cluster only."""
    values = np.asarray(values, dtype=np.float64)
    _, index = np.unique(np.asarray(groups, dtype=object).astype(str), return_inverse=True)
    sizes = np.bincount(index)
    k, n = len(sizes), len(values)
    if k < 2 or k == n:
        return 1.0
    means = np.bincount(index, values) / sizes
    between = np.sum(sizes * (means - values.mean()) ** 2) / (k - 1)
    within = np.sum((values - means[index]) ** 2) / (n - k)
    n0 = (n - np.sum(sizes ** 2) / n) / (k - 1)
    spread = max(0.0, (between - within) / n0)
    icc = min(1.0, spread / (spread + within)) if spread + within > 0 else 0.0
    return float(1.0 + (np.sum(sizes ** 2) / n - 1.0) * icc)


def _quantiles(values: np.ndarray) -> np.ndarray:
    """The values at GRID (numpy's default "linear" quantiles, by one sort instead of 201 partitions)."""
    ordered = np.sort(values)
    return np.interp(GRID * (len(ordered) - 1), np.arange(len(ordered)), ordered)


def reference_from_files(model, paths: Sequence[str | Path], *, source: str = "", batch_size: int = 32,
                         patients: Sequence[str] | None = None) -> Reference:
    """Screen ``paths`` (the model's validation images) through the stage and build their reference;
    ``patients``: one id per path, when known (``build_reference``)."""
    from .. import pipeline

    facts = [s.facts() for s in pipeline.screen(model, [str(p) for p in paths], batch_size=batch_size)]
    return build_reference(facts, prior=model.record.fitted_prevalence, model_sha256=model.sha256,
                           source=source or f"{len(paths)} validation images", patients=patients)


def bundled_reference() -> Reference:
    return Reference.load(BUNDLED_REFERENCE)


def reference_for(model) -> Reference | None:
    """The drift reference of a loaded ``Model``: its record's, or the bundled one for the bundled file; None
    when it has none (a service then exports no drift gauges rather than failing to start)."""
    from ..predict import BUNDLED_SHA256

    if model.record.drift_reference is not None:
        return Reference.from_dict(model.record.drift_reference, f"{model.path}: drift_reference")
    if model.sha256 == BUNDLED_SHA256 or getattr(model.record, "source_sha256", None) == BUNDLED_SHA256:
        return bundled_reference()
    return None


def reference_of_model(path: str | Path | None = None) -> Reference:
    """The drift reference of a model file: its record's ``drift_reference``, or the bundled model's (keyed on
    the bundled file's sha256, as the code supplies its population). None: the bundled model's. Reads the file's
    JSON header only, never its weights."""
    from ..modelfile import resolve_model_path, sha256_file
    from ..predict import BUNDLED_SHA256, DEFAULT_MODEL

    path = DEFAULT_MODEL if path is None else resolve_model_path(path)
    sha256 = sha256_file(path)
    if sha256 == BUNDLED_SHA256:
        return bundled_reference()
    meta = _record_header(path)
    data = meta.get("drift_reference")
    if data is None and meta.get("source_sha256") == BUNDLED_SHA256:  # an ONNX export of the bundled model
        return bundled_reference()
    if data is None:
        raise MonitorError(f"{path}: the model record has no drift reference (models calibrated before drift "
                           "monitoring); give one with --reference")
    return Reference.from_dict(data, f"{path}: drift_reference")


def _record_header(path: Path) -> dict:
    if path.suffix.lower() == ".onnx":
        import onnx

        try:
            props = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        except Exception as exc:  # noqa: BLE001 - whatever a malformed file makes onnx raise
            raise MonitorError(f"{path}: unreadable ONNX file ({type(exc).__name__})") from None
        text = props.get("pneumoscan", "{}")
    else:
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="numpy") as f:
                text = (f.metadata() or {}).get("pneumoscan", "{}")
        except (SafetensorError, OSError) as exc:
            raise MonitorError(f"{path}: unreadable model file ({str(exc).splitlines()[0][:200]})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        raise MonitorError(f"{path}: corrupt model metadata") from None
