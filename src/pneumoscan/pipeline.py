"""The screening stage: sources in, typed results out. How an image becomes a decision, for every route.

    source (path | bytes | array | DecodedImage)
      -> decode            DecodedImage: pixels + what the file said (size, colour, DICOM header)
      -> prepare           uint8 network input + the image checks (header, colour, size, content)
      -> score (batched)   one ``Model.score`` call: logits, calibrated log-odds, features, guard distance
      -> decide            checks first, then the feature guard, then the threshold -> ``Prediction``

``prepare`` never raises for the input's fault: an unreadable file becomes a ``Prepared`` holding its one-line
message (``unreadable``), so a batch always yields one result per source, in order. ``decide`` makes one network
call for the readable items of a batch. ``screen`` streams any number of sources through both, decoding ahead in
threads with at most two batches in flight.

The CLI, the Python API, the HTTP service (its batcher only queues ``Prepared`` items), the DICOM node, the Ray
actors, ``evaluate``, ``adapt``, the export check and training's threshold fitting all wrap these three functions
and add only their transport; none of them builds a batch, walks an index or words a failure itself. What a route
needs beyond the decision (the decoded pixels for a heatmap, the DICOM header for an SR, the logits for a refit)
comes with the ``Screened`` result, never by decoding again.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from .constants import BATCH_SIZE
from .data.images import DecodedImage, ImageReadError, Source
from .errors import PneumoscanError

if TYPE_CHECKING:
    import torch

# ok | not_xray (the checks say it is no frontal chest X-ray) | outside_population (the DICOM header says the
# patient is outside the model's intended population) | out_of_distribution (the feature guard) | error
STATUSES = ("ok", "not_xray", "outside_population", "out_of_distribution", "error")
OUTSIDE_INTENDED = "outside the model's intended population"


@dataclass(frozen=True)
class Prediction:
    """One screened image. ``status``: one of ``STATUSES``; probability and decision are None unless ok. ``heatmap``: the file a route wrote the image's Grad-CAM
    overlay to, when it wrote one."""

    path: str
    probability: float | None
    decision: str | None
    operating_point: str
    threshold: float
    status: str
    message: str = ""
    guard_score: float | None = None
    heatmap: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def with_heatmap(self, path: str | None) -> Prediction:
        return replace(self, heatmap=path)


@dataclass
class Prepared:
    """A source ready for the network, or the reason it is not: ``image`` is set exactly when neither ``error``
    (it cannot be read) nor ``refused`` (its header puts it outside the intended population) is."""

    name: str
    decoded: DecodedImage | None = field(default=None, repr=False)
    image: np.ndarray | None = field(default=None, repr=False)  # uint8 (S, S) network input
    reason: str | None = None  # why the image checks say it is no frontal chest X-ray
    error: str | None = None  # why it cannot be read: the row's message
    refused: str | None = None  # why it is outside the model's intended population: the row's message

    @property
    def readable(self) -> bool:
        return self.error is None


@dataclass(frozen=True)
class Screened:
    """What the stage says about one source: the decision, and what a route may need next."""

    prediction: Prediction
    decoded: DecodedImage | None = field(default=None, repr=False)  # pixels and DICOM header (None if unreadable)
    logits: torch.Tensor | None = field(default=None, repr=False)  # (2,) raw network output (None if unreadable)
    input_stats: tuple[float, float] | None = None  # mean and std of the uint8 network input, in [0, 1]
    features: torch.Tensor | None = field(default=None, repr=False)  # (D,) pooled features (the guard's input)

    @property
    def status(self) -> str:
        return self.prediction.status

    def facts(self) -> dict:
        """What drift monitoring needs of one result, as every route records it (audit lines, the node's
        results, archive rows): the answer, the guard distance, a few image statistics and the DICOM header
        categories. No file name, no identifier, no patient attribute but an age band."""
        p, d = self.prediction, self.decoded
        header = d.dicom if d is not None else None
        return {
            "status": p.status, "probability": p.probability, "guard_score": p.guard_score,
            "input_mean": None if self.input_stats is None else round(self.input_stats[0], 5),
            "input_std": None if self.input_stats is None else round(self.input_stats[1], 5),
            "width": d.width if d is not None else None, "height": d.height if d is not None else None,
            "format": d.format if d is not None else None,
            "modality": getattr(header, "modality", None), "manufacturer": getattr(header, "manufacturer", None),
            "view": getattr(header, "view", None), "photometric": getattr(header, "photometric", None),
            "age_band": age_band(getattr(header, "age_years", None)),
        }


AGE_BANDS = ((1.0, "under 1"), (6.0, "1-5"), (18.0, "6-17"), (float("inf"), "18+"))


def age_band(years: float | None) -> str | None:
    """A coarse age band (never the age itself) for monitoring the patient mix."""
    if years is None:
        return None
    return next(label for limit, label in AGE_BANDS if years < limit)


def unreadable(name: str, exc: BaseException) -> str:
    """The one message a source that cannot be read gets, on every route."""
    if isinstance(exc, ImageReadError):
        return str(exc).splitlines()[0]
    detail = str(exc).splitlines()[0][:200] if str(exc) else ""
    return f"{name}: unreadable ({type(exc).__name__}: {detail})"


def prepare(model, source: Source | DecodedImage | np.ndarray, name: str | None = None) -> Prepared:
    """Decode and check one source for ``model`` (no network needed: a model without a backend works, as Ray's
    decoding tasks use it). A file that cannot be read comes back with its message, never as an exception."""
    label = name or (str(source) if isinstance(source, str | os.PathLike) else None)
    try:
        decoded = model.decode(source, name)
        image, reason = model.prepare(decoded)
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - whatever a malformed file makes a library raise is its row
        where = label or (source.name if isinstance(source, DecodedImage) else "<bytes>")
        return Prepared(where, error=unreadable(where, exc))
    label = decoded.name if label is None else label
    population = model.record.population
    why = population.check(decoded.dicom.age_years) if population and decoded.dicom and reason is None else None
    if why is not None:  # answered without a network call
        return Prepared(label, decoded, refused=f"{OUTSIDE_INTENDED}: {why}; no probability reported")
    return Prepared(label, decoded, image, reason)


def from_array(name: str, image: np.ndarray, reason: str | None = None) -> Prepared:
    """A network input already at the model's size (training's and evaluation's uint8 caches)."""
    return Prepared(name, None, np.asarray(image, dtype=np.uint8), reason)


