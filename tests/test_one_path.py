"""One trustworthy path: every input route reaches the same checks and the same answer, and the same pixels in any
file format reach the network as the same tensor.

Routes: a path, the file's bytes, a DecodedImage, ``predict_files`` (the CLI's), the HTTP upload (a real server on
a socket) and the ONNX backend. Inputs: a CT DICOM, a lateral DICOM, a colour photo, a 256x64 strip and a real
X-ray. Before the one path existed, the HTTP upload answered "ok" for the CT, the lateral view and the strip.
"""

from __future__ import annotations

import io

import httpx
import numpy as np
import pytest
from conftest import KERMANY, synthetic_xray
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumoscan import load_model
from pneumoscan.data.images import decode
from pneumoscan.export import export_onnx
from pneumoscan.serve import create_app, serve_in_thread

DX = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation


def dicom(pixels: np.ndarray, *, bits_stored: int = 8, photometric: str = "MONOCHROME2", **elements) -> bytes:
    """A single-frame DICOM of ``pixels`` (uint8 or uint16) with the given header elements."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("x.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = DX, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = 8 if pixels.dtype == np.uint8 else 16
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    ds.PixelData = pixels.tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def png(array: np.ndarray, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).convert(mode).save(buffer, format="PNG")
    return buffer.getvalue()


XRAY = np.round(synthetic_xray(96, 7) * 255).astype(np.uint8)
COLOUR = np.zeros((96, 96, 3), np.uint8)
COLOUR[..., 0] = XRAY
COLOUR[:48, :, 2] = 200  # a blue sky over a red picture
INPUTS = {
    "ct_dicom": (dicom(XRAY, Modality="CT"), "not_xray", "DICOM Modality is CT"),
    "lateral_dicom": (dicom(XRAY, ViewPosition="LL"), "not_xray", "DICOM ViewPosition is LL"),
    "colour_png": (png(COLOUR, "RGB"), "not_xray", "colour image"),
    "strip_png": (png(np.tile(XRAY[:64], (1, 4))[:, :256]), "not_xray", "image is 256x64 pixels, too elongated"),
    "xray_dicom": (dicom(XRAY, BodyPartExamined="CHEST", ViewPosition="PA"), "ok", ""),
    "xray_png": (png(XRAY), "ok", ""),
}


@pytest.fixture(scope="module")
def onnx_model(tiny_model, tmp_path_factory):
    images = np.stack([tiny_model.preprocessing.to_uint8(synthetic_xray(96, s)) for s in range(4)])
    result = export_onnx(tiny_model, tmp_path_factory.mktemp("onnx") / "tiny.onnx", images=images)
    return load_model(result.path, backend="onnx")


@pytest.fixture(scope="module")
def server(tiny_model):
    with serve_in_thread(create_app(tiny_model)) as url:
        yield url


def _route(route: str, data: bytes, tmp_path, tiny_model, onnx_model, server) -> tuple[str, float | None, str]:
    path = tmp_path / "input"
    path.write_bytes(data)
    if route == "path":
        r = tiny_model.predict(path)
    elif route == "bytes":
        r = tiny_model.predict(data, name="upload")
    elif route == "decoded":
        r = tiny_model.predict(decode(data))
    elif route == "predict_files":
        (r,) = tiny_model.predict_files([path])
    elif route == "onnx":
        r = onnx_model.predict(path)
    else:
        body = httpx.post(f"{server}/v1/predict", files={"file": ("input", data)}, timeout=60).json()
        return body["status"], body["probability"], body["message"]
    return r.status, r.probability, r.message


@pytest.mark.parametrize("name", list(INPUTS))
@pytest.mark.slow
def test_every_route_gives_the_same_status_reason_and_probability(name, tmp_path, tiny_model, onnx_model, server):
    data, status, reason = INPUTS[name]
    answers = {route: _route(route, data, tmp_path, tiny_model, onnx_model, server)
               for route in ("path", "bytes", "decoded", "predict_files", "http", "onnx")}
    for route, (got, probability, message) in answers.items():
        assert got == status, (route, message)
        assert reason in message, route
        if status == "ok":
            assert probability == pytest.approx(answers["path"][1], abs=1e-4), route
        else:
            assert probability is None, route


def test_an_array_skips_only_the_header_check(tiny_model):
    strip = np.tile(XRAY[:64], (1, 4))[:, :256].astype(np.float32) / 255
    assert tiny_model.predict(strip).status == "not_xray"  # size, colour and content checks still run
    assert tiny_model.predict(XRAY.astype(np.float32) / 255).status == "ok"


# --- the same pixels in every format ---------------------------------------------------------------------------

def _formats(pixels: np.ndarray) -> dict[str, bytes]:
    """The 8-bit ``pixels`` written losslessly in every container and encoding pneumoscan reads.

    16-bit PNG: v * 257 (exactly v / 255 of full scale). 12-bit DICOM: stored v * 16 with a LINEAR window
    (center 2040.5, width 4081) that maps 0..4080 exactly onto 0..1; MONOCHROME1 stores 4080 - v * 16; a modality
    LUT (slope 2, intercept -100) and a VOI LUT table stand in for what modalities write.
    """
    stored = pixels.astype(np.uint16) * 16
    rgba = np.dstack([pixels] * 3 + [np.full_like(pixels, 255)])
    lut = (np.arange(4081) // 16 * 257).astype(np.uint16)  # VOI LUT: 12-bit in, 16-bit out (v * 257)
    from pydicom.dataset import Dataset

    voi = Dataset()
    voi.LUTDescriptor = [4081, 0, 16]
    voi.add_new("LUTData", "US", lut.tolist())
    return {
        "png8": png(pixels),
        "png16": png((pixels.astype(np.uint16) * 257), "I;16"),
        "png_rgb": png(pixels, "RGB"),
        "png_rgba": png(rgba, "RGBA"),
        "dicom8_mono2": dicom(pixels),
        "dicom12_window_mono2": dicom(stored, bits_stored=12, WindowCenter=2040.5, WindowWidth=4081),
        "dicom12_window_mono1": dicom(4080 - stored, bits_stored=12, photometric="MONOCHROME1",
                                      WindowCenter=2040.5, WindowWidth=4081),
        "dicom12_modality_lut": dicom((stored + 100) // 2, bits_stored=12, RescaleSlope=2, RescaleIntercept=-100,
                                      WindowCenter=2040.5, WindowWidth=4081),
        "dicom12_voi_lut": dicom(stored, bits_stored=12, VOILUTSequence=[voi]),
    }


def _real_xrays(n: int) -> list:
    files = sorted((KERMANY / "test" / "NORMAL").glob("*.jpeg"))[:n // 2]
    files += sorted((KERMANY / "test" / "PNEUMONIA").glob("*.jpeg"))[:n - n // 2]
    return files


@pytest.mark.integration
@pytest.mark.slow
def test_the_same_real_xray_in_every_format_reaches_the_network_as_the_same_tensor(kermany):
    model = load_model()  # the bundled model: its guard and thresholds are the real ones
    for jpeg in _real_xrays(6):
        reference = model.prepare(decode(jpeg))[0]
        with Image.open(jpeg) as im:
            pixels = np.asarray(im.convert("L"))  # the JPEG's own full decode: the same pixels
        expected = model.predict(jpeg)
        for fmt, data in _formats(pixels).items():
            small = model.prepare(decode(data, name=fmt))[0]
            assert np.array_equal(small, reference), (jpeg.name, fmt)
            got = model.predict(data, name=fmt)
            assert got.status == expected.status, (jpeg.name, fmt)
            assert got.probability == pytest.approx(expected.probability, abs=1e-6), (jpeg.name, fmt)


@pytest.mark.integration
@pytest.mark.slow
def test_torch_onnx_fp32_and_int8_agree_on_the_guard_for_real_xrays(kermany, tmp_path):
    from pneumoscan.export import int8_inputs, quantize_int8

    model = load_model(precision="float32")
    files = _real_xrays(64)
    images = np.stack([model.prepare(decode(f))[0] for f in files])
    fp32 = export_onnx(model, tmp_path / "m.onnx", images=images[:8])
    calibration, val_images, val_labels, described = int8_inputs(model, kermany)
    quantize_int8(fp32.path, calibration=calibration, val_images=val_images, val_labels=val_labels)
    backends = {"torch": model, "onnx": load_model(fp32.path, backend="onnx"),
                "int8": load_model(tmp_path / "m.int8.onnx", backend="onnx")}
    statuses = {name: [p.status for p in m.predict_files(files)] for name, m in backends.items()}
    assert statuses["onnx"] == statuses["torch"]
    assert statuses["int8"] == statuses["torch"]
