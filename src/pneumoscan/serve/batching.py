"""Dynamic batching: the images of concurrent requests scored as one network call, in one worker thread.

Requests are decoded and prepared in the server's thread pool; each puts its uint8 network input here and awaits
a future. The batcher thread takes the first waiting image, then gathers what else arrives within the window
(``window_s``, a few milliseconds), up to ``max_batch`` images, and scores them with one ``Model.score`` call,
the same function every other route ends in. Row i of the result goes to the future of image i, so an answer can
only ever belong to its own request. While the network runs, new images queue, so under load batches fill
without waiting at all; when no other request is in flight the window is skipped, so a lone request pays nothing.

The queue itself is unbounded: the server bounds the requests in progress (``--max-pending``) before any upload
is read, and each request puts at most one image here.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import NamedTuple

import numpy as np

from .limits import DEFAULT_MAX_BATCH, DEFAULT_WINDOW_MS

logger = logging.getLogger("pneumoscan.serve")



class Scored(NamedTuple):
    logits: object  # torch.Tensor (2,): the row of this request's image
    guard: float
    batch_size: int  # how many images shared the network call


class _Item(NamedTuple):
    image: np.ndarray
    future: Future


_STOP = object()


class Batcher:
    def __init__(self, model, *, window_s: float = DEFAULT_WINDOW_MS / 1000, max_batch: int = DEFAULT_MAX_BATCH,
                 incoming: Callable[[], int] | None = None, metrics=None):
        if max_batch < 1:
            raise ValueError(f"max_batch must be at least 1, got {max_batch}")
        if window_s < 0:
            raise ValueError(f"the batch window must be 0 or more, got {window_s}")
        self.model = model
        self.window_s = window_s
        self.max_batch = max_batch
        # how many requests in progress have not put their image here yet (None: unknown, always wait the window)
        self._incoming = incoming
        self._metrics = metrics
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self.batches = 0  # network calls made, for tests and metrics
        self.images = 0

    # --- the request side --------------------------------------------------------------------------------------
    def submit(self, image: np.ndarray) -> Future:
        """Queue one uint8 (S, S) network input; the future resolves to its ``Scored`` row."""
        self._start()
        future: Future = Future()
        if self._metrics is not None:
            self._metrics.queue_depth.inc()
        self._queue.put(_Item(image, future))
        return future

    async def score(self, image: np.ndarray) -> Scored:
        """Await one image's row without holding a thread (a cancelled request drops out of its batch)."""
        return await asyncio.wrap_future(self.submit(image))

    def close(self) -> None:
        with self._lock:
            if self._thread is not None:
                self._queue.put(_STOP)
                self._thread.join(timeout=10)
                self._thread = None

    # --- the worker thread -------------------------------------------------------------------------------------
    def _start(self) -> None:
        if self._thread is not None:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="pneumoscan-batcher", daemon=True)
                self._thread.start()

    def _taken(self) -> None:
        if self._metrics is not None:
            self._metrics.queue_depth.dec()

    def _gather(self, first: _Item) -> tuple[list[_Item], bool]:
        batch, stop = [first], False
        deadline = time.monotonic() + self.window_s
        while len(batch) < self.max_batch:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                if self._incoming is not None and self._incoming() <= 0:
                    break  # no request in progress is still being uploaded or decoded: nothing to wait for
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    item = self._queue.get(timeout=min(remaining, 0.001))
                except queue.Empty:
                    continue
            if item is _STOP:
                stop = True
                break
            self._taken()
            batch.append(item)
        return batch, stop

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            self._taken()
            batch, stop = self._gather(first)
            live = [item for item in batch if item.future.set_running_or_notify_cancel()]
            if live:
                self._score(live)
            if stop:
                return

    def _score(self, live: list[_Item]) -> None:
        start = time.perf_counter()
        try:
            scores = self.model.score(np.stack([item.image for item in live]))
        except BaseException as exc:  # noqa: BLE001 (every waiting request gets the failure, the thread lives on)
            logger.exception("pneumoscan: a network call for %d image(s) failed", len(live))
            for item in live:
                item.future.set_exception(exc if isinstance(exc, Exception) else RuntimeError(repr(exc)))
            return
        n = len(live)
        self.batches += 1
        self.images += n
        if self._metrics is not None:
            self._metrics.batch_size.observe(n)
            self._metrics.network_seconds.observe(time.perf_counter() - start)
        for i, item in enumerate(live):
            item.future.set_result(Scored(scores.logits[i].clone(), float(scores.guard[i]), n))
