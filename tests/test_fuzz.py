"""A bounded run of benchmarks/fuzz.py: 150 mutated real X-rays through predict_files, the CLI and the server.

The full run (10,000 files, docs/benchmarks.md "Fuzz run") is ``python benchmarks/fuzz.py --n 10000 --seed 0``.
Here the small test model keeps the network cheap; the decoders, checks, CSV writer and server are the real ones.
"""

from __future__ import annotations

import importlib.util
import io
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_fuzz():
    spec = importlib.util.spec_from_file_location("pneumoscan_fuzz", ROOT / "benchmarks" / "fuzz.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


fuzz = _load_fuzz()
HTTP_ANSWERS = {200, 400, 413, 415, 422}  # what a mutated upload may get; never a 5xx


@pytest.fixture(scope="module")
def bases():
    from conftest import KERMANY

    if not (KERMANY / "test").is_dir():
        pytest.skip(f"{KERMANY} not present")
    return fuzz.base_files(fuzz.source_xrays(3, 128, seed=0, folder=KERMANY / "test"))


def test_cases_are_reproducible(bases):
    first = [fuzz.make_case(i, 0, bases) for i in range(40)]
    again = [fuzz.make_case(i, 0, bases) for i in (range(40))]
    assert [c.data for c in first] == [c.data for c in again]
    assert [c.ops for c in first] == [c.ops for c in again]
    assert len({c.data for c in first}) == len(first)  # mutated: no two alike
    assert {c.ext for c in first} == {"jpeg", "png", "dcm"}


def test_dicom_edits_land_on_the_element(bases):
    import pydicom

    data = next(d for label, ext, d in bases if label.endswith(" dcm16"))
    edited = fuzz.set_element(data, 0x00280010, "US", fuzz._us(65535))
    assert pydicom.dcmread(io.BytesIO(edited)).Rows == 65535
    inserted = fuzz.set_element(data, 0x00280008, "IS", b"1A")  # NumberOfFrames was absent
    assert pydicom.dcmread(io.BytesIO(inserted), force=True)[0x00280008].value in ("1A", "1A ")
    deleted = fuzz.set_element(data, 0x00280004, "CS", None)
    assert "PhotometricInterpretation" not in pydicom.dcmread(io.BytesIO(deleted))
    syntax = fuzz.set_element(data, fuzz.TS_TAG, "UI", b"1.2.840.10008.1.2.4.90")  # longer: the meta grows
    ds = pydicom.dcmread(io.BytesIO(syntax), stop_before_pixels=True)
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.90"
    assert ds.Modality == "DX"  # the meta group length was kept true, so the dataset after it still parses


def test_png_and_jpeg_header_edits(bases):
    """The declared sizes really are in the headers (read back from the bytes: Pillow refuses the huge ones)."""
    import struct

    png = next(d for label, ext, d in bases if label.endswith(" png8"))
    jpeg = next(d for label, ext, d in bases if label.endswith(" jpeg"))
    rng = random.Random(3)
    sizes = 0
    for _ in range(40):
        out, what = fuzz.png_ihdr(png, rng)
        if what.startswith("IHDR width x height"):
            width, height = (int(v) for v in what.split("= ")[1].split(",")[0].split(" x "))
            assert struct.unpack(">II", out[16:24]) == (width, height)
            sizes += 1
        out, what = fuzz.jpeg_sof(jpeg, rng)
        if what.startswith("SOF height x width"):
            pos = next(s[0] for s in fuzz._jpeg_segments(out) if s[1] in fuzz.SOF_MARKERS)
            height, width = (int(v) for v in what.split("= ")[1].split(" x "))
            assert struct.unpack(">HH", out[pos + 5:pos + 9]) == (height, width)
            sizes += 1
    assert sizes >= 10


@pytest.mark.integration
@pytest.mark.slow
def test_bounded_fuzz_run(kermany, tiny_model_path):
    result = fuzz.fuzz(150, 0, size=128, sources=3, model_path=str(tiny_model_path), chunk=150, cli="in-process",
                       images=kermany / "test", log=lambda _: None)
    for route in ("predict_files", "cli", "http"):
        counts = result[route]
        assert counts["tracebacks"] == 0, (route, counts["failures"])
        assert counts["failures"] == [], (route, counts["failures"])
        assert counts["files"] == 150 and counts["rows"] == 150, (route, counts)
    assert sum(result["predict_files"]["statuses"].values()) == 150
    assert result["cli"]["statuses"] == result["predict_files"]["statuses"]  # the same rows by both routes
    assert result["http"]["server_5xx"] == 0
    assert set(map(int, result["http"]["status_codes"])) <= HTTP_ANSWERS, result["http"]["status_codes"]


# ---- reproducers found by the full run ----------------------------------------------------------------------------

RLE_SOURCE = "PNEUMONIA/person110_bacteria_531.jpeg"


def _corrupt_rle(kermany) -> bytes:
    """Reproducer (fuzz.py --seed 0, case 9403): the real X-ray at 256 px as RLE lossless DICOM, one bit flipped
    in its RLE stream (byte 20430, 0xFF -> 0x7F)."""
    path = kermany / "test" / RLE_SOURCE
    bases = fuzz.base_files([(path.stem, fuzz.load_xray(path, 256))])
    data = bytearray(next(d for label, ext, d in bases if label.endswith(" dcm-rle")))
    assert data[20430] == 0xFF
    data[20430] ^= 0x80
    return bytes(data)


@pytest.mark.integration
def test_corrupt_rle_is_a_one_line_error(kermany):
    """With the project's dependencies (pydicom's own RLE decoder) the corrupt stream decodes to (wrong but
    valid) pixels, or is that file's one-line error; nothing else escapes."""
    if importlib.util.find_spec("rle") is not None:
        pytest.skip("pylibjpeg-rle is installed: see test_corrupt_rle_with_pylibjpeg_rle")
    import numpy as np

    from pneumoscan.data.images import ImageReadError, decode

    try:
        pixels = decode(_corrupt_rle(kermany), name="corrupt-rle.dcm").pixels
    except ImageReadError as exc:
        assert str(exc).startswith("corrupt-rle.dcm: ") and "\n" not in str(exc)
    else:
        assert pixels.dtype == np.float32 and pixels.ndim == 2
        assert np.isfinite(pixels).all() and pixels.min() >= 0.0 and pixels.max() <= 1.0


@pytest.mark.integration
def test_corrupt_rle_with_pylibjpeg_rle(kermany):
    """pylibjpeg-rle 2.2 panics on this stream (pyo3's PanicException, a BaseException): still one file's error."""
    pytest.importorskip("rle", reason="pylibjpeg-rle is not installed (not a dependency because of this)")
    from pneumoscan.data.images import ImageReadError, decode

    with pytest.raises(ImageReadError):
        decode(_corrupt_rle(kermany), name="corrupt-rle.dcm")
