"""DICOM through decode, with real files written by pydicom: modality LUT, VOI window, MONOCHROME1,
compressed pixel data, and exact one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import save_gray, synthetic_xray
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid

from pneumoscan.data.images import ImageReadError, decode
from pneumoscan.guard import NOT_XRAY

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"  # Computed Radiography Image Storage


def write_dicom(path, pixels: np.ndarray | None, *, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                frames: int = 1, compress: bool = False, **elements):
    """A minimal but valid CR DICOM file (preamble, file meta, explicit VR little endian) written by pydicom."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CR_STORAGE
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientName = "Test^Phantom"
    if pixels is not None:
        bits = pixels.dtype.itemsize * 8
        ds.Rows, ds.Columns = pixels.shape[-2:]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = photometric
        ds.BitsAllocated = bits
        ds.BitsStored = bits_stored or bits
        ds.HighBit = ds.BitsStored - 1
        ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
        if frames > 1:
            ds.NumberOfFrames = frames
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    if compress:
        ds.compress(RLELossless)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def picture() -> np.ndarray:
    """uint8 synthetic radiograph spanning 0..255."""
    image = synthetic_xray(64)
    return np.round((image - image.min()) / (image.max() - image.min()) * 255).astype(np.uint8)


def _error(path) -> str:
    with pytest.raises(ImageReadError) as info:
        decode(path)
    return str(info.value)


def test_monochrome2_8bit_without_window_equals_the_png(tmp_path, picture):
    dicom = decode(write_dicom(tmp_path / "x.dcm", picture)).pixels
    png = decode(save_gray(tmp_path / "x.png", picture / 255)).pixels
    assert dicom.dtype == np.float32 and dicom.shape == (64, 64)
    assert np.allclose(dicom, png, atol=1e-6)


def test_file_without_dicom_suffix_is_recognised_by_content(tmp_path, picture):
    path = write_dicom(tmp_path / "IMG0001", picture)
    assert np.allclose(decode(path).pixels, picture / 255, atol=1e-6)
    assert np.allclose(decode(path.read_bytes()).pixels, picture / 255, atol=1e-6)


def test_16bit_rescale_slope_and_intercept_are_applied_before_the_window(tmp_path, picture):
    # stored = (value - intercept) / slope; the window is given in output (modality) units.
    stored = (picture.astype(np.uint16) * 16).astype(np.uint16)  # 0..4080 in 12 bits
    path = write_dicom(tmp_path / "rescaled.dcm", stored, bits_stored=12, RescaleSlope=0.5, RescaleIntercept=-100,
                       WindowCenter=(0.5 * 2040 - 100) + 0.5, WindowWidth=0.5 * 4080 + 1)
    # window [-100, 1940] in output units covers the whole output range: the result is value / 4080 exactly
    assert np.allclose(decode(path).pixels, stored / 4080, atol=1e-6)


def test_window_clips_outside_and_does_not_restretch_inside(tmp_path):
    stored = np.array([[0, 1000, 1500, 2000, 2500, 3000, 4095]], np.uint16)
    path = write_dicom(tmp_path / "window.dcm", stored, bits_stored=12, WindowCenter=2000, WindowWidth=1001,
                       VOILUTFunction="LINEAR")
    image = decode(path).pixels
    # PS3.3 C.11.2.1.2: linear ramp from c - 0.5 - (w-1)/2 = 1499.5 to c - 0.5 + (w-1)/2 = 2499.5
    expected = np.clip((stored - 1999.5) / 1000 + 0.5, 0, 1)
    assert np.allclose(image, expected, atol=1e-6)
    assert image[0, 0] == 0.0 and image[0, -1] == 1.0


def test_window_inside_the_data_is_not_stretched_to_full_range(tmp_path):
    stored = np.array([[1000, 1100, 1200]], np.uint16)  # all inside a wide window: must stay mid-gray
    image = decode(write_dicom(tmp_path / "wide.dcm", stored, bits_stored=12, WindowCenter=1100,
                                   WindowWidth=2000, VOILUTFunction="LINEAR_EXACT")).pixels
    assert np.allclose(image, [[0.45, 0.5, 0.55]], atol=1e-6)


def test_first_of_several_windows_is_used(tmp_path):
    stored = np.array([[0, 50, 100]], np.uint16)
    image = decode(write_dicom(tmp_path / "multi.dcm", stored, bits_stored=12, WindowCenter=[50, 2000],
                                   WindowWidth=[100, 10], VOILUTFunction="LINEAR_EXACT")).pixels
    assert np.allclose(image, [[0.0, 0.5, 1.0]], atol=1e-6)


def test_sigmoid_window(tmp_path):
    stored = np.array([[0, 500, 1000]], np.uint16)
    image = decode(write_dicom(tmp_path / "sig.dcm", stored, bits_stored=12, WindowCenter=500, WindowWidth=400,
                                   VOILUTFunction="SIGMOID")).pixels
    assert np.allclose(image, 1 / (1 + np.exp(-4 * (stored.astype(float) - 500) / 400)), atol=1e-6)


def test_16bit_without_window_is_stretched_min_to_max(tmp_path):
    stored = np.array([[300, 400, 500]], np.uint16)
    assert np.allclose(decode(write_dicom(tmp_path / "raw.dcm", stored)).pixels, [[0.0, 0.5, 1.0]], atol=1e-6)


def test_signed_pixels(tmp_path):
    stored = np.array([[-1000, 0, 1000]], np.int16)
    assert np.allclose(decode(write_dicom(tmp_path / "signed.dcm", stored)).pixels, [[0.0, 0.5, 1.0]], atol=1e-6)


