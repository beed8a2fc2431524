"""The DICOM node against real parts: Debian's Orthanc (with its DICOMweb plug-in), dcmtk's storescu and
dicom3tools' dciodvfy, with X-ray DICOMs made by pydicom from the Kermany test split (resized to 512 px).

Orthanc runs on free 127.0.0.1 ports with its own configuration and storage folder; a missing Orthanc, storescu
or dciodvfy fails the test with the reason (install: apt-get install orthanc orthanc-dicomweb dcmtk dicom3tools;
.ci/run does). The node runs in this process (one loaded model for every test) except for the SIGKILL restart,
which needs a process to kill. The model is the small, structurally real test model of conftest: the node's
plumbing does not depend on what the network learnt, and its probabilities are compared with `pneumoscan predict`
on the same files.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import KERMANY
from pydicom.uid import JPEGLosslessSV1, RLELossless, generate_uid

from pneumoscan.dicom import samples
from pneumoscan.dicom.node import Destination, Node

pytestmark = [pytest.mark.integration, pytest.mark.slow]

XRAYS = [KERMANY / "test" / "PNEUMONIA" / "person1_virus_6.jpeg",
         KERMANY / "test" / "NORMAL" / "IM-0001-0001.jpeg",
         KERMANY / "test" / "PNEUMONIA" / "person100_bacteria_475.jpeg",
         KERMANY / "test" / "NORMAL" / "IM-0003-0001.jpeg",
         KERMANY / "test" / "NORMAL" / "IM-0005-0001.jpeg"]
# (modality, SOP class, photometric, bits, transfer syntax): every kind the issue names, one file each
KINDS = [
    ("CR", samples.CR, "MONOCHROME1", 16, RLELossless),
    ("DX", samples.DX_PRESENTATION, "MONOCHROME2", 8, pydicom.uid.ExplicitVRLittleEndian),
    ("DX", samples.DX_PRESENTATION, "MONOCHROME2", 16, JPEGLosslessSV1),
    ("DX", samples.DX_PROCESSING, "MONOCHROME1", 8, pydicom.uid.ExplicitVRLittleEndian),
    ("OT", samples.SC, "MONOCHROME2", 8, pydicom.uid.ExplicitVRLittleEndian),  # a digitised film
]
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.33"
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
TIMEOUT = 60.0


# ---- the real tools ----------------------------------------------------------------------------------------------


def _tool(*names: str) -> str:
    for name in names:
        found = shutil.which(name, path="/usr/bin:/usr/sbin:/usr/local/bin:/bin:/sbin") or shutil.which(name)
        if found:
            return found
    pytest.fail(f"{' / '.join(names)} not found: install Debian's orthanc orthanc-dicomweb dcmtk dicom3tools "
                "(apt-get install -y orthanc orthanc-dicomweb dcmtk dicom3tools; .ci/run does)")


def _dicomweb_plugin() -> str:
    try:
        listing = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        pytest.fail(f"the orthanc-dicomweb package is not installed ({exc}): apt-get install -y orthanc-dicomweb")
    for line in listing.splitlines():
        if line.endswith(".so") and "DicomWeb" in line and Path(line).exists():
            return line
    pytest.fail("orthanc-dicomweb is installed but its plug-in .so was not found in `dpkg -L orthanc-dicomweb`")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Orthanc:
    """A real Orthanc on 127.0.0.1 with its own configuration and storage folder."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        self.ae_title = "ORTHANC"
        self.proc: subprocess.Popen | None = None
        folder.mkdir(parents=True, exist_ok=True)
        self.config = folder / "orthanc.json"
        self.config.write_text(json.dumps({
            "Name": "pneumoscan-test", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": self.ae_title,
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True,
            "DicomServerEnabled": True, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
            "Plugins": [_dicomweb_plugin()], "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
            "StorageCompression": False, "ConcurrentJobs": 1, "HttpThreadsCount": 4,
        }))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def destination(self) -> Destination:
        return Destination(self.ae_title, "127.0.0.1", self.dicom_port)

    def start(self) -> Orthanc:
        binary = _tool("Orthanc")
        self.log = open(self.folder / "orthanc.log", "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen([binary, str(self.config)], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {self.proc.returncode}: "
                            f"{(self.folder / 'orthanc.log').read_text(errors='replace')[-2000:]}")
            try:
                self.get("/system")
                return self
            except OSError:
                time.sleep(0.2)
        pytest.fail("Orthanc's REST API did not answer within 30 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        if getattr(self, "log", None):
            self.log.close()

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as response:
            body = response.read()
            return json.loads(body) if response.headers.get_content_type() == "application/json" else body

    def post(self, path: str, data: bytes, content_type: str = "application/octet-stream"):
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": content_type})
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def study_instances(self, study_uid: str) -> list[pydicom.Dataset]:
        found = self.post("/tools/lookup", study_uid.encode(), "text/plain")
        studies = [f["ID"] for f in found if f["Type"] == "Study"]
        if not studies:
            return []
        return [pydicom.dcmread(io.BytesIO(self.get(f"/instances/{i['ID']}/file")))
                for i in self.get(f"/studies/{studies[0]}/instances")]

    def wait_for(self, study_uid: str, count: int, timeout: float = TIMEOUT) -> list[pydicom.Dataset]:
        deadline = time.monotonic() + timeout
        while True:
            instances = self.study_instances(study_uid)
            if len(instances) >= count or time.monotonic() > deadline:
                return instances
            time.sleep(0.3)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    server = Orthanc(tmp_path_factory.mktemp("orthanc")).start()
    yield server
    server.stop()


# ---- test X-ray DICOMs -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def xrays(tmp_path_factory) -> list[Path]:
    """One DICOM per KINDS entry, each in its own study, from real test-split X-rays."""
    for path in XRAYS:
        if not path.is_file():
            if os.environ.get("CI"):
                pytest.fail(f"{path} is missing: the DICOM node tests need ../shared/data")
            pytest.skip(f"{path} not present")
    folder = tmp_path_factory.mktemp("xrays")
    out = []
    for i, ((modality, sop_class, photometric, bits, syntax), image) in enumerate(zip(KINDS, XRAYS, strict=True)):
        ds = samples.xray_dicom(image, modality=modality, sop_class=sop_class, photometric=photometric, bits=bits,
                                syntax=syntax, patient_name=f"Secret^Name{i}", patient_id=f"SECRET-ID-{i}")
        path = folder / f"{i}-{modality}-{photometric}-{bits}.dcm"
        ds.save_as(path, enforce_file_format=True)
        out.append(path)
    return out


def make(tmp_path: Path, name: str, **kw) -> Path:
    ds = samples.xray_dicom(XRAYS[0], **kw)
    path = tmp_path / name
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def model(tiny_model_path):
    from pneumoscan import load_model

    return load_model(tiny_model_path)


@pytest.fixture(scope="module")
def node(model, orthanc, tmp_path_factory):
    """The node under test: forwarding to the module's Orthanc and writing under out/."""
    root = tmp_path_factory.mktemp("node")
    node = Node(model, spool=root / "spool", out=root / "out", forward=orthanc.destination, host="127.0.0.1",
                port=0, max_instance_bytes=3 * 2**20, retry_max=1.0).start()
    yield node
    node.stop()


STORESCU_SYNTAX_OPTION = {str(RLELossless): "-xr", str(JPEGLosslessSV1): "-xs"}  # else: uncompressed


def storescu(port: int, *files: Path, ae_title: str = "PNEUMOSCAN") -> subprocess.CompletedProcess:
    """dcmtk's storescu, one run per transfer syntax (it proposes one compressed syntax per run)."""
    groups: dict[str, list[str]] = {}
    for path in files:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(STORESCU_SYNTAX_OPTION.get(syntax, ""), []).append(str(path))
    for option, names in groups.items():
        run = subprocess.run([_tool("storescu"), *([option] if option else []), "-aec", ae_title, "-aet",
                              "MODALITY", "127.0.0.1", str(port), *names], capture_output=True, text=True,
                             timeout=60)
        if run.returncode != 0:
            return run
    return run


def scu(port: int, contexts: list[str], ae_title: str = "PNEUMOSCAN"):
    from pynetdicom import AE

    ae = AE(ae_title="TESTSCU")
    for sop_class in contexts:  # one context per transfer syntax: the node accepts one syntax per context
        for syntax in (pydicom.uid.ExplicitVRLittleEndian, pydicom.uid.ImplicitVRLittleEndian, RLELossless,
                       JPEGLosslessSV1, pydicom.uid.JPEGBaseline8Bit, pydicom.uid.JPEG2000Lossless):
            ae.add_requested_context(sop_class, [syntax])
    return ae.associate("127.0.0.1", port, ae_title=ae_title)


def send(port: int, path: Path) -> int:
    """C-STORE status of one file sent by pynetdicom."""
    ds = pydicom.dcmread(path)
    assoc = scu(port, [ds.SOPClassUID])
    assert assoc.is_established
    try:
        return int(assoc.send_c_store(ds).Status)
    finally:
        assoc.release()


def results_in(out: Path, study_uid: str, count: int, timeout: float = TIMEOUT) -> list[pydicom.Dataset]:
    deadline = time.monotonic() + timeout
    while True:
        files = sorted((out / study_uid).glob("*.dcm")) if (out / study_uid).is_dir() else []
        if len(files) >= count or time.monotonic() > deadline:
            return [pydicom.dcmread(f) for f in files]
        time.sleep(0.2)


# ---- reading an SR -----------------------------------------------------------------------------------------------


def sr_items(sr: pydicom.Dataset) -> dict[str, object]:
    """Concept name meaning -> value, over the whole content tree."""
    found: dict[str, object] = {}

    def walk(items):
        for item in items:
            meaning = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            kind = item.ValueType
            if kind == "NUM":
                found[meaning] = float(item.MeasuredValueSequence[0].NumericValue)
            elif kind == "TEXT":
                found[meaning] = str(item.TextValue)
            elif kind == "CODE":
                found[meaning] = str(item.ConceptCodeSequence[0].CodeMeaning)
            elif kind == "IMAGE":
                found[meaning] = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def dciodvfy_errors(ds: pydicom.Dataset, folder: Path) -> list[str]:
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    ds.save_as(path, enforce_file_format=True)
    run = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (run.stdout + run.stderr).splitlines() if line.startswith("Error")]


