"""The DICOM objects a screened instance gets back: a TID 1500 Measurement Report SR and a Grad-CAM Secondary
Capture, made with highdicom.

Both join the source study (its Study Instance UID, patient and study attributes copied from the source) in new
series (SR 9901, SC 9902). Their UIDs are derived from the source SOP Instance UID and the model's sha256, so
screening the same instance again with the same model (a restart, a retry) makes the same objects, which a PACS
stores once.

The SR is a Comprehensive 3D SR (the SOP class IHE AI Results names) whose content is TID 1500 "Imaging Measurement
Report", so highdicom (``hd.sr.srread`` / ``MeasurementReport.from_sequence``) and AI-aware viewers read it as data:
- language of content (en-US), observation context (the device: pneumoscan, its version and the model), procedure
  reported (SCT 399208008 "Plain chest X-ray"), the image library (the source X-ray and the heatmap SC);
- one TID 1501 measurement group (tracking identifier and UID, finding site lung, TID 4019 algorithm
  identification: model name, version, family "Artificial Intelligence", parameters = operating point and model
  sha256) holding
  - the finding as a qualitative evaluation: SCT 233604007 "Pneumonia" = SCT Present / Absent at the operating
    point, or Indeterminate when the image was not analysed (then a comment says why);
  - "CAD Processing and Findings Summary" (DCM 111017): all algorithms succeeded with / without findings, or none;
  - the calibrated probability (DCM 122157 "Probability", UCUM "{probability}") when there is one, and the
    operating point: its name ("CAD Operating Point Description", DCM 111081) and threshold ("Threshold Value",
    DCM 122411, UCUM "{probability}");
  - "Source of Measurement" = the X-ray, "Illustration of ROI" = the heatmap SC when one is made;
  - a comment that the result is AI-generated, not reviewed by a person, a screening aid and not a diagnosis.
Every code is a standard one (DCM, SCT, UCUM, RFC5646): dciodvfy (dicom3tools 2022) warns about any other coding
scheme designator, a private scheme declared in CodingSchemeIdentificationSequence included, so none is used.
The SC says the same in its burned-in legend (result, colour scale, "AI-generated (pneumoscan ...)") and header.
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
COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"  # the SOP class of pneumoscan's SRs before TID 1500
COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
SR_SOP_CLASS = COMPREHENSIVE_3D_SR
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
# (value, scheme, meaning): standard codes that pydicom's dictionary lacks
PNEUMONIA = ("233604007", "SCT", "Pneumonia")
PLAIN_CHEST_XRAY = ("399208008", "SCT", "Plain chest X-ray")
ENGLISH = ("en-US", "RFC5646", "English (United States)")
PROBABILITY_UNIT = ("{probability}", "UCUM", "probability")
TRACKING_IDENTIFIER = "pneumoscan pneumonia screening"


def _code(value: str, scheme: str, meaning: str):
    from highdicom.sr import CodedConcept

    return CodedConcept(value, scheme, meaning)


def ai_statement() -> str:
    """The comment every SR and SC carries."""
    from ..explain import ai_label

    return f"{ai_label()}, not reviewed by a person; {DISCLAIMER}"


def not_analysed(prediction: Prediction) -> str:
    """The SR comment of an image with no probability: the status and the stage's reason, on one line."""
    return f"not analysed ({prediction.status}): {_one_line(prediction.message) or prediction.status}"


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


