"""The HTTP service, exercised over a real socket: a uvicorn server in a thread, httpx as the client.

Every refusal is checked for its exact status code and message, and the server is checked to keep answering after
each kind of bad request.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import struct
import subprocess
import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import pytest
from conftest import synthetic_xray
from PIL import Image

from pneumoscan import load_model
from pneumoscan.data.images import FORMAT_NAMES
from pneumoscan.guard import OUTSIDE_POPULATION
from pneumoscan.serve import app as serve_app
from pneumoscan.serve import create_app, serve_in_thread

MiB = 2**20


# ---- inputs ---------------------------------------------------------------------------------------------------


def image_bytes(fmt: str = "JPEG", size: int = 96, seed: int = 0) -> bytes:
    buffer = io.BytesIO()
    pixels = np.round(synthetic_xray(size, seed) * 255).astype(np.uint8)
    Image.fromarray(pixels, "L").save(buffer, format=fmt)
    return buffer.getvalue()


def dicom_bytes(bits: int = 16, *, pixels: bool = True, size: int = 80) -> bytes:
    """A minimal DX DICOM file (explicit VR little endian, MONOCHROME2), optionally without its pixel data."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    sop_class = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("test.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.PatientName = "Test^Phantom"
    if pixels:
        dtype = np.uint16 if bits == 16 else np.uint8
        array = np.round(synthetic_xray(size, 3) * (4095 if bits == 16 else 255)).astype(dtype)
        ds.Rows, ds.Columns = array.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated = bits
        ds.BitsStored = 12 if bits == 16 else 8
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 0
        ds.PixelData = array.tobytes()
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def bomb_png(width: int = 20000, height: int = 20000) -> bytes:
    """A valid ~50 KB 1-bit PNG that declares width x height pixels: gigabytes once decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" * (1 + (width + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 1000) for _ in range(height // 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


JPEG = image_bytes("JPEG")
PNG = image_bytes("PNG", seed=1)
TEXT = b"Patient notes: cough for three days, no fever.\n" * 20


def post(
    url: str, data: bytes, filename: str = "xray.jpeg", params: dict | None = None, **kwargs
) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/predict", files={"file": (filename, data)}, params=params, timeout=60, **kwargs
    )


def decode_png(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


# ---- servers --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(tiny_model):
    with serve_in_thread(create_app(tiny_model)) as url:
        yield url


@pytest.fixture(scope="module")
def small_server(tiny_model):
    with serve_in_thread(create_app(tiny_model, max_upload_bytes=4096)) as url:
        yield url


# ---- the good path --------------------------------------------------------------------------------------------


def test_healthz_names_the_served_model(server, tiny_model):
    response = httpx.get(f"{server}/healthz")
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "ok"
    assert body["model"] == {"name": "tiny-test-model", "sha256": tiny_model.sha256}


def test_model_endpoint_reports_metadata_from_the_model_file(server, tiny_model):
    body = httpx.get(f"{server}/v1/model").json()
    assert body["name"] == "tiny-test-model"
    assert body["sha256"] == tiny_model.sha256
    assert body["arch"] == "efficientnet_lite0"
    assert body["thresholds"] == {"screening": 0.3, "balanced": 0.5}
    assert body["temperature"] == 1.5
    assert body["prevalence"] == {"fitted": 0.75, "used": 0.75}  # the fixture's validation: 75 of 100 pneumonia
    assert body["preprocessing"] == json.loads(json.dumps(tiny_model.record.preprocessing.to_dict()))
    assert body["validation"] == {"n": 0, "auc": 0.5}
    assert body["heatmap"] is True
    assert body["max_upload_bytes"] == 20 * MiB


def test_openapi_schema_documents_the_endpoints_and_the_file_field(server):
    schema = httpx.get(f"{server}/openapi.json").json()
    assert {"/healthz", "/v1/model", "/v1/predict"} <= set(schema["paths"])
    predict = schema["paths"]["/v1/predict"]["post"]
    form = predict["requestBody"]["content"]["multipart/form-data"]["schema"]
    assert form["required"] == ["file"]
    assert {p["name"] for p in predict["parameters"]} == {"threshold", "heatmap", "heatmaps", "preview"}
    assert {"413", "415", "422"} <= set(predict["responses"])


def test_web_page_and_its_assets_are_served_locally(server):
    page = httpx.get(f"{server}/")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "Screening aid, not a diagnosis." in page.text
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # nothing from the internet
    for asset, kind in (("app.js", "javascript"), ("style.css", "text/css")):
        response = httpx.get(f"{server}/static/{asset}")
        assert response.status_code == 200
        assert kind in response.headers["content-type"]


@pytest.mark.parametrize(
    ("name", "data"),
    [("xray.jpeg", JPEG), ("xray.png", PNG), ("xray8.dcm", dicom_bytes(8)), ("xray16.dcm", dicom_bytes(16))],
)
def test_predict_matches_the_python_api_for_jpeg_png_and_dicom(server, tiny_model, name, data):
    response = post(server, data, name)
    assert response.status_code == 200, response.text
    body = response.json()
    expected = tiny_model.predict(data, name=name)
    assert body["probability"] == pytest.approx(expected.probability, abs=1e-6)
    assert body["decision"] == expected.decision
    assert body["status"] == "ok"
    assert body["message"] == ""
    assert body["operating_point"] == "screening"
    assert body["threshold"] == 0.3
    assert body["thresholds"] == {"screening": 0.3, "balanced": 0.5}
    assert body["decisions"] == {
        "screening": "PNEUMONIA" if expected.probability >= 0.3 else "NORMAL",
        "balanced": "PNEUMONIA" if expected.probability >= 0.5 else "NORMAL",
    }
    assert body["guard_score"] == pytest.approx(expected.guard_score, rel=1e-5)
    assert body["model"] == {"name": "tiny-test-model", "sha256": tiny_model.sha256}
    assert body["filename"] == name
    assert body["timing_ms"]["total"] > 0
    assert "heatmap_png_base64" not in body
    assert response.headers["cache-control"] == "no-store"


@pytest.mark.parametrize(
    ("threshold", "point", "value"), [("balanced", "balanced", 0.5), ("0.42", "custom", 0.42)]
)
def test_threshold_by_name_or_number(server, threshold, point, value):
    body = post(server, JPEG, params={"threshold": threshold}).json()
    assert (body["operating_point"], body["threshold"]) == (point, value)
    assert body["decision"] == ("PNEUMONIA" if body["probability"] >= value else "NORMAL")


def test_preview_is_the_decoded_image_for_display(server):
    body = post(server, dicom_bytes(16), "chest.dcm", params={"preview": "true"}).json()
    preview = decode_png(body["image_png_base64"])
    assert (preview.mode, preview.size) == ("L", (80, 80))


def test_heatmap_is_an_rgb_overlay_at_the_image_size(server):
    response = post(server, image_bytes("JPEG", size=120), params={"heatmap": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    overlay = decode_png(body["heatmap_png_base64"])
    assert overlay.format == "PNG"
    assert (overlay.mode, overlay.size) == ("RGB", (120, 120))
    assert body["timing_ms"]["heatmap"] > 0


def test_image_outside_the_training_distribution_gets_no_probability(tiny_model_path):
    model = load_model(tiny_model_path)
    model.guard.threshold = -1.0  # every image is now unlike the training X-rays
    with serve_in_thread(create_app(model)) as url:
        response = post(url, JPEG, params={"heatmap": "true"})
    assert response.status_code == 200
    body = response.json()
    assert body["status"] == "out_of_distribution"
    assert body["message"].startswith(f"{OUTSIDE_POPULATION}: features far from the training X-rays: distance ")
    assert body["probability"] is None and body["decision"] is None and body["decisions"] is None
    assert body["guard_score"] > -1.0
    assert body["heatmap_png_base64"] is None
    assert body["heatmap_reason"] == "no heatmap: the model did not judge this image (status out_of_distribution)"


# ---- refusals -------------------------------------------------------------------------------------------------


def test_text_file_named_png_is_unsupported_media_type(server):
    response = post(server, TEXT, "notes.png")
    assert response.status_code == 415
    assert response.json() == {
        "error": f"notes.png: not a readable image (expected {FORMAT_NAMES})"  # the stage's message
    }


def test_non_multipart_request_is_unsupported_media_type(server):
    response = httpx.post(f"{server}/v1/predict", json={"file": "xray.jpeg"})
    assert response.status_code == 415
    assert response.json() == {
        "error": "unsupported content type 'application/json': send multipart/form-data with the image in a "
        "field named 'file'"
    }


def test_empty_body_is_bad_request(server):
    for headers in ({}, {"content-type": "multipart/form-data; boundary=xyz"}):
        response = httpx.post(f"{server}/v1/predict", headers=headers)
        assert response.status_code == 400
        assert response.json() == {"error": serve_app.EMPTY_BODY}


def test_malformed_multipart_is_bad_request(server):
    headers = {"content-type": "multipart/form-data; boundary=xyz"}
    garbage = httpx.post(f"{server}/v1/predict", headers=headers, content=b"this is not multipart at all")
    assert garbage.status_code == 400
    assert garbage.json()["error"].startswith("malformed multipart body (")

    truncated = b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.jpeg"\r\n\r\n' + JPEG
    response = httpx.post(f"{server}/v1/predict", headers=headers, content=truncated)
    assert response.status_code == 400
    assert response.json() == {"error": "malformed multipart body: it ended before the closing boundary"}

    no_boundary = httpx.post(
        f"{server}/v1/predict", headers={"content-type": "multipart/form-data"}, content=b"x"
    )
    assert no_boundary.status_code == 400
    assert no_boundary.json() == {
        "error": "malformed multipart body: the Content-Type header has no boundary"
    }


def test_missing_file_field_is_unprocessable(server):
    response = httpx.post(f"{server}/v1/predict", files={"image": ("xray.jpeg", JPEG)})
    assert response.status_code == 422
    assert response.json() == {"error": "missing form field 'file' (the image to screen)"}


def test_empty_file_is_unprocessable_with_the_stages_message(server):
    response = post(server, b"", "empty.jpeg")
    assert response.status_code == 422
    assert response.json() == {"error": "empty.jpeg: empty file"}


def test_invalid_parameters_are_unprocessable(server):
    response = post(server, JPEG, params={"threshold": "nonsense"})
    assert response.status_code == 422
    assert response.json() == {
        "error": "threshold must be one of balanced, screening or a number in (0, 1), got 'nonsense'"
    }
    response = post(server, JPEG, params={"heatmap": "perhaps"})
    assert response.status_code == 422
    assert response.json()["error"].startswith("invalid request: heatmap: Input should be a valid boolean")


def test_corrupt_jpeg_is_unprocessable_with_the_reason(server):
    response = post(server, JPEG[: len(JPEG) // 2], "cut.jpeg")
    assert response.status_code == 422
    assert response.json()["error"].startswith("cut.jpeg: corrupt or truncated image (")


def test_dicom_without_pixel_data_is_unprocessable(server):
    response = post(server, dicom_bytes(pixels=False), "report.dcm")
    assert response.status_code == 422
    assert response.json() == {"error": "report.dcm: DICOM has no pixel data (not an image object)"}


def test_decompression_bomb_is_refused_before_decoding(server):
    bomb = bomb_png()
    assert len(bomb) < 200_000
    response = post(server, bomb, "bomb.png")
    assert response.status_code == 422
    error = response.json()["error"]
    assert error.startswith("bomb.png: ") and "decompression bomb" in error and "\n" not in error


def test_upload_over_the_limit_is_refused_and_the_server_keeps_serving(server):
    response = post(server, b"\0" * (30 * MiB), "huge.png")
    assert response.status_code == 413
    assert response.json() == {"error": "upload is larger than the 20 MiB limit"}
    assert httpx.get(f"{server}/healthz").status_code == 200
    assert post(server, JPEG).status_code == 200


def test_chunked_upload_without_length_is_cut_off_at_the_limit(server):
    """No Content-Length to check up front: the limit has to be enforced while the body streams in."""
    boundary = "limit-test"

    def body():
        yield f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.jpeg"\r\n\r\n'.encode()
        for _ in range(40):
            yield b"\xff" * MiB
        yield f"\r\n--{boundary}--\r\n".encode()

    response = httpx.post(
        f"{server}/v1/predict",
        headers={"content-type": f"multipart/form-data; boundary={boundary}"},
        content=body(),
        timeout=60,
    )
    assert response.status_code == 413
    assert response.json() == {"error": "upload is larger than the 20 MiB limit"}
    assert post(server, JPEG).status_code == 200


def test_upload_limit_is_configurable(small_server):
    big = image_bytes("PNG", size=160, seed=5)
    assert len(big) > 4096
    response = post(small_server, big, "big.png")
    assert response.status_code == 413
    assert response.json() == {"error": "upload is larger than the 4096 bytes limit"}
    small = dicom_bytes(pixels=False)
    assert len(small) < 4096
    assert post(small_server, small, "small.dcm").status_code == 422  # under the limit: read and judged


def test_unknown_routes_answer_json(server):
    missing = httpx.get(f"{server}/nope")
    assert (missing.status_code, missing.json()) == (404, {"error": "not found: /nope"})
    wrong = httpx.get(f"{server}/v1/predict")
    assert (wrong.status_code, wrong.json()) == (405, {"error": "method GET not allowed here"})


def test_concurrent_good_and_bad_requests_all_get_their_answer(server):
    cases = [
        (JPEG, "a.jpeg", 200),
        (TEXT, "notes.png", 415),
        (PNG, "b.png", 200),
        (bomb_png(), "bomb.png", 422),
        (dicom_bytes(pixels=False), "report.dcm", 422),
        (dicom_bytes(16), "c.dcm", 200),
        (JPEG[:300], "cut.jpeg", 422),
        (b"\0" * (21 * MiB), "huge.png", 413),
    ] * 2

    def send(case):
        data, name, _ = case
        return post(server, data, name).status_code

    with ThreadPoolExecutor(max_workers=6) as pool:
        codes = list(pool.map(send, cases))
    assert codes == [expected for _, _, expected in cases]
    response = post(server, JPEG, "after.jpeg")
    assert response.status_code == 200
    assert response.json()["status"] == "ok"


@pytest.mark.slow
def test_onnx_backend_serves_predictions_but_no_heatmaps(tiny_model, tmp_path):
    from pneumoscan.export import export_onnx

    prep = tiny_model.preprocessing
    calibration = np.stack([prep.to_uint8(synthetic_xray(96, s)) for s in range(4)])
    exported = export_onnx(tiny_model, tmp_path / "tiny.onnx", images=calibration, checked_on="generated")
    model = load_model(exported.path, backend="onnx")
    with serve_in_thread(create_app(model)) as url:
        info = httpx.get(f"{url}/v1/model").json()
        ok = post(url, JPEG)
        refused = post(url, JPEG, params={"heatmap": "true"})
    assert (info["backend"], info["heatmap"]) == ("onnx", False)
    assert ok.status_code == 200
    assert ok.json()["probability"] == pytest.approx(tiny_model.predict(JPEG).probability, abs=1e-3)
    assert refused.status_code == 501
    assert refused.json() == {"error": serve_app.NO_HEATMAP}


# ---- the command line ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_serve_command_starts_a_server_on_the_requested_port(tiny_model_path):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [
        sys.executable,
        "-m",
        "pneumoscan.cli",
        "serve",
        "--model",
        str(tiny_model_path),
        "--port",
        str(port),
    ]
    server = subprocess.Popen(command, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                health = httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "server did not start"
                time.sleep(0.2)
        assert health.json()["model"]["name"] == "tiny-test-model"
        assert post(f"http://127.0.0.1:{port}", JPEG).status_code == 200
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_serve_command_reports_a_missing_model_in_one_line(tmp_path, capsys):
    from pneumoscan.cli import main

    assert main(["serve", "--model", str(tmp_path / "nope.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pneumoscan: error: ") and "nope.safetensors" in err and "\n" not in err
