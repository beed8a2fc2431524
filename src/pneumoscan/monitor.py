"""Drift monitoring without labels: is the model still seeing what it was validated on?

Every route records ``Screened.facts()`` per image (status, calibrated probability, guard distance, network-input
mean and spread, DICOM header categories). This module compares windows of those records with a ``Reference``,
the same figures on the model's validation images, and returns values; ``pneumoscan monitor`` and the services
print or export them.

Per window (``judge``): a two-sample Kolmogorov-Smirnov test of each continuous figure against the reference
(probability over ok images; guard distance, input mean and spread over scored images), an EM estimate of the
pneumonia share (Saerens et al. 2002) with a profile-likelihood interval and a likelihood-ratio test against the
reference's share, the rejection rates with Wilson intervals and a one-sided Fisher test of "any rejection", and a
chi-square test per header field (with the total variation distance as the readable size of the shift).

One combined score, ``max(-log10 p)`` over those tests, alarms above a threshold set for a chosen false-alarm rate
by ``null_threshold``: windows of the same size drawn from the reference itself. Each simulated window is judged
against a reference rebuilt from a fresh draw of the reference's size (a parametric bootstrap), so the threshold
includes the reference's own sampling noise, as a real in-distribution window sees it. The figures are drawn
independently of one another; the tests of a real stream are positively correlated (a darker image moves the mean
and the guard together), which makes the max of their scores smaller, so the real false-alarm rate is at most
the chosen one under that approximation (``benchmarks/drift.py`` measures it).
"""

from __future__ import annotations

import contextlib
import csv
import json
import math
import queue
import threading
from collections import Counter, deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from scipy import stats

from .errors import PneumoscanError
from .pipeline import STATUSES

REFERENCE_VERSION = 1
GRID = np.linspace(0.0, 1.0, 201)  # the quantile levels a reference stores for each continuous figure
CONTINUOUS = ("probability", "guard_score", "input_mean", "input_std")
CATEGORIES = ("format", "modality", "manufacturer", "view", "photometric", "age_band")
REJECTED = tuple(s for s in STATUSES if s != "ok")
NONE = "(none)"  # a header category the record did not have (a JPEG has no modality)
ABSENT = "(not recorded)"  # a field the route does not record at all: left out of its test, not a category
MIN_WINDOW = 20  # fewer results than this are reported, not judged
DEFAULT_FALSE_ALARM_RATE = 0.01
BUNDLED_REFERENCE = Path(__file__).parent / "weights" / "default.reference.json"
# which tests make up the combined score, in the order tables show them
COMPONENTS = ("probability", "guard_score", "input_mean", "input_std", "pneumonia_share", "rejection", "header")


class MonitorError(PneumoscanError):
    """Records or a reference the monitor cannot use; the message names the file."""


# --- the reference ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reference:
    """What the model's answers looked like on its validation images, compactly: 201 quantiles of each
    continuous figure, the count of each status and of each header category. Stored in the model record
    (``drift_reference``) or, for the bundled model whose file cannot change, beside it."""

    n: int  # results it was computed from
    quantiles: dict[str, list[float]]  # figure -> values at GRID (empty when no result had the figure)
    counts: dict[str, int]  # figure -> how many results had it (the reference's n in its two-sample test)
    statuses: dict[str, int]  # status -> results
    categories: dict[str, dict[str, int]]  # header field -> value (or NONE) -> results
    prior: float  # pneumonia share the calibration holds at (EM's starting prior)
    model_sha256: str | None = None
    source: str = ""  # what it was computed from, in words
    version: int = REFERENCE_VERSION

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict, where: str = "reference") -> Reference:
        if not isinstance(data, dict):
            raise MonitorError(f"{where}: a drift reference must be a JSON object")
        version = data.get("version")
        if version != REFERENCE_VERSION:
            raise MonitorError(f"{where}: drift reference version {version!r} is not one this pneumoscan reads "
                               f"({REFERENCE_VERSION})")
        try:
            ref = cls(n=int(data["n"]),
                      quantiles={k: [float(x) for x in data["quantiles"].get(k, [])] for k in CONTINUOUS},
                      counts={k: int(data["counts"].get(k, 0)) for k in CONTINUOUS},
                      statuses={str(k): int(v) for k, v in data["statuses"].items()},
                      categories={k: {str(v): int(c) for v, c in data["categories"].get(k, {}).items()}
                                  for k in CATEGORIES},
                      prior=float(data["prior"]), model_sha256=data.get("model_sha256"),
                      source=str(data.get("source", "")))
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise MonitorError(f"{where}: malformed drift reference ({type(exc).__name__}: {exc})") from None
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
        return em_share(self.sample("probability"), self.prior)[0]


