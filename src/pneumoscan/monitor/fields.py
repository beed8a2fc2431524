"""What every part of the monitor agrees on: the figures a record carries, the markers of a missing one, the
smallest window judged, and the one error type. Kept apart so that the readers, the reference and the
statistics share them without importing one another."""

from __future__ import annotations

from ..errors import PneumoscanError
from ..pipeline import STATUSES

CONTINUOUS = ("probability", "guard_score", "input_mean", "input_std")
CATEGORIES = ("format", "modality", "manufacturer", "view", "photometric", "age_band")
REJECTED = tuple(s for s in STATUSES if s != "ok")
NONE = "(none)"  # a header category the record did not have (a JPEG has no modality)
ABSENT = "(not recorded)"  # a field the route does not record at all: left out of its test, not a category
MIN_WINDOW = 20  # fewer results than this are reported, not judged
DEFAULT_FALSE_ALARM_RATE = 0.01
# which tests make up the combined score, in the order tables show them
COMPONENTS = ("probability", "guard_score", "input_mean", "input_std", "pneumonia_share", "rejection", "header")


class MonitorError(PneumoscanError):
    """Records or a reference the monitor cannot use; the message names the file."""
