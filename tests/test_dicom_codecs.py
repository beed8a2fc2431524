"""Compressed DICOM as a PACS sends it: a real chest X-ray written in every common transfer syntax must decode.

The image is a real radiograph from the Kermany test split (NORMAL/IM-0001-0001.jpeg, resized to 512 px on its
longest side), stored as 12 bits in 16 (DX, MONOCHROME2) with a fixed VOI window, so the decoded [0, 1] values
depend on the stored pixels only and the compressed versions can be compared with the uncompressed one:

- pydicom encodes RLE (natively), JPEG-LS (pyjpegls) and JPEG 2000 (pylibjpeg-openjpeg);
- pydicom has no JPEG encoder: imagecodecs (libjpeg-turbo) writes the 12-bit JPEG extended and the lossless
  process 14 streams, Pillow the 8-bit baseline one, and ``pydicom.encaps.encapsulate`` wraps them.

Lossless syntaxes must decode to exactly the uncompressed pixels; lossy ones within the tolerances below. pydicom's
own bundled test files in the same syntaxes are decoded too, lossless ones compared with their uncompressed twin.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np
import pytest
from conftest import KERMANY
from PIL import Image

from pneumoscan.data import images

XRAY = KERMANY / "test" / "NORMAL" / "IM-0001-0001.jpeg"
SIDE = 512
DX_STORAGE = "1.2.840.10008.5.1.4.1.1.1.1"  # Digital X-Ray Image Storage - For Presentation

# Lossy syntaxes: mean and 99th percentile of |decoded - uncompressed| on the [0, 1] scale (a gray level of an
# 8-bit display is 0.0039), and the largest. Measured on this image (pydicom 3.0.2, pylibjpeg-openjpeg 2.6,
# pyjpegls 1.5, imagecodecs 2026.3.6, Pillow 13): mean / p99 / max 0.0035 / 0.0122 / 0.024 for JPEG 2000 at 10:1,
# 0.0032 / 0.0118 / 0.024 for 8-bit baseline at quality 95, 0.0004 / 0.0012 / 0.0022 for 12-bit extended,
# 0.0003 / 0.0005 / 0.0005 for JPEG-LS near-lossless (error 2 of 4096).
LOSSY_MEAN = 0.005
LOSSY_P99 = 0.02
LOSSY_MAX = 0.05


def decoded(path: Path | str) -> np.ndarray:
    """The decoded float32 (H, W) image in [0, 1], by whichever entry point images.py has."""
    if hasattr(images, "decode"):
        return np.asarray(images.decode(path).pixels)
    return images.read_image(path)


# ---- the real X-ray in each syntax ------------------------------------------------------------------------------


def _xray_pixels() -> tuple[np.ndarray, np.ndarray]:
    """(12-bit uint16, 8-bit uint8) versions of the real radiograph at SIDE px on its longest side."""
    if not XRAY.is_file():
        pytest.skip(f"{XRAY} not present")
    with Image.open(XRAY) as image:
        gray = image.convert("L")
        scale = SIDE / max(gray.size)
        size = (round(gray.width * scale), round(gray.height * scale))
        # A float resize keeps the fractions an 8-bit resize would round away: real 12-bit values, not x16 steps.
        small = np.asarray(gray.convert("F").resize(size, Image.Resampling.BILINEAR, reducing_gap=3.0))
    twelve = np.clip(np.round(small * (4095.0 / 255.0)), 0, 4095).astype(np.uint16)
    eight = np.clip(np.round(small), 0, 255).astype(np.uint8)
    return twelve, eight


def _dataset(pixels: np.ndarray):
    """A DX dataset (explicit VR little endian, uncompressed) holding ``pixels`` (uint16: 12 bits, uint8: 8)."""
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DX_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("xray.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = DX_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.BodyPartExamined = "CHEST"
    ds.ViewPosition = "AP"
    ds.PatientName = "Kermany^IM-0001"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    bits = 12 if pixels.dtype == np.uint16 else 8
    ds.BitsAllocated = pixels.dtype.itemsize * 8
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    # A fixed full-range window: decoded values are the stored ones scaled, not stretched per image.
    ds.WindowCenter = 2**bits // 2
    ds.WindowWidth = 2**bits
    ds.PixelData = pixels.tobytes()
    return ds


def _encapsulated(ds, frame: bytes, syntax: str):
    """``ds`` with ``frame`` (one compressed JPEG stream) as encapsulated pixel data in ``syntax``."""
    from pydicom.encaps import encapsulate
    from pydicom.uid import UID

    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.LossyImageCompression = "00" if UID(syntax) in LOSSLESS_UIDS else "01"
    return ds


def _pillow_baseline(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, "L").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


LOSSLESS_UIDS = {
    "1.2.840.10008.1.2.1",  # explicit VR little endian
    "1.2.840.10008.1.2.5",  # RLE lossless
    "1.2.840.10008.1.2.4.80",  # JPEG-LS lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 lossless
    "1.2.840.10008.1.2.4.57",  # JPEG lossless, process 14
    "1.2.840.10008.1.2.4.70",  # JPEG lossless, process 14, selection value 1
}

# (label, transfer syntax UID, bit depth of the source pixels, lossless?)
SYNTAXES = [
    ("explicit-vr-little-endian", "1.2.840.10008.1.2.1", 12, True),
    ("rle-lossless", "1.2.840.10008.1.2.5", 12, True),
    ("jpeg-ls-lossless", "1.2.840.10008.1.2.4.80", 12, True),
    ("jpeg-ls-near-lossless", "1.2.840.10008.1.2.4.81", 12, False),
    ("jpeg2000-lossless", "1.2.840.10008.1.2.4.90", 12, True),
    ("jpeg2000-lossy", "1.2.840.10008.1.2.4.91", 12, False),
    ("jpeg-lossless-sv1", "1.2.840.10008.1.2.4.70", 12, True),
    ("jpeg-lossless-p14", "1.2.840.10008.1.2.4.57", 12, True),
    ("jpeg-extended-12bit", "1.2.840.10008.1.2.4.51", 12, False),
    ("jpeg-baseline-8bit", "1.2.840.10008.1.2.4.50", 8, False),
    ("explicit-vr-little-endian-8bit", "1.2.840.10008.1.2.1", 8, True),
]


def _write(label: str, syntax: str, bits: int, folder: Path, twelve: np.ndarray, eight: np.ndarray) -> Path:
    import imagecodecs
    from pydicom import uid

    pixels = twelve if bits == 12 else eight
    ds = _dataset(pixels)
    if label.startswith("explicit-vr"):
        pass
    elif syntax == uid.RLELossless:
        ds.compress(uid.RLELossless)
    elif syntax == uid.JPEGLSLossless:
        ds.compress(uid.JPEGLSLossless)
    elif syntax == uid.JPEGLSNearLossless:
        ds.compress(uid.JPEGLSNearLossless, jls_error=2)
    elif syntax == uid.JPEG2000Lossless:
        ds.compress(uid.JPEG2000Lossless)
    elif syntax == uid.JPEG2000:
        ds.compress(uid.JPEG2000, j2k_cr=[10])
    elif syntax == uid.JPEGLosslessSV1:
        _encapsulated(ds, imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=1, bitspersample=12), syntax)
    elif syntax == uid.JPEGLossless:  # process 14 with another predictor than SV1's
        _encapsulated(ds, imagecodecs.jpeg8_encode(pixels, lossless=True, predictor=6, bitspersample=12), syntax)
    elif syntax == uid.JPEGExtended12Bit:
        _encapsulated(ds, imagecodecs.jpeg8_encode(pixels, level=95, bitspersample=12), syntax)
    elif syntax == uid.JPEGBaseline8Bit:
        _encapsulated(ds, _pillow_baseline(pixels), syntax)
    else:  # pragma: no cover - a new entry in SYNTAXES without an encoder
        raise AssertionError(f"no encoder for {label}")
    path = folder / f"{label}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> dict[str, Path]:
    """label -> the real X-ray as a DICOM file in that syntax."""
    folder = tmp_path_factory.mktemp("dicom_codecs")
    twelve, eight = _xray_pixels()
    return {label: _write(label, syntax, bits, folder, twelve, eight) for label, syntax, bits, _ in SYNTAXES}


def _reference(label: str, written: dict[str, Path]) -> np.ndarray:
    bits = next(b for name, _, b, _ in SYNTAXES if name == label)
    return decoded(written["explicit-vr-little-endian" if bits == 12 else "explicit-vr-little-endian-8bit"])


# ---- tests ------------------------------------------------------------------------------------------------------


@pytest.mark.integration
@pytest.mark.parametrize("label, syntax", [(s[0], s[1]) for s in SYNTAXES], ids=[s[0] for s in SYNTAXES])
def test_file_is_in_the_syntax(written, label, syntax):
    import pydicom

    ds = pydicom.dcmread(written[label], stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == syntax
    assert ds.Modality == "DX"


@pytest.mark.integration
@pytest.mark.parametrize("label", [s[0] for s in SYNTAXES if s[3]])
def test_lossless_syntaxes_decode_to_the_same_pixels(written, label):
    image = decoded(written[label])
    reference = _reference(label, written)
    assert image.dtype == np.float32 and image.ndim == 2
    assert image.shape == reference.shape
    assert image.min() >= 0.0 and image.max() <= 1.0
    assert np.array_equal(image, reference)


@pytest.mark.integration
@pytest.mark.parametrize("label", [s[0] for s in SYNTAXES if not s[3]])
def test_lossy_syntaxes_stay_close(written, label):
    image = decoded(written[label])
    reference = _reference(label, written)
    assert image.dtype == np.float32 and image.shape == reference.shape
    difference = np.abs(image.astype(np.float64) - reference)
    assert difference.mean() <= LOSSY_MEAN, f"{label}: mean |difference| {difference.mean():.5f}"
    assert np.quantile(difference, 0.99) <= LOSSY_P99, f"{label}: p99 {np.quantile(difference, 0.99):.5f}"
    assert difference.max() <= LOSSY_MAX, f"{label}: max {difference.max():.5f}"


@pytest.mark.integration
def test_predict_scores_every_syntax(written, tmp_path):
    """The CLI with the bundled model gives every file a row with status ok and a probability."""
    from pneumoscan.cli import main

    out = tmp_path / "rows.csv"
    paths = [str(p) for p in written.values()]
    assert main(["predict", *paths, "--csv", str(out), "--quiet", "--precision", "float32"]) == 0
    with out.open(newline="") as handle:
        rows = {Path(row["path"]).stem: row for row in csv.DictReader(handle)}
    assert set(rows) == set(written)
    for label, row in rows.items():
        assert row["status"] == "ok", f"{label}: {row['status']} {row.get('message')}"
        assert 0.0 <= float(row["probability"]) <= 1.0
    # Lossless copies of the same image are the same input: the same probability.
    lossless = {rows[s[0]]["probability"] for s in SYNTAXES if s[3] and s[2] == 12}
    assert len(lossless) == 1


# pydicom's bundled files: (compressed, a lossless twin of the same image or None)
BUNDLED = [
    ("JPGExtended.dcm", None),  # JPEG extended, 12-bit (NEMA WG04 NM1_JPLY, fixed)
    ("JPEG2000.dcm", None),
    ("693_J2KI.dcm", None),
    ("SC_rgb_jpeg_gdcm.dcm", "SC_rgb_rle.dcm"),  # JPEG lossless SV1 and RLE, RGB
    ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
    ("MR_small_jp2klossless.dcm", "MR_small.dcm"),
    ("MR_small_RLE.dcm", "MR_small.dcm"),
    ("JPEGLSNearLossless_16.dcm", None),
    ("SC_jpeg_no_color_transform.dcm", None),  # JPEG baseline
]


def _bundled(name: str) -> str:
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom's test file {name} is not bundled with this pydicom")
    return path


@pytest.mark.parametrize("name, twin", BUNDLED, ids=[b[0] for b in BUNDLED])
def test_pydicom_bundled_files_decode(name, twin):
    image = decoded(_bundled(name))
    assert image.dtype == np.float32 and image.ndim == 2
    assert np.isfinite(image).all() and image.min() >= 0.0 and image.max() <= 1.0
    assert image.max() > image.min()
    if twin is not None:
        assert np.array_equal(image, decoded(_bundled(twin)))


def test_malformed_jpeg_extended_is_one_line_error():
    """JPEG-lossy.dcm is the unfixed NM1_JPLY: its scan header has invalid Ss/Se for a sequential JPEG (pydicom's
    README: GDCM reports "Invalid SOS parameters"; JPGExtended.dcm is the fixed copy). libjpeg refuses it, as it
    should; what matters is a one-line error for that file, not a traceback."""
    with pytest.raises(images.ImageReadError) as caught:
        decoded(_bundled("JPEG-lossy.dcm"))
    message = str(caught.value)
    assert "JPEG-lossy.dcm" in message and "\n" not in message