def build_reference(facts: Iterable[dict], *, prior: float | None = None, model_sha256: str | None = None,
                    source: str = "") -> Reference:
    """The reference of results (``Screened.facts()`` dicts). ``prior``: the pneumonia share the model's
    calibration holds at (``ModelRecord.fitted_prevalence``); None: the mean calibrated probability."""
    rows = [normalise(f) for f in facts]
    rows = [r for r in rows if r is not None]
    values = {k: np.array([r[k] for r in rows if r[k] is not None], dtype=np.float64) for k in CONTINUOUS}
    if len(values["probability"]) < MIN_WINDOW:
        raise MonitorError(f"a drift reference needs at least {MIN_WINDOW} results with a probability, got "
                           f"{len(values['probability'])}")
    if prior is None:
        prior = float(values["probability"].mean())
    quantiles = {k: ([round(float(x), 6) for x in _quantiles(v)] if len(v) else []) for k, v in values.items()}
    return Reference(n=len(rows), quantiles=quantiles, counts={k: len(v) for k, v in values.items()},
                     statuses=dict(Counter(r["status"] for r in rows)),
                     categories={k: dict(Counter(r[k] or NONE for r in rows if r[k] != ABSENT)) for k in CATEGORIES},
                     prior=float(prior), model_sha256=model_sha256, source=source)


def _quantiles(values: np.ndarray) -> np.ndarray:
    """The values at GRID (numpy's default "linear" quantiles, by one sort instead of 201 partitions)."""
    ordered = np.sort(values)
    return np.interp(GRID * (len(ordered) - 1), np.arange(len(ordered)), ordered)


def reference_from_files(model, paths: Sequence[str | Path], *, source: str = "", batch_size: int = 32) -> Reference:
    """Screen ``paths`` (the model's validation images) through the stage and build their reference."""
    from . import pipeline

    facts = [s.facts() for s in pipeline.screen(model, [str(p) for p in paths], batch_size=batch_size)]
    return build_reference(facts, prior=model.record.fitted_prevalence, model_sha256=model.sha256,
                           source=source or f"{len(paths)} validation images")


def bundled_reference() -> Reference:
    return Reference.load(BUNDLED_REFERENCE)


def reference_for(model) -> Reference | None:
    """The drift reference of a loaded ``Model``: its record's, or the bundled one for the bundled file; None
    when it has none (a service then exports no drift gauges rather than failing to start)."""
    from .predict import BUNDLED_SHA256

    if model.record.drift_reference is not None:
        return Reference.from_dict(model.record.drift_reference, f"{model.path}: drift_reference")
    if model.sha256 == BUNDLED_SHA256 or getattr(model.record, "source_sha256", None) == BUNDLED_SHA256:
        return bundled_reference()
    return None


def reference_of_model(path: str | Path | None = None) -> Reference:
    """The drift reference of a model file: its record's ``drift_reference``, or the bundled model's (keyed on
    the bundled file's sha256, as the code supplies its population). None: the bundled model's. Reads the file's
    JSON header only, never its weights."""
    from .modelfile import resolve_model_path, sha256_file
    from .predict import BUNDLED_SHA256, DEFAULT_MODEL

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


# --- reading what the routes recorded -----------------------------------------------------------------------------

def normalise(row: dict) -> dict | None:
    """One record as the monitor reads it, or None when it is no screening result (an audit line of a health
    check or a refused request). Tolerant: a figure the route did not record is None. The facts may be flat or
    under ``facts``; an audit line's ``status`` is the HTTP status and its ``prediction`` the result's."""
    if isinstance(row.get("facts"), dict):
        row = {**row, **row["facts"]}
    status = next((v for v in (row.get("prediction"), row.get("prediction_status"), row.get("status"))
                   if isinstance(v, str) and v in STATUSES), None)
    if status is None:
        return None
    out: dict = {"status": status}
    for key in CONTINUOUS:
        out[key] = _number(row.get(key))
    if status != "ok":
        out["probability"] = None
    for key in CATEGORIES:
        value = row.get(key, ABSENT)
        out[key] = None if value is None or value == "" else str(value)
    out["prevalence"] = _number(row.get("prevalence"))  # the share the route re-based probabilities to, if any
    out["time"] = _time(row.get("time", row.get("timestamp")))
    out["model_sha256"] = row.get("model_sha256") or None
    return out


