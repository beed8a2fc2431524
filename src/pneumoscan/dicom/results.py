"""The DICOM objects a screened instance gets back: a Comprehensive SR and a Secondary Capture, made with highdicom.

Both join the source study (its Study Instance UID, patient and study attributes copied from the source) in new
series. Their UIDs are derived from the source SOP Instance UID and the model's sha256, so screening the same
instance again with the same model (a restart, a retry) makes the same objects, which a PACS stores once.

The SR (IHE AI Results in spirit) says, under an "Imaging Measurement Report" container:
- observer context: the device (pneumoscan) and the algorithm identification (name, version, sha256);
- the pneumonia finding at the operating point (Present / Absent), the calibrated probability, the operating
  point's name and threshold; or, when the instance was not assessed, "Indeterminate" and the reason;
- the source image (SOP class and instance), VerificationFlag UNVERIFIED, and "screening aid, not a diagnosis".
"""

from __future__ import annotations

import uuid
from typing import TYPE_CHECKING

import numpy as np
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from .. import __version__

if TYPE_CHECKING:
    from PIL import Image

    from ..predict import Model, Prediction

DISCLAIMER = "screening aid, not a diagnosis"
MANUFACTURER = "pneumoscan"
SR_SERIES_NUMBER = 9901
SC_SERIES_NUMBER = 9902
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# Codes without a standard one live in a private scheme (designators starting "99" are private, PS3.16 8.2).
SCHEME = "99PNEUMOSCAN"


def _code(value: str, scheme: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, scheme, meaning)


PNEUMONIA = ("233604007", "SCT", "Pneumonia")
OPERATING_POINT = ("OPPOINT", SCHEME, "Operating point")
THRESHOLD = ("THRESHOLD", SCHEME, "Decision threshold")
NOT_ASSESSED_REASON = ("NOTASSESSED", SCHEME, "Reason not assessed")
SCREENING_STATUS = ("STATUS", SCHEME, "Screening status")


def derived_uid(*parts: str) -> str:
    """A UID of the 2.25 form (PS3.5 B.2) from a name-based UUID (version 5) of ``parts``: the same parts give the
    same UID on every machine and every run. (pydicom's generate_uid ignores its entropy sources without a prefix.)"""
    return f"2.25.{uuid.uuid5(_NAMESPACE, chr(31).join(parts)).int}"


_NAMESPACE = uuid.UUID("6d1f0c42-53a8-5b0e-9f5e-70a6e0c1d215")  # pneumoscan's own namespace for derived UIDs


def result_uid(source_sop_uid: str, model_sha256: str, kind: str) -> str:
    """Same instance, same model, same kind (sr | sc) -> same result UID."""
    return derived_uid(source_sop_uid, model_sha256, kind)


def _series_uid(source: Dataset, model_sha256: str, kind: str) -> str:
    return derived_uid(str(source.get("SeriesInstanceUID", source.SOPInstanceUID)), model_sha256, kind, "series")


def _instance_number(source: Dataset) -> int:
    try:
        return max(1, int(source.get("InstanceNumber") or 1))
    except (TypeError, ValueError):
        return 1


