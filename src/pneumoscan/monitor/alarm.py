"""The alarm threshold (``NullModel``): the combined score a window of a given size exceeds by chance at a chosen
false-alarm rate, found by simulating in-distribution windows from the reference.

Each simulated window is judged against a reference rebuilt from a fresh draw (a parametric bootstrap), so the
threshold includes the reference's own sampling noise, as a real in-distribution window sees it. Each figure is
redrawn at the reference's effective size for it (``Reference.effective``): a reference of few patients with many
images each knows the figure no better than that many independent images, and a new stream of patients differs
from it by that much. The figures are drawn independently of one another; the tests of a real stream are positively
correlated (a darker image moves the mean and the guard together), which makes the max of their scores smaller,
so the real false-alarm rate is at most the chosen one under that approximation (``benchmarks/drift.py``
measures it)."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np

from .fields import CATEGORIES, CONTINUOUS, MIN_WINDOW, NONE, MonitorError
from .reference import GRID, Reference, _quantiles
from .statistics import Columns, em_share, judge


class NullModel:
    """Simulated in-distribution windows from a reference, for the alarm threshold at each window size.

    The procedure (seeded, so a threshold is reproducible): ``simulations`` times, draw a replicate reference
    (each continuous figure by inverse-CDF sampling of its quantiles at the figure's effective size, statuses and
    header categories multinomially at the reference's size) and keep its quantiles as a reference does; draw a
    window of ``size`` results from the reference the same way (independent results); judge the window against
    the replicate. The threshold is the (1 - rate) quantile of the combined scores."""

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
        """A reference as one built from a fresh draw of other patients would be: each figure's quantiles from
        its effective size's draws (its count when the images are independent)."""
        ref = self.ref
        names = list(ref.statuses)
        counts = rng.multinomial(ref.n, np.array([ref.statuses[s] for s in names], dtype=float) / ref.n)
        quantiles = {k: (_quantiles(np.interp(rng.random(max(1, round(ref.effective[k]))), GRID, q)).tolist()
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
                         categories, ref.prior, patients=ref.patients, effective=dict(ref.effective))

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
