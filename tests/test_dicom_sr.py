"""The DICOM result objects as a PACS and an AI-aware viewer read them: the TID 1500 Measurement Report SR parsed
back by highdicom, checked by dicom3tools' dciodvfy and rendered by dcmtk's dsrdump, and the Grad-CAM Secondary
Capture with its burned-in legend. Sources are DX instances made from a real test-split X-ray (or, where a header
needs odd attributes, generated ones); the model is conftest's tiny one (the objects do not depend on what it
learnt). A missing dciodvfy or dsrdump fails the test with the reason (apt-get install dicom3tools dcmtk)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import KERMANY
from highdicom.sr.utils import find_content_items
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

from pneumoscan import explain
from pneumoscan.dicom import results, samples
from pneumoscan.pipeline import Prediction

XRAY = KERMANY / "test" / "PNEUMONIA" / "person1_virus_6.jpeg"
PNEUMONIA = Code("233604007", "SCT", "Pneumonia")
TEXT = hd.sr.ValueTypeValues.TEXT
IMAGE = hd.sr.ValueTypeValues.IMAGE


def _tool(name: str) -> str:
    found = shutil.which(name, path="/usr/bin:/usr/local/bin:/bin") or shutil.which(name)
    if not found:
        pytest.fail(f"{name} not found: install Debian's dicom3tools and dcmtk (apt-get install -y dicom3tools dcmtk)")
    return found


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A DX instance of a real X-ray with patient identifiers that must reach the results (and nothing else)."""
    if not XRAY.is_file():
        pytest.skip(f"{XRAY} not present")
    path = tmp_path_factory.mktemp("source") / "dx.dcm"
    samples.xray_dicom(XRAY, modality="DX", patient_name="Secret^Name", patient_id="SECRET-ID").save_as(
        path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def header(source) -> pydicom.Dataset:
    return pydicom.dcmread(source, stop_before_pixels=True)


def prediction(kind: str) -> Prediction:
    if kind == "positive":
        return Prediction("dx.dcm", 0.8125, "PNEUMONIA", "screening", 0.3, "ok")
    if kind == "negative":
        return Prediction("dx.dcm", 0.0625, "NORMAL", "balanced", 0.5, "ok")
    return Prediction("dx.dcm", None, None, "screening", 0.3, "not_xray",
                      "not a frontal chest X-ray: ViewPosition is LL (a lateral view); no probability reported")


def made(kind: str, header, model, source) -> list[pydicom.Dataset]:
    """The objects a route makes for ``kind``: an SC (and an SR naming it) only for a judged image."""
    overlay = explain.gradcam_overlay(model, model.decode(str(source)).pixels) if kind != "not_analysed" else None
    return results.result_objects(header, prediction(kind), model, overlay)


def saved(ds: pydicom.Dataset, folder: Path) -> Path:
    path = folder / f"{ds.SOPInstanceUID}.dcm"
    results.write(ds, path)
    return path


def dciodvfy(path: Path) -> tuple[list[str], list[str]]:
    run = subprocess.run([_tool("dciodvfy"), str(path)], capture_output=True, text=True, timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    return [x for x in lines if x.startswith("Error")], [x for x in lines if x.startswith("Warning")]


def group_of(sr_path: Path):
    sr = hd.sr.srread(sr_path)
    report = hd.sr.MeasurementReport.from_sequence(sr.content)
    [group] = report.get_image_measurement_groups()
    return sr, report, group


def texts(group, meaning: str) -> list[str]:
    return [item.value for item in find_content_items(group[0], value_type=TEXT) if item.name.meaning == meaning]


def images(group, meaning: str) -> list[str]:
    return [item.referenced_sop_instance_uid for item in find_content_items(group[0], value_type=IMAGE)
            if item.name.meaning == meaning]


# ---- highdicom reads back what was written --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["positive", "negative", "not_analysed"])
def test_highdicom_parses_the_sr_back_into_the_same_values(kind, header, tiny_model, source, tmp_path):
    objects = made(kind, header, tiny_model, source)
    expected = prediction(kind)
    sr_path = saved(objects[0], tmp_path)
    sr, report, group = group_of(sr_path)
    assert isinstance(sr, hd.sr.Comprehensive3DSR) and sr.SOPClassUID == results.COMPREHENSIVE_3D_SR
    assert report[0].ContentTemplateSequence[0].TemplateIdentifier == "1500"

    # the finding, coded, at the operating point
    [finding] = group.get_qualitative_evaluations(name=PNEUMONIA)
    [summary] = group.get_qualitative_evaluations(name=codes.DCM.CADProcessingAndFindingsSummary)
    want = {"positive": (codes.SCT.Present, codes.DCM.AllAlgorithmsSucceededWithFindings),
            "negative": (codes.SCT.Absent, codes.DCM.AllAlgorithmsSucceededWithoutFindings),
            "not_analysed": (codes.SCT.Indeterminate, codes.DCM.NoAlgorithmsSucceededWithoutFindings)}[kind]
    assert (finding.value, summary.value) == want
    probability = group.get_measurements(name=codes.DCM.Probability)
    if kind == "not_analysed":
        assert probability == []
        [reason] = [t for t in texts(group, "Comment") if t.startswith("not analysed")]
        assert reason == f"not analysed (not_xray): {expected.message}"
    else:
        assert probability[0].value == pytest.approx(expected.probability, abs=1e-12)
        assert probability[0].unit == hd.sr.CodedConcept("{probability}", "UCUM", "probability")
        assert not any(t.startswith("not analysed") for t in texts(group, "Comment"))
    [threshold] = group.get_measurements(name=codes.DCM.ThresholdValue)
    assert threshold.value == pytest.approx(expected.threshold)
    assert texts(group, "CAD Operating Point Description") == [expected.operating_point]

    # who made it: the algorithm, and that it is AI, in code and in words
    assert texts(group, "Algorithm Name") == [tiny_model.name]
    assert texts(group, "Algorithm Version") == [tiny_model.record.version]
    assert f"model sha256 {tiny_model.sha256}" in texts(group, "Algorithm Parameters")
    assert (f"operating point {expected.operating_point} (threshold {expected.threshold:.4f})"
            in texts(group, "Algorithm Parameters"))
    family = [item.value for item in find_content_items(group[0], name=codes.DCM.AlgorithmFamily)]
    assert family == [codes.DCM.ArtificialIntelligence]
    [statement] = [t for t in texts(group, "Comment") if not t.startswith("not analysed")]
    assert statement.startswith("AI-generated (pneumoscan ") and results.DISCLAIMER in statement
    [observer] = report.get_observer_contexts(observer_type=codes.DCM.Device)
    assert observer.observer_identifying_attributes.name.startswith("pneumoscan ")
    assert "AI-generated" in sr.SeriesDescription

    # TID 1500's required context: language, procedure, tracking
    root = {item.name.meaning: item for item in report[0].ContentSequence}
    assert root["Language of Content Item and Descendants"].value == hd.sr.CodedConcept("en-US", "RFC5646",
                                                                                       "English (United States)")
    assert root["Procedure reported"].value == hd.sr.CodedConcept("399208008", "SCT", "Plain chest X-ray")
    assert group.tracking_identifier == "pneumoscan pneumonia screening" and group.tracking_uid
    assert [site.value for site in group.finding_sites] == [codes.SCT.Lung]

    # references: the X-ray (and the heatmap SC when there is one), in the group, the library and the evidence
    assert [ref.referenced_sop_instance_uid for ref in group.source_images] == [header.SOPInstanceUID]
    library = [item.referenced_sop_instance_uid for item in find_content_items(report[0], value_type=IMAGE,
                                                                                recursive=True)
               if item.name.meaning == "Source"]
    evidence = {uid for _, _, uid, _ in sr.get_evidence()}
    if kind == "not_analysed":
        assert len(objects) == 1 and images(group, "Illustration of ROI") == []
        assert library == [header.SOPInstanceUID] and evidence == {header.SOPInstanceUID}
    else:
        sc = objects[1]
        assert images(group, "Illustration of ROI") == [sc.SOPInstanceUID]
        assert library == [header.SOPInstanceUID, sc.SOPInstanceUID]
        assert evidence == {header.SOPInstanceUID, sc.SOPInstanceUID}

    # the source study, the result series, the patient as the source has it
    for ds in objects:
        assert ds.StudyInstanceUID == header.StudyInstanceUID
        assert (ds.PatientID, str(ds.PatientName)) == ("SECRET-ID", "Secret^Name")
        assert ds.Manufacturer == results.MANUFACTURER
    assert sr.SeriesNumber == results.SR_SERIES_NUMBER
    assert sr.VerificationFlag == "UNVERIFIED" and sr.CompletionFlag == "COMPLETE"


def test_a_real_prediction_reaches_the_sr_unchanged(header, tiny_model, source, tmp_path):
    screened = tiny_model.predict(str(source))
    objects = results.result_objects(header, screened, tiny_model)
    _, _, group = group_of(saved(objects[0], tmp_path))
    assert group.get_measurements(name=codes.DCM.Probability)[0].value == pytest.approx(screened.probability,
                                                                                       abs=1e-12)
    decided = group.get_qualitative_evaluations(name=PNEUMONIA)[0].value
    assert decided == (codes.SCT.Present if screened.decision == "PNEUMONIA" else codes.SCT.Absent)


def test_the_sr_references_the_sc_that_is_made_with_it(header, tiny_model, source):
    first = made("positive", header, tiny_model, source)
    again = made("positive", header, tiny_model, source)
    assert [d.SOPInstanceUID for d in first] == [d.SOPInstanceUID for d in again]  # a retry stores nothing new
    sr, sc = first
    assert sc.SOPClassUID == results.SECONDARY_CAPTURE and sc.SeriesNumber == results.SC_SERIES_NUMBER
    referenced = [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                  for item in find_content_items(sr, value_type=IMAGE, recursive=True)]
    assert sc.SOPInstanceUID in referenced
    # without an overlay the same SR UID names no heatmap: a route that makes none references none
    [plain] = results.result_objects(header, prediction("positive"), tiny_model)
    assert plain.SOPInstanceUID == sr.SOPInstanceUID
    assert sc.SOPInstanceUID not in [item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID
                                     for item in find_content_items(plain, value_type=IMAGE, recursive=True)]


# ---- the validators --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["positive", "negative", "not_analysed"])
def test_dciodvfy_finds_no_error_and_no_coding_scheme_warning(kind, header, tiny_model, source, tmp_path):
    for ds in made(kind, header, tiny_model, source):
        errors, warnings = dciodvfy(saved(ds, tmp_path))
        assert errors == [], (ds.Modality, errors)
        assert [w for w in warnings if "Coding Scheme" in w] == [], (ds.Modality, warnings)
        assert warnings == [], (ds.Modality, warnings)  # none at all, today


def test_headers_without_projection_descriptors_or_pixels_still_give_valid_srs(tiny_model, tmp_path):
    """A CR header without pixel spacing or orientation (type 3 there), and an instance without pixel data (no
    size), get a valid report: the image library describes what the header has and nothing made up."""
    picture = np.outer(np.hanning(128), np.linspace(0.0, 255.0, 128)).astype(np.float32)
    cr = samples.xray_dicom(picture, modality="CR", side=None)
    for keyword in ("ImagerPixelSpacing", "PatientOrientation"):
        if keyword in cr:
            delattr(cr, keyword)
    bare = samples.xray_dicom(picture, modality="DX", side=None)
    for keyword in ("PixelData", "Rows", "Columns"):
        delattr(bare, keyword)
    no_probability = Prediction("x", None, None, "screening", 0.3, "error", "x: cannot decode the pixel data")
    for ds, pred in ((cr, prediction("negative")), (bare, no_probability)):
        sr = results.structured_report(ds, pred, tiny_model)
        errors, warnings = dciodvfy(saved(sr, tmp_path))
        assert errors == [] and [w for w in warnings if "Coding Scheme" in w] == [], (ds.Modality, errors, warnings)
        _, _, group = group_of(tmp_path / f"{sr.SOPInstanceUID}.dcm")
        assert [ref.referenced_sop_instance_uid for ref in group.source_images] == [ds.SOPInstanceUID]


@pytest.mark.parametrize("kind", ["positive", "not_analysed"])
def test_dsrdump_renders_the_report(kind, header, tiny_model, source, tmp_path):
    path = saved(made(kind, header, tiny_model, source)[0], tmp_path)
    run = subprocess.run([_tool("dsrdump"), str(path)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    text = run.stdout
    assert "Comprehensive 3D SR Document" in text and '"Imaging Measurement Report"' in text
    assert '"Pneumonia")=(' in text and '"Plain chest X-ray"' in text and "AI-generated (pneumoscan" in text
    if kind == "positive":
        assert '(52101004,SCT,"Present")' in text and '"Probability")="0.8125"' in text
        assert '"Illustration of ROI")=(SC image,)' in text
    else:
        assert '(82334004,SCT,"Indeterminate")' in text and "not analysed (not_xray)" in text


# ---- the Secondary Capture ---------------------------------------------------------------------------------------


def test_secondary_capture_carries_its_legend_and_says_it_is_ai_generated(header, tiny_model, source):
    overlay = explain.gradcam_overlay(tiny_model, tiny_model.decode(str(source)).pixels)
    sc = results.secondary_capture(header, prediction("positive"), tiny_model, overlay)
    pixels = sc.pixel_array
    assert pixels.shape[0] > overlay.height and pixels.shape[1] > overlay.width  # the band above, the scale beside
    band = pixels[: pixels.shape[0] - overlay.height]
    assert (band > 0).any()  # the result lines are written
    assert np.array_equal(pixels[-overlay.height:, :overlay.width], np.asarray(overlay))  # the picture itself
    assert "probability 0.812" in sc.ImageComments and "AI-generated (pneumoscan" in sc.ImageComments
    assert "AI-generated" in sc.SeriesDescription and "AI-generated" in sc.DerivationDescription
    assert sc.BurnedInAnnotation == "YES" and sc.BodyPartExamined == "CHEST" and "Laterality" not in sc
    assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID == header.SOPInstanceUID
