"""The monitor inside a running service (``SlidingMonitor``): the figures over the last N results for Prometheus
gauges, computed in a thread of its own and fed by a queue put, so the request path never waits on them."""

from __future__ import annotations

import contextlib
import math
import queue
import threading
from collections import deque

from .alarm import NullModel
from .fields import CONTINUOUS, DEFAULT_FALSE_ALARM_RATE, MIN_WINDOW, MonitorError
from .records import normalise
from .reference import Reference
from .statistics import Window, judge
from .stream import _at_reference_prior


class SlidingMonitor:
    """The monitor's figures over the last ``window`` results of a running service, for Prometheus gauges.

    ``submit(facts)`` only puts the dict on a bounded queue (never blocks, never raises: a full queue drops the
    record and counts it), so the request path pays a queue put. A background thread drains the queue, keeps the
    last ``window`` records and recomputes the figures after every ``every`` new records; ``figures()`` returns
    the latest ones. The alarm threshold is simulated once, in that thread, when the first window fills (a
    service that stops before then never pays for it). Probabilities a route re-based with ``--prevalence`` are
    moved back to the reference's prior first, as ``monitor`` does, so re-basing is not read as drift."""

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
        threshold = None  # simulated once, when the window first fills: it is judged only when full
        fresh = 0
        while not self._stop.is_set():
            item = self._queue.get()
            if item is None:
                break
            record = normalise(item)
            if record is None:
                continue
            record = _at_reference_prior(record, self.ref.prior)
            self._rows.append(record)
            fresh += 1
            self.seen += 1
            if (fresh < self.every and not self._queue.empty()) or len(self._rows) < MIN_WINDOW:
                continue
            full = len(self._rows) == self.window
            if full and threshold is None:
                threshold = self.null.threshold(self.window)
            figures = judge(list(self._rows), self.ref, label=f"last {len(self._rows)}",
                            threshold=threshold if full else None, reference_samples=samples, reference_share=share)
            if not full:
                figures.score, figures.note = None, f"filling: {len(self._rows)} of {self.window} results"
            with self._updated:
                self._latest, self._covered = figures, self.seen
                self._updated.notify_all()
            fresh = 0
