"""``pneumoscan dicom listen``: a DICOM Storage SCP that screens what a PACS sends and sends DICOM results back.

Three operators, each with one job, joined by the spool folder (``spool.Spool``):

- the receiver (pynetdicom's association threads): C-ECHO; C-STORE of CR, DX and Secondary Capture images (and CT,
  whose SR says it was not assessed) in uncompressed and compressed transfer syntaxes. A C-STORE is answered
  Success only once the instance is fsynced under ``incoming/``; too large an instance is refused with 0xA700,
  one without pixel data with 0xA900. A sender that drops the association mid-transfer leaves nothing: pynetdicom
  hands over a dataset only once all of it arrived.
- the screener (one thread, the one model): takes up to ``batch_size`` spooled instances at a time, screens them
  through ``Screener`` (one ``Model.score`` per batch), writes the SR and SC under ``--out`` and/or queues them in
  ``outbox/``, and only then removes the instance. After a crash or SIGKILL whatever is still in ``incoming/``
  is screened at the next start; result UIDs are derived from the instance and the model, so doing it twice
  makes the same objects.
- the forwarder (one thread): C-STOREs ``outbox/`` to ``--forward``; a destination that is down or refuses is
  retried with exponential backoff (1 s doubling to ``retry_max`` s) until it takes them.

Logs: one line per instance (SOP Instance UID, result, timings) and per delivery; never a patient attribute.
"""

from __future__ import annotations

import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from ..errors import PneumoscanError
from .spool import Spool, atomic_write, safe_name

log = logging.getLogger("pneumoscan.dicom")

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
CT = "1.2.840.10008.5.1.4.1.1.2"
# Accepted storage SOP classes: the radiographs, and CT so that a CT slice sent by mistake gets a "not assessed"
# SR instead of a silent refusal. Anything else is not negotiated (pynetdicom rejects those contexts).
STORAGE_CLASSES = {CR: "CR", DX_PRESENTATION: "DX for presentation", DX_PROCESSING: "DX for processing",
                   SECONDARY_CAPTURE: "Secondary Capture", CT: "CT"}
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
RESULT_CLASSES = ["1.2.840.10008.5.1.4.1.1.88.33", SECONDARY_CAPTURE]  # Comprehensive SR, Secondary Capture
RESULT_SYNTAXES = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]

SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC000
PROCESSING_FAILURE = 0x0110


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


