"""Dynamic batching: the images of concurrent requests decided by one network call, in one worker thread.

Requests are decoded and checked in the server's thread pool (``pipeline.prepare``); each queues its ``Prepared``
item here with its own operating point and awaits a future. The batcher thread takes the first waiting item, then
gathers what else arrives within the window (``window_s``, a few milliseconds), up to ``max_batch`` items, and
hands them to ``pipeline.decide``: one network call, one ``Screened`` per item in order, the same stage every
other route ends in. Result i goes to the future of item i, so an answer can only ever belong to its own request. While the network runs, new images queue, so under load batches fill
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

from ..pipeline import Prepared, Screened, decide
from .limits import DEFAULT_MAX_BATCH, DEFAULT_WINDOW_MS

logger = logging.getLogger("pneumoscan.serve")


class Scored(NamedTuple):
    screened: Screened  # the stage's result for this request's item
    batch_size: int  # how many items shared the network call


class _Item(NamedTuple):
    prepared: Prepared
    op: tuple[str, float]  # the request's operating point (name, threshold)
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
        self.batches = 0  # network calls made, for the tests and the metrics
        self.images = 0

    # --- the request side --------------------------------------------------------------------------------------
    def submit(self, prepared: Prepared, op: tuple[str, float]) -> Future:
        """Queue one readable ``Prepared`` item; the future resolves to its ``Scored`` result."""
        if prepared.error is not None:
            raise ValueError(f"{prepared.name}: an unreadable item has no place in a network call")
        self._start()
        future: Future = Future()
        if self._metrics is not None:
            self._metrics.queue_depth.inc()
        self._queue.put(_Item(prepared, op, future))
        return future

    async def decide(self, prepared: Prepared, op: tuple[str, float]) -> Scored:
        """Await one item's decision without holding a thread (a cancelled request drops out of its batch)."""
        return await asyncio.wrap_future(self.submit(prepared, op))

    def start(self) -> None:
        """Start the worker thread now (the service's lifespan does, so the first request pays nothing)."""
        self._start()

    def close(self) -> None:
        """Stop the worker thread once the items queued before this call are decided."""
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
            screened = decide(self.model, [item.prepared for item in live], [item.op for item in live])
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
        for item, result in zip(live, screened, strict=True):
            item.future.set_result(Scored(result, n))