def test_monochrome1_is_inverted(tmp_path, picture):
    mono1 = decode(write_dicom(tmp_path / "m1.dcm", (255 - picture).astype(np.uint8), photometric="MONOCHROME1")).pixels
    assert np.allclose(mono1, picture / 255, atol=1e-6)


def test_monochrome1_with_window_is_inverted_after_windowing(tmp_path):
    stored = np.array([[0, 50, 100]], np.uint16)
    image = decode(write_dicom(tmp_path / "m1w.dcm", stored, photometric="MONOCHROME1", bits_stored=12,
                                   WindowCenter=50, WindowWidth=100, VOILUTFunction="LINEAR_EXACT")).pixels
    assert np.allclose(image, [[1.0, 0.5, 0.0]], atol=1e-6)


def test_rle_lossless_compressed_dicom_decodes_to_the_same_pixels(tmp_path):
    stored = np.round(synthetic_xray(64, seed=5) * 4095).astype(np.uint16)
    plain = decode(write_dicom(tmp_path / "plain.dcm", stored, bits_stored=12)).pixels
    path = write_dicom(tmp_path / "rle.dcm", stored, bits_stored=12, compress=True)
    import pydicom

    assert pydicom.dcmread(path).file_meta.TransferSyntaxUID == RLELossless
    assert np.array_equal(decode(path).pixels, plain)


def test_dicom_without_pixel_data(tmp_path):
    path = write_dicom(tmp_path / "report.dcm", None)
    assert _error(path) == f"{path}: DICOM has no pixel data (not an image object)"


def test_multiframe_dicom(tmp_path):
    stack = np.stack([synthetic_xray(16, seed=s) for s in range(3)])
    path = write_dicom(tmp_path / "cine.dcm", np.round(stack * 255).astype(np.uint8), frames=3)
    assert _error(path) == f"{path}: DICOM has 3 frames; expected a single radiograph"


def test_corrupt_dicom_pixel_data(tmp_path, picture):
    path = write_dicom(tmp_path / "short.dcm", picture)
    data = path.read_bytes()
    path.write_bytes(data[:-1000])  # the pixel data element now claims more bytes than the file has
    message = _error(path)
    assert message.startswith(f"{path}: ")
    assert "\n" not in message
    assert "DICOM" in message


def test_dicom_bomb_is_refused_from_the_header(tmp_path):
    path = write_dicom(tmp_path / "bomb.dcm", np.zeros((2, 2), np.uint8), Rows=10000, Columns=10000)
    assert _error(path) == (f"{path}: image is 10000x10000 pixels, above the 50 MP limit "
                            "(refused as a possible decompression bomb; see --max-megapixels)")


def test_dicom_and_png_of_the_same_radiograph_get_the_same_prediction(tmp_path, tiny_model, picture):
    png = save_gray(tmp_path / "x.png", picture / 255)
    dcm = write_dicom(tmp_path / "x.dcm", picture)
    a, b = tiny_model.predict(png), tiny_model.predict(dcm)
    assert a.status == b.status == "ok"
    assert a.probability == pytest.approx(b.probability, abs=1e-6)
    assert a.decision == b.decision


@pytest.mark.parametrize("elements, reason", [
    ({"Modality": "CT"}, "DICOM Modality is CT; chest radiographs are CR, DX, OT, RG"),
    ({"Modality": "MR", "BodyPartExamined": "CHEST"}, "DICOM Modality is MR; chest radiographs are CR, DX, OT, RG"),
    ({"BodyPartExamined": "KNEE"}, "DICOM BodyPartExamined is KNEE, not the chest"),
    ({"ViewPosition": "LL"}, "DICOM ViewPosition is LL, a lateral view; the model reads frontal (PA/AP) views"),
])
def test_dicom_header_that_says_no_frontal_chest_radiograph_is_not_xray(tmp_path, tiny_model, picture, elements,
                                                                        reason):
    dcm = write_dicom(tmp_path / "x.dcm", picture, **elements)
    for result in (tiny_model.predict(dcm), *tiny_model.predict_files([dcm])):
        assert result.status == "not_xray" and result.probability is None
        assert result.message == f"{NOT_XRAY}: {reason}; no probability reported"


@pytest.mark.parametrize("elements", [
    {"Modality": "DX", "BodyPartExamined": "CHEST", "ViewPosition": "PA"},
    {"Modality": "CR", "BodyPartExamined": "THORAX", "ViewPosition": "AP"},
    {"Modality": "OT"},  # secondary capture of a film
])
def test_dicom_header_of_a_frontal_chest_radiograph_passes(tmp_path, tiny_model, picture, elements):
    assert tiny_model.predict(write_dicom(tmp_path / "x.dcm", picture, **elements)).status == "ok"


@pytest.mark.integration
def test_real_xray_as_dicom_gets_the_same_prediction_as_its_jpeg(tmp_path, kermany, tiny_model):
    jpeg = sorted((kermany / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    with Image.open(jpeg) as im:
        pixels = np.asarray(im.convert("L"))
    # LINEAR_EXACT window 127.5 / 255 maps stored value x to exactly x / 255, whatever the image's own range.
    dcm = write_dicom(tmp_path / "real.dcm", pixels, WindowCenter=127.5, WindowWidth=255,
                      VOILUTFunction="LINEAR_EXACT", compress=True)
    assert np.allclose(decode(dcm).pixels, decode(jpeg).pixels, atol=1e-6)
    a, b = tiny_model.predict(jpeg), tiny_model.predict(dcm)
    assert a.probability == pytest.approx(b.probability, abs=1e-6)
