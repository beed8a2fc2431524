"""What the DICOM node records for monitoring: the results log ``pneumoscan monitor`` reads, and the Prometheus
``/metrics`` it serves with ``--metrics-port`` (instances by status; drift gauges over a sliding window).

Apart from ``node`` so the SCP's handlers and threads are not interleaved with what is counted and written about
them; a node with neither a metrics port nor a drift reference still writes its results log.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

from ..errors import PneumoscanError
from .screen import Outcome

log = logging.getLogger("pneumoscan.dicom")

RESULTS_LOG = "results.jsonl"  # under the spool unless --results-log names another file
DEFAULT_DRIFT_WINDOW = 200


class ResultsLog:
    """The node's results as ``pneumoscan monitor`` reads them: one JSON line per screened instance, ``{"time",
    "sop_instance_uid", "model_sha256", "prevalence", "facts"}``. Appended in one write per line (whole lines
    even if two nodes share the file), created with the process's umask (``durable``'s policy: owner-only under
    the node's 077). No patient attribute: the facts hold an age band at most."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
        except OSError as exc:
            raise PneumoscanError(f"{path}: cannot open the results log ({exc.strerror or exc})") from None

    def write(self, outcome: Outcome, model) -> None:
        line = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "sop_instance_uid": outcome.sop_instance_uid or None, "model_sha256": model.sha256,
                "prevalence": model.prevalence, "facts": outcome.facts}
        os.write(self._fd, (json.dumps(line, separators=(",", ":")) + "\n").encode("utf-8"))

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None



class Metrics:
    """The registry ``/metrics`` shows: instances by status, and the drift gauges when the model has a
    reference (and ``drift_window`` is not 0). ``start`` serves it; ``count`` is one instance's share."""

    def __init__(self, model, drift_window: int):
        try:
            from prometheus_client import CollectorRegistry, Counter
        except ImportError as exc:
            raise PneumoscanError(f"--metrics-port needs prometheus-client (pip install 'pneumoscan[serve]'): "
                                  f"{exc}") from None
        from .. import monitor

        self.registry = CollectorRegistry(auto_describe=True)
        self.by_status = Counter("pneumoscan_dicom_screened", "instances screened, by the stage's status",
                                 ["status"], registry=self.registry)
        self.drift = None
        ref = monitor.reference_for(model) if drift_window else None
        if ref is not None:
            self.drift = monitor.SlidingMonitor(ref, window=drift_window)
            self.drift.register(self.registry)
        self._server = None

    def start(self, host: str, port: int) -> int:
        """Serve ``/metrics`` on ``host:port`` (0: a free port) and start the drift thread; the port served."""
        from prometheus_client import start_http_server

        try:
            self._server, _ = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise PneumoscanError(f"--metrics-port {port}: cannot listen on {host} "
                                  f"({exc.strerror or exc})") from None
        port = self._server.server_port
        if self.drift is not None:
            self.drift.start()
        log.info("metrics on http://%s:%d/metrics (%s)", host, port,
                 f"drift gauges over the last {self.drift.window} instances" if self.drift is not None
                 else "no drift gauges: off, or the model has no drift reference")
        return port

    def count(self, outcome: Outcome) -> None:
        """The status counter and the drift window (a queue put: computed in the drift thread)."""
        self.by_status.labels(outcome.prediction.status).inc()
        if self.drift is not None:
            self.drift.submit(outcome.facts)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self.drift is not None:
            self.drift.stop()