def predict_cli(model_path: Path, files: list[Path]) -> dict[str, float]:
    run = subprocess.run([sys.executable, "-m", "pneumoscan.cli", "predict", "--json", "--quiet", "--model",
                          str(model_path), *map(str, files)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    rows = [json.loads(line) for line in run.stdout.splitlines() if line.strip()]
    return {row["path"]: row["probability"] for row in rows}


# ---- end to end --------------------------------------------------------------------------------------------------


def test_end_to_end_storescu_to_node_to_orthanc(node, orthanc, xrays, tiny_model_path, tmp_path, caplog):
    caplog.set_level("INFO", logger="pneumoscan.dicom")
    echo = subprocess.run([_tool("echoscu"), "-aec", "PNEUMOSCAN", "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    sent = storescu(node.port, *xrays)
    assert sent.returncode == 0, sent.stderr + sent.stdout
    expected = predict_cli(tiny_model_path, xrays)
    for path in xrays:
        source = pydicom.dcmread(path, stop_before_pixels=True)
        study = orthanc.wait_for(source.StudyInstanceUID, 2)  # the X-ray itself went to the node only
        by_class = {}
        for ds in study:
            by_class.setdefault(str(ds.SOPClassUID), []).append(ds)
        assert set(by_class) == {SR_CLASS, SC_CLASS} and all(len(v) == 1 for v in by_class.values()), \
            f"{path.name}: {[(d.SOPClassUID, d.get('SeriesDescription')) for d in study]}"
        sr, sc = by_class[SR_CLASS][0], by_class[SC_CLASS][0]
        for result in (sr, sc):
            assert result.StudyInstanceUID == source.StudyInstanceUID
            assert result.SeriesInstanceUID != source.SeriesInstanceUID
            assert result.SOPInstanceUID != source.SOPInstanceUID
            assert result.PatientID == source.PatientID  # the result joins the patient's study
        assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
        items = sr_items(sr)
        assert abs(items["Probability"] - expected[str(path)]) < 1e-4, (path.name, items, expected[str(path)])
        assert items["Source (attribute)"] == source.SOPInstanceUID
        assert sr.CurrentRequestedProcedureEvidenceSequence[0].ReferencedSeriesSequence[0] \
            .ReferencedSOPSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"
        assert items["Comment"] == "screening aid, not a diagnosis"
        assert items["Pneumonia"] in ("Present", "Absent")
        assert items["Operating point"] == "screening" and 0 < items["Decision threshold"] < 1
        assert items["Algorithm Name"] == "tiny-test-model" and items["Algorithm Version"]
        assert node.model.sha256 in items["Algorithm Parameters"]
        assert sc.PhotometricInterpretation == "RGB" and sc.SamplesPerPixel == 3 and sc.BurnedInAnnotation == "YES"
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert sc.pixel_array.shape[2] == 3 and sc.pixel_array.std() > 10
    # dciodvfy on one of each (they are made by the same code for every input)
    assert dciodvfy_errors(sr, tmp_path) == []
    assert dciodvfy_errors(sc, tmp_path) == []
    # the log: one line per instance with its UID and result, no patient name or ID
    text = caplog.text
    for path in xrays:
        uid = pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID
        assert any(uid in line and "probability" in line and "from receipt" in line for line in text.splitlines())
    assert "Secret" not in text and "SECRET-ID" not in text


def test_not_assessed_srs_say_why(node, tmp_path):
    """A lateral view and a CT slice are received (Success) and get an SR without a probability, with the reason;
    a frontal DX with corrupt pixel data likewise (status error)."""
    lateral = make(tmp_path, "lateral.dcm", modality="DX", view="LL")
    ct = make(tmp_path, "ct.dcm", modality="CT", view="", body_part="")
    corrupt_ds = samples.xray_dicom(XRAYS[1], modality="DX")
    corrupt_ds.PixelData = corrupt_ds.PixelData[: len(corrupt_ds.PixelData) // 3]  # a third of the pixels
    corrupt = tmp_path / "corrupt.dcm"
    corrupt_ds.save_as(corrupt, enforce_file_format=True)
    cases = {lateral: "lateral view", ct: "Modality is CT", corrupt: "cannot decode"}
    for path in cases:
        assert send(node.port, path) == 0x0000, path.name
    for path, reason in cases.items():
        source = pydicom.dcmread(path, stop_before_pixels=True)
        found = results_in(node.out, source.StudyInstanceUID, 1)
        assert [str(d.SOPClassUID) for d in found] == [SR_CLASS], path.name  # no SC without a probability
        items = sr_items(found[0])
        assert "Probability" not in items and items["Pneumonia"] == "Indeterminate"
        assert reason in items["Reason not assessed"], (path.name, items)
        assert items["Source (attribute)"] == source.SOPInstanceUID
    report = results_in(node.out, pydicom.dcmread(lateral, stop_before_pixels=True).StudyInstanceUID, 1)[0]
    assert "not a frontal chest X-ray" in sr_items(report)["Reason not assessed"]
    assert dciodvfy_errors(report, tmp_path) == []


def test_not_assessed_reasons_keep_not_xray_and_outside_population_apart(model, xrays):
    from pneumoscan.dicom.results import structured_report
    from pneumoscan.guard import NOT_XRAY, OUTSIDE_POPULATION
    from pneumoscan.predict import Prediction

    header = pydicom.dcmread(xrays[1], stop_before_pixels=True)
    for status, message in (("not_xray", f"{NOT_XRAY}: a colour image; no probability reported"),
                            ("out_of_distribution", f"{OUTSIDE_POPULATION}: guard score 9 > 3")):
        items = sr_items(structured_report(header, Prediction("x", None, None, "screening", 0.3, status, message),
                                           model))
        assert items["Reason not assessed"].startswith(message.split(":")[0])
        assert items["Screening status"] == f"not assessed ({status})"
        assert "Probability" not in items and items["Pneumonia"] == "Indeterminate"


@pytest.mark.parametrize("syntax", [pydicom.uid.JPEGBaseline8Bit, pydicom.uid.JPEG2000Lossless])
def test_jpeg_baseline_and_jpeg2000_are_screened(node, model, syntax, tmp_path):
    path = make(tmp_path, "x.dcm", modality="DX", syntax=syntax)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    assert send(node.port, path) == 0x0000
    study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    sr = next(d for d in results_in(node.out, study, 2) if d.SOPClassUID == SR_CLASS)
    assert abs(sr_items(sr)["Probability"] - model.predict(path).probability) < 1e-4


def test_dimse_failures_and_the_node_keeps_serving(node, tmp_path):
    no_pixels = samples.xray_dicom(XRAYS[0], modality="DX")
    del no_pixels.PixelData
    path = tmp_path / "nopixels.dcm"
    no_pixels.save_as(path, enforce_file_format=True)
    assert send(node.port, path) == 0xA900

    big = samples.xray_dicom(np.random.default_rng(0).uniform(0, 255, (1500, 1500)).astype(np.float32),
                             modality="DX", bits=16, side=None)  # 4.3 MB, above the fixture's 3 MB limit
    path = tmp_path / "big.dcm"
    big.save_as(path, enforce_file_format=True)
    assert send(node.port, path) == 0xA700
    # nothing of either reached the spool; the next association is served
    names = {p.stem for p in node.spool.incoming.glob("*.dcm")} | {p.stem for p in node.spool.failed.glob("*")}
    assert str(no_pixels.SOPInstanceUID) not in names and str(big.SOPInstanceUID) not in names
    assert send(node.port, make(tmp_path, "ok.dcm", modality="CR")) == 0x0000


def test_association_with_only_unsupported_sop_classes_is_refused(node, caplog):
    caplog.set_level("INFO", logger="pneumoscan.dicom")
    mr = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage
    assoc = scu(node.port, [mr])
    try:
        assert not assoc.is_established or all(cx.result != 0 for cx in assoc.rejected_contexts) \
            and not assoc.accepted_contexts
    finally:
        if assoc.is_established:
            assoc.release()
    assert any("proposed only SOP classes this node does not take" in r.message and mr in r.message
               for r in caplog.records)
    echo = scu(node.port, ["1.2.840.10008.1.1"])
    assert echo.is_established and int(echo.send_c_echo().Status) == 0
    echo.release()


def test_sender_dropping_mid_transfer_leaves_nothing(node, tmp_path):
    """The sender's socket closes after a few P-DATA PDUs of a C-STORE: nothing is spooled, the node serves on."""
    ds = samples.xray_dicom(XRAYS[2], modality="DX", bits=16, side=1024)  # ~2 MB: many PDUs
    assoc = scu(node.port, [ds.SOPClassUID])
    assert assoc.is_established
    assoc.dimse_timeout = 2  # no answer will come: do not wait the default 30 s for it
    sock = assoc.dul.socket
    real_send = sock.send
    calls = {"n": 0}

    def send_then_drop(data):
        calls["n"] += 1
        if calls["n"] <= 4:  # the C-STORE command and the first P-DATA PDUs of the dataset
            return real_send(data)
        if sock.socket is not None:  # then the sender's connection is gone
            with contextlib.suppress(OSError):
                sock.socket.shutdown(socket.SHUT_RDWR)
            sock.socket.close()

    sock.send = send_then_drop
    with contextlib.suppress(Exception):  # the store cannot complete: that is the point
        assoc.send_c_store(ds)
    assert calls["n"] > 4  # the drop happened mid-transfer, not before
    assoc.abort()
    time.sleep(1.0)
    spooled = {p.stem for p in node.spool.incoming.glob("*.dcm")} | {p.name for p in node.spool.tmp.iterdir()}
    assert str(ds.SOPInstanceUID) not in spooled and not list(node.spool.tmp.glob(".part-*"))
    assert not (node.out / ds.StudyInstanceUID).exists()
    assert send(node.port, make(tmp_path, "after.dcm", modality="DX")) == 0x0000


def test_destination_down_then_up(model, xrays, tmp_path):
    """Results made while the PACS is down wait in the spool and arrive once it is back."""
    pacs = Orthanc(tmp_path / "pacs")
    node = Node(model, spool=tmp_path / "spool", forward=pacs.destination, host="127.0.0.1", port=0,
                retry_max=1.0, heatmaps=False).start()
    try:
        assert send(node.port, xrays[1]) == 0x0000
        deadline = time.monotonic() + TIMEOUT
        while not node.spool.outgoing() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert node.spool.outgoing() and node.delivered == 0  # screened, waiting
        time.sleep(1.5)  # at least one failed retry
        pacs.start()
        study = pydicom.dcmread(xrays[1], stop_before_pixels=True).StudyInstanceUID
        found = pacs.wait_for(study, 1)
        assert [str(d.SOPClassUID) for d in found] == [SR_CLASS]
        deadline = time.monotonic() + 10
        while node.spool.outgoing() and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not node.spool.outgoing()
    finally:
        node.stop()
        pacs.stop()


def test_restart_after_sigkill_screens_what_was_received(orthanc, xrays, tiny_model_path, tmp_path):
    """SIGKILL after the C-STORE was answered but before screening (held by the test hook): the next start
    screens every received instance and its results reach the PACS."""
    port = free_port()
    command = [sys.executable, "-m", "pneumoscan.cli", "dicom", "listen", "--host", "127.0.0.1", "--port",
               str(port), "--model", str(tiny_model_path), "--spool", str(tmp_path / "spool"), "--forward",
               str(orthanc.destination), "--retry-max", "1"]

    def start(env: dict) -> subprocess.Popen:
        with open(tmp_path / "node.log", "ab") as log:
            proc = subprocess.Popen(command, env={**os.environ, **env}, stderr=log)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            assert proc.poll() is None, (tmp_path / "node.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return proc
            except OSError:
                time.sleep(0.2)
        proc.kill()
        pytest.fail("the node did not listen within 120 s")

    sources = [make(tmp_path, f"r{i}.dcm", modality="DX", study_uid=generate_uid()) for i in range(2)]
    proc = start({"PNEUMOSCAN_DICOM_HOLD_SECONDS": "600"})
    try:
        assert storescu(port, *sources).returncode == 0
        assert len(list((tmp_path / "spool" / "incoming").glob("*.dcm"))) == 2
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = start({})
    try:
        for path in sources:
            study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
            found = orthanc.wait_for(study, 2)
            assert sorted(str(d.SOPClassUID) for d in found) == sorted([SR_CLASS, SC_CLASS]), path.name
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert not list((tmp_path / "spool" / "incoming").glob("*.dcm"))
    log = (tmp_path / "node.log").read_text()
    assert "waiting: screening them first" in log


def test_dicomweb_pull_and_store(orthanc, model, tmp_path):
    from pneumoscan.dicom.pull import pull

    path = make(tmp_path, "web.dcm", modality="CR", photometric="MONOCHROME1", bits=16, syntax=RLELossless)
    orthanc.post("/instances", path.read_bytes())
    study = pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID
    pulled = list(pull(model, f"{orthanc.url}/dicom-web", study, store=True))
    assert len(pulled) == 1 and pulled[0].stored
    outcome = pulled[0].outcome
    assert outcome.prediction.status == "ok"
    assert abs(outcome.prediction.probability - model.predict(path).probability) < 1e-4
    found = orthanc.wait_for(study, 3)
    assert sorted(str(d.SOPClassUID) for d in found) == sorted([samples.CR, SR_CLASS, SC_CLASS])
    # pulling again screens the X-ray only, not our own Secondary Capture
    assert len(list(pull(model, f"{orthanc.url}/dicom-web", study))) == 1


@pytest.mark.parametrize("argv, message", [
    (["dicom", "listen"], "results must go somewhere"),
    (["dicom", "listen", "--forward", "ORTHANC@nohost"], "--forward must be AET@HOST:PORT"),
])
def test_listen_refuses_bad_options_before_loading_anything(argv, message, capsys):
    from pneumoscan.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err



def test_screening_again_makes_the_same_result_objects(model, xrays):
    """After a crash between sending results and removing the instance, re-screening must not duplicate them."""
    from pneumoscan.dicom.screen import Screener

    data = xrays[0].read_bytes()
    first, second = (Screener(model).screen([("x", data)])[0] for _ in range(2))
    assert [d.SOPInstanceUID for d in first.results] == [d.SOPInstanceUID for d in second.results]
    assert [d.SeriesInstanceUID for d in first.results] == [d.SeriesInstanceUID for d in second.results]
    assert len({d.SOPInstanceUID for d in first.results}) == 2


@pytest.mark.parametrize("text", ["ORTHANC", "ORTHANC@host", "@host:4242", "A@h:0", "A@h:70000",
                                  "SEVENTEEN_CHARS_X@h:1"])
def test_forward_destination_must_be_aet_at_host_port(text):
    from pneumoscan.errors import PneumoscanError

    with pytest.raises(PneumoscanError, match="AET@HOST:PORT"):
        Destination.parse(text)
    assert Destination.parse("ORTHANC@127.0.0.1:4242") == Destination("ORTHANC", "127.0.0.1", 4242)


def test_spool_names_are_uids_or_hashes():
    from pneumoscan.dicom.spool import safe_name

    assert safe_name("1.2.840.113619.2.55") == "1.2.840.113619.2.55"
    for bad in ("../../etc/passwd", "1.2/3", "", None, ".1.2", "1" * 65):
        name = safe_name(bad, b"data")
        assert name.startswith("x") and "/" not in name and len(name) == 41


def test_predict_dicom_out_writes_sr_and_sc_for_dicom_inputs(xrays, tiny_model_path, tmp_path):
    from pneumoscan.cli import main

    lateral = make(tmp_path, "lateral.dcm", modality="DX", view="LL")
    jpeg = XRAYS[0]
    out = tmp_path / "dicom-out"
    code = main(["predict", "--quiet", "--json", "--model", str(tiny_model_path), "--dicom-out", str(out),
                 str(xrays[0]), str(lateral), str(jpeg)])
    assert code == 0
    source = pydicom.dcmread(xrays[0], stop_before_pixels=True)
    made = results_in(out, source.StudyInstanceUID, 2, timeout=0)
    assert sorted(str(d.SOPClassUID) for d in made) == sorted([SR_CLASS, SC_CLASS])
    sr = next(d for d in made if d.SOPClassUID == SR_CLASS)
    from pneumoscan import load_model

    expected = load_model(tiny_model_path).predict(xrays[0]).probability
    assert abs(sr_items(sr)["Probability"] - expected) < 1e-4
    lateral_study = pydicom.dcmread(lateral, stop_before_pixels=True).StudyInstanceUID
    [report] = results_in(out, lateral_study, 1, timeout=0)
    assert "lateral view" in sr_items(report)["Reason not assessed"]
    assert len(list(out.iterdir())) == 2  # nothing for the JPEG
