"""The DICOM node against real parts: Debian's Orthanc (with its DICOMweb plug-in), dcmtk's storescu and
dicom3tools' dciodvfy, with X-ray DICOMs made by pydicom from the Kermany test split (resized to 512 px).

Orthanc runs on free 127.0.0.1 ports with its own configuration and storage folder; a missing Orthanc, storescu
or dciodvfy fails the test with the reason (install: apt-get install orthanc orthanc-dicomweb dcmtk dicom3tools;
.ci/run does). The node runs in this process (one loaded model for every test) except for the SIGKILL restart,
which needs a process to kill. The model is the small, structurally real test model of conftest: the node's
plumbing does not depend on what the network learnt, and its probabilities are compared with `pneumoscan predict`
on the same files.

Tests wait on events with a deadline, never on time: the node's log lines (``logs``), a test peer's handler, or
the answers of Orthanc's REST API and the node's folders (``until`` asks again every 0.2 s: they push nothing).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
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
SC_CLASS = "1.2.840.10008.5.1.4.1.1.7"
TIMEOUT = 60.0


def until(probe, timeout: float = TIMEOUT, every: float = 0.2):
    """Ask ``probe`` (an API answer, a folder listing) until it is truthy or ``timeout`` passes; its last answer.
    The one polling loop of these tests: Orthanc's REST API and a folder cannot push an event."""
    deadline = time.monotonic() + timeout
    while True:
        answer = probe()
        if answer or time.monotonic() > deadline:
            return answer
        time.sleep(every)  # the poll interval, not a guess at how long something takes


class LogWatch(logging.Handler):
    """The node's log lines as events: ``wait(pattern)`` returns once a line matches, or fails at the deadline."""

    def __init__(self):
        super().__init__(logging.INFO)
        self.lines: list[str] = []
        self.changed = threading.Condition()

    def emit(self, record: logging.LogRecord) -> None:
        with self.changed:
            self.lines.append(record.getMessage())
            self.changed.notify_all()

    def matching(self, pattern: str) -> list[str]:
        regex = re.compile(pattern)
        with self.changed:
            return [line for line in self.lines if regex.search(line)]

    def wait(self, pattern: str, count: int = 1, timeout: float = TIMEOUT) -> list[str]:
        with self.changed:
            self.changed.wait_for(lambda: len(self.matching(pattern)) >= count, timeout)
        found = self.matching(pattern)
        assert len(found) >= count, f"no {count} log line(s) matching {pattern!r} in {timeout} s: {self.lines[-15:]}"
        return found

    @property
    def text(self) -> str:
        with self.changed:
            return "\n".join(self.lines)


@pytest.fixture
def logs():
    watch = LogWatch()
    logger = logging.getLogger("pneumoscan.dicom")
    level = logger.level
    logger.setLevel(logging.INFO)
    logger.addHandler(watch)
    yield watch
    logger.removeHandler(watch)
    logger.setLevel(level)


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
        def answers() -> bool:
            if self.proc.poll() is not None:
                pytest.fail(f"Orthanc exited with {self.proc.returncode}: "
                            f"{(self.folder / 'orthanc.log').read_text(errors='replace')[-2000:]}")
            try:
                return bool(self.get("/system"))
            except OSError:
                return False

        if not until(answers, 30):
            pytest.fail("Orthanc's REST API did not answer within 30 s")
        return self

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
        """The study's instances once it holds ``count`` (or whatever it holds at the deadline)."""
        found: list[pydicom.Dataset] = []

        def enough() -> bool:
            found[:] = self.study_instances(study_uid)
            return len(found) >= count

        until(enough, timeout)
        return found


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
    """The node under test: forwarding to the module's Orthanc and writing under out/, a heatmap for every judged
    instance (the rule itself is tested on ``Screener``)."""
    root = tmp_path_factory.mktemp("node")
    node = Node(model, spool=root / "spool", out=root / "out", forward=orthanc.destination, host="127.0.0.1",
                port=0, max_instance_bytes=3 * 2**20, retry_max=1.0, heatmaps="all").start()
    yield node
    node.stop()


STORESCU_SYNTAX_OPTION = {str(RLELossless): "-xr", str(JPEGLosslessSV1): "-xs"}  # else: uncompressed