def structured_report(source: Dataset, prediction: Prediction, model: Model, *,
                      heatmap: Dataset | None = None) -> Dataset:
    """The TID 1500 Measurement Report (Comprehensive 3D SR) for ``prediction`` of the instance whose header is
    ``source``. ``heatmap``: the Secondary Capture made for it (``secondary_capture``), referenced as the
    illustration of the finding; make the SC first (``result_objects`` does)."""
    import highdicom as hd
    from highdicom.sr import (
        AlgorithmIdentification,
        DeviceObserverIdentifyingAttributes,
        FindingSite,
        ImageContentItem,
        LanguageOfContentItemAndDescendants,
        Measurement,
        MeasurementReport,
        MeasurementsAndQualitativeEvaluations,
        ObservationContext,
        ObserverContext,
        QualitativeEvaluation,
        RelationshipTypeValues,
        SourceImageForMeasurementGroup,
        TextContentItem,
        TrackingIdentifier,
    )

    contains = RelationshipTypeValues.CONTAINS
    source_uid = str(source.SOPInstanceUID)
    observer = ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=DeviceObserverIdentifyingAttributes(
            uid=derived_uid(model.sha256, "device"),
            name=f"pneumoscan {__version__}", manufacturer_name=MANUFACTURER, model_name=model.name),
    )
    algorithm = AlgorithmIdentification(
        name=model.name, version=model.record.version or __version__, manufacturer=MANUFACTURER,
        family=codes.DCM.ArtificialIntelligence,
        parameters=[f"operating point {prediction.operating_point} (threshold {prediction.threshold:.4f})",
                    f"model sha256 {model.sha256}"])
    ok = prediction.status == "ok"
    if ok and prediction.decision == model.classes[1]:
        finding, summary = codes.SCT.Present, codes.DCM.AllAlgorithmsSucceededWithFindings
    elif ok:
        finding, summary = codes.SCT.Absent, codes.DCM.AllAlgorithmsSucceededWithoutFindings
    else:
        finding, summary = codes.SCT.Indeterminate, codes.DCM.NoAlgorithmsSucceededWithoutFindings
    measurements = []
    if ok:
        measurements.append(Measurement(codes.DCM.Probability, float(prediction.probability),
                                        _code(*PROBABILITY_UNIT), algorithm_id=algorithm))
    measurements.append(Measurement(codes.DCM.ThresholdValue, float(prediction.threshold), _code(*PROBABILITY_UNIT)))
    group = MeasurementsAndQualitativeEvaluations(
        tracking_identifier=TrackingIdentifier(uid=result_uid(source_uid, model.sha256, "tracking"),
                                               identifier=TRACKING_IDENTIFIER),
        algorithm_id=algorithm,
        finding_sites=[FindingSite(codes.SCT.Lung)],
        measurements=measurements,
        qualitative_evaluations=[QualitativeEvaluation(_code(*PNEUMONIA), finding),
                                 QualitativeEvaluation(codes.DCM.CADProcessingAndFindingsSummary, summary)],
        source_images=[SourceImageForMeasurementGroup(str(source.SOPClassUID), source_uid)],
    )
    extra = [TextContentItem(codes.DCM.CADOperatingPointDescription, prediction.operating_point,
                             relationship_type=contains)]
    if heatmap is not None:
        extra.append(ImageContentItem(codes.DCM.IllustrationOfROI, str(heatmap.SOPClassUID),
                                      str(heatmap.SOPInstanceUID), relationship_type=contains))
    if not ok:
        extra.append(TextContentItem(codes.DCM.Comment, not_analysed(prediction), relationship_type=contains))
    extra.append(TextContentItem(codes.DCM.Comment, ai_statement(), relationship_type=contains))
    group[0].ContentSequence.extend(extra)
    images = [source] + ([heatmap] if heatmap is not None else [])
    report = MeasurementReport(
        observation_context=ObservationContext(observer_device_context=observer),
        procedure_reported=_code(*PLAIN_CHEST_XRAY),
        imaging_measurements=[group],
        language_of_content_item_and_descendants=LanguageOfContentItemAndDescendants(_code(*ENGLISH)),
        referenced_images=[view for view in map(_library_view, images) if view is not None] or None,
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=images,
        content=report[0],
        series_instance_uid=_series_uid(source, model.sha256, "sr"),
        series_number=SR_SERIES_NUMBER,
        sop_instance_uid=result_uid(source_uid, model.sha256, "sr"),
        instance_number=_instance_number(source),
        manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    sr.SeriesDescription = "pneumoscan AI screening report (AI-generated)"
    sr.ManufacturerModelName = model.name
    sr.SoftwareVersions = __version__
    return sr


_PROJECTION_DESCRIPTORS = ("PatientOrientation", "ImagerPixelSpacing")
_PROJECTION_MODALITIES = ("CR", "DX", "IO", "MG", "PX", "RF", "RG", "XA")  # highdicom's, which adds TID 1603 for them


def _library_view(image: Dataset) -> Dataset | None:
    """What highdicom's image library (TID 1601) is given of ``image``: its identifiers, size, modality and, for a
    projection radiograph, orientation and pixel spacing (TID 1603) only when the header has them all; no value
    is made up. None for an instance the library cannot describe (no size, as without pixel data, or a SOP class
    highdicom does not know as an image): the measurement group still references it."""
    from highdicom.sr import ImageLibraryEntryDescriptors

    if not image.get("Rows") or not image.get("Columns"):
        return None
    view = Dataset()
    for keyword in ("SOPClassUID", "SOPInstanceUID", "Rows", "Columns", "FrameOfReferenceUID",
                    *_PROJECTION_DESCRIPTORS):
        if image.get(keyword) not in (None, ""):
            setattr(view, keyword, image.get(keyword))
    complete = all(keyword in view and not isinstance(view[keyword].value, str) and len(view[keyword].value) == 2
                   for keyword in _PROJECTION_DESCRIPTORS)
    modality = str(image.get("Modality", ""))
    view.Modality = modality if complete and modality in _PROJECTION_MODALITIES else ""
    try:
        ImageLibraryEntryDescriptors(view)
    except ValueError:  # not an image SOP class highdicom knows
        return None
    return view


def result_objects(source: Dataset, prediction: Prediction, model: Model,
                   overlay: Image.Image | None = None) -> list[Dataset]:
    """[SR] or, given the Grad-CAM ``overlay``, [SR, SC] with the SR referencing the SC: the SC is made first so
    that the SR can name it."""
    if overlay is None:
        return [structured_report(source, prediction, model)]
    sc = secondary_capture(source, prediction, model, overlay)
    return [structured_report(source, prediction, model, heatmap=sc), sc]


def _one_line(text: str, limit: int = 1000) -> str:
    return " ".join(str(text).split())[:limit]


def caption(prediction: Prediction) -> str:
    from ..explain import legend_lines

    return legend_lines(prediction)[0]


def burn_in(picture: Image.Image, prediction: Prediction) -> Image.Image:
    """The overlay with its legend: the result, what the colours mean, the colour scale and the AI label."""
    from ..explain import annotate, legend_lines

    return annotate(picture, legend_lines(prediction))


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
    sc.SeriesDescription = "pneumoscan AI Grad-CAM (AI-generated)"
    sc.ImageComments = f"{caption(prediction)}; {ai_statement()}"
    sc.DerivationDescription = (f"Grad-CAM of the PNEUMONIA class by {model.name} (model sha256 {model.sha256[:12]}), "
                                "overlaid on the source image; AI-generated")[:1024]
    sc.BurnedInAnnotation = "YES"
    # Laterality is type 2C, for a paired structure only: a chest (the SC is only made for an image judged to be
    # a frontal chest X-ray) is none, so it is absent, and BodyPartExamined says why (dciodvfy checks the pair).
    sc.BodyPartExamined = str(source.get("BodyPartExamined") or "CHEST")
    if source.get("Laterality"):
        sc.Laterality = source.Laterality
    elif "Laterality" in sc:
        del sc.Laterality
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