def _number(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _time(value) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(float(value), timezone.utc)
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


SUFFIXES = (".jsonl", ".json", ".log", ".ndjson", ".csv", ".parquet")


def read_records(sources: Sequence[str | Path]) -> tuple[list[dict], int]:
    """(screening records in the order given, how many lines were no screening result) of audit logs (JSON
    lines, rotated ``.log.N`` copies too), JSON files (a list of rows, or an object holding one), CSV and Parquet
    outputs, and folders of them. Anything unreadable is an error naming the file and line."""
    rows: list[dict] = []
    other = 0
    for source in sources:
        for path in _files(Path(source)):
            for row in _rows(path):
                record = normalise(row)
                if record is None:
                    other += 1
                else:
                    rows.append(record)
    return rows, other


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _readable_kind(p) is not None)
        if not found:
            raise MonitorError(f"{path}: no records in this folder (looked for {', '.join(SUFFIXES)})")
        return found
    if not path.exists():
        raise MonitorError(f"{path}: no such file")
    if _readable_kind(path) is None:
        raise MonitorError(f"{path}: not a record file the monitor reads ({', '.join(SUFFIXES)}, or a rotated "
                           "audit log NAME.log.N)")
    return [path]


def _readable_kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if not suffixes:
        return None
    if suffixes[-1] == ".parquet":
        return "parquet"
    if suffixes[-1] == ".csv":
        return "csv"
    if suffixes[-1] in (".jsonl", ".json", ".log", ".ndjson") or (
            len(suffixes) >= 2 and suffixes[-2] == ".log" and suffixes[-1][1:].isdigit()):
        return "json"
    return None


def _rows(path: Path) -> Iterator[dict]:
    kind = _readable_kind(path)
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            yield from pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise MonitorError(f"{path}: unreadable Parquet file ({str(exc).splitlines()[0][:200]})") from None
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MonitorError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if kind == "csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "status" not in reader.fieldnames:
            raise MonitorError(f"{path}: not a results CSV (no status column)")
        yield from reader
        return
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _json_list(path, stripped)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == 1:  # one JSON document over several lines
                yield from _json_list(path, stripped)
                return
            raise MonitorError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(row, dict):
            raise MonitorError(f"{path}:{number}: a record must be a JSON object")
        yield row