def structured_report(source: Dataset, prediction: Prediction, model: Model) -> Dataset:
    """The Comprehensive SR for ``prediction`` of the instance whose header is ``source``."""
    import highdicom as hd
    from highdicom.sr import (
        CodeContentItem,
        ContainerContentItem,
        DeviceObserverIdentifyingAttributes,
        NumContentItem,
        ObserverContext,
        RelationshipTypeValues,
        TextContentItem,
    )

    has_props = RelationshipTypeValues.HAS_PROPERTIES
    contains = RelationshipTypeValues.CONTAINS
    context = RelationshipTypeValues.HAS_OBS_CONTEXT
    items = []
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derived_uid(model.sha256, "device"),
            name=f"pneumoscan {__version__}", manufacturer_name=MANUFACTURER, model_name=model.name),
    )
    items.extend(observer)
    # TID 4019 Algorithm Identification
    items.append(TextContentItem(codes.DCM.AlgorithmName, model.name, relationship_type=context))
    items.append(TextContentItem(codes.DCM.AlgorithmVersion, model.record.version or __version__,
                                 relationship_type=context))
    items.append(TextContentItem(codes.DCM.AlgorithmParameters, f"model sha256 {model.sha256}",
                                 relationship_type=context))
    source_item = hd.sr.ImageContentItem(codes.SCT.Source, str(source.SOPClassUID), str(source.SOPInstanceUID),
                                         relationship_type=contains)
    finding_code = _code(*PNEUMONIA)
    if prediction.status == "ok":
        present = prediction.decision == model.classes[1]
        finding = CodeContentItem(finding_code, codes.SCT.Present if present else codes.SCT.Absent,
                                  relationship_type=contains)
        finding.ContentSequence = [
            NumContentItem(codes.DCM.Probability, float(prediction.probability), _code("1", "UCUM", "no units"),
                           relationship_type=has_props),
            TextContentItem(_code(*OPERATING_POINT), prediction.operating_point, relationship_type=has_props),
            NumContentItem(_code(*THRESHOLD), float(prediction.threshold), _code("1", "UCUM", "no units"),
                           relationship_type=has_props),
        ]
    else:
        finding = CodeContentItem(finding_code, codes.SCT.Indeterminate, relationship_type=contains)
        finding.ContentSequence = [
            TextContentItem(_code(*SCREENING_STATUS), f"not assessed ({prediction.status})",
                            relationship_type=has_props),
            TextContentItem(_code(*NOT_ASSESSED_REASON), _one_line(prediction.message) or prediction.status,
                            relationship_type=has_props),
        ]
    items.append(finding)
    items.append(source_item)
    items.append(TextContentItem(codes.DCM.Comment, DISCLAIMER, relationship_type=contains))
    root = ContainerContentItem(codes.DCM.ImagingMeasurementReport)
    root.ContentSequence = items
    sr = hd.sr.ComprehensiveSR(
        evidence=[source],
        content=root,
        series_instance_uid=_series_uid(source, model.sha256, "sr"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(str(source.SOPInstanceUID), model.sha256, "sr"),
        instance_number=_instance_number(source),
        manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sr.SeriesDescription = "pneumoscan screening report"
    sr.ManufacturerModelName = model.name
    sr.SoftwareVersions = __version__
    return sr


def _one_line(text: str, limit: int = 1000) -> str:
    return " ".join(str(text).split())[:limit]


def caption(prediction: Prediction) -> str:
    if prediction.status != "ok":
        return f"pneumoscan: NOT ASSESSED ({prediction.status})"
    return (f"pneumoscan: {prediction.decision}  probability {prediction.probability:.3f}  "
            f"({prediction.operating_point} threshold {prediction.threshold:.3f})")


def burn_in(picture: Image.Image, prediction: Prediction) -> Image.Image:
    """The overlay with the result and the disclaimer written on a black band above it."""
    from PIL import Image, ImageDraw, ImageFont

    width = picture.width
    size = max(12, width // 40)
    try:
        font = ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        font = ImageFont.load_default()
    band = 2 * size + 3 * (size // 2)
    canvas = Image.new("RGB", (width, picture.height + band), (0, 0, 0))
    canvas.paste(picture, (0, band))
    draw = ImageDraw.Draw(canvas)
    draw.text((size // 2, size // 2), caption(prediction), fill=(255, 255, 0), font=font)
    draw.text((size // 2, size + size), f"Grad-CAM (PNEUMONIA); {DISCLAIMER}", fill=(255, 255, 255), font=font)
    return canvas


def secondary_capture(source: Dataset, prediction: Prediction, model: Model, overlay: Image.Image) -> Dataset:
    """The Secondary Capture: the Grad-CAM overlay with the result burned in, RGB 8 bit."""
    import highdicom as hd

    pixels = np.ascontiguousarray(np.asarray(burn_in(overlay, prediction).convert("RGB"), dtype=np.uint8))
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=source,
        pixel_array=pixels,
        photometric_interpretation="RGB",
        bits_allocated=8,
        coordinate_system="PATIENT",
        series_instance_uid=_series_uid(source, model.sha256, "sc"),
        series_number=SC_SERIES_NUMBER,
        sop_instance_uid=result_uid(str(source.SOPInstanceUID), model.sha256, "sc"),
        instance_number=_instance_number(source),
        manufacturer=MANUFACTURER,
        patient_orientation=_orientation(source),
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sc.SeriesDescription = "pneumoscan Grad-CAM"
    sc.ImageComments = f"{caption(prediction)}; {DISCLAIMER}"
    sc.BurnedInAnnotation = "YES"
    sc.Laterality = source.get("Laterality", "")  # type 2C; a chest is no paired structure, so empty
    sc.SoftwareVersions = __version__
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    sc.SourceImageSequence = [ref]
    return sc


def _orientation(source: Dataset) -> tuple[str, str]:
    value = source.get("PatientOrientation")
    if value and len(value) == 2 and all(str(v) for v in value):
        return str(value[0]), str(value[1])
    return "L", "F"  # a frontal chest radiograph as displayed: rows run to the patient's left, columns to the feet


def write(dataset: Dataset, path) -> None:
    dataset.save_as(path, enforce_file_format=True)
