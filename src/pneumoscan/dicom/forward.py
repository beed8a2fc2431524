"""The DICOM node's forwarder: C-STOREs the results queued in the spool's ``outbox/`` to ``--forward``.

Apart from ``node`` because delivery is its own job with its own state (each result's backoff) and its own
failure rules: a destination that is down is retried with exponential backoff (1 s doubling to ``retry_max``
s); a result the destination refuses (a status, or no presentation context for its SOP class) is logged and
retried on its own backoff while the others go on; a result file that cannot be parsed is moved to ``failed/``.
Nothing a peer or a file does ends its thread.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import PneumoscanError
from .spool import Spool

log = logging.getLogger("pneumoscan.dicom")

# What the forwarder proposes: the SR classes pneumoscan writes or wrote (a spool may hold results of an older
# version: Comprehensive SR before TID 1500), Enhanced SR, and the Secondary Capture.
RESULT_CLASSES = ["1.2.840.10008.5.1.4.1.1.88.34", "1.2.840.10008.5.1.4.1.1.88.33", "1.2.840.10008.5.1.4.1.1.88.22",
                  "1.2.840.10008.5.1.4.1.1.7"]
RESULT_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]

SUCCESS = 0x0000


@dataclass(frozen=True)
class Destination:
    ae_title: str
    host: str
    port: int

    @classmethod
    def parse(cls, text: str) -> Destination:
        match = re.fullmatch(r"([^@]{1,16})@([^:]+):(\d{1,5})", text.strip())
        if not match or not 1 <= int(match.group(3)) <= 65535:
            raise PneumoscanError(f"--forward must be AET@HOST:PORT (e.g. ORTHANC@127.0.0.1:4242), got {text!r}")
        return cls(match.group(1), match.group(2), int(match.group(3)))

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


class Forwarder:
    """One thread's worth of delivery: ``run`` until ``stop`` is set; ``wake`` when results were queued."""

    def __init__(self, spool: Spool, destination: Destination, *, ae_title: str, retry_max: float,
                 stop: threading.Event):
        self.spool = spool
        self.forward = destination
        self.ae_title = ae_title
        self.retry_max = retry_max
        self._stop = stop
        self._send = threading.Event()
        self._retry: dict[str, tuple[int, float]] = {}  # outbox file name -> (failed attempts, when next)
        self.delivered = 0

    def wake(self) -> None:
        """New results in the outbox (or the node stops): look now rather than at the next tick."""
        self._send.set()

    def run(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            try:
                due, wait = self._due()
                if not due:
                    self._send.wait(wait)
                    self._send.clear()
                    continue
                reached = self._deliver(due)
            except Exception as exc:  # noqa: BLE001 - whatever a peer or a library does: logged, retried
                log.error("delivering results to %s failed (%s: %s); retrying", self.forward, type(exc).__name__,
                          _first_line(exc))
                reached = False
            if reached:
                delay = 0.0
                continue
            delay = min(self.retry_max, max(1.0, delay * 2))
            log.warning("%d result(s) wait in %s; retrying %s in %.0f s", len(self.spool.outgoing()),
                        self.spool.outbox, self.forward, delay)
            self._stop.wait(delay)

    def _due(self) -> tuple[list[Path], float]:
        """Outbox files whose turn it is (not waiting on their own backoff), and how long until the next one."""
        files = self.spool.outgoing()
        names = {p.name for p in files}
        for name in [n for n in self._retry if n not in names]:
            del self._retry[name]  # delivered, or removed by a person
        now = time.monotonic()
        due = [p for p in files if self._retry.get(p.name, (0, 0.0))[1] <= now]
        later = [when - now for attempts, when in self._retry.values() if when > now]
        return due, min([1.0, *later])

    def _later(self, path: Path, uid: str, why: str) -> None:
        """One result's own backoff: it waits, the others go on."""
        attempts = self._retry.get(path.name, (0, 0.0))[0] + 1
        delay = min(self.retry_max, 2.0 ** (attempts - 1))
        self._retry[path.name] = (attempts, time.monotonic() + delay)
        log.warning("result %s: not delivered to %s (%s); kept, retrying in %.0f s (attempt %d)", uid,
                    self.forward, why, delay, attempts)

    def _deliver(self, files: list[Path]) -> bool:
        """C-STORE the files over one association; False when the destination could not be reached (then all
        wait), True otherwise (a result it refused waits on its own backoff)."""
        import pydicom
        from pydicom.errors import InvalidDicomError
        from pynetdicom import AE

        ae = AE(ae_title=self.ae_title)
        for sop_class in RESULT_CLASSES:
            ae.add_requested_context(sop_class, RESULT_SYNTAXES)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        dest = self.forward
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        except Exception as exc:  # noqa: BLE001 - name resolution and socket errors
            log.warning("cannot reach %s (%s)", dest, _first_line(exc) or type(exc).__name__)
            return False
        if not assoc.is_established:
            log.warning("%s did not accept an association (down, or it does not know AE title %s)", dest,
                        self.ae_title)
            return False
        try:
            for path in files:
                if self._stop.is_set():
                    return True
                try:
                    ds = pydicom.dcmread(path)
                    uid = str(ds.SOPInstanceUID)
                except FileNotFoundError:
                    continue
                except (InvalidDicomError, ValueError, EOFError, KeyError, AttributeError, TypeError) as exc:
                    log.error("result file %s cannot be parsed (%s: %s); moved to %s, the others go on", path.name,
                              type(exc).__name__, _first_line(exc), self.spool.failed)
                    self.spool.fail(path)
                    continue
                except OSError as exc:
                    self._later(path, path.stem, f"cannot read its file: {exc.strerror or exc}")
                    continue
                sop_class = str(ds.get("SOPClassUID", ""))
                if not any(str(cx.abstract_syntax) == sop_class for cx in assoc.accepted_contexts):
                    self._later(path, uid, f"it accepted no presentation context for SOP class {sop_class}")
                    continue
                try:
                    status = assoc.send_c_store(ds)
                except Exception as exc:  # noqa: BLE001 - e.g. ValueError: no accepted context for its SOP class
                    self._later(path, uid, f"{type(exc).__name__}: {_first_line(exc)}")
                    if not assoc.is_established:
                        return False
                    continue
                code = getattr(status, "Status", None)
                if code is not None and (code == SUCCESS or 0xB000 <= code <= 0xBFFF):
                    self.delivered += 1
                    path.unlink(missing_ok=True)
                    self._retry.pop(path.name, None)
                    log.info("result %s (%s) for study %s delivered to %s", uid, ds.get("Modality", ""),
                             ds.get("StudyInstanceUID", ""), dest)
                elif code is None or not assoc.is_established:
                    log.warning("result %s: %s answered nothing (connection lost); kept for retry", uid, dest)
                    return False
                else:
                    self._later(path, uid, f"status 0x{code:04X}")
        finally:
            if assoc.is_established:
                assoc.release()
        return True



def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc) else ""

