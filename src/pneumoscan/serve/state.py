"""What one app holds while it runs: its settings, the model, and the worker resources the lifespan owns.

``open`` (at startup) starts the decode pool, the batcher thread and the drift monitor's thread; ``close`` (at
shutdown) stops them, so an app that has served and stopped leaves no thread behind. ``admit`` bounds the screening
requests in progress (``max_pending``) and tells the batcher how many of them have not handed it their image yet.
"""

from __future__ import annotations

import contextlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .audit import AuditLog
from .auth import KeyStore
from .batching import Batcher
from .metrics import Metrics
from .middleware import new_entry

if TYPE_CHECKING:
    from ..monitor import SlidingMonitor


@dataclass(frozen=True)
class Settings:
    max_upload_bytes: int
    max_concurrency: int
    max_pending: int
    upload_timeout: float
    batch_window_ms: float
    max_batch: int
    public_docs: bool

    @property
    def batching(self) -> dict:
        return {"batch_window_ms": self.batch_window_ms, "max_batch": self.max_batch}


class Busy(Exception):
    """More screening requests are in progress than ``max_pending`` allows."""


@dataclass
class Service:
    model: object
    settings: Settings
    metrics: Metrics
    keys: KeyStore | None
    audit: AuditLog | None
    drift: SlidingMonitor | None = None  # the drift gauges' window; None: the model has no reference, or it is off
    decoders: ThreadPoolExecutor | None = None
    batcher: Batcher | None = None
    pending: int = 0  # screening requests admitted and not yet answered
    incoming: int = 0  # of those, the ones whose image has not reached the batcher yet

    @property
    def heatmap_ok(self) -> bool:
        return bool(self.model.backend.gradcam)

    @property
    def model_ref(self) -> dict:
        return {"name": self.model.name, "sha256": self.model.sha256}

    def open(self) -> None:
        s = self.settings
        # decoding, checks, heatmaps and previews: at most max_concurrency at once, beside the batcher's network call
        self.decoders = ThreadPoolExecutor(s.max_concurrency, thread_name_prefix="pneumoscan-decode")
        self.batcher = Batcher(self.model, window_s=s.batch_window_ms / 1000.0, max_batch=s.max_batch,
                               incoming=lambda: self.incoming, metrics=self.metrics)
        self.batcher.start()
        if self.drift is not None:
            self.drift.start()

    def close(self) -> None:
        if self.batcher is not None:
            self.batcher.close()
        if self.drift is not None:
            self.drift.stop()
        if self.decoders is not None:
            self.decoders.shutdown(wait=True, cancel_futures=True)

    def rejected(self, reason: str, status: int | None, line: tuple[str, str] | None, client: str | None) -> None:
        """A request the server refused before the app saw it (``server.GuardedH11Protocol``): counted, and
        audited when its request line was read."""
        self.metrics.protocol_rejections.labels(reason).inc()
        if self.audit is not None and line is not None:
            entry = new_entry(method=line[0], path=line[1], client=client, model_sha256=self.model.sha256)
            entry.update(status=status, rejected=reason)
            self.audit.write(entry)

    @contextlib.contextmanager
    def admit(self):
        """One screening request in progress; yields a callable to say its image has reached the batcher."""
        if self.pending >= self.settings.max_pending:
            self.metrics.rejected.inc()
            raise Busy
        self.pending += 1
        self.incoming += 1
        self.metrics.in_progress.inc()
        handed = [False]

        def handed_over() -> None:
            if not handed[0]:
                handed[0] = True
                self.incoming -= 1

        try:
            yield handed_over
        finally:
            handed_over()
            self.pending -= 1
            self.metrics.in_progress.dec()