def _json_list(path: Path, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MonitorError(f"{path}: neither JSON lines nor a JSON document ({exc})") from None
    if isinstance(data, dict):
        data = next((v for k in ("results", "rows", "predictions", "records") if isinstance(v := data.get(k), list)),
                    None)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise MonitorError(f"{path}: expected a list of records (or an object with a 'results' list)")
    return data


# --- statistics of one window ----------------------------------------------------------------------------------------

def em_share(p: np.ndarray, prior: float, *, interval: bool = True) -> tuple[float, float, float]:
    """(estimate, 95% profile-likelihood interval) of the pneumonia share of images whose calibrated
    probabilities ``p`` hold at share ``prior``. The estimate is the fixed point of Saerens et al.'s (2002) EM
    (re-weight the posteriors by the prior ratio, average, repeat), which is the maximum of the likelihood below;
    it is found by root-finding on the likelihood's slope, the same point in a few steps where EM can take
    hundreds near 0 or 1. The interval: the shares whose likelihood-ratio statistic stays under chi2(1)'s 95%."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
    if len(p) == 0:
        return math.nan, math.nan, math.nan
    a, b = p / prior, (1 - p) / (1 - prior)  # the likelihood of share s is prod(s * a + (1 - s) * b)

    def slope(share: float) -> float:
        return float(np.sum((a - b) / (share * a + (1 - share) * b)))

    low_end, high_end = 1e-6, 1 - 1e-6
    if slope(low_end) <= 0:
        share = low_end
    elif slope(high_end) >= 0:
        share = high_end
    else:
        from scipy.optimize import brentq

        share = float(brentq(slope, low_end, high_end, xtol=1e-9))
    if not interval:
        return share, math.nan, math.nan
    grid = np.linspace(0.0005, 0.9995, 1999)
    ll = _share_loglik(a, b, grid)
    top = max(ll.max(), float(_share_loglik(a, b, np.array([share]))[0]))
    inside = grid[2 * (top - ll) <= CHI2_1_95]
    low, high = (float(inside.min()), float(inside.max())) if len(inside) else (share, share)
    return share, min(low, share), max(high, share)


CHI2_1_95 = 3.841458820694124  # chi2(1) 95% quantile


def _share_loglik(a: np.ndarray, b: np.ndarray, shares: np.ndarray) -> np.ndarray:
    return np.log(shares[:, None] * a[None] + (1 - shares[:, None]) * b[None]).sum(axis=1)


def share_test(p: np.ndarray, prior: float, reference_share: float, estimate: float | None = None) -> float:
    """p-value of the likelihood-ratio test that the window's pneumonia share is the reference's."""
    if len(p) == 0:
        return 1.0
    estimate = em_share(p, prior, interval=False)[0] if estimate is None else estimate
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
    ll = _share_loglik(p / prior, (1 - p) / (1 - prior), np.array([estimate, reference_share]))
    return math.erfc(math.sqrt(max(0.0, ll[0] - ll[1])))  # chi2(1) survival of 2 * (ll0 - ll1)


def wilson(k: int, n: int) -> tuple[float, float, float]:
    """(rate, 95% Wilson interval) of k in n."""
    if n == 0:
        return math.nan, math.nan, math.nan
    z = 1.959963984540054
    centre, half = (k + z * z / 2) / (n + z * z), z * math.sqrt(k * (n - k) / n + z * z / 4) / (n + z * z)
    return k / n, max(0.0, centre - half), min(1.0, centre + half)


def ks_test(x: np.ndarray, reference: np.ndarray) -> tuple[float, float]:
    """(statistic, p) of the two-sample Kolmogorov-Smirnov test, p from the asymptotic Kolmogorov distribution
    with Stephens' small-sample correction (scipy's ks_2samp gives the same within its approximation, ~50x
    slower; the alarm threshold is simulated, so the p-value only needs to rank windows)."""
    x, reference = np.sort(x), np.sort(reference)
    both = np.concatenate([x, reference])
    d = float(np.max(np.abs(np.searchsorted(x, both, "right") / len(x)
                            - np.searchsorted(reference, both, "right") / len(reference))))
    en = math.sqrt(len(x) * len(reference) / (len(x) + len(reference)))
    lam = (en + 0.12 + 0.11 / en) * d
    if lam < 0.2:
        return d, 1.0
    k = np.arange(1, 101)
    p = float(2 * np.sum((-1.0) ** (k - 1) * np.exp(-2 * k * k * lam * lam)))
    return d, min(1.0, max(p, 0.0))


def fisher_greater(k: int, n: int, k_ref: int, n_ref: int) -> float:
    """One-sided Fisher exact p that the window's rate (k of n) exceeds the reference's (k_ref of n_ref)."""
    total, hits = n + n_ref, k + k_ref

    def log_choose(a: int, b: int) -> float:
        return math.lgamma(a + 1) - math.lgamma(b + 1) - math.lgamma(a - b + 1)

    base = log_choose(total, n)
    return min(1.0, sum(math.exp(log_choose(hits, j) + log_choose(total - hits, n - j) - base)
                        for j in range(k, min(n, hits) + 1)))


@dataclass
class Window:
    """What one window of results says against the reference."""

    label: str
    n: int
    start: str | None = None  # first and last record time, when the records have times
    end: str | None = None
    statuses: dict[str, int] = field(default_factory=dict)
    rejection: dict[str, tuple[float, float, float]] = field(default_factory=dict)  # status -> rate, low, high
    ks: dict[str, float | None] = field(default_factory=dict)  # figure -> KS statistic (None: no values)
    pneumonia_share: tuple[float, float, float] | None = None  # EM estimate, 95% interval
    reference_share: float | None = None
    header_tv: dict[str, float] = field(default_factory=dict)  # field -> total variation distance
    p_values: dict[str, float] = field(default_factory=dict)  # component -> p-value
    score: float | None = None  # max(-log10 p) over the components; None: too few results to judge
    threshold: float | None = None
    alarm: bool = False
    note: str = ""

    def to_dict(self) -> dict:
        return _finite(asdict(self))


def _finite(value):
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _header(counts: dict[str, Counter], ref: Reference) -> tuple[dict[str, float], float | None]:
    """(total variation distance per field, Bonferroni-combined chi-square p over the fields that vary)."""
    tv, ps = {}, []
    for key in CATEGORIES:
        window, reference = counts[key], ref.categories.get(key, {})
        values = sorted(set(window) | set(reference))
        w = np.array([window.get(v, 0) for v in values], dtype=float)
        r = np.array([reference.get(v, 0) for v in values], dtype=float)
        if w.sum() == 0 or r.sum() == 0:
            continue
        tv[key] = float(0.5 * np.abs(w / w.sum() - r / r.sum()).sum())
        if len(values) > 1:
            ps.append(float(stats.chi2_contingency(np.stack([w, r]), correction=False)[1]))
    return tv, (min(1.0, min(ps) * len(ps)) if ps else None)


@dataclass
class Columns:
    """A window's records as arrays: what the tests read (NaN where a route did not record a figure)."""

    statuses: Counter
    values: dict[str, np.ndarray]  # figure -> its values (missing ones dropped)
    categories: dict[str, Counter]  # header field -> value (or NONE) -> count
    n: int
    times: list = field(default_factory=list)

    @classmethod
    def of(cls, rows: Sequence[dict]) -> Columns:
        return cls(Counter(r["status"] for r in rows),
                   {k: np.array([r[k] for r in rows if r[k] is not None], dtype=np.float64) for k in CONTINUOUS},
                   {k: Counter(r[k] or NONE for r in rows if r[k] != ABSENT) for k in CATEGORIES}, len(rows),
                   [r["time"] for r in rows if r.get("time") is not None])


