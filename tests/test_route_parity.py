"""Route parity: one set of files, every route, the same answer.

Real X-rays (two originals from the test split, in eight containers and encodings), a lateral and a CT DICOM, an
adult's DICOM, a colour photo, a truncated JPEG, an empty file and a text file go through the Python API,
``predict_files``, the command line, the HTTP service (a real server on a socket), the DICOM node's screening, the
Ray engine, the ONNX backend, ``evaluate`` and ``adapt``'s scoring. Every route must give the same status, the same
message (with the route's own name for the input) and the same probability within 1e-6 (ONNX: within its
documented tolerance), or the failure names the route and the file.
"""

from __future__ import annotations

import csv
import io
import json
import shutil

import httpx
import numpy as np
import pytest
from conftest import KERMANY
from PIL import Image
from pydicom.uid import generate_uid
from test_one_path import dicom

from pneumoscan import load_model, pipeline
from pneumoscan.cli import main

pytestmark = pytest.mark.integration

ONNX_TOLERANCE = 1e-4  # docs: onnxruntime's float32 kernels differ from PyTorch's in the last bits


def _encode(pixels: np.ndarray, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _inputs() -> dict[str, tuple[bytes, str]]:
    """name -> (file bytes, the status every route must give it)."""
    normal = sorted((KERMANY / "test" / "NORMAL").glob("*.jpeg"))[0]
    pneumonia = sorted((KERMANY / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    with Image.open(pneumonia) as im:
        pixels = np.asarray(im.convert("L"))
    colour = np.dstack([pixels, pixels // 2, 255 - pixels])
    jpeg = pneumonia.read_bytes()
    study = {"StudyInstanceUID": generate_uid(), "SeriesInstanceUID": generate_uid()}  # an SR can answer each
    return {
        "normal.jpeg": (normal.read_bytes(), "ok"),
        "pneumonia.jpeg": (jpeg, "ok"),
        "pneumonia.png": (_encode(pixels, "PNG"), "ok"),
        "pneumonia16.png": (_encode(pixels.astype(np.uint16) * 257, "PNG"), "ok"),
        "pneumonia.gif": (_encode(pixels, "GIF"), "ok"),
        "pneumonia.webp": (_encode(pixels, "WEBP", lossless=True), "ok"),
        "pneumonia.ppm": (_encode(np.dstack([pixels] * 3), "PPM"), "ok"),
        "pneumonia.tiff": (_encode(pixels, "TIFF"), "ok"),
        "pneumonia.bmp": (_encode(pixels, "BMP"), "ok"),
        "pneumonia.dcm": (dicom(pixels, BodyPartExamined="CHEST", ViewPosition="PA", PatientAge="004Y", **study),
                          "ok"),
        "lateral.dcm": (dicom(pixels, ViewPosition="LL", **study), "not_xray"),
        "ct.dcm": (dicom(pixels, Modality="CT", **study), "not_xray"),
        "adult.dcm": (dicom(pixels, PatientAge="074Y", **study), "outside_population"),
        "photo.png": (_encode(colour, "PNG"), "not_xray"),
        "truncated.jpeg": (jpeg[: len(jpeg) // 3], "error"),
        "empty.png": (b"", "error"),
        "notes.png": (b"these are not the pixels you are looking for\n", "error"),
    }


Answer = tuple[str, str, float | None]  # status, message with the input's name as <input>, probability


def _answer(status: str, message: str, probability, name: str) -> Answer:
    return status, message.replace(name, "<input>"), probability


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    if not KERMANY.is_dir():
        pytest.fail(f"{KERMANY} is missing: the parity test screens real X-rays from ../shared/data")
    folder = tmp_path_factory.mktemp("parity")
    for name, (data, _) in _inputs().items():
        (folder / name).write_bytes(data)
    return folder


@pytest.fixture(scope="module")
def model():
    return load_model(precision="float32")


@pytest.fixture(scope="module")
def reference(model, files) -> dict[str, Answer]:
    """The stage itself: what every route must say."""
    paths = sorted(files.iterdir())
    return {p.name: _answer(s.status, s.prediction.message, s.prediction.probability, str(p))
            for p, s in zip(paths, pipeline.screen(model, paths), strict=True)}


def test_the_stage_gives_each_input_its_expected_status(reference):
    expected = {name: status for name, (_, status) in _inputs().items()}
    assert {name: answer[0] for name, answer in reference.items()} == expected


def _compare(route: str, got: dict[str, Answer], reference: dict[str, Answer], tolerance: float = 1e-6,
             names=None) -> None:
    names = sorted(reference) if names is None else sorted(names)
    assert sorted(got) == names, f"{route}: answered {sorted(got)}"
    for name in names:
        want, have = reference[name], got[name]
        assert have[0] == want[0], f"{route}, {name}: status {have[0]!r}, the stage says {want[0]!r} ({have[1]})"
        assert have[1] == want[1], f"{route}, {name}: message {have[1]!r}, the stage says {want[1]!r}"
        if want[2] is None:
            assert have[2] is None, f"{route}, {name}: probability {have[2]} where the stage gives none"
        else:
            assert have[2] == pytest.approx(want[2], abs=tolerance), f"{route}, {name}: probability"


def test_python_api_matches_the_stage(model, files, reference):
    from pneumoscan.data.images import ImageReadError

    got = {}
    for path in sorted(files.iterdir()):
        try:
            p = model.predict(path)
            got[path.name] = _answer(p.status, p.message, p.probability, str(path))
        except ImageReadError as exc:
            got[path.name] = _answer("error", str(exc), None, str(path))
    _compare("Model.predict", got, reference)


def test_predict_files_matches_the_stage(model, files, reference):
    paths = sorted(files.iterdir())
    got = {p.name: _answer(r.status, r.message, r.probability, str(p))
           for p, r in zip(paths, model.predict_files(paths), strict=True)}
    _compare("Model.predict_files", got, reference)


def test_command_line_matches_the_stage(files, reference, tmp_path, capsys):
    out = tmp_path / "rows.csv"
    main(["predict", str(files), "--json", "--quiet", "--precision", "float32", "--csv", str(out)])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    got = {}
    for row in rows:
        name = row["path"].rsplit("/", 1)[-1]
        got[name] = _answer(row["status"], row["message"], row["probability"], row["path"])
    _compare("pneumoscan predict --json", got, reference)
    with open(out, newline="") as f:
        table = {r["path"].rsplit("/", 1)[-1]: r for r in csv.DictReader(f)}
    for name, (status, _, probability) in reference.items():
        assert table[name]["status"] == status, f"pneumoscan predict --csv, {name}"
        if probability is not None:
            assert float(table[name]["probability"]) == pytest.approx(probability, abs=1e-6)


def test_http_service_matches_the_stage(model, files, reference):
    from pneumoscan.serve import create_app, serve_in_thread

    got = {}
    with serve_in_thread(create_app(model)) as url:
        for path in sorted(files.iterdir()):
            response = httpx.post(f"{url}/v1/predict", files={"file": (path.name, path.read_bytes())}, timeout=60)
            body = response.json()
            if response.status_code == 200:
                got[path.name] = _answer(body["status"], body["message"], body["probability"], path.name)
            else:
                got[path.name] = _answer("error", body["error"], None, path.name)
    _compare("POST /v1/predict", got, reference)


def test_dicom_node_screening_matches_the_stage(model, files, reference):
    pytest.importorskip("highdicom")
    from pneumoscan.dicom.screen import Screener

    dicoms = sorted(p for p in files.iterdir() if p.suffix == ".dcm")
    outcomes = Screener(model, heatmaps="none").screen([(p.name, p.read_bytes()) for p in dicoms])
    got = {p.name: _answer(o.prediction.status, o.prediction.message, o.prediction.probability, p.name)
           for p, o in zip(dicoms, outcomes, strict=True)}
    _compare("the DICOM node", got, reference, names=[p.name for p in dicoms])
    for path, outcome in zip(dicoms, outcomes, strict=True):  # and every instance is answered in its study
        assert outcome.unanswerable is None and outcome.results, f"the DICOM node, {path.name}: no SR"


def test_adapt_scores_what_the_stage_scores_and_counts_the_rest(model, files, reference):
    from pneumoscan.adapt import load_site

    site = load_site(model, sorted(files.iterdir()))
    ok = sorted(name for name, answer in reference.items() if answer[0] == "ok")
    assert sorted(f.rsplit("/", 1)[-1] for f in site.files) == ok, "adapt: the images it keeps"
    for file, probability in zip(site.files, model.probability(site.base_logits).tolist(), strict=True):
        name = file.rsplit("/", 1)[-1]
        assert probability == pytest.approx(reference[name][2], abs=1e-6), f"adapt, {name}: probability"
    for name, (status, message, _) in reference.items():
        if status != "ok":
            wanted = message.replace("<input>", str(files / name))
            assert any(wanted in line for line in site.messages), f"adapt, {name}: {status} message missing"


@pytest.mark.slow
def test_ray_engine_matches_the_stage(files, reference, tmp_path):
    pytest.importorskip("ray")
    out = tmp_path / "ray.csv"
    assert main(["predict", str(files), "--engine", "ray", "--precision", "float32", "--quiet",
                 "--out", str(out)]) == 1  # some inputs are unreadable
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    got = {r["path"].rsplit("/", 1)[-1]: _answer(r["status"], r["message"],
                                                 float(r["probability"]) if r["probability"] else None, r["path"])
           for r in rows}
    _compare("pneumoscan predict --engine ray", got, reference)


@pytest.mark.slow
def test_onnx_backend_matches_the_stage(model, files, reference, tmp_path):
    pytest.importorskip("onnxruntime")
    from pneumoscan.export import export_onnx

    paths = sorted(files.iterdir())
    ready = [item.image for item in (pipeline.prepare(model, p) for p in paths) if item.image is not None]
    exported = export_onnx(model, tmp_path / "m.onnx", images=np.stack(ready[:4]))
    onnx = load_model(exported.path, backend="onnx")
    got = {p.name: _answer(r.status, r.message, r.probability, str(p))
           for p, r in zip(paths, onnx.predict_files(paths), strict=True)}
    _compare("the ONNX backend", got, reference, tolerance=ONNX_TOLERANCE)


def test_evaluate_scores_what_the_stage_accepts_and_reports_the_rest_apart(model, files, reference, tmp_path):
    from pneumoscan.evaluate import evaluate

    data = tmp_path / "labelled"
    for split in ("test",):
        for label in ("NORMAL", "PNEUMONIA"):
            (data / split / label).mkdir(parents=True)
    for path in files.iterdir():
        shutil.copy(path, data / "test" / ("NORMAL" if path.name.startswith("normal") else "PNEUMONIA") / path.name)
    result = evaluate(model, data, split="test")
    scored = {name for name, answer in reference.items() if answer[0] == "ok"}
    assert result.n == len(scored)
    refused = {item["path"].rsplit("/", 1)[-1]: (status, item["message"].replace(item["path"], "<input>"))
               for status, items in result.refused.items() for item in items}
    assert sorted(refused) == sorted(set(reference) - scored), "evaluate: the images it refuses"
    for name, answer in refused.items():
        assert answer == reference[name][:2], f"evaluate, {name}"
