"""Screen DICOM instances through the pipeline stage and make their result objects.

Each instance is read once and parsed once (pydicom); the parsed dataset goes to the stage as it is
(``pipeline.prepare`` decodes it without parsing again) and stays, without its pixel data, as the header the SR
and Secondary Capture copy. ``pipeline.decide`` scores a batch in one network call. Nothing is judged here: the
statuses and their messages are the stage's, so an instance gets the same answer as ``pneumoscan predict`` gives
its file, and an instance the stage cannot analyse (no pixel data, unreadable pixels, not a frontal chest
radiograph, outside the intended population) gets an SR saying so.

Which objects are never screened (``not_screened``): anything that is no image (SR, presentation states, key
objects, encapsulated documents: they are answered Success and left alone), and whatever pneumoscan made
(``made_by_pneumoscan``: Manufacturer "pneumoscan", or a Secondary Capture in the result series 9901/9902), so a
PACS that routes everything back to the node makes no loop.
"""

from __future__ import annotations

import io
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .. import pipeline
from . import results

if TYPE_CHECKING:
    from pydicom.dataset import Dataset

    from ..pipeline import Prediction
    from ..predict import Model

HEATMAP_CHOICES = ("positive", "all", "none")  # explain.HEATMAP_RULES, or no heatmaps at all
IMAGE_CLASSES = {  # the storage SOP classes the node screens; CT so that a slice sent by mistake is told why not
    "1.2.840.10008.5.1.4.1.1.1": "CR",
    "1.2.840.10008.5.1.4.1.1.1.1": "DX for presentation",
    "1.2.840.10008.5.1.4.1.1.1.1.1": "DX for processing",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture",
    "1.2.840.10008.5.1.4.1.1.2": "CT",
}
RESULT_SERIES = (results.SR_SERIES_NUMBER, results.SC_SERIES_NUMBER)
# Patient and General Study attributes (Type 2) that the results copy from their source instance
TYPE2_COPIED = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                "StudyDate", "StudyTime", "ReferringPhysicianName")
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID")


class UnreadableInstance(Exception):
    """The bytes are not a DICOM dataset with the identifiers a result must reference."""


@dataclass
class Outcome:
    name: str
    sop_instance_uid: str
    prediction: Prediction
    results: list = field(default_factory=list)  # pydicom Datasets: the SR, then the SC when there is one
    seconds: dict = field(default_factory=dict)  # decode, score, results
    unanswerable: str | None = None  # why no result object could be made (then ``results`` is empty)
    facts: dict = field(default_factory=dict)  # ``Screened.facts()``: what drift monitoring reads, no identifier

    def summary(self) -> str:
        p = self.prediction
        if p.status == "ok":
            return f"ok {p.decision} probability {p.probability:.4f} ({p.operating_point} threshold {p.threshold:.4f})"
        return f"not analysed ({p.status}): {' '.join(p.message.split())[:300]}"


def made_by_pneumoscan(ds: Dataset) -> bool:
    """A result object of pneumoscan (this node, another node, ``predict --dicom-out``): never screened again."""
    if str(ds.get("Manufacturer", "") or "").strip() == results.MANUFACTURER:
        return True
    try:
        series = int(ds.get("SeriesNumber") or 0)
    except (TypeError, ValueError):
        series = 0
    return str(ds.get("SOPClassUID", "")) == results.SECONDARY_CAPTURE and series in RESULT_SERIES


def not_screened(ds: Dataset) -> str | None:
    """Why an instance is answered without screening (no image, or pneumoscan's own result), or None."""
    sop_class = str(ds.get("SOPClassUID", "") or "")
    if sop_class not in IMAGE_CLASSES:
        return f"SOP class {sop_class or '(none)'} is no image this node screens"
    if made_by_pneumoscan(ds):
        return "made by pneumoscan (its own result)"
    return None


def parse(source: bytes | str | Path | Dataset, name: str, *, pixels: bool = True) -> Dataset:
    """The one parse of an instance (bytes or a file; a Dataset is only checked), checked for the identifiers its
    results must carry. ``pixels=False`` reads a file's header only, stopping before its pixel data."""
    ds = _read(source, name, pixels)
    why = unanswerable(ds, name)
    if why is not None:
        raise UnreadableInstance(why)
    return ds


def _read(source: bytes | str | Path | Dataset, name: str, pixels: bool = True) -> Dataset:
    import pydicom
    from pydicom.dataset import Dataset

    try:
        if isinstance(source, Dataset):
            ds = source
        else:
            ds = pydicom.dcmread(io.BytesIO(source) if isinstance(source, bytes | bytearray) else source,
                                 force=True, stop_before_pixels=not pixels)
        ds.get("SOPInstanceUID")  # force=True parses lazily: a malformed header fails here, as that file's answer
    except Exception as exc:  # noqa: BLE001 - any parse failure of a malformed file is that file's answer
        raise UnreadableInstance(pipeline.unreadable(name, exc)) from None
    for keyword in TYPE2_COPIED:  # required but may be empty: many exports leave them out altogether
        if keyword not in ds:
            setattr(ds, keyword, "")
    return ds