def judge(rows: Sequence[dict] | Columns, ref: Reference, *, label: str = "", threshold: float | None = None,
          reference_samples: dict[str, np.ndarray] | None = None, reference_share: float | None = None,
          intervals: bool = True) -> Window:
    """Every figure of one window of normalised records against the reference, and its combined score
    (``intervals=False``: the tests only, as the threshold simulation needs them)."""
    cols = rows if isinstance(rows, Columns) else Columns.of(rows)
    samples = reference_samples or {k: ref.sample(k) for k in CONTINUOUS}
    ref_share = ref.share() if reference_share is None else reference_share
    n, statuses, times = cols.n, cols.statuses, cols.times
    out = Window(label, n, min(times).isoformat() if times else None, max(times).isoformat() if times else None,
                 dict(statuses))
    rejected = n - statuses.get("ok", 0)
    if intervals:
        out.rejection = {s: wilson(statuses.get(s, 0), n) for s in REJECTED}
        out.rejection["any"] = wilson(rejected, n)
    for key in CONTINUOUS:
        values = cols.values[key]
        if len(values) and len(samples[key]):
            out.ks[key], out.p_values[key] = ks_test(values, samples[key])
        else:
            out.ks[key] = None
    probabilities = cols.values["probability"]
    out.reference_share = ref_share
    if len(probabilities):
        out.pneumonia_share = em_share(probabilities, ref.prior, interval=intervals)
        out.p_values["pneumonia_share"] = share_test(probabilities, ref.prior, ref_share, out.pneumonia_share[0])
    if n:
        out.p_values["rejection"] = fisher_greater(rejected, n, ref.n - ref.statuses.get("ok", 0), ref.n)
    out.header_tv, p = _header(cols.categories, ref)
    if p is not None:
        out.p_values["header"] = p
    if n < MIN_WINDOW:
        out.note = f"too few results to judge (fewer than {MIN_WINDOW})"
        return out
    out.score = combined_score(out.p_values)
    out.threshold = threshold
    out.alarm = threshold is not None and out.score > threshold
    return out


def combined_score(p_values: dict[str, float]) -> float:
    """max(-log10 p) over the tests: one strong shift in any figure is enough."""
    return max((-math.log10(max(p, 1e-300)) for p in p_values.values()), default=0.0)


# --- the alarm threshold ---------------------------------------------------------------------------------------------

