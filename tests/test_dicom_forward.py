"""The node's forwarder against a real peer: a pynetdicom Storage SCP in the test that takes the SR's SOP class but
not the Secondary Capture's (sending the SC would make pynetdicom raise ValueError, which once ended the thread),
with an unreadable file in the outbox. The forwarder must deliver what can be delivered, keep and retry the rest
on its own backoff, and live on; whatever else a delivery raises is logged in one line and retried."""

from __future__ import annotations

import os
import threading

import pytest
from test_dicom_node import logs, make, model, send, until  # noqa: F401 - logs and model are fixtures

from pneumoscan.dicom.forward import RESULT_CLASSES, RESULT_SYNTAXES, Destination, Forwarder
from pneumoscan.dicom.node import Node

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"


class Peer:
    """A Storage SCP on 127.0.0.1 that records what it stored and says so by an event."""

    def __init__(self, classes: list[str]):
        from pynetdicom import AE, evt

        self.ae = AE(ae_title="PACS")
        for sop_class in classes:
            self.ae.add_supported_context(sop_class, RESULT_SYNTAXES)
        self.stored: list[tuple[str, str]] = []  # (SOP class, SOP instance UID)
        self.changed = threading.Condition()
        self.server = self.ae.start_server(("127.0.0.1", 0), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self.destination = Destination("PACS", "127.0.0.1", self.server.server_address[1])

    def _on_store(self, event) -> int:
        with self.changed:
            self.stored.append((str(event.request.AffectedSOPClassUID), str(event.request.AffectedSOPInstanceUID)))
            self.changed.notify_all()
        return 0x0000

    def take_also(self, sop_class: str) -> None:
        """From the next association on, accept ``sop_class`` too (the server negotiates with its own list)."""
        self.ae.add_supported_context(sop_class, RESULT_SYNTAXES)
        self.server.contexts = self.ae.supported_contexts

    def wait(self, sop_class: str, timeout: float = 60.0) -> bool:
        with self.changed:
            return self.changed.wait_for(lambda: any(c == sop_class for c, _ in self.stored), timeout)

    def stop(self) -> None:
        self.server.shutdown()


def test_forwarder_survives_a_peer_refusing_the_sc_and_an_unreadable_outbox_file(model, tmp_path, logs):  # noqa: F811
    sr_classes = [c for c in RESULT_CLASSES if c != SC_CLASS]
    peer = Peer(sr_classes)
    node = Node(model, spool=tmp_path / "spool", forward=peer.destination, host="127.0.0.1", port=0,
                retry_max=1.0, heatmaps="all")
    garbage = node.spool.outbox / "garbage.dcm"  # the oldest file of the outbox: tried first
    garbage.write_bytes(b"this is no DICOM file" * 50)
    os.utime(garbage, (1, 1))
    node.start()
    try:
        assert send(node.port, make(tmp_path, "x.dcm", modality="DX")) == 0x0000
        assert until(lambda: any(is_sr_class(c) for c, _ in peer.stored)), "the SR never reached the peer"
        logs.wait(r"result file garbage\.dcm cannot be parsed .* moved to .*failed")
        refused = logs.wait(r"result .*: not delivered to PACS@127\.0\.0\.1:\d+ \(it accepted no presentation "
                            rf"context for SOP class {SC_CLASS}\); kept, retrying")
        logs.wait(r"result .*: not delivered to PACS@.*; kept, retrying in \d+ s \(attempt 2\)")  # retried
        assert node.alive() == {"pneumoscan-screen": True, "pneumoscan-forward": True}
        assert [p.name for p in node.spool.failed.iterdir()] == ["garbage.dcm"]
        [waiting] = node.spool.outgoing()  # the SC, kept
        assert waiting.stem in refused[0]
        assert not any(c == SC_CLASS for c, _ in peer.stored)
        peer.take_also(SC_CLASS)  # the PACS is fixed: the kept SC arrives on its next retry
        assert peer.wait(SC_CLASS), "the kept Secondary Capture was never retried"
        assert until(lambda: not node.spool.outgoing(), 30)
        assert node.alive() == {"pneumoscan-screen": True, "pneumoscan-forward": True}
        assert until(lambda: node.delivered == 2, 10)
    finally:
        node.stop()
        peer.stop()


def is_sr_class(sop_class: str) -> bool:
    return sop_class.startswith("1.2.840.10008.5.1.4.1.1.88.")


def test_forwarder_survives_any_exception_of_one_delivery(model, tmp_path, logs, monkeypatch):  # noqa: F811
    """Whatever a delivery raises (here: the first association attempt itself) is logged in one line and
    retried; the thread lives on and delivers."""
    peer = Peer(RESULT_CLASSES)
    node = Node(model, spool=tmp_path / "spool", forward=peer.destination, host="127.0.0.1", port=0,
                retry_max=1.0, heatmaps="none")
    real = Forwarder._deliver
    calls = []

    def fail_once(self, files):
        calls.append(len(files))
        if len(calls) == 1:
            raise RuntimeError("the network library broke\nsecond line never logged")
        return real(self, files)

    monkeypatch.setattr(Forwarder, "_deliver", fail_once)
    node.start()
    try:
        assert send(node.port, make(tmp_path, "y.dcm", modality="DX")) == 0x0000
        [line] = logs.wait(r"delivering results to PACS@.* failed \(RuntimeError: the network library broke\)")
        assert "second line" not in line
        assert until(lambda: any(is_sr_class(c) for c, _ in peer.stored)), "never delivered after the failure"
        assert node.alive()["pneumoscan-forward"]
    finally:
        node.stop()
        peer.stop()