class Node:
    """The DICOM node: receiver, screener and forwarder around one loaded model."""

    def __init__(self, model, *, spool: str | Path, ae_title: str = "PNEUMOSCAN", host: str = "0.0.0.0",
                 port: int = 11112, forward: Destination | None = None, out: str | Path | None = None,
                 max_instance_bytes: int = 100 * 2**20, batch_size: int = 8, retry_max: float = 60.0,
                 heatmaps: bool = True, threshold: str | float = "screening"):
        from .screen import Screener

        if forward is None and out is None:
            raise PneumoscanError("give --forward AET@HOST:PORT and/or --out DIR: results must go somewhere")
        self.model = model
        self.screener = Screener(model, threshold=threshold, heatmaps=heatmaps)
        self.spool = Spool(spool)
        self.ae_title = ae_title
        self.host, self.port = host, port
        self.forward = forward
        self.out = Path(out) if out is not None else None
        self.max_instance_bytes = max_instance_bytes
        self.batch_size = batch_size
        self.retry_max = retry_max
        self._stop = threading.Event()
        self._work = threading.Event()
        self._send = threading.Event()
        self._threads: list[threading.Thread] = []
        self._server = None
        self.screened = 0
        self.delivered = 0

    # --- lifecycle ---------------------------------------------------------------------------------------------
    def start(self) -> Node:
        from pynetdicom import AE, evt
        from pynetdicom.sop_class import Verification

        ae = AE(ae_title=self.ae_title)
        ae.require_called_aet = True  # a PACS configured with another title for us is told so (rejected)
        ae.maximum_pdu_size = 256 * 1024  # per P-DATA PDU received: bounded, and few PDUs per radiograph
        ae.add_supported_context(Verification)
        for sop_class in STORAGE_CLASSES:
            ae.add_supported_context(sop_class, TRANSFER_SYNTAXES)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_ABORTED, self._on_aborted), (evt.EVT_REJECTED, self._on_rejected),
                    (evt.EVT_ACCEPTED, self._on_accepted)]
        pending = len(self.spool.pending())
        if pending:
            log.info("%d instance(s) received before the last stop are waiting: screening them first", pending)
        self._threads = [threading.Thread(target=self._screen_loop, name="pneumoscan-screen", daemon=True)]
        if self.forward is not None:
            self._threads.append(threading.Thread(target=self._forward_loop, name="pneumoscan-forward", daemon=True))
        for thread in self._threads:
            thread.start()
        self._server = ae.start_server((self.host, self.port), block=False, evt_handlers=handlers)
        self.port = self._server.server_address[1]
        log.info("listening as %s on %s:%d; results to %s", self.ae_title, self.host, self.port,
                 " and ".join(x for x in (str(self.forward) if self.forward else "",
                                         str(self.out) if self.out else "") if x))
        return self

    def stop(self, timeout: float = 30.0) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._stop.set()
        self._work.set()
        self._send.set()
        for thread in self._threads:
            thread.join(timeout)

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            pass

    def idle(self) -> bool:
        """Nothing left to screen or deliver (for tests and the benchmark)."""
        return not self.spool.pending(1) and not self.spool.outgoing()

    # --- receiver ----------------------------------------------------------------------------------------------
    def _on_echo(self, event) -> int:
        log.info("C-ECHO from %s", _peer(event))
        return SUCCESS

    def _on_aborted(self, event) -> None:
        log.warning("association with %s aborted; nothing half-received was kept", _peer(event))

    def _on_accepted(self, event) -> None:
        assoc = event.assoc
        if not assoc.accepted_contexts:
            proposed = sorted({str(cx.abstract_syntax) for cx in assoc.rejected_contexts})
            log.warning("association from %s proposed only SOP classes this node does not take (%s): "
                        "every presentation context rejected", _peer(event), ", ".join(proposed)[:300])

    def _on_rejected(self, event) -> None:
        log.warning("association from %s rejected", _peer(event))

    def _on_store(self, event) -> int:
        start = time.perf_counter()
        sop_uid = str(event.request.AffectedSOPInstanceUID or "")
        sop_class = str(event.request.AffectedSOPClassUID or "")
        size = event.request.DataSet.getbuffer().nbytes
        if size > self.max_instance_bytes:
            log.warning("instance %s: refused, %.1f MB is above the %.1f MB limit (status 0xA700)",
                        sop_uid, size / 2**20, self.max_instance_bytes / 2**20)
            return OUT_OF_RESOURCES
        try:
            ds = event.dataset
            has_pixels = any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))
            uid_in_dataset = str(ds.get("SOPInstanceUID", ""))
        except Exception as exc:
            log.warning("instance %s: refused, the dataset cannot be parsed (%s; status 0xC000)", sop_uid,
                        type(exc).__name__)
            return CANNOT_UNDERSTAND
        if not has_pixels:
            log.warning("instance %s: refused, %s without pixel data (status 0xA900)", sop_uid,
                        STORAGE_CLASSES.get(sop_class, sop_class))
            return DOES_NOT_MATCH_SOP_CLASS
        if not uid_in_dataset or not ds.get("StudyInstanceUID"):
            log.warning("instance %s: refused, the dataset lacks its SOP Instance or Study Instance UID "
                        "(status 0xA900)", sop_uid)
            return DOES_NOT_MATCH_SOP_CLASS
        try:
            data = event.encoded_dataset()
            self.spool.receive(safe_name(uid_in_dataset, data), data)
        except OSError as exc:
            log.error("instance %s: cannot be spooled (%s; status 0xA700)", sop_uid, exc.strerror or exc)
            return OUT_OF_RESOURCES
        took = time.perf_counter() - start
        (log.warning if took > 5 else log.info)(
            "instance %s: received (%s, %.1f MB, spooled in %.3f s)", uid_in_dataset,
            STORAGE_CLASSES.get(sop_class, sop_class), size / 2**20, took)
        self._work.set()
        return SUCCESS

    # --- screener ----------------------------------------------------------------------------------------------
    def _screen_loop(self) -> None:
        # Test hook: instances wait this long in the spool before screening, so a test can kill the node
        # between receipt and screening for certain.
        hold = float(os.environ.get("PNEUMOSCAN_DICOM_HOLD_SECONDS", "0") or 0)
        while not self._stop.is_set():
            batch = self.spool.pending(self.batch_size)
            if hold:
                batch = [p for p in batch if _age(p) >= hold]
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
                    except Exception as exc:
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
            if isinstance(outcome, str):
                log.error("%s; no result can reference it, kept in %s", outcome, self.spool.failed)
                self.spool.fail(path)
                continue
            for ds in outcome.results:
                self._emit(ds)
            if _same_file(path, when):  # not sent again while being screened (then the new copy is screened next)
                path.unlink(missing_ok=True)
            self.screened += 1
            t = outcome.seconds
            log.info("instance %s: %s; %d result(s); %.2f s from receipt (decode %.2f, score %.2f, results %.2f)",
                     outcome.sop_instance_uid, outcome.summary(), len(outcome.results), time.time() - when.st_mtime,
                     t.get("decode", 0), t.get("score", 0), t.get("results", 0))
        self._send.set()

    def _emit(self, ds) -> None:
        name = safe_name(str(ds.SOPInstanceUID))
        if self.out is not None:
            target = self.out / safe_name(str(ds.StudyInstanceUID)) / f"{name}.dcm"
            atomic_write(target, lambda handle: ds.save_as(handle, enforce_file_format=True))
        if self.forward is not None:
            self.spool.queue_result(name, lambda handle: ds.save_as(handle, enforce_file_format=True))

    # --- forwarder ---------------------------------------------------------------------------------------------
    def _forward_loop(self) -> None:
        delay = 0.0
        while not self._stop.is_set():
            files = self.spool.outgoing()
            if not files:
                self._send.wait(1.0)
                self._send.clear()
                continue
            if self._deliver(files):
                delay = 0.0
                continue
            delay = min(self.retry_max, max(1.0, delay * 2))
            log.warning("%d result(s) wait in %s; retrying %s in %.0f s", len(files), self.spool.outbox,
                        self.forward, delay)
            self._stop.wait(delay)

    def _deliver(self, files: list[Path]) -> bool:
        """C-STORE the files over one association; True when all were taken."""
        import pydicom
        from pynetdicom import AE

        ae = AE(ae_title=self.ae_title)
        for sop_class in RESULT_CLASSES:
            ae.add_requested_context(sop_class, RESULT_SYNTAXES)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
        dest = self.forward
        try:
            assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title)
        except Exception as exc:  # name resolution and socket errors
            log.warning("cannot reach %s (%s)", dest, exc)
            return False
        if not assoc.is_established:
            log.warning("%s did not accept an association (down, or it does not know AE title %s)", dest,
                        self.ae_title)
            return False
        all_taken = True
        try:
            for path in files:
                if self._stop.is_set():
                    return False
                try:
                    ds = pydicom.dcmread(path)
                except FileNotFoundError:
                    continue
                status = assoc.send_c_store(ds)
                code = getattr(status, "Status", None)
                if code is not None and (code == SUCCESS or 0xB000 <= code <= 0xBFFF):
                    path.unlink(missing_ok=True)
                    self.delivered += 1
                    log.info("result %s (%s) for study %s delivered to %s", ds.SOPInstanceUID, ds.Modality,
                             ds.StudyInstanceUID, dest)
                else:
                    all_taken = False
                    log.warning("result %s: %s answered %s; kept for retry", ds.SOPInstanceUID, dest,
                                f"status 0x{code:04X}" if code is not None else "nothing (connection lost)")
                    if code is None or not assoc.is_established:
                        return False
        finally:
            if assoc.is_established:
                assoc.release()
        return all_taken


def _same_file(path: Path, stat: os.stat_result) -> bool:
    try:
        now = path.stat()
    except FileNotFoundError:
        return False
    return (now.st_ino, now.st_mtime_ns, now.st_size) == (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def _age(path: Path) -> float:
    try:
        return time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _peer(event) -> str:
    try:
        requestor = event.assoc.requestor
        return f"{requestor.ae_title.strip() if isinstance(requestor.ae_title, str) else requestor.ae_title} at " \
               f"{requestor.address}:{requestor.port}"
    except Exception:
        return "a peer"