class NullModel:
    """Simulated in-distribution windows from a reference, for the alarm threshold at each window size.

    The procedure (seeded, so a threshold is reproducible): ``simulations`` times, draw a replicate reference of
    the reference's size (each continuous figure by inverse-CDF sampling of its quantiles, statuses and header
    categories multinomially) and keep its quantiles as a reference does; draw a window of ``size`` results
    from the reference the same way; judge the window against the replicate. The threshold is the (1 - rate)
    quantile of the combined scores."""

    def __init__(self, ref: Reference, *, simulations: int | None = None, false_alarm_rate: float = 0.01,
                 seed: int = 0):
        if not 0 < false_alarm_rate < 0.5:
            raise MonitorError(f"the false-alarm rate must be in (0, 0.5), got {false_alarm_rate}")
        self.ref = ref
        self.rate = false_alarm_rate
        self.simulations = simulations or max(1000, math.ceil(20 / false_alarm_rate))
        self.seed = seed
        self._thresholds: dict[int, float] = {}
        self._replicates: list[tuple[Reference, dict[str, np.ndarray], float]] | None = None

    def _draw(self, rng: np.random.Generator, n: int) -> Columns:
        """A window of ``n`` results drawn from the reference: statuses and categories multinomially, each
        figure from its quantiles (the probability for each ok result, the others in the reference's share)."""
        ref = self.ref
        names = list(ref.statuses)
        counts = rng.multinomial(n, np.array([ref.statuses[s] for s in names], dtype=float) / ref.n)
        statuses = Counter({s: int(c) for s, c in zip(names, counts, strict=True) if c})
        values = {}
        for key in CONTINUOUS:
            q = ref.quantiles.get(key) or []
            size = statuses.get("ok", 0) if key == "probability" else rng.binomial(n, min(1.0, ref.counts[key] / ref.n))
            values[key] = np.interp(rng.random(size), GRID, q) if q else np.zeros(0)
        categories = {}
        for key in CATEGORIES:
            known = ref.categories.get(key, {}) or {NONE: 1}
            drawn = rng.multinomial(n, np.array(list(known.values()), dtype=float) / sum(known.values()))
            categories[key] = Counter({v: int(c) for v, c in zip(known, drawn, strict=True) if c})
        return Columns(statuses, values, categories, n)

    def _replicate(self, rng: np.random.Generator) -> Reference:
        """A reference as one built from a fresh draw of the reference's size would be."""
        ref = self.ref
        names = list(ref.statuses)
        counts = rng.multinomial(ref.n, np.array([ref.statuses[s] for s in names], dtype=float) / ref.n)
        quantiles = {k: (_quantiles(np.interp(rng.random(ref.counts[k]), GRID, q)).tolist()
                         if (q := ref.quantiles.get(k)) and ref.counts[k] else []) for k in CONTINUOUS}
        categories = {}
        for key in CATEGORIES:
            values = ref.categories.get(key, {})
            if values:
                drawn = rng.multinomial(ref.n, np.array(list(values.values()), dtype=float) / sum(values.values()))
                categories[key] = {v: int(c) for v, c in zip(values, drawn, strict=True) if c}
            else:
                categories[key] = {}
        return Reference(ref.n, quantiles, dict(ref.counts), {s: int(c) for s, c in zip(names, counts, strict=True)},
                         categories, ref.prior)

    def _replicate_references(self) -> list:
        if self._replicates is None:
            rng = np.random.default_rng([self.seed, 1])
            out = []
            for _ in range(self.simulations):
                replicate = self._replicate(rng)
                samples = {k: replicate.sample(k) for k in CONTINUOUS}
                out.append((replicate, samples, em_share(samples["probability"], replicate.prior, interval=False)[0]))
            self._replicates = out
        return self._replicates

    def threshold(self, size: int) -> float:
        """The alarm threshold of windows of ``size`` results."""
        size = max(int(size), MIN_WINDOW)
        if size not in self._thresholds:
            rng = np.random.default_rng([self.seed, 2, size])
            scores = [judge(self._draw(rng, size), replicate, reference_samples=samples, reference_share=share,
                            intervals=False).score
                      for replicate, samples, share in self._replicate_references()]
            self._thresholds[size] = float(np.quantile(scores, 1 - self.rate))
        return self._thresholds[size]


# --- windows over a stream of records -------------------------------------------------------------------------------

