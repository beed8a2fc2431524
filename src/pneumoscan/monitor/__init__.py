"""Drift monitoring without labels: is the model still seeing what it was validated on?

Every route records ``Screened.facts()`` per image (status, calibrated probability, guard distance, network-input
mean and spread, DICOM header categories). The monitor compares windows of those records with a ``Reference``,
the same figures on the model's validation images, and returns values; ``pneumoscan monitor`` and the services
print or export them. One idea per module:

- ``fields``: the figures a record carries, the smallest window judged, ``MonitorError``;
- ``records``: reading what the routes recorded (audit logs, node results, CSV, Parquet) into one shape;
- ``reference``: the reference, built from results or found for a model;
- ``statistics``: one window against the reference (``judge``) and its combined score;
- ``alarm``: the score's threshold for a chosen false-alarm rate (``NullModel``);
- ``stream``: a stream judged window by window (``monitor``, ``Report``);
- ``sliding``: the last N results of a running service as Prometheus gauges (``SlidingMonitor``).

The names other code uses are re-exported here, so ``from pneumoscan import monitor`` reads as one module.
"""

from __future__ import annotations

from .alarm import NullModel
from .fields import (
    ABSENT,
    CATEGORIES,
    COMPONENTS,
    CONTINUOUS,
    DEFAULT_FALSE_ALARM_RATE,
    MIN_WINDOW,
    NONE,
    REJECTED,
    MonitorError,
)
from .records import SUFFIXES, normalise, read_records
from .reference import (
    BUNDLED_REFERENCE,
    GRID,
    REFERENCE_VERSION,
    Reference,
    build_reference,
    bundled_reference,
    reference_for,
    reference_from_files,
    reference_of_model,
)
from .sliding import SlidingMonitor
from .statistics import (
    CHI2_1_95,
    Columns,
    Window,
    combined_score,
    em_share,
    fisher_greater,
    judge,
    ks_test,
    share_test,
    wilson,
)
from .stream import Report, monitor, windows

__all__ = [
    "ABSENT", "BUNDLED_REFERENCE", "CATEGORIES", "CHI2_1_95", "COMPONENTS", "CONTINUOUS", "DEFAULT_FALSE_ALARM_RATE",
    "GRID", "MIN_WINDOW", "NONE", "REFERENCE_VERSION", "REJECTED", "SUFFIXES", "Columns", "MonitorError",
    "NullModel", "Reference", "Report", "SlidingMonitor", "Window", "build_reference", "bundled_reference",
    "combined_score", "em_share", "fisher_greater", "judge", "ks_test", "monitor", "normalise", "read_records",
    "reference_for", "reference_from_files", "reference_of_model", "share_test", "wilson", "windows",
]