def storescu(port: int, *files: Path, ae_title: str = "PNEUMOSCAN", calling: str = "MODALITY",
             options: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """dcmtk's storescu, one run per transfer syntax (it proposes one compressed syntax per run)."""
    groups: dict[str, list[str]] = {}
    for path in files:
        syntax = str(pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        groups.setdefault(STORESCU_SYNTAX_OPTION.get(syntax, ""), []).append(str(path))
    for option, names in groups.items():
        run = subprocess.run([_tool("storescu"), *options, *([option] if option else []), "-aec", ae_title,
                              "-aet", calling, "127.0.0.1", str(port), *names], capture_output=True, text=True,
                             timeout=60)
        if run.returncode != 0:
            return run
    return run


def scu(port: int, contexts: list[str], ae_title: str = "PNEUMOSCAN", calling: str = "TESTSCU"):
    from pynetdicom import AE

    ae = AE(ae_title=calling)
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
    """The result files under out/<study> once there are ``count`` (or what there is at the deadline)."""
    def listing() -> list[Path]:
        folder = out / study_uid  # not the hidden .part-* files being written
        return sorted(p for p in folder.glob("*.dcm") if not p.name.startswith(".")) if folder.is_dir() else []

    until(lambda: len(listing()) >= count, timeout)
    return [pydicom.dcmread(f) for f in listing()]


def is_sr(ds: pydicom.Dataset) -> bool:
    return ds.Modality == "SR"


# ---- reading an SR ----------------------------------------------------------------------------------------------
# The SR's content is dicom/results.py's (tests/test_dicom_sr.py checks it field by field); the node's tests read
# only what proves the transport: the probability, and the words that say why an instance was not analysed.


def sr_values(sr: pydicom.Dataset) -> dict[str, list]:
    """Concept name meaning -> every value with that name, over the whole content tree."""
    found: dict[str, list] = {}

    def walk(items):
        for item in items:
            meaning = item.ConceptNameCodeSequence[0].CodeMeaning if "ConceptNameCodeSequence" in item else ""
            kind = item.ValueType
            value = None
            if kind == "NUM" and "MeasuredValueSequence" in item:
                value = float(item.MeasuredValueSequence[0].NumericValue)
            elif kind == "TEXT":
                value = str(item.TextValue)
            elif kind == "CODE":
                value = str(item.ConceptCodeSequence[0].CodeMeaning)
            elif kind == "IMAGE":
                value = str(item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID)
            if value is not None:
                found.setdefault(meaning, []).append(value)
            if "ContentSequence" in item:
                walk(item.ContentSequence)

    walk(sr.ContentSequence)
    return found


def probability(sr: pydicom.Dataset) -> float | None:
    values = sr_values(sr).get("Probability")
    return values[0] if values else None


def sr_text(sr: pydicom.Dataset) -> str:
    return " | ".join(str(v) for values in sr_values(sr).values() for v in values)


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


def header(path: Path) -> pydicom.Dataset:
    return pydicom.dcmread(path, stop_before_pixels=True)


# ---- end to end --------------------------------------------------------------------------------------------------


def test_end_to_end_storescu_to_node_to_orthanc(node, orthanc, xrays, tiny_model_path, tmp_path, logs):
    echo = subprocess.run([_tool("echoscu"), "-aec", "PNEUMOSCAN", "127.0.0.1", str(node.port)],
                          capture_output=True, text=True, timeout=30)
    assert echo.returncode == 0, echo.stderr
    sent = storescu(node.port, *xrays)
    assert sent.returncode == 0, sent.stderr + sent.stdout
    expected = predict_cli(tiny_model_path, xrays)
    for path in xrays:
        source = header(path)
        study = orthanc.wait_for(source.StudyInstanceUID, 2)  # the X-ray itself went to the node only
        srs, scs = [d for d in study if is_sr(d)], [d for d in study if d.SOPClassUID == SC_CLASS]
        assert len(srs) == 1 and len(scs) == 1 and len(study) == 2, \
            f"{path.name}: {[(d.SOPClassUID, d.get('SeriesDescription')) for d in study]}"
        sr, sc = srs[0], scs[0]
        for result in (sr, sc):
            assert result.StudyInstanceUID == source.StudyInstanceUID
            assert result.SeriesInstanceUID != source.SeriesInstanceUID
            assert result.SOPInstanceUID != source.SOPInstanceUID
            assert result.PatientID == source.PatientID  # the result joins the patient's study
            assert result.SeriesNumber in (9901, 9902) and result.Manufacturer == "pneumoscan"
        assert sr.SeriesInstanceUID != sc.SeriesInstanceUID
        assert abs(probability(sr) - expected[str(path)]) < 1e-4, (path.name, sr_values(sr), expected[str(path)])
        assert str(source.SOPInstanceUID) in sr_text(sr)  # the SR names the image it is about
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == source.SOPInstanceUID
        assert sc.pixel_array.shape[2] == 3 and sc.pixel_array.std() > 10
    # dciodvfy on one of each (they are made by the same code for every input)
    assert dciodvfy_errors(sr, tmp_path) == []
    assert dciodvfy_errors(sc, tmp_path) == []
    # the log: one line per instance with its UID and result, one per association with the calling AE, the
    # peer's address and every SOP Instance UID it sent; no patient name or ID anywhere
    uids = [str(header(path).SOPInstanceUID) for path in xrays]
    for uid in uids:
        logs.wait(rf"instance {re.escape(uid)}: ok .* probability .* from receipt")
    associations = logs.matching(r"association from AE 'MODALITY' at 127\.0\.0\.1:\d+ released; \d+ instance")
    assert sorted(u for line in associations for u in uids if u in line) == sorted(uids)
    assert "Secret" not in logs.text and "SECRET-ID" not in logs.text


def test_instances_not_analysed_get_an_sr_saying_why(node, model, tmp_path, monkeypatch):
    """A lateral view, a CT slice, unreadable pixels, no pixel data at all and an adult (PatientAge 074Y, outside
    the model's intended population) are each answered Success and get one SR in their study saying why they were
    not analysed: no probability, and no heatmap even though the node makes one for every judged instance."""
    from pneumoscan.record import Population

    monkeypatch.setattr(model, "record", model.record.with_(population=Population(1.0, 6.0, "ages 1 to 5 years")))
    lateral = make(tmp_path, "lateral.dcm", modality="DX", view="LL")
    ct = make(tmp_path, "ct.dcm", modality="CT", view="", body_part="")
    corrupt_ds = samples.xray_dicom(XRAYS[1], modality="DX")
    corrupt_ds.PixelData = corrupt_ds.PixelData[: len(corrupt_ds.PixelData) // 3]  # a third of the pixels
    corrupt = tmp_path / "corrupt.dcm"
    corrupt_ds.save_as(corrupt, enforce_file_format=True)
    no_pixels_ds = samples.xray_dicom(XRAYS[0], modality="DX")
    del no_pixels_ds.PixelData
    no_pixels = tmp_path / "nopixels.dcm"
    no_pixels_ds.save_as(no_pixels, enforce_file_format=True)
    adult_ds = samples.xray_dicom(XRAYS[3], modality="DX")
    adult_ds.PatientAge = "074Y"
    adult = tmp_path / "adult.dcm"
    adult_ds.save_as(adult, enforce_file_format=True)
    cases = {lateral: ("not_xray", "lateral view"), ct: ("not_xray", "Modality is CT"),
             corrupt: ("error", "cannot decode"), no_pixels: ("error", "no pixel data"),
             adult: ("outside_population", "outside the model's intended population: patient age 74 years")}
    for path in cases:
        assert send(node.port, path) == 0x0000, path.name
    for path, (status, reason) in cases.items():
        source = header(path)
        found = results_in(node.out, source.StudyInstanceUID, 1)
        assert [is_sr(d) for d in found] == [True], path.name  # no SC without a probability
        text = sr_text(found[0])
        assert probability(found[0]) is None and reason in text, (path.name, status, text)
        assert source.SOPInstanceUID in text
    assert dciodvfy_errors(results_in(node.out, header(adult).StudyInstanceUID, 1)[0], tmp_path) == []


@pytest.mark.parametrize("syntax", [pydicom.uid.JPEGBaseline8Bit, pydicom.uid.JPEG2000Lossless])
def test_jpeg_baseline_and_jpeg2000_are_screened(node, model, syntax, tmp_path):
    path = make(tmp_path, "x.dcm", modality="DX", syntax=syntax)
    assert header(path).file_meta.TransferSyntaxUID == syntax
    assert send(node.port, path) == 0x0000
    sr = next(d for d in results_in(node.out, header(path).StudyInstanceUID, 2) if is_sr(d))
    assert abs(probability(sr) - model.predict(path).probability) < 1e-4


def test_dimse_failures_and_the_node_keeps_serving(node, tmp_path, logs):
    no_study = samples.xray_dicom(XRAYS[0], modality="DX")
    del no_study.StudyInstanceUID
    path = tmp_path / "nostudy.dcm"
    no_study.save_as(path, enforce_file_format=True)
    assert send(node.port, path) == 0xA900  # no result could join a study it does not name: refused, and said

    big = samples.xray_dicom(np.random.default_rng(0).uniform(0, 255, (1500, 1500)).astype(np.float32),
                             modality="DX", bits=16, side=None)  # 4.3 MB, above the fixture's 3 MB limit
    path = tmp_path / "big.dcm"
    big.save_as(path, enforce_file_format=True)
    assert send(node.port, path) == 0xA700
    # nothing of either reached the spool; the next association is served
    names = {p.stem for p in node.spool.incoming.glob("*.dcm")} | {p.stem for p in node.spool.failed.glob("*")}
    assert str(no_study.SOPInstanceUID) not in names and str(big.SOPInstanceUID) not in names
    logs.wait(rf"instance {no_study.SOPInstanceUID}: refused, .* lacks its SOP Instance or Study Instance UID")
    assert send(node.port, make(tmp_path, "ok.dcm", modality="CR")) == 0x0000


def test_non_images_and_pneumoscans_own_results_are_answered_without_screening(node, xrays, tmp_path, logs):
    """A route-everything PACS sends the node its own SR and Secondary Capture back, and other objects that are
    no image: each is answered Success, nothing is spooled, no new result is made (no loop)."""
    study = header(xrays[0]).StudyInstanceUID
    own = results_in(node.out, study, 2)  # from the end-to-end test, or made now
    if len(own) < 2:
        assert send(node.port, xrays[0]) == 0x0000
        own = results_in(node.out, study, 2)
    assert len(own) == 2
    text_sr = pydicom.Dataset()  # somebody else's Basic Text SR
    text_sr.SOPClassUID, text_sr.SOPInstanceUID = "1.2.840.10008.5.1.4.1.1.88.11", generate_uid()
    text_sr.StudyInstanceUID, text_sr.SeriesInstanceUID = generate_uid(), generate_uid()
    text_sr.Modality, text_sr.file_meta = "SR", pydicom.dataset.FileMetaDataset()
    text_sr.file_meta.TransferSyntaxUID = pydicom.uid.ExplicitVRLittleEndian
    files = []
    for i, ds in enumerate([*own, text_sr]):
        path = tmp_path / f"back{i}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    sent = storescu(node.port, *files, options=("-R",))  # -R: propose each file's own SOP class
    assert sent.returncode == 0, sent.stderr + sent.stdout
    for ds in [*own, text_sr]:
        logs.wait(rf"instance {ds.SOPInstanceUID}: accepted without screening: ")
    assert len(logs.matching("accepted without screening: made by pneumoscan")) >= 1  # the SC (an image class)
    spooled = {p.stem for p in node.spool.incoming.glob("*.dcm")}
    assert not spooled & {str(ds.SOPInstanceUID) for ds in [*own, text_sr]}
    logs.wait(r"association from AE 'MODALITY' .* released; 3 instance\(s\) \(3 not screened\)")
    assert len(results_in(node.out, study, 2, timeout=0)) == 2


def test_association_with_only_unsupported_sop_classes_is_refused(node, logs):
    mr = "1.2.840.10008.5.1.4.1.1.4"  # MR Image Storage: an image this node does not screen
    assoc = scu(node.port, [mr])
    try:
        assert not assoc.is_established or not assoc.accepted_contexts
    finally:
        if assoc.is_established:
            assoc.release()
    logs.wait(rf"proposed only SOP classes this node does not take \({re.escape(mr)}")
    echo = scu(node.port, ["1.2.840.10008.1.1"])
    assert echo.is_established and int(echo.send_c_echo().Status) == 0
    echo.release()


def test_sender_dropping_mid_transfer_leaves_nothing(node, tmp_path, logs):
    """The sender's socket closes after a few P-DATA PDUs of a C-STORE: nothing is spooled, the node serves on."""
    ds = samples.xray_dicom(XRAYS[2], modality="DX", bits=16, side=1024)  # ~2 MB: many PDUs
    assoc = scu(node.port, [ds.SOPClassUID], calling="DROPPER")
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
    logs.wait(r"association from AE 'DROPPER' .* (aborted|closed); 0 instance")  # the node saw it end
    spooled = {p.stem for p in node.spool.incoming.glob("*.dcm")} | {p.name for p in node.spool.tmp.iterdir()}
    assert str(ds.SOPInstanceUID) not in spooled and not list(node.spool.tmp.glob(".part-*"))
    assert not (node.out / ds.StudyInstanceUID).exists()
    assert send(node.port, make(tmp_path, "after.dcm", modality="DX")) == 0x0000


def test_destination_down_then_up(model, xrays, tmp_path, logs):
    """Results made while the PACS is down wait in the spool and arrive once it is back."""
    pacs = Orthanc(tmp_path / "pacs")
    node = Node(model, spool=tmp_path / "spool", forward=pacs.destination, host="127.0.0.1", port=0,
                retry_max=1.0, heatmaps="none").start()
    try:
        assert send(node.port, xrays[1]) == 0x0000
        logs.wait(r"result\(s\) wait in .*; retrying .* in \d+ s", count=2)  # screened, and retried at least once
        assert node.spool.outgoing() and node.delivered == 0
        pacs.start()
        study = header(xrays[1]).StudyInstanceUID
        found = pacs.wait_for(study, 1)
        assert [is_sr(d) for d in found] == [True]
        assert until(lambda: not node.spool.outgoing(), 10)
    finally:
        node.stop()
        pacs.stop()


# A child process that receives and spools but never screens, to be SIGKILLed between the two: the test patches
# the node in that process only (no hook in the node itself).
RECEIVE_ONLY = """
import sys, threading
from pneumoscan.dicom.node import Node
Node._screen_batch = lambda self, batch: threading.Event().wait()
from pneumoscan.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_restart_after_sigkill_screens_what_was_received(orthanc, xrays, tiny_model_path, tmp_path):
    """SIGKILL after the C-STORE was answered but before screening: the next start screens every received
    instance and its results reach the PACS. The spool is owner-only (the service umask)."""
    port = free_port()
    arguments = ["dicom", "listen", "--host", "127.0.0.1", "--port", str(port), "--model", str(tiny_model_path),
                 "--spool", str(tmp_path / "spool"), "--forward", str(orthanc.destination), "--retry-max", "1",
                 "--heatmaps", "all"]

    def start(command: list[str]) -> subprocess.Popen:
        with open(tmp_path / "node.log", "ab") as log:
            proc = subprocess.Popen(command, stderr=log)

        def listening() -> bool:
            assert proc.poll() is None, (tmp_path / "node.log").read_text()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        if not until(listening, 120):
            proc.kill()
            pytest.fail("the node did not listen within 120 s")
        return proc

    sources = [make(tmp_path, f"r{i}.dcm", modality="DX", study_uid=generate_uid()) for i in range(2)]
    proc = start([sys.executable, "-c", RECEIVE_ONLY, *arguments])
    try:
        assert storescu(port, *sources).returncode == 0
        spooled = list((tmp_path / "spool" / "incoming").glob("*.dcm"))
        assert len(spooled) == 2
        assert {oct(p.stat().st_mode & 0o777) for p in spooled} == {oct(0o600)}
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    proc = start([sys.executable, "-m", "pneumoscan.cli", *arguments])
    try:
        for path in sources:
            found = orthanc.wait_for(header(path).StudyInstanceUID, 2)
            assert sorted(is_sr(d) for d in found) == [False, True], path.name
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
    assert not list((tmp_path / "spool" / "incoming").glob("*.dcm"))
    log = (tmp_path / "node.log").read_text()
    assert "waiting: screening them first" in log
    assert log.index("warmed up in") < log.index("listening as")  # warm before the first association


def test_dicomweb_pull_and_store(orthanc, model, tmp_path):
    from pneumoscan.dicom.pull import pull

    path = make(tmp_path, "web.dcm", modality="CR", photometric="MONOCHROME1", bits=16, syntax=RLELossless)
    orthanc.post("/instances", path.read_bytes())
    study = header(path).StudyInstanceUID
    pulled = list(pull(model, f"{orthanc.url}/dicom-web", study, store=True, heatmaps="all"))
    assert len(pulled) == 1 and pulled[0].stored
    outcome = pulled[0].outcome
    assert outcome.prediction.status == "ok"
    assert abs(outcome.prediction.probability - model.predict(path).probability) < 1e-4
    found = orthanc.wait_for(study, 3)
    assert sorted(str(d.SOPClassUID) for d in found if not is_sr(d)) == sorted([samples.CR, SC_CLASS])
    assert sum(is_sr(d) for d in found) == 1
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
    first, second = (Screener(model, heatmaps="all").screen([("x", data)])[0] for _ in range(2))
    assert [d.SOPInstanceUID for d in first.results] == [d.SOPInstanceUID for d in second.results]
    assert [d.SeriesInstanceUID for d in first.results] == [d.SeriesInstanceUID for d in second.results]
    assert len({d.SOPInstanceUID for d in first.results}) == 2


@pytest.mark.parametrize("threshold, rule, heatmap", [
    (0.001, "positive", True), (0.999, "positive", False),  # PNEUMONIA gets one, NORMAL none (the default)
    (0.999, "all", True), (0.001, "none", False),
])
def test_heatmap_rule_decides_which_instances_get_a_secondary_capture(model, xrays, threshold, rule, heatmap):
    from pneumoscan.dicom.screen import Screener

    [outcome] = Screener(model, threshold=threshold, heatmaps=rule).screen([("x", xrays[1].read_bytes())])
    assert outcome.prediction.decision == ("PNEUMONIA" if threshold < 0.5 else "NORMAL")
    assert [is_sr(d) for d in outcome.results] == ([True, False] if heatmap else [True])


def test_instances_no_result_can_reference_still_get_the_stages_answer(model, xrays):
    """Without a Study Instance UID no SR can join a study, and garbage is no DICOM at all: both come back with
    the stage's answer (the same as predict's) and no result objects, saying why."""
    from pneumoscan.dicom.screen import Screener

    no_study = pydicom.dcmread(xrays[1])
    del no_study.StudyInstanceUID
    buffer = io.BytesIO()
    no_study.save_as(buffer, enforce_file_format=True)
    outcomes = Screener(model).screen([("nostudy", buffer.getvalue()), ("garbage", b"\x00not dicom" * 40)])
    assert outcomes[0].prediction.status == "ok" and outcomes[0].results == []
    assert abs(outcomes[0].prediction.probability - model.predict(xrays[1]).probability) < 1e-6
    assert outcomes[0].unanswerable == "nostudy: DICOM dataset lacks StudyInstanceUID; no result can reference it"
    assert outcomes[1].prediction.status == "error" and outcomes[1].results == []
    assert outcomes[1].prediction.message.startswith("garbage: ") and "\n" not in outcomes[1].prediction.message
    assert outcomes[1].unanswerable.startswith("garbage: DICOM dataset lacks SOPClassUID")


def test_each_instance_is_parsed_once(model, xrays, monkeypatch):
    """One pydicom parse per instance for the whole of screening (header, pixels and results)."""
    from pneumoscan.dicom.screen import Screener

    screener = Screener(model, heatmaps="all")
    parses = []
    real = pydicom.dcmread
    monkeypatch.setattr(pydicom, "dcmread", lambda *a, **k: parses.append(a) or real(*a, **k))
    outcomes = screener.screen([(p.name, p.read_bytes()) for p in xrays])
    assert all(o.prediction.status == "ok" and len(o.results) == 2 for o in outcomes)
    assert len(parses) == len(xrays)


def test_dicom_out_reads_the_preamble_not_the_whole_file(model, xrays, tmp_path, monkeypatch):
    from pneumoscan.dicom.predict_out import DicomOut
    from pneumoscan.dicom.screen import Screener

    prediction = model.predict(xrays[0])
    jpeg = model.predict(XRAYS[0])

    def whole_file(self):
        raise AssertionError(f"{self} read whole")

    monkeypatch.setattr(Path, "read_bytes", whole_file)
    write = DicomOut(tmp_path / "out", Screener(model, heatmaps="none"))
    assert write(jpeg) == []  # not DICOM: nothing, from 133 bytes
    [sr] = write(prediction)
    assert is_sr(pydicom.dcmread(sr)) and abs(probability(pydicom.dcmread(sr)) - prediction.probability) < 1e-6


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
    from pneumoscan import load_model

    expected = load_model(tiny_model_path).predict(xrays[0])
    made = results_in(out, header(xrays[0]).StudyInstanceUID, 1, timeout=0)
    # the default heatmap rule: a Secondary Capture only for an instance decided PNEUMONIA
    assert sorted(is_sr(d) for d in made) == ([False, True] if expected.decision == "PNEUMONIA" else [True])
    sr = next(d for d in made if is_sr(d))
    assert abs(probability(sr) - expected.probability) < 1e-4
    [report] = results_in(out, header(lateral).StudyInstanceUID, 1, timeout=0)
    assert "lateral view" in sr_text(report)
    assert len(list(out.iterdir())) == 2  # nothing for the JPEG