def windows(rows: Sequence[dict], *, size: int | None = None, by_day: bool = False) -> list[tuple[str, list[dict]]]:
    """(label, records) per window: consecutive ``size`` records (the last may be shorter), or one window per UTC
    day of the records' times. Records with times are taken in time order."""
    if by_day:
        missing = sum(r["time"] is None for r in rows)
        if missing:
            raise MonitorError(f"{missing} record(s) have no time; windows by day need every record's time "
                               "(use --window N)")
        days: dict[str, list[dict]] = {}
        for r in sorted(rows, key=lambda r: r["time"]):
            days.setdefault(r["time"].astimezone(timezone.utc).date().isoformat(), []).append(r)
        return list(days.items())
    if size is None or size < 1:
        raise MonitorError(f"the window size must be a positive number of records, got {size}")
    if rows and all(r["time"] is not None for r in rows):
        rows = sorted(rows, key=lambda r: r["time"])
    return [(f"{i + 1}-{min(i + size, len(rows))}", list(rows[i:i + size])) for i in range(0, len(rows), size)]


@dataclass
class Report:
    windows: list[Window]
    reference: Reference
    false_alarm_rate: float
    records: int
    other_lines: int  # lines of the sources that were no screening result (audit lines of other requests)
    other_models: int  # records of another model than the reference's, left out

    @property
    def alarm(self) -> bool:
        return any(w.alarm for w in self.windows)

    def to_dict(self) -> dict:
        ref = self.reference
        return {"alarm": self.alarm, "false_alarm_rate": self.false_alarm_rate, "records": self.records,
                "other_lines": self.other_lines, "other_models": self.other_models,
                "reference": {"n": ref.n, "source": ref.source, "model_sha256": ref.model_sha256,
                              "share": _finite(ref.share())},
                "windows": [w.to_dict() for w in self.windows]}


def monitor(rows: Sequence[dict], ref: Reference, *, size: int | None = None, by_day: bool = False,
            false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE, other_lines: int = 0,
            null: NullModel | None = None) -> Report:
    """Judge every window of ``rows`` (normalised records) against ``ref``. Records of another model than the
    reference's (their ``model_sha256`` differs) are left out and counted."""
    kept = [r for r in rows if not (ref.model_sha256 and r.get("model_sha256") and r["model_sha256"] != ref.model_sha256)]
    if not kept:
        raise MonitorError("no screening record to judge" + (f" ({len(rows)} from another model than the "
                                                             "reference's)" if rows else ""))
    kept = [_at_reference_prior(r, ref.prior) for r in kept]
    null = null or NullModel(ref, false_alarm_rate=false_alarm_rate)
    samples = {k: ref.sample(k) for k in CONTINUOUS}
    share = ref.share()
    judged = []
    for label, chunk in windows(kept, size=size, by_day=by_day):
        threshold = null.threshold(_bucket(len(chunk)) if by_day else len(chunk)) if len(chunk) >= MIN_WINDOW else None
        judged.append(judge(chunk, ref, label=label, threshold=threshold, reference_samples=samples,
                            reference_share=share))
    return Report(judged, ref, null.rate, len(kept), other_lines, len(rows) - len(kept))


def _at_reference_prior(record: dict, prior: float) -> dict:
    """A probability a route re-based to another prevalence (``--prevalence``), moved back to the prior the
    reference holds at: the same odds shift undone (calibrate.prior_shift), so re-basing is no drift."""
    shared, p = record.get("prevalence"), record["probability"]
    if shared is None or p is None or not 0 < shared < 1 or abs(shared - prior) < 1e-12:
        return record
    p = min(max(p, 1e-12), 1 - 1e-12)
    z = math.log(p / (1 - p)) - math.log(shared / (1 - shared)) + math.log(prior / (1 - prior))
    return {**record, "probability": 1 / (1 + math.exp(-z)), "prevalence": prior}


def _bucket(size: int) -> int:
    """Day windows vary in size; their thresholds are simulated at the nearest size of a 1.25x ladder (the
    threshold moves little with size) rather than once per day."""
    return int(round(1.25 ** round(math.log(max(size, MIN_WINDOW)) / math.log(1.25))))


# --- inside a service --------------------------------------------------------------------------------------------------

