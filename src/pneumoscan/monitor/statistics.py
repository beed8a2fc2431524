"""The statistics of one window against the reference (``judge``): a two-sample Kolmogorov-Smirnov test of each
continuous figure, the pneumonia share (``calibrate.prior_estimate``, the one estimate of it) with a
profile-likelihood interval and a likelihood-ratio test against the reference's share, the rejection rates with
Wilson intervals and a one-sided Fisher test, a chi-square test per header field, and the combined score
``max(-log10 p)`` the alarm compares with its threshold."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import stats

from ..calibrate import prior_estimate
from .fields import ABSENT, CATEGORIES, CONTINUOUS, MIN_WINDOW, NONE, REJECTED
from .reference import Reference


def em_share(p: np.ndarray, prior: float, *, interval: bool = True) -> tuple[float, float, float]:
    """(estimate, 95% profile-likelihood interval) of the pneumonia share of images whose calibrated
    probabilities ``p`` hold at share ``prior``. The estimate is ``calibrate.prior_estimate`` (the maximum of
    the likelihood below, EM's fixed point); the interval: the shares whose likelihood-ratio statistic stays
    under chi2(1)'s 95%."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-9, 1 - 1e-9)
    if len(p) == 0:
        return math.nan, math.nan, math.nan
    share = prior_estimate(p, prior)
    if not interval:
        return share, math.nan, math.nan
    a, b = p / prior, (1 - p) / (1 - prior)  # the likelihood of share s is prod(s * a + (1 - s) * b)
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
