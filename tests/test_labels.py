"""Labelled site data as hospitals keep it (data.labels): a labels CSV or a NORMAL/PNEUMONIA folder, DICOM files
grouped by their PatientID, on train, evaluate, adapt and data summary.

Generated images for the reader's rules; real test-split X-rays (some written as DICOM with PatientIDs shared by
two files) for the commands end to end. A PatientID must never reach a file, a log or the terminal."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from conftest import save_gray, synthetic_xray
from PIL import Image
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from pneumoscan.cli import main
from pneumoscan.data.labels import is_labelled_set, read_labelled, require
from pneumoscan.data.layout import DatasetError, patient_split
from pneumoscan.data.sources import FolderSource, LabelsSource, MedMNISTSource, open_source
from pneumoscan.run import RunFolder

CR_STORAGE = "1.2.840.10008.5.1.4.1.1.1"
SECRET = "MRN-SECRET"  # every PatientID and name written below carries it: it must appear nowhere we write


def write_dicom(path: Path, pixels: np.ndarray, patient_id: str | None) -> Path:
    """An 8-bit MONOCHROME2 CR file with a PatientID (None: the element is absent)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CR_STORAGE
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = CR_STORAGE, meta.MediaStorageSOPInstanceUID, "CR"
    ds.PatientName = f"{SECRET}^Name"
    if patient_id is not None:
        ds.PatientID = patient_id
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.ascontiguousarray(pixels, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def picture(seed: int, label: int) -> np.ndarray:
    return np.round(synthetic_xray(64, seed, opacity=0.5 * label) * 255).astype(np.uint8)


def write_csv(path: Path, rows: list[list[str]], header=("path", "label")) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def generated_site(root: Path, normal: int, pneumonia: int) -> list[list[str]]:
    """PNG files under root/img and the (path, label) rows naming them."""
    rows = []
    for label, n in ((0, normal), (1, pneumonia)):
        for i in range(n):
            name = f"img/{'n' if label == 0 else 'p'}{i:03d}.png"
            save_gray(root / name, synthetic_xray(64, 100 * label + i, opacity=0.5 * label))
            rows.append([name, str(label)])
    return rows


# --- the reader ----------------------------------------------------------------------------------------------------

def test_bad_csv_rows_are_each_named_by_line_and_the_rest_are_used(tmp_path):
    rows = generated_site(tmp_path, 3, 3)
    rows += [["img/gone.png", "1"], ["img/n000.png", "maybe"], ["", "0"], ["img/p001.png", "PNEUMONIA"],
             ["img", "0"]]
    labelled = read_labelled(write_csv(tmp_path / "site.csv", rows))
    site = tmp_path / "site.csv"
    assert labelled.problems == [
        f"{site}:8: img/gone.png: file not found",
        f"{site}:9: img/n000.png: label 'maybe' is not NORMAL, PNEUMONIA, 0 or 1",
        f"{site}:10: empty path",
        f"{site}:11: img/p001.png: the same file as line 6 (kept there)",
        f"{site}:12: img: not a file",
    ]
    assert len(labelled.samples) == 6 and labelled.counts == [3, 3] and labelled.rows == 11
    assert [s.path.name for s in labelled.samples] == sorted(f"{c}{i:03d}.png" for c in "np" for i in range(3))


def test_csv_columns_and_labels_are_read_in_any_case_with_a_bom_extra_columns_and_paths_outside(tmp_path):
    save_gray(tmp_path / "site" / "a.png", synthetic_xray(64, 1))
    save_gray(tmp_path / "elsewhere" / "b.png", synthetic_xray(64, 2, opacity=0.5))
    save_gray(tmp_path / "c.png", synthetic_xray(64, 3, opacity=0.5))
    text = ("\ufeffNote,PATH,Label\n"
            "x,a.png,normal\n"
            "y,../elsewhere/b.png,Pneumonia\n"
            f"z,{tmp_path / 'c.png'},1\n")
    (tmp_path / "site" / "site.csv").write_text(text, encoding="utf-8")
    labelled = read_labelled(tmp_path / "site" / "site.csv")
    assert labelled.problems == []
    assert [(s.path, s.label) for s in labelled.samples] == [
        (tmp_path / "c.png", 1), (tmp_path / "elsewhere" / "b.png", 1), (tmp_path / "site" / "a.png", 0)]
    assert labelled.root == (tmp_path / "site").resolve()


@pytest.mark.parametrize("text, expected", [
    ("file,diagnosis\na.png,0\n", "no 'path' or 'label' column in the header row (found file,diagnosis"),
    ("path\na.png\n", "no 'label' column"),
    ("", "empty file"),
    ("path,label\nnothing.png,0\n", "no usable row (1 read, 1 left out; the first: "),
    ("path,label\n\"a.png,0\n", "not a readable CSV row"),
])
def test_a_csv_that_cannot_be_used_is_one_error_naming_the_file(tmp_path, text, expected):
    site = tmp_path / "site.csv"
    site.write_text(text)
    with pytest.raises(DatasetError) as info:
        read_labelled(site)
    message = str(info.value)
    assert message.startswith(str(site)) and expected in message and "\n" not in message


def test_a_csv_in_another_encoding_is_refused_naming_it(tmp_path):
    (tmp_path / "site.csv").write_bytes("path,label\nr\xe9sum\xe9.png,0\n".encode("latin-1"))
    with pytest.raises(DatasetError, match="not a UTF-8 text file"):
        read_labelled(tmp_path / "site.csv")


def test_a_labelled_folder_is_walked_recursively_hidden_files_skipped_other_files_reported(tmp_path):
    site = tmp_path / "site"
    save_gray(site / "normal" / "a.png", synthetic_xray(64, 1))
    write_dicom(site / "normal" / "deep" / "0001", picture(2, 0), None)  # PACS export: no suffix
    save_gray(site / "Pneumonia" / "b.jpeg", synthetic_xray(64, 3, opacity=0.5), "RGB")
    (site / "Pneumonia" / ".b.jpeg").write_bytes(b"hidden")
    (site / "Pneumonia" / "notes.txt").write_text("reported")
    labelled = read_labelled(site)
    assert [(s.path.relative_to(site.resolve()).as_posix(), s.label) for s in labelled.samples] == [
        ("Pneumonia/b.jpeg", 1), ("normal/a.png", 0), ("normal/deep/0001", 0)]
    assert labelled.problems == [f"{site}: 1 file(s) under NORMAL and PNEUMONIA not taken: not an image file name "
                                 "(.txt 1)"]


def test_the_forms_are_told_apart_and_each_opens_its_source(tmp_path, tiny_dataset):
    save_gray(tmp_path / "site" / "NORMAL" / "a.png", synthetic_xray(64, 1))
    (tmp_path / "site" / "PNEUMONIA").mkdir()
    assert is_labelled_set(tmp_path / "site") and is_labelled_set(tmp_path / "missing.csv")
    assert not is_labelled_set(tiny_dataset) and not is_labelled_set(tmp_path / "x.npz")
    assert isinstance(open_source(tmp_path / "site"), LabelsSource)
    assert isinstance(open_source(tmp_path / "site.csv"), LabelsSource)
    assert open_source(tmp_path / "site.csv").root == tmp_path.resolve()
    assert isinstance(open_source(tiny_dataset), FolderSource)
    assert isinstance(open_source(tmp_path / "x.npz"), MedMNISTSource)
    with pytest.raises(DatasetError, match="needs NORMAL and PNEUMONIA folders directly inside"):
        read_labelled(tiny_dataset)


def test_patients_come_from_the_csv_then_the_dicom_header_then_the_file_name_as_opaque_labels(tmp_path):
    write_dicom(tmp_path / "a.dcm", picture(1, 0), f"{SECRET}-1")
    write_dicom(tmp_path / "b", picture(2, 0), f"{SECRET}-1")  # the same patient, no suffix
    write_dicom(tmp_path / "c.dcm", picture(3, 1), f"{SECRET}-2")
    write_dicom(tmp_path / "d.dcm", picture(4, 1), None)  # no PatientID: its own patient
    write_dicom(tmp_path / "e.dcm", picture(5, 1), f"{SECRET}-2")  # the CSV's patient_id wins over the header
    save_gray(tmp_path / "person7_virus_1.jpeg", synthetic_xray(64, 6, opacity=0.5), "RGB")
    save_gray(tmp_path / "person7_virus_2.jpeg", synthetic_xray(64, 7, opacity=0.5), "RGB")
    save_gray(tmp_path / "scan.png", synthetic_xray(64, 8))
    rows = [["a.dcm", "0", ""], ["b", "0", ""], ["c.dcm", "1", ""], ["d.dcm", "1", ""], ["e.dcm", "1", "ward-9"],
            ["person7_virus_1.jpeg", "1", ""], ["person7_virus_2.jpeg", "1", ""], ["scan.png", "0", ""]]
    labelled = read_labelled(write_csv(tmp_path / "site.csv", rows, header=("path", "label", "Patient_ID")))
    patient = {s.path.name: s.patient for s in labelled.samples}
    assert patient == {"a.dcm": "dicom-patient-0001", "b": "dicom-patient-0001", "c.dcm": "dicom-patient-0002",
                       "d.dcm": "d.dcm", "e.dcm": "csv-patient-0001", "person7_virus_1.jpeg": "person7",
                       "person7_virus_2.jpeg": "person7", "scan.png": "scan.png"}
    assert labelled.patients == 6
    assert SECRET not in repr(labelled)


def test_an_odd_patient_id_is_read_without_a_warning_or_log_line_that_could_carry_it(tmp_path, caplog):
    odd = f"{SECRET}-" + "9" * 70  # longer than LO allows: pydicom's validation would warn about the value
    with pytest.warns(UserWarning):  # (writing it warns; reading must not)
        write_dicom(tmp_path / "a.dcm", picture(1, 0), odd)
        write_dicom(tmp_path / "b.dcm", picture(2, 1), odd)
    caplog.clear()
    with caplog.at_level(logging.DEBUG), warnings.catch_warnings():
        warnings.simplefilter("error")
        labelled = read_labelled(write_csv(tmp_path / "site.csv", [["a.dcm", "0"], ["b.dcm", "1"]]))
    assert [s.patient for s in labelled.samples] == ["dicom-patient-0001"] * 2
    assert SECRET not in caplog.text


def test_a_patient_split_keeps_every_dicom_patient_on_one_side(tmp_path):
    rows = []
    for patient in range(12):
        for image in range(2):  # two studies per patient, named so that nothing but the header links them
            label = patient % 2
            name = f"scans/{patient * 2 + image:03d}.dcm"
            write_dicom(tmp_path / name, picture(patient * 2 + image, label), f"{SECRET}-{patient}")
            rows.append([name, str(label)])
    labelled = read_labelled(write_csv(tmp_path / "site.csv", rows))
    assert labelled.patients == 12
    for seed in range(5):
        train, val = patient_split(labelled.samples, 0.2, seed)
        assert {s.patient for s in train}.isdisjoint({s.patient for s in val})
        assert {s.label for s in val} == {0, 1}


def test_require_refuses_too_few_or_one_class_naming_what_was_left_out(tmp_path):
    rows = generated_site(tmp_path, 2, 0) + [["img/gone.png", "0"]]
    labelled = read_labelled(write_csv(tmp_path / "site.csv", rows))
    with pytest.raises(DatasetError) as info:
        require(labelled, 25, "nothing written")
    assert str(info.value) == (f"{tmp_path / 'site.csv'}: 2 usable rows of 3 (1 left out); at least 25 "
                               "needed: nothing written")
    with pytest.raises(DatasetError, match="usable rows are all NORMAL .2, no PNEUMONIA.*both classes needed"):
        require(labelled, 2)
    both = read_labelled(write_csv(tmp_path / "both.csv", generated_site(tmp_path, 2, 1)))
    require(both, 3)  # enough, both classes: no error


# --- the commands refuse before any work ---------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["train", "evaluate", "adapt"])
def test_too_few_usable_rows_are_refused_with_exit_2_and_nothing_written(tmp_path, capsys, tiny_model_path,
                                                                          command):
    rows = generated_site(tmp_path, 1, 0) + [["img/gone.png", "1"], ["img/n000.png", "maybe"]]
    site = write_csv(tmp_path / "site.csv", rows)
    out = tmp_path / "out"
    args = {"train": ["train", "--data", str(site), "--out", str(out), "--pretrained", "none", "--quiet"],
            "evaluate": ["evaluate", "--model", str(tiny_model_path), "--data", str(site), "--json", str(out)],
            "adapt": ["adapt", "--model", str(tiny_model_path), "--data", str(site), "--out", str(out)]}[command]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[:2] == [f"pneumoscan: left out: {site}:3: img/gone.png: file not found",
                       f"pneumoscan: left out: {site}:4: img/n000.png: label 'maybe' is not NORMAL, PNEUMONIA, 0 or 1"]
    assert len(err) == 3 and err[2].startswith(f"pneumoscan: error: {site}: ")
    assert "1 usable rows of 3 (2 left out)" in err[2] or "all NORMAL" in err[2]
    assert not out.exists()


def test_evaluate_refuses_an_official_split_name_for_labelled_data(tmp_path, capsys, tiny_model_path):
    site = write_csv(tmp_path / "site.csv", generated_site(tmp_path, 2, 2))
    assert main(["evaluate", "--model", str(tiny_model_path), "--data", str(site), "--split", "test"]) == 2
    assert "has no 'test' split: all of it is scored as the 'site' split" in capsys.readouterr().err


def test_data_summary_of_a_csv_counts_classes_and_patients_and_lists_the_rows_left_out(tmp_path, capsys):
    rows = generated_site(tmp_path, 2, 3) + [["img/gone.png", "1"]]
    write_dicom(tmp_path / "img" / "x.dcm", picture(9, 1), f"{SECRET}-1")
    write_dicom(tmp_path / "img" / "y.dcm", picture(10, 1), f"{SECRET}-1")
    rows += [["img/x.dcm", "1"], ["img/y.dcm", "PNEUMONIA"]]
    site = write_csv(tmp_path / "site.csv", rows)
    assert main(["data", "summary", str(site)]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    normal = next(line for line in lines if line.startswith("site   NORMAL")).split()
    pneumonia = next(line for line in lines if line.startswith("site   PNEUMONIA")).split()
    assert normal[2:4] == ["2", "2"] and pneumonia[2:4] == ["5", "4"]  # x.dcm and y.dcm: one patient
    assert "MONOCHROME2 8-bit 2" in out
    assert f"{site}: 7 usable of 8 rows, 6 patients; 1 left out:" in lines
    assert lines[-1] == f"left out: {site}:7: img/gone.png: file not found"
    assert SECRET not in out


# --- real X-rays end to end ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def real_site(tmp_path_factory) -> Path:
    """site.csv over 30 real test-split X-rays (the smallest files, 14 NORMAL and 16 PNEUMONIA); the first four
    of each class written as DICOM (two without a suffix) under neutral names, pairs sharing a PatientID; two bad
    rows."""
    from conftest import KERMANY

    if not KERMANY.is_dir():  # as the kermany fixture: missing data fails under CI instead of silently skipping
        if os.environ.get("CI"):
            pytest.fail(f"{KERMANY} is missing: integration tests need ../shared/data in CI")
        pytest.skip(f"{KERMANY} not present")
    root = tmp_path_factory.mktemp("real_site")
    rows = []
    for label, (name, n) in enumerate((("NORMAL", 14), ("PNEUMONIA", 16))):
        files = sorted((KERMANY / "test" / name).glob("*.jpeg"), key=lambda p: (p.stat().st_size, p.name))[:n]
        for i, jpeg in enumerate(files):
            if i < 4:
                with Image.open(jpeg) as im:
                    pixels = np.asarray(im.convert("L"))
                item = f"scans/{name[0]}{i:02d}" + (".dcm" if i % 2 else "")
                write_dicom(root / item, pixels, f"{SECRET}-{name}-{i // 2}")
            else:
                item = f"scans/{jpeg.name}"
                (root / "scans").mkdir(exist_ok=True)
                shutil.copy(jpeg, root / item)
            rows.append([item, name if i % 2 else str(label)])
    rows += [["scans/missing.jpeg", "1"], ["scans/N00", "maybe"]]
    write_csv(root / "site.csv", rows)
    return root / "site.csv"


def _no_secret(*texts: str, folder: Path | None = None) -> None:
    for text in texts:
        assert SECRET not in text
    for path in (folder.rglob("*") if folder is not None else ()):
        if path.is_file():
            assert SECRET.encode() not in path.read_bytes(), path


LEFT_OUT = ["pneumoscan: left out: {site}:32: scans/missing.jpeg: file not found",
            "pneumoscan: left out: {site}:33: scans/N00: label 'maybe' is not NORMAL, PNEUMONIA, 0 or 1"]


@pytest.fixture(scope="module")
def trained_on_csv(real_site, tmp_path_factory):
    """`pneumoscan train` in the quick mode on the labels CSV: (run folder, stdout, stderr, log records)."""
    run = tmp_path_factory.mktemp("runs") / "site"
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep(level=logging.DEBUG)
    logging.getLogger().addHandler(handler)
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(["train", "--data", str(real_site), "--out", str(run), "--config",
                         str(Path(__file__).resolve().parents[1] / "configs" / "quick.yaml"),
                         "--pretrained", "none", "--batch-size", "8", "--quiet"])
    finally:
        logging.getLogger().removeHandler(handler)
    assert code == 0, err.getvalue()
    return run, out.getvalue(), err.getvalue(), "\n".join(records)


@pytest.mark.integration
@pytest.mark.slow
def test_train_on_a_labels_csv_keeps_dicom_patients_together_and_never_writes_their_ids(real_site, trained_on_csv):
    run, out, err, logs = trained_on_csv
    assert out.strip() == str(run / "model.safetensors")
    assert err.splitlines()[:2] == [line.format(site=real_site) for line in LEFT_OUT]
    lines = (run / "split.csv").read_text().splitlines()
    assert lines[1:3] == ["# source: labels", f"# root: {real_site.parent.resolve()}"]
    rows = list(csv.DictReader(lines[3:]))
    assert len(rows) == 30 and {r["subset"] for r in rows} == {"train", "val"}
    by_path = {r["path"]: r for r in rows}
    for a, b in (("N00", "N01.dcm"), ("N02", "N03.dcm"), ("P00", "P01.dcm"), ("P02", "P03.dcm")):
        first, second = by_path[f"scans/{a}"], by_path[f"scans/{b}"]
        assert first["patient"] == second["patient"] and first["patient"].startswith("dicom-patient-")
        assert first["subset"] == second["subset"]
    _no_secret(out, err, logs, folder=run)
    train, val = RunFolder(run).split()
    assert len(train) + len(val) == 30 and all(s.path.is_file() for s in train + val)


@pytest.mark.integration
@pytest.mark.slow
def test_evaluate_validation_of_a_run_trained_on_a_labels_csv(real_site, trained_on_csv, tmp_path, capsys):
    run = trained_on_csv[0]
    assert main(["evaluate", "--model", str(run), "--data", str(real_site), "--split", "validation",
                 "--json", str(tmp_path / "v.json")]) == 0
    result = json.loads((tmp_path / "v.json").read_text())
    val = RunFolder(run).split()[1]
    assert result["split"] == "validation" and result["n"] + sum(result["refused_counts"].values()) == len(val)
    assert result["left_out"] == []
    _no_secret(*capsys.readouterr())


@pytest.mark.integration
def test_evaluate_scores_a_labels_csv_whole_as_the_site_split_with_the_patient_bootstrap(
        real_site, tiny_model_path, tmp_path, capsys):
    assert main(["evaluate", "--model", str(tiny_model_path), "--data", str(real_site),
                 "--json", str(tmp_path / "e.json")]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines() == [line.format(site=real_site) for line in LEFT_OUT]
    assert ", site split: 30 images" in out.splitlines()[0]
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["split"] == "site" and result["n"] == 30
    assert result["left_out"] == [line.format(site=real_site).removeprefix("pneumoscan: left out: ")
                                  for line in LEFT_OUT]
    patients = read_labelled(real_site).patients
    assert result["intervals"]["groups"] == patients < 30  # four DICOM pairs, Kermany persons with two images
    _no_secret(out, err, (tmp_path / "e.json").read_text())


@pytest.mark.integration
def test_adapt_on_a_labels_csv_refits_on_its_usable_rows(real_site, tiny_model_path, tmp_path, capsys):
    out_file = tmp_path / "site.safetensors"
    assert main(["adapt", "--model", str(tiny_model_path), "--data", str(real_site), "--out", str(out_file),
                 "--sensitivity", "0.8"]) == 0
    out, err = capsys.readouterr()
    assert err.splitlines()[:2] == [line.format(site=real_site) for line in LEFT_OUT]
    from pneumoscan import load_model

    step = load_model(out_file).record.adaptation["labelled"]
    assert step["images"] == 30 and step["counts"] == [14, 16]
    _no_secret(out, err)
    assert SECRET.encode() not in out_file.read_bytes()