class SlidingMonitor:
    """The monitor's figures over the last ``window`` results of a running service, for Prometheus gauges.

    ``submit(facts)`` only puts the dict on a bounded queue (never blocks, never raises: a full queue drops the
    record and counts it), so the request path pays a queue put. A background thread drains the queue, keeps the
    last ``window`` records and recomputes the figures after every ``every`` new records; ``figures()`` returns
    the latest ones. The alarm threshold is simulated once, in that thread, before the first figures."""

    def __init__(self, ref: Reference, *, window: int = 200, every: int = 10,
                 false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE, queue_size: int = 10000,
                 null: NullModel | None = None):
        if window < MIN_WINDOW:
            raise MonitorError(f"the sliding window needs at least {MIN_WINDOW} results, got {window}")
        self.ref = ref
        self.window = window
        self.every = max(1, every)
        self.null = null or NullModel(ref, false_alarm_rate=false_alarm_rate)
        self.dropped = 0
        self.seen = 0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._rows: deque = deque(maxlen=window)
        self._lock = threading.Lock()
        self._latest: Window | None = None
        self._covered = 0  # results the latest figures include
        self._updated = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self) -> SlidingMonitor:
        self._thread = threading.Thread(target=self._run, name="pneumoscan-drift", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        with contextlib.suppress(queue.Full):  # full: the thread sees the stop flag after its next record
            self._queue.put_nowait(None)
        if self._thread is not None:
            self._thread.join(timeout)

    def submit(self, facts: dict) -> None:
        try:
            self._queue.put_nowait(facts)
        except queue.Full:
            self.dropped += 1

    def figures(self) -> Window | None:
        """The latest window's figures: None before MIN_WINDOW results; no score or alarm until the window is
        full (its threshold is simulated for that size only)."""
        with self._lock:
            return self._latest

    def wait_for(self, seen: int, timeout: float = 30.0) -> Window | None:
        """Block until the figures cover at least ``seen`` results (or the timeout): for tests and tools."""
        with self._updated:
            self._updated.wait_for(lambda: self._latest is not None and self._covered >= seen, timeout)
            return self._latest

    def gauges(self) -> dict[str, float]:
        """The figures as gauge values (NaN where there is none yet)."""
        w = self.figures()
        nan = math.nan
        if w is None:
            return {"score": nan, "alarm": nan, "threshold": nan, "window_results": 0.0, "pneumonia_share": nan,
                    "rejection_rate": nan, **{f"ks_{k}": nan for k in CONTINUOUS}, "dropped": float(self.dropped)}
        return {"score": w.score if w.score is not None else nan, "alarm": float(w.alarm),
                "threshold": w.threshold if w.threshold is not None else nan, "window_results": float(w.n),
                "pneumonia_share": w.pneumonia_share[0] if w.pneumonia_share else nan,
                "rejection_rate": w.rejection["any"][0],
                **{f"ks_{k}": (v if v is not None else nan) for k, v in w.ks.items()},
                "dropped": float(self.dropped)}

    def register(self, registry=None, prefix: str = "pneumoscan_drift") -> None:
        """Prometheus gauges (``PREFIX_score``, ``_alarm``, ...) that read ``gauges()`` when scraped."""
        from prometheus_client import REGISTRY, Gauge

        for name in self.gauges():
            gauge = Gauge(f"{prefix}_{name}", f"drift monitor over the last {self.window} results: {name}",
                          registry=registry or REGISTRY)
            gauge.set_function(lambda name=name: self.gauges()[name])

    def _run(self) -> None:
        samples = {k: self.ref.sample(k) for k in CONTINUOUS}
        share = self.ref.share()
        threshold = self.null.threshold(self.window)  # once: the window is judged only when full
        fresh = 0
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                break
            record = normalise(item)
            if record is None:
                continue
            self._rows.append(record)
            fresh += 1
            self.seen += 1
            if (fresh < self.every and not self._queue.empty()) or len(self._rows) < MIN_WINDOW:
                continue
            full = len(self._rows) == self.window
            figures = judge(list(self._rows), self.ref, label=f"last {len(self._rows)}",
                            threshold=threshold if full else None, reference_samples=samples, reference_share=share)
            if not full:
                figures.score, figures.note = None, f"filling: {len(self._rows)} of {self.window} results"
            with self._updated:
                self._latest, self._covered = figures, self.seen
                self._updated.notify_all()
            fresh = 0
