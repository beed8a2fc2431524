"""A stream of recorded results judged window by window (``monitor``): consecutive windows of N records or one
per UTC day, probabilities a route re-based to another prevalence moved back to the reference's prior, records
of another model left out, and the ``Report`` that ``pneumoscan monitor`` prints."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timezone

from .alarm import NullModel
from .fields import CONTINUOUS, DEFAULT_FALSE_ALARM_RATE, MIN_WINDOW, MonitorError
from .reference import Reference
from .statistics import Window, _finite, judge


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