def unanswerable(ds: Dataset, name: str) -> str | None:
    """Why no result object can be made for ``ds`` (it lacks the UIDs a result must reference), or None."""
    try:
        missing = [k for k in REQUIRED_UIDS if not ds.get(k)]
    except Exception as exc:  # noqa: BLE001 - a malformed element: that file's answer
        return pipeline.unreadable(name, exc)
    return f"{name}: DICOM dataset lacks {', '.join(missing)}; no result can reference it" if missing else None


def _drop_pixels(ds: Dataset) -> None:
    """Keep only the header once the pixels are decoded: a batch waiting for results holds no second copy."""
    for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"):
        if keyword in ds:
            delattr(ds, keyword)


class Screener:
    """One loaded model screening DICOM instances in batches; not thread-safe (one worker uses it)."""

    def __init__(self, model: Model, *, threshold: str | float = "screening", heatmaps: str = "positive"):
        if heatmaps not in HEATMAP_CHOICES:
            raise ValueError(f"heatmaps must be one of {', '.join(HEATMAP_CHOICES)}, got {heatmaps!r}")
        self.model = model
        self.op = model.resolve_threshold(threshold)
        self.heatmaps = heatmaps if model.backend.gradcam else "none"

    def screen(self, items: Sequence[tuple[str, bytes | Dataset]]) -> list[Outcome]:
        """(name, DICOM bytes or a parsed Dataset) pairs -> one Outcome each, in order, with the stage's answer.
        Raises nothing for a bad instance: its SR says why it was not analysed, and an instance no SR can reference
        (not parseable, or without its UIDs) has no results and ``unanswerable`` says why. One parse per instance,
        one network call per batch, one Grad-CAM call per batch."""
        headers, prepared, notes, decode_seconds = [], [], [], []
        for name, data in items:
            start = time.perf_counter()
            try:
                ds = _read(data, name)
            except UnreadableInstance as exc:
                headers.append(None)
                notes.append(str(exc))
                prepared.append(pipeline.Prepared(name, error=str(exc)))
            else:
                headers.append(ds)
                notes.append(unanswerable(ds, name))
                prepared.append(pipeline.prepare(self.model, ds, name))
                _drop_pixels(ds)
            decode_seconds.append(time.perf_counter() - start)
        if not prepared:
            return []
        start = time.perf_counter()
        screened = pipeline.decide(self.model, prepared, self.op)
        score_seconds = (time.perf_counter() - start) / len(prepared)
        start = time.perf_counter()
        overlays = self._overlays([s for s, note in zip(screened, notes, strict=True) if note is None])
        heatmap_seconds = (time.perf_counter() - start) / len(prepared)
        out = []
        for (name, _), header, note, done, seconds in zip(items, headers, notes, screened, decode_seconds,
                                                          strict=True):
            start = time.perf_counter()
            made = [] if note is not None else \
                results.result_objects(header, done.prediction, self.model, overlays.get(id(done)))
            uid = str(header.get("SOPInstanceUID", "") or "") if header is not None else ""
            out.append(Outcome(name, uid, done.prediction, made,
                               {"decode": seconds, "score": score_seconds if done.logits is not None else 0.0,
                                "results": heatmap_seconds + time.perf_counter() - start}, note, done.facts()))
        return out

    def wants_heatmap(self, prediction: Prediction) -> bool:
        from ..explain import wants_heatmap

        return self.heatmaps != "none" and wants_heatmap(prediction, self.heatmaps)

    def _overlays(self, screened: Sequence[pipeline.Screened]) -> dict[int, object]:
        """The Grad-CAM overlays of the batch's items the heatmap rule wants, in one batched call."""
        chosen = [done for done in screened if done.decoded is not None and self.wants_heatmap(done.prediction)]
        if not chosen:
            return {}
        from ..explain import gradcam_overlays

        pictures = gradcam_overlays(self.model, [done.decoded.data for done in chosen])
        return {id(done): picture for done, picture in zip(chosen, pictures, strict=True)}

    def results_for(self, header: Dataset, prediction: Prediction, decoded=None) -> list:
        """The SR, and the Grad-CAM SC where the heatmap rule wants one for ``prediction`` (one instance)."""
        screened = pipeline.Screened(prediction, decoded)
        return results.result_objects(header, prediction, self.model, self._overlays([screened]).get(id(screened)))

    def warm_up(self) -> float:
        """Run every step once on a synthetic instance (decoding, the network, Grad-CAM and the colour map, the SR
        and SC builders and what they import), so the first study a PACS sends after a start does not pay for
        them. Returns the seconds it took."""
        from ..pipeline import Prediction
        from .samples import xray_dicom

        start = time.perf_counter()
        picture = np.outer(np.hanning(256), np.linspace(0.0, 255.0, 256)).astype(np.float32)
        header = xray_dicom(picture, side=None)
        item = pipeline.prepare(self.model, header, "warm-up")
        _drop_pixels(header)
        done = pipeline.decide(self.model, [item], self.op)[0]
        probe = Prediction("warm-up", 0.5, self.model.classes[1], self.op[0], self.op[1], "ok")
        self.results_for(header, probe, done.decoded)
        return time.perf_counter() - start
