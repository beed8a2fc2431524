"""``pneumoscan dicom listen``: a DICOM Storage SCP that screens what a PACS sends and sends DICOM results back.

Three operators, each with one job, joined by the spool folder (``spool.Spool``). This module is the receiver
and the screener (the pynetdicom AE, its event handlers, the screening thread) and wires the parts that live
apart: ``access`` (allow-list, DICOM TLS, the association record), ``forward`` (the forwarder and its backoff)
and ``observe`` (results log, ``/metrics``). Their public names are importable from here too.

- the receiver (pynetdicom's association threads): only the senders of the allow-list (``--allow-ae``; anyone
  else gets A-ASSOCIATE-RJ "calling AE title not recognised"), over DICOM TLS when configured; C-ECHO; C-STORE
  of CR, DX and Secondary Capture images (and CT, whose SR says it was not analysed) in uncompressed and
  compressed transfer syntaxes, answered Success only once the instance is fsynced under ``incoming/``. Objects
  that are no image (SR, presentation states, key objects, documents, ...) and pneumoscan's own results are
  answered Success and never screened (``screen.not_screened``), so routing everything back makes no loop.
  Too large an instance is refused with 0xA700, one without the UIDs a result must reference with 0xA900. A
  sender that drops the association mid-transfer leaves nothing: pynetdicom hands over a dataset only once all of
  it arrived. One log line per association: calling AE, peer address, and the SOP Instance UIDs it sent.
- the screener (one thread, the one model, warmed up before the first association is accepted): takes up to
  ``batch_size`` spooled instances at a time, screens them through ``Screener`` (the pipeline stage, one network
  call per batch), writes the SR (always: an instance it cannot analyse gets one saying why) and the Grad-CAM SC
  (where the heatmap rule wants one) under ``--out`` and/or queues them in ``outbox/``, and only then removes the
  instance. After a crash or SIGKILL whatever is still in ``incoming/`` is screened at the next start; result
  UIDs are derived from the instance and the model, so doing it twice makes the same objects.
- the forwarder (one thread): C-STOREs ``outbox/`` to ``--forward``. A destination that is down is retried with
  exponential backoff (1 s doubling to ``retry_max`` s); a result the destination refuses (a status, or no
  presentation context for its SOP class) is logged and retried on its own backoff while the others go on; a
  result file that cannot be parsed is moved to ``failed/``. Nothing a peer or a file does ends the thread.

Logs: one line per association, per instance (SOP Instance UID, result, timings) and per delivery; never a
patient attribute.

Monitoring: every screened instance gets a line in the results log (``ResultsLog``, JSON lines, by default
``SPOOL/results.jsonl``) with its SOP Instance UID, the model's sha256 and ``Screened.facts()``, never a patient
attribute; ``pneumoscan monitor`` reads it. With ``metrics_port`` the node serves Prometheus ``/metrics`` on its
own host: instances screened by status and, for a model with a drift reference, the drift gauges of
``monitor.SlidingMonitor`` over the last ``drift_window`` instances (fed by a queue put; computed in its thread).
"""

from __future__ import annotations

import io
import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PneumoscanError

# The parts the node wires, re-exported: ``pneumoscan.dicom.node`` stays the one place callers import from.
from .access import REJECT_CALLING_AE, AllowList, Sender, _Association, parse_sender, tls_context
from .forward import RESULT_CLASSES, RESULT_SYNTAXES, SUCCESS, Destination, Forwarder
from .observe import DEFAULT_DRIFT_WINDOW, RESULTS_LOG, Metrics, ResultsLog
from .screen import IMAGE_CLASSES, Outcome, not_screened
from .spool import Spool, atomic_write, safe_name

__all__ = ["DEFAULT_DRIFT_WINDOW", "RESULTS_LOG", "RESULT_CLASSES", "RESULT_SYNTAXES", "SUCCESS", "TRANSFER_SYNTAXES",
           "AllowList", "Destination", "Node", "ResultsLog", "Sender", "non_image_classes", "parse_sender",
           "tls_context"]

if TYPE_CHECKING:
    import ssl

log = logging.getLogger("pneumoscan.dicom")

TRANSFER_SYNTAXES = [
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2",  # implicit VR little endian
    "1.2.840.10008.1.2.1.99",  # deflated explicit VR little endian
    "1.2.840.10008.1.2.2",  # explicit VR big endian (retired, still sent by old modalities)
    "1.2.840.10008.1.2.4.50",  # JPEG baseline 8 bit
    "1.2.840.10008.1.2.4.51",  # JPEG extended 12 bit
    "1.2.840.10008.1.2.4.57",  # JPEG lossless, process 14
    "1.2.840.10008.1.2.4.70",  # JPEG lossless, process 14, selection value 1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.5",  # RLE lossless
]

OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000


def non_image_classes() -> list[str]:
    """Every storage SOP class pynetdicom knows that is no image (its name has no "Image": SR, presentation
    states, key objects, encapsulated documents, waveforms, RT objects, ...). The node takes these and answers
    Success without screening, so a PACS that routes everything to it is not left with failed transfers."""
    from pydicom.uid import UID
    from pynetdicom import AllStoragePresentationContexts

    return [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts
            if "Image" not in UID(cx.abstract_syntax).name and str(cx.abstract_syntax) not in IMAGE_CLASSES]


# ---- the node ----------------------------------------------------------------------------------------------------


class Node:
    """The DICOM node: receiver, screener and forwarder around one loaded model."""

    def __init__(self, model, *, spool: str | Path, ae_title: str = "PNEUMOSCAN", host: str = "127.0.0.1",
                 port: int = 11112, forward: Destination | None = None, out: str | Path | None = None,
                 max_instance_bytes: int = 100 * 2**20, batch_size: int = 8, retry_max: float = 60.0,
                 heatmaps: str = "positive", threshold: str | float = "screening",
                 allow: AllowList | None = None, tls: ssl.SSLContext | None = None,
                 results_log: str | Path | None = None, metrics_port: int | None = None,
                 drift_window: int = DEFAULT_DRIFT_WINDOW):
        from .screen import Screener

        if forward is None and out is None:
            raise PneumoscanError("give --forward AET@HOST:PORT and/or --out DIR: results must go somewhere")
        self.model = model
        self.screener = Screener(model, threshold=threshold, heatmaps=heatmaps)
        self.spool = Spool(spool)
        self.results_log = ResultsLog(results_log if results_log is not None else self.spool.root / RESULTS_LOG)
        self.metrics_port = metrics_port
        self.metrics = Metrics(model, drift_window) if metrics_port is not None else None
        self.drift = self.metrics.drift if self.metrics is not None else None
        self.ae_title = ae_title
        self.host, self.port = host, port
        self.forward = forward
        self.out = Path(out) if out is not None else None
        self.max_instance_bytes = max_instance_bytes
        self.batch_size = batch_size
        self.retry_max = retry_max
        self.allow = allow or AllowList()
        self.tls = tls
        self._stop = threading.Event()
        self._work = threading.Event()
        self.forwarder = Forwarder(self.spool, forward, ae_title=ae_title, retry_max=retry_max, stop=self._stop) \
            if forward is not None else None
        self._threads: list[threading.Thread] = []
        self._server = None
        self._associations: dict[int, _Association] = {}
        self._associations_lock = threading.Lock()
        self.screened = 0

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> Node:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True  # a PACS configured with another title for us is told so (rejected)
        ae.maximum_pdu_size = 256 * 1024  # per P-DATA PDU received: bounded, and few PDUs per radiograph
        ae.add_supported_context(Verification)
        for sop_class in [*IMAGE_CLASSES, *non_image_classes()]:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_REQUESTED, self._on_requested), (evt.EVT_C_STORE, self._on_store),
                    (evt.EVT_C_ECHO, self._on_echo), (evt.EVT_ACCEPTED, self._on_accepted),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_RELEASED, self._on_closed),
                    (evt.EVT_ABORTED, self._on_closed), (evt.EVT_CONN_CLOSE, self._on_closed)]
        took = self.screener.warm_up()  # before any association: the first study does not pay for it
        log.info("model %s warmed up in %.1f s (network%s, result builders)", self.model.name, took,
                 ", Grad-CAM" if self.screener.heatmaps != "none" else "")
        pending = len(self.spool.pending())
        if pending:
            log.info("%d instance(s) received before the last stop are waiting: screening them first", pending)
        if self.metrics is not None:  # before any thread: a port in use is refused with nothing running
            self.metrics_port = self.metrics.start(self.host, self.metrics_port)
        self._threads = [threading.Thread(target=self._screen_loop, name="pneumoscan-screen", daemon=True)]
        if self.forwarder is not None:
            self._threads.append(threading.Thread(target=self.forwarder.run, name="pneumoscan-forward", daemon=True))
        for thread in self._threads:
            thread.start()
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers,
                                       ssl_context=self.tls)
        self.port = self._server.server_address[1]
        log.info("listening as %s on %s:%d%s; senders: %s; heatmaps: %s; results to %s", self.ae_title, self.host,
                 self.port, " (DICOM TLS)" if self.tls else "", self.allow, self.screener.heatmaps,
                 " and ".join(x for x in (str(self.forward) if self.forward else "",
                                         str(self.out) if self.out else "") if x))
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        self._work.set()
        if self.forwarder is not None:
            self.forwarder.wake()
        for thread in self._threads:
            thread.join(timeout)
        if self.metrics is not None:
            self.metrics.stop()
        self.results_log.close()

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            pass

    def idle(self) -> bool:
        """Nothing left to screen or deliver (for tests and the benchmark)."""
        return not self.spool.pending(1) and not self.spool.outgoing()

    @property
    def delivered(self) -> int:
        """Results the forwarder delivered since start."""
        return self.forwarder.delivered if self.forwarder is not None else 0

    def alive(self) -> dict[str, bool]:
        """Whether each worker thread still runs (a worker that ended would leave the spool to pile up)."""
        return {thread.name: thread.is_alive() for thread in self._threads}

    # --- associations ------------------------------------------------------------------------------------------
    def _on_requested(self, event) -> None:
        """Take the association only from an allowed sender; anyone else gets the standard rejection."""
        assoc = event.assoc
        calling = str(assoc.requestor.primitive.calling_ae_title).strip()
        peer = f"AE {calling!r} at {assoc.requestor.address}:{assoc.requestor.port}" \
               f"{' (TLS)' if self.tls else ''}"
        if not self.allow.permits(calling, assoc.requestor.address):
            assoc.acse.send_reject(*REJECT_CALLING_AE)
            assoc.kill()  # as pynetdicom does after its own rejections: waits until the A-ASSOCIATE-RJ is sent
            log.warning("association from %s: rejected (calling AE title not recognised: not in the allow-list)",
                        peer)
            return
        with self._associations_lock:
            self._associations[id(assoc)] = _Association(peer)

    def _on_rejected(self, event) -> None:
        record = self._pop(event)
        primitive = event.assoc.acceptor.primitive
        reason = getattr(primitive, "reason_str", None) or "rejected"
        log.warning("association from %s: rejected (%s)", record.peer if record else _peer(event), reason)

    def _on_accepted(self, event) -> None:
        assoc = event.assoc
        if not assoc.accepted_contexts:
            proposed = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
            log.warning("association from %s proposed only SOP classes this node does not take (%s): "
                        "every presentation context rejected", _peer(event), ", ".join(proposed)[:300])

    def _on_closed(self, event) -> None:
        """The association's one line, when it ends (released, aborted, or its connection closed)."""
        record = self._pop(event)
        if record is None:
            return
        how = {"EVT_RELEASED": "released", "EVT_ABORTED": "aborted"}.get(event.event.name, "closed")
        kinds = ", ".join(f"{count} {kind}" for kind, count in record.kinds.items())
        (log.warning if how == "aborted" else log.info)(
            "association from %s %s; %d instance(s)%s%s", record.peer, how, len(record.uids),
            f" ({kinds})" if kinds else "", f": {' '.join(record.uids)}" if record.uids else "")

    def _pop(self, event) -> _Association | None:
        with self._associations_lock:
            return self._associations.pop(id(event.assoc), None)

    def _note(self, event, uid: str, kind: str) -> None:
        with self._associations_lock:
            record = self._associations.get(id(event.assoc))
            if record is not None:
                record.add(uid, kind)

    # --- receiver ----------------------------------------------------------------------------------------------
    def _on_echo(self, event) -> int:
        log.info("C-ECHO from %s", _peer(event))
        return SUCCESS

    def _on_store(self, event) -> int:
        start = time.perf_counter()
        sop_uid = str(event.request.AffectedSOPInstanceUID or "")
        sop_class = str(event.request.AffectedSOPClassUID or "")
        size = event.request.DataSet.getbuffer().nbytes
        if size > self.max_instance_bytes:
            log.warning("instance %s: refused, %.1f MB is above the %.1f MB limit (status 0xA700)",
                        sop_uid, size / 2**20, self.max_instance_bytes / 2**20)
            self._note(event, sop_uid, "refused")
            return OUT_OF_RESOURCES
        try:
            import pydicom

            data = event.encoded_dataset()  # as sent, with its file meta: what the spool keeps
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)  # the header; pixels are the screener's
            uid_in_dataset = str(ds.get("SOPInstanceUID", ""))
            skip = not_screened(ds)
        except Exception as exc:  # noqa: BLE001 - a dataset pydicom cannot parse is that instance's answer
            log.warning("instance %s: refused, the dataset cannot be parsed (%s; status 0xC000)", sop_uid,
                        type(exc).__name__)
            self._note(event, sop_uid, "refused")
            return CANNOT_UNDERSTAND
        if skip is not None:
            log.info("instance %s: accepted without screening: %s", uid_in_dataset or sop_uid, skip)
            self._note(event, uid_in_dataset or sop_uid, "not screened")
            return SUCCESS
        if not uid_in_dataset or not ds.get("StudyInstanceUID"):
            log.warning("instance %s: refused, the dataset lacks its SOP Instance or Study Instance UID, so no "
                        "result could join its study (status 0xA900)", sop_uid)
            self._note(event, sop_uid, "refused")
            return DOES_NOT_MATCH_SOP_CLASS
        try:
            self.spool.receive(safe_name(uid_in_dataset, data), data)
        except OSError as exc:
            log.error("instance %s: cannot be spooled (%s; status 0xA700)", sop_uid, exc.strerror or exc)
            self._note(event, uid_in_dataset, "refused")
            return OUT_OF_RESOURCES
        took = time.perf_counter() - start
        (log.warning if took > 5 else log.info)(
            "instance %s: received (%s, %.1f MB, spooled in %.3f s)", uid_in_dataset,
            IMAGE_CLASSES.get(sop_class, sop_class), size / 2**20, took)
        self._note(event, uid_in_dataset, "to screen")
        self._work.set()
        return SUCCESS

    # --- screener ----------------------------------------------------------------------------------------------
    def _screen_loop(self) -> None:
        while not self._stop.is_set():
            batch = self.spool.pending(self.batch_size)
            if not batch:
                self._work.wait(1.0)
                self._work.clear()
                continue
            try:
                self._screen_batch(batch)
            except Exception:  # never let one batch stop the node; screen its instances one by one
                log.exception("screening a batch of %d failed; retrying one instance at a time", len(batch))
                for path in batch:
                    if self._stop.is_set():
                        return
                    try:
                        self._screen_batch([path])
                    except Exception as exc:  # noqa: BLE001 - that instance's failure, kept for a person
                        log.error("instance %s: screening failed (%s: %s); kept in %s", path.stem,
                                  type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "",
                                  self.spool.failed)
                        if path.exists():
                            self.spool.fail(path)

    def _screen_batch(self, batch: list[Path]) -> None:
        items, paths, received = [], [], []
        for path in batch:
            try:
                stat = path.stat()
                items.append((path.stem, path.read_bytes()))
                received.append(stat)
                paths.append(path)
            except FileNotFoundError:
                continue
        outcomes = self.screener.screen(items)
        for path, when, outcome in zip(paths, received, outcomes, strict=True):
            if outcome.unanswerable is not None:
                log.error("%s; kept in %s", outcome.unanswerable, self.spool.failed)
                self.spool.fail(path)
                self._record(outcome)  # the stage's answer all the same: a rejection the monitor counts
                continue
            for ds in outcome.results:
                self._emit(ds)
            if _same_file(path, when):  # not sent again while being screened (then the new copy is screened next)
                path.unlink(missing_ok=True)
            self._record(outcome)
            self.screened += 1
            t = outcome.seconds
            log.info("instance %s: %s; %d result(s); %.2f s from receipt (decode %.2f, score %.2f, results %.2f)",
                     outcome.sop_instance_uid, outcome.summary(), len(outcome.results), time.time() - when.st_mtime,
                     t.get("decode", 0), t.get("score", 0), t.get("results", 0))
        if self.forwarder is not None:
            self.forwarder.wake()

    def _record(self, outcome: Outcome) -> None:
        """The results log line, the status counter and the drift window (a queue put) of one instance. A log
        that cannot be written costs its line, never the instance (its results are already out)."""
        try:
            self.results_log.write(outcome, self.model)
        except OSError as exc:
            log.error("instance %s: results log %s not written (%s)", outcome.sop_instance_uid,
                      self.results_log.path, exc.strerror or exc)
        if self.metrics is not None:
            self.metrics.count(outcome)

    def _emit(self, ds) -> None:
        name = safe_name(str(ds.SOPInstanceUID))
        if self.out is not None:
            target = self.out / safe_name(str(ds.StudyInstanceUID)) / f"{name}.dcm"
            atomic_write(target, lambda handle: ds.save_as(handle, enforce_file_format=True))
        if self.forward is not None:
            self.spool.queue_result(name, lambda handle: ds.save_as(handle, enforce_file_format=True))


def _same_file(path: Path, stat: os.stat_result) -> bool:
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    return (now.st_ino, now.st_mtime_ns, now.st_size) == (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _peer(event) -> str:
    try:
        requestor = event.assoc.requestor
        return f"AE {str(requestor.ae_title).strip()!r} at {requestor.address}:{requestor.port}"
    except Exception:  # noqa: BLE001
        return "a peer"
