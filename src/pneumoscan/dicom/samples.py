"""DICOM versions of ordinary X-ray image files, as a modality would send them: for the tests and the benchmark.

``xray_dicom("person1_virus_6.jpeg", modality="CR", photometric="MONOCHROME1", bits=16, syntax=RLE)`` reads the
picture, resizes it to ``side`` px on its longest side, and returns a complete pydicom ``FileDataset`` (patient,
study, series, equipment and image modules; a fresh study unless ``study_uid`` is given) in the transfer syntax.
MONOCHROME1 stores inverted values, so a correct reader shows the same picture.
"""

from __future__ import annotations

import datetime as _dt
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    RLELossless,
    generate_uid,
)

CR = "1.2.840.10008.5.1.4.1.1.1"
DX_PRESENTATION = "1.2.840.10008.5.1.4.1.1.1.1"
DX_PROCESSING = "1.2.840.10008.5.1.4.1.1.1.1.1"
CT = "1.2.840.10008.5.1.4.1.1.2"
SC = "1.2.840.10008.5.1.4.1.1.7"


def read_gray(path: str | Path, side: int | None = 512) -> np.ndarray:
    """float32 (H, W) in [0, 255] of an image file, resized to ``side`` px on its longest side (None: as is)."""
    from PIL import Image

    with Image.open(path) as image:
        gray = image.convert("L")
        if side is not None:
            scale = side / max(gray.size)
            gray = gray.convert("F").resize((max(1, round(gray.width * scale)), max(1, round(gray.height * scale))),
                                            Image.Resampling.BILINEAR, reducing_gap=3.0)
        return np.asarray(gray.convert("F"), dtype=np.float32)


def xray_dicom(image: str | Path | np.ndarray, *, modality: str = "DX", sop_class: str | None = None,
               photometric: str = "MONOCHROME2", bits: int = 8, syntax: str = ExplicitVRLittleEndian,
               side: int | None = 512, study_uid: str | None = None, view: str = "PA", body_part: str = "CHEST",
               patient_id: str = "PNEUMOSCAN-TEST", patient_name: str = "Test^Patient",
               instance_number: int = 1) -> FileDataset:
    """A radiograph DICOM of ``image`` (a file, or float (H, W) in [0, 255]). bits 8 (uint8) or 16 (12 stored)."""
    gray = read_gray(image, side) if not isinstance(image, np.ndarray) else np.asarray(image, np.float32)
    if bits == 8:
        stored, bits_stored = np.clip(np.round(gray), 0, 255).astype(np.uint8), 8
    elif bits == 16:
        stored, bits_stored = np.clip(np.round(gray * (4095 / 255)), 0, 4095).astype(np.uint16), 12
    else:
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    if photometric == "MONOCHROME1":
        stored = (2**bits_stored - 1 - stored).astype(stored.dtype)
    sop_class = sop_class or {"CR": CR, "DX": DX_PRESENTATION, "CT": CT, "OT": SC}.get(modality, SC)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset("xray.dcm", {}, file_meta=meta, preamble=b"\0" * 128)
    now = _dt.datetime.now(_dt.timezone.utc)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = patient_name
    ds.PatientID = patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "O"
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.SeriesTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = instance_number
    ds.Modality = modality
    ds.Manufacturer = "pneumoscan test"
    if sop_class == SC:
        ds.ConversionType = "WSD"  # workstation: a film or an image captured from a screen
    if body_part:
        ds.BodyPartExamined = body_part
    if view:
        ds.ViewPosition = view
    ds.PatientOrientation = ["L", "F"] if view not in ("LL", "RL", "LATERAL") else ["A", "F"]
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    if sop_class in (DX_PRESENTATION, DX_PROCESSING):
        ds.ImageType = ["ORIGINAL", "PRIMARY", ""]
        ds.PresentationIntentType = "FOR PRESENTATION" if sop_class == DX_PRESENTATION else "FOR PROCESSING"
        ds.PixelIntensityRelationship = "LOG"
        ds.PixelIntensityRelationshipSign = -1 if photometric == "MONOCHROME1" else 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = 0, 1, "US"
        ds.BurnedInAnnotation = "NO"
        ds.DetectorType = "SCINTILLATOR"
        ds.ImagerPixelSpacing = [0.2, 0.2]
        ds.ImageLaterality = "U"
        ds.PresentationLUTShape = "INVERSE" if photometric == "MONOCHROME1" else "IDENTITY"
        ds.LossyImageCompression = "00"
        ds.PositionerType = ""
        ds.AcquisitionContextSequence = []
        region = Dataset()
        region.CodeValue, region.CodingSchemeDesignator, region.CodeMeaning = "43799004", "SCT", "Chest"
        ds.AnatomicRegionSequence = [region]
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits
    ds.BitsStored = bits_stored
    ds.HighBit = bits_stored - 1
    ds.PixelRepresentation = 0
    if modality == "CT":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.RescaleIntercept, ds.RescaleSlope = 0, 1
        ds.KVP = 120
        ds.AcquisitionNumber = 1
        ds.ImagePositionPatient = [0, 0, 0]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [0.5, 0.5]
        ds.SliceThickness = 1
        ds.FrameOfReferenceUID = generate_uid()
        ds.PositionReferenceIndicator = ""
    ds.WindowCenter = 2**bits_stored // 2
    ds.WindowWidth = 2**bits_stored
    ds.PixelData = stored.tobytes()
    if UID(syntax) == RLELossless:
        ds.compress(RLELossless)
    elif UID(syntax) == JPEGLosslessSV1:
        _jpeg_lossless(ds, stored, bits_stored)
    elif UID(syntax) == JPEGBaseline8Bit:
        if bits != 8:
            raise ValueError("JPEG baseline holds 8-bit images only")
        _encapsulate(ds, _pillow_jpeg(stored), JPEGBaseline8Bit, lossy=True)
    elif UID(syntax) != ExplicitVRLittleEndian:
        ds.compress(UID(syntax))  # whatever pydicom can encode (JPEG-LS, JPEG 2000)
    return ds


def _jpeg_lossless(ds: FileDataset, stored: np.ndarray, bits_stored: int) -> None:
    """JPEG lossless (process 14, selection value 1): imagecodecs encodes it, pydicom has no encoder."""
    import imagecodecs

    frame = imagecodecs.jpeg8_encode(stored, lossless=True, predictor=1, bitspersample=bits_stored)
    _encapsulate(ds, frame, JPEGLosslessSV1, lossy=False)


def _pillow_jpeg(stored: np.ndarray) -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(stored, "L").save(buffer, format="JPEG", quality=95)
    return buffer.getvalue()


def _encapsulate(ds: FileDataset, frame: bytes, syntax: str, *, lossy: bool) -> None:
    from pydicom.encaps import encapsulate

    ds.file_meta.TransferSyntaxUID = UID(syntax)
    ds.PixelData = encapsulate([frame])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.LossyImageCompression = "01" if lossy else "00"
    if lossy:
        ds.LossyImageCompressionMethod = "ISO_10918_1"
