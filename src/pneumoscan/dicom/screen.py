"""Screen DICOM instances with the core API and make their result objects.

decode (``Model.decode``) -> ``Model.prepare`` -> one ``Model.score`` per batch -> ``Model.result`` -> SR
(always) and Grad-CAM Secondary Capture (when a probability was reported). Nothing is judged here: the statuses and
their messages are the model's, so an instance gets the same answer as ``pneumoscan predict`` gives its file.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from . import results

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from ..predict import Model, Prediction


class UnreadableInstance(Exception):
    """The bytes are not a DICOM dataset with the identifiers a result must reference."""


@dataclass
class Outcome:
    name: str
    sop_instance_uid: str
    prediction: Prediction
    results: list = field(default_factory=list)  # pydicom Datasets: the SR, then the SC when there is one
    seconds: dict = field(default_factory=dict)  # decode, score, results

    def summary(self) -> str:
        p = self.prediction
        if p.status == "ok":
            return f"ok {p.decision} probability {p.probability:.4f} ({p.operating_point} threshold {p.threshold:.4f})"
        return f"not assessed ({p.status}): {' '.join(p.message.split())[:300]}"


def read_header(data: bytes, name: str) -> Dataset:
    """The instance's header (no pixel data), checked for the identifiers its results must carry."""
    import pydicom

    try:
        ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True)
        missing = [k for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID") if not ds.get(k)]
    except Exception as exc:  # any parse failure of a malformed file
        raise UnreadableInstance(f"{name}: not a readable DICOM dataset ({type(exc).__name__}: "
                                 f"{str(exc).splitlines()[0][:200] if str(exc) else ''})") from None
    if missing:
        raise UnreadableInstance(f"{name}: DICOM dataset lacks {', '.join(missing)}")
    for keyword in TYPE2_COPIED:  # required but may be empty: many exports leave them out altogether
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


# Patient and General Study attributes (Type 2) that the results copy from their source instance
TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                "StudyDate", "StudyTime", "ReferringPhysicianName")


class Screener:
    """One loaded model screening DICOM instances in batches; not thread-safe (one worker uses it)."""

    def __init__(self, model: Model, *, threshold: str | float = "screening", heatmaps: bool = True):
        self.model = model
        self.op = model.resolve_threshold(threshold)
        self.heatmaps = heatmaps and model.backend.gradcam

    def screen(self, items: Sequence[tuple[str, bytes]]) -> list[Outcome]:
        """(name, DICOM bytes) pairs -> one Outcome each, in order. Raises nothing for a bad image (its SR says
        why it was not assessed); ``UnreadableInstance`` items come back as a string (no SR can reference them)."""
        from ..data.images import ImageReadError
        from ..predict import Prediction

        model = self.model
        prepared: list[tuple] = []
        for name, data in items:
            start = time.perf_counter()
            try:
                header = read_header(data, name)
            except UnreadableInstance as exc:
                prepared.append((name, None, str(exc), None, None, 0.0))
                continue
            try:
                decoded = model.decode(data, name)
                small, reason = model.prepare(decoded)
                prepared.append((name, header, None, decoded, (small, reason), time.perf_counter() - start))
            except ImageReadError as exc:
                prepared.append((name, header, str(exc), None, None, time.perf_counter() - start))
            except Exception as exc:  # whatever a malformed file makes a library raise: that instance's answer
                message = f"{name}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"
                prepared.append((name, header, message, None, None, time.perf_counter() - start))
        batch = [p[4][0] for p in prepared if p[4] is not None]
        score_seconds = 0.0
        if batch:
            start = time.perf_counter()
            scores = model.score(np.stack(batch))
            score_seconds = (time.perf_counter() - start) / len(batch)
        out: list = []
        i = 0
        for name, header, error, decoded, ready, decode_seconds in prepared:
            if header is None:
                out.append(error)
                continue
            if ready is None:
                prediction = Prediction(name, None, None, self.op[0], self.op[1], "error", error or "unreadable")
            else:
                prediction = model.result(name, scores.logits[i], float(scores.guard[i]), self.op, ready[1])
                i += 1
            start = time.perf_counter()
            made = self.results_for(header, prediction, decoded)
            out.append(Outcome(name, str(header.SOPInstanceUID), prediction, made,
                               {"decode": decode_seconds, "score": score_seconds if ready else 0.0,
                                "results": time.perf_counter() - start}))
        return out

    def results_for(self, header: Dataset, prediction: Prediction, decoded=None) -> list:
        """The SR, and the Grad-CAM SC when the instance got a probability."""
        made = [results.structured_report(header, prediction, self.model)]
        if prediction.status == "ok" and self.heatmaps and decoded is not None:
            from ..explain import gradcam_overlay

            overlay = gradcam_overlay(self.model, decoded.pixels)
            made.append(results.secondary_capture(header, prediction, self.model, overlay))
        return made