def decide(model, items: Sequence[Prepared], op: tuple[str, float] | Sequence[tuple[str, float]], *,
           tta: bool = False) -> list[Screened]:
    """One network call for the readable items; one ``Screened`` per item, in order. ``op``: the operating
    point (name, threshold) for all items, or one per item (the HTTP batcher mixes requests)."""
    ops = list(op) if op and isinstance(op[0], tuple) else [op] * len(items)
    if len(ops) != len(items):
        raise ValueError(f"{len(items)} items but {len(ops)} operating points")
    ready = [item.image for item in items if item.image is not None]
    if ready:
        scores = model.score(np.stack(ready), tta=tta)
    out: list[Screened] = []
    row = 0
    for item, (name, value) in zip(items, ops, strict=True):
        if item.error is not None:
            out.append(Screened(Prediction(item.name, None, None, name, value, "error", item.error)))
            continue
        if item.image is None:
            refused = Prediction(item.name, None, None, name, value, "outside_population", item.refused or "")
            out.append(Screened(refused, item.decoded))
            continue
        logits = scores.logits[row]
        prediction = model.result(item.name, logits, float(scores.guard[row]), (name, value), item.reason)
        out.append(Screened(prediction, item.decoded, logits, _input_stats(item.image), scores.features[row]))
        row += 1
    return out


def _input_stats(image: np.ndarray) -> tuple[float, float]:
    values = image.astype(np.float32) / np.float32(255.0)
    return float(values.mean()), float(values.std())


def screen(model, sources: Iterable[Source | DecodedImage | np.ndarray], *, threshold: str | float = "screening",
           batch_size: int = BATCH_SIZE, tta: bool = False, workers: int | None = None,
           on_prepared: Callable[[Prepared], None] | None = None) -> Iterator[Screened]:
    """Screen many sources, one ``Screened`` each, in order.

    Sources are decoded ahead in threads (PIL and the DICOM decoders release the GIL), at most two batches in
    flight, so memory is bounded whatever the number of sources and decoding overlaps the network.
    ``on_prepared(item)``, if given, sees each item as it leaves decoding (from a decoding thread).
    """
    if batch_size < 1:
        raise PneumoscanError(f"batch size must be a positive integer, got {batch_size}")
    op = model.resolve_threshold(threshold)

    def load(source) -> Prepared:
        item = prepare(model, source)
        if on_prepared is not None:
            on_prepared(item)
        return item

    batch: list[Prepared] = []
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        for item in _bounded_map(pool, load, sources, ahead=2 * batch_size):
            batch.append(item)
            if len(batch) == batch_size:
                yield from decide(model, batch, op, tta=tta)
                batch = []
        if batch:
            yield from decide(model, batch, op, tta=tta)


def _bounded_map(pool: ThreadPoolExecutor, fn, items: Iterable, ahead: int) -> Iterator:
    """Like pool.map, in order, but never more than ``ahead`` results in flight (pool.map reads all input first)."""
    queue: deque = deque()
    for item in items:
        queue.append(pool.submit(fn, item))
        if len(queue) >= ahead:
            yield queue.popleft().result()
    while queue:
        yield queue.popleft().result()
