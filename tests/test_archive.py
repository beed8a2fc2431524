"""Screening an archive (issue 18): rows survive a SIGKILL, --resume finishes the run with exactly the rows of an
uninterrupted one and refuses other settings (calibration options included), every row says how it was made (CSV
and Parquet), every file follows the umask, and bad input is one line each."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import KERMANY, make_model_file, save_gray, synthetic_xray

from pneumoscan.archive import JOURNAL_FORMAT, journal_path, read_journal
from pneumoscan.cli import main

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def write_dicom(path: Path, pixels: np.ndarray, **elements) -> Path:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    cr = "1.2.840.10008.5.1.4.1.1.1"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = cr
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = cr
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "CR"
    ds.Rows, ds.Columns = pixels.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    for key, value in elements.items():
        setattr(ds, key, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def build_archive(root: Path, n_synthetic: int = 20, n_real: int = 6) -> Path:
    """A folder like an archive export: generated X-rays, real test-split X-rays (when present), DICOM files
    (one without a suffix), a blank image (not_xray), a broken and an empty file (error rows)."""
    folder = root / "archive"
    for i in range(n_synthetic):
        save_gray(folder / "gen" / f"x{i:03d}.png", synthetic_xray(64, seed=i, opacity=0.4 * (i % 2)))
    if KERMANY.is_dir():
        def smallest(label, n):  # the quickest to decode: this test is about rows, not pixels
            return sorted((KERMANY / "test" / label).iterdir(), key=lambda p: (p.stat().st_size, p.name))[:n]

        real = smallest("PNEUMONIA", n_real // 2) + smallest("NORMAL", n_real - n_real // 2)
        for path in real:
            (folder / "real").mkdir(parents=True, exist_ok=True)
            (folder / "real" / path.name).symlink_to(path)
    picture = np.round(synthetic_xray(64, seed=99) * 255).astype(np.uint8)
    write_dicom(folder / "dicom" / "a.dcm", picture)
    write_dicom(folder / "dicom" / "IMG0002", np.round(synthetic_xray(64, seed=98) * 255).astype(np.uint8))
    save_gray(folder / "odd" / "blank.png", np.zeros((64, 64), np.float32))
    (folder / "odd" / "broken.png").write_text("not an image")
    (folder / "odd" / "empty.jpeg").write_bytes(b"")
    return folder


def csv_rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def parquet_rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    return build_archive(tmp_path_factory.mktemp("archive"))


@pytest.fixture(scope="module")
def reference(archive, tiny_model_path, tmp_path_factory) -> dict:
    """An uninterrupted run, in process: the rows every other run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    code = main(["predict", str(archive), "--model", str(tiny_model_path), "--csv", str(out / "r.csv"), "--out",
                 str(out / "r.parquet"), "--quiet", "--batch-size", "1", "--precision", "float32"])
    assert code == 1  # the broken and the empty file
    assert not journal_path(out / "r.parquet").exists()
    return {"csv": csv_rows(out / "r.csv"), "parquet": parquet_rows(out / "r.parquet")}


# --- what an uninterrupted run writes ------------------------------------------------------------------------

def test_csv_and_parquet_hold_the_same_rows_with_sha256_and_dicom_uids(reference, archive, tiny_model_path):
    from pneumoscan.modelfile import sha256_file

    rows, table = reference["csv"], reference["parquet"]
    assert [r["path"] for r in rows] == [r["path"] for r in table]
    assert len(rows) == len({r["path"] for r in rows}) == len(list(p for p in archive.rglob("*") if p.is_file()))
    statuses = {Path(r["path"]).name: r["status"] for r in rows}
    assert statuses["blank.png"] == "not_xray" and statuses["broken.png"] == statuses["empty.jpeg"] == "error"
    facts = ["input_mean", "input_std", "width", "height", "format", "modality", "manufacturer", "view",
             "photometric", "age_band"]  # pipeline.Screened.facts(), beyond status, probability, guard_score
    assert list(table[0]) == ["path", "probability", "decision", "threshold", "status", "message", "model_sha256",
                              "study_instance_uid", "series_instance_uid", "sop_instance_uid",  # old columns first
                              "operating_point", "prevalence", "temperature", "bias", *facts, "guard_score",
                              "heatmap"]
    assert list(rows[0]) == ["path", "probability", "decision", "threshold", "status", "message",
                             "operating_point", "prevalence", "temperature", "bias", "model_sha256", *facts,
                             "guard_score", "heatmap"]
    sha = sha256_file(tiny_model_path)
    for c, p in zip(rows, table, strict=True):
        assert p["model_sha256"] == c["model_sha256"] == sha
        assert p["operating_point"] == c["operating_point"] == "screening"
        assert p["prevalence"] is None and c["prevalence"] == ""  # none given
        assert p["temperature"] == float(c["temperature"]) == 1.5  # the fixture's calibration, exactly
        assert p["bias"] == float(c["bias"]) == 0.0
        assert (c["status"], c["message"], c["decision"]) == (p["status"], p["message"], p["decision"] or "")
        assert c["probability"] == ("" if p["probability"] is None else f"{p['probability']:.6f}")
        assert float(c["threshold"]) == pytest.approx(p["threshold"], abs=1e-6)
        # the guard's distance, which the drift monitor's guard test reads: exactly the same figure in both files
        assert c["guard_score"] == ("" if p["guard_score"] is None else repr(p["guard_score"]))
        if p["status"] in ("ok", "error"):  # scored: a distance; unreadable: none
            assert (p["guard_score"] is not None) == (p["status"] == "ok")
        is_dicom = "/dicom/" in p["path"]
        assert all((p[k] is not None) == is_dicom for k in ("study_instance_uid", "series_instance_uid",
                                                            "sop_instance_uid"))
    by_name = {Path(p["path"]).name: p for p in table}
    assert by_name["a.dcm"]["format"] == "dicom" and by_name["a.dcm"]["modality"] == "CR"
    assert (by_name["x000.png"]["width"], by_name["x000.png"]["format"]) == (64, "png")
    assert 0 < by_name["x000.png"]["input_mean"] < 1 and by_name["x000.png"]["modality"] is None
    assert all(by_name["broken.png"][k] is None for k in facts)  # unreadable: nothing known
    from pneumoscan import pipeline

    every = pipeline.Screened(pipeline.Prediction("x", None, None, "screening", 0.5, "error")).facts()
    assert set(facts) == set(every) - {"status", "probability", "guard_score"}  # a new fact needs its column
    dicom = {Path(p["path"]).name: p for p in table if "/dicom/" in p["path"]}
    import pydicom

    header = pydicom.dcmread(archive / "dicom" / "a.dcm", stop_before_pixels=True)
    assert dicom["a.dcm"]["study_instance_uid"] == header.StudyInstanceUID
    assert dicom["a.dcm"]["series_instance_uid"] == header.SeriesInstanceUID
    assert dicom["a.dcm"]["sop_instance_uid"] == header.SOPInstanceUID


# --- SIGKILL, then --resume ----------------------------------------------------------------------------------

def _journal_rows(path: Path) -> int:
    try:
        return max(0, path.read_bytes().count(b"\n") - 1)
    except FileNotFoundError:
        return -1


def _kill_after(argv: list[str], rows: int, timeout: float = 240) -> int | None:
    """Start a real `pneumoscan predict`, SIGKILL it once it has printed ``rows`` rows (a row is in the journal
    before it is printed; stdout unbuffered, so each line is an event as it happens); the run's journal rows at
    the kill, or None when the run ended first."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env)
    timer = threading.Timer(timeout, proc.kill)  # a run that hangs fails the test instead of blocking it
    timer.start()
    try:
        for printed, _ in enumerate(proc.stdout, 1):  # blocks until the next row is printed, or the run ends
            if printed >= rows:
                proc.send_signal(signal.SIGKILL)
                proc.wait(30)
                return printed
        proc.wait(30)
        assert not timer.finished.is_set(), "the run never reached the kill point"
        return None
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
        proc.stdout.close()


@pytest.mark.slow
def test_sigkill_at_several_moments_then_resume_gives_the_uninterrupted_rows(archive, tiny_model_path, reference,
                                                                           tmp_path):
    out_csv, out_pq = tmp_path / "res" / "r.csv", tmp_path / "res" / "r.parquet"
    journal = journal_path(out_pq)
    argv = [sys.executable, "-m", "pneumoscan.cli", "predict", str(archive), "--model", str(tiny_model_path),
            "--out", str(out_pq), "--csv", str(out_csv), "--quiet", "--batch-size", "1", "--precision", "float32"]
    total = len(reference["csv"])
    killed_at = []
    for i, rows in enumerate((1, 5, total // 2 + 3)):  # at the first row, early, past the middle
        at = _kill_after(argv + (["--resume"] if i else []), rows)
        if at is None:
            break  # everything left was scored before the kill point: the checks below still judge the run
        killed_at.append(at)
        assert not out_csv.exists() and not out_pq.exists()  # nothing at the final names before the end
        settings, kept = read_journal(journal)
        assert settings["format"] == JOURNAL_FORMAT and _journal_rows(journal) >= len(kept) >= rows
    assert len(killed_at) >= 2, killed_at  # at least two real kills mid-run
    if not out_csv.exists():
        proc = subprocess.run(argv + ["--resume"], capture_output=True, text=True, timeout=300)
        assert proc.returncode == 1, proc.stderr  # as uninterrupted: two files could not be read
        assert "Traceback" not in proc.stderr
        assert "pneumoscan: 2 file(s) could not be read" in proc.stderr
    assert not journal.exists()
    assert csv_rows(out_csv) == reference["csv"]  # same rows, same order, same figures: none lost, none doubled
    assert parquet_rows(out_pq) == reference["parquet"]


def test_a_torn_last_line_is_dropped_and_rescored(archive, tiny_model_path, reference, tmp_path, capsys):
    out = tmp_path / "r.csv"
    args = ["predict", str(archive), "--model", str(tiny_model_path), "--csv", str(out), "--quiet",
            "--batch-size", "1", "--precision", "float32"]
    # rebuild the journal a killed run leaves: settings, 7 complete rows, half of the 8th
    from pneumoscan.archive import run_settings
    from pneumoscan.predict import load_model

    model = load_model(tiny_model_path, precision="float32")
    journal = journal_path(out)
    settings = {"format": JOURNAL_FORMAT, **run_settings(model, "screening", False)}
    from pneumoscan.archive import predict_local
    from pneumoscan.cli import Inputs

    files = Inputs([str(archive)]).files
    rows = [row for _, row in predict_local(model, files[:8], batch_size=1)]
    text = json.dumps(settings) + "\n" + "".join(json.dumps(r) + "\n" for r in rows[:7])
    journal.write_text(text + json.dumps(rows[7])[:40])
    assert read_journal(journal)[1] == rows[:7]
    assert main([a for a in args if a != "--quiet"] + ["--resume"]) == 1
    assert "resuming: 7 row(s) kept" in capsys.readouterr().err
    assert csv_rows(out) == reference["csv"]


def test_resume_rescores_a_file_that_changed_and_drops_a_file_that_left(tmp_path, tiny_model_path, capsys):
    folder = tmp_path / "in"
    for i in range(4):
        save_gray(folder / f"x{i}.png", synthetic_xray(64, seed=i))
    out = tmp_path / "r.csv"
    args = ["predict", str(folder), "--model", str(tiny_model_path), "--csv", str(out), "--quiet"]
    assert main(args) == 0
    first = {r["path"]: r for r in csv_rows(out)}
    # a journal holding all four rows, as if the run died just before the final rename
    from pneumoscan.archive import predict_local, run_settings
    from pneumoscan.predict import load_model

    model = load_model(tiny_model_path)
    files = sorted(folder.iterdir())
    rows = [row for _, row in predict_local(model, files, batch_size=4)]
    journal = journal_path(out)
    journal.write_text(json.dumps({"format": JOURNAL_FORMAT, **run_settings(model, "screening", False)}) + "\n"
                       + "".join(json.dumps(r) + "\n" for r in rows))
    save_gray(folder / "x1.png", synthetic_xray(64, seed=41, opacity=0.8))  # changed: size/mtime differ
    os.utime(folder / "x1.png", ns=(1, 1))
    (folder / "x3.png").unlink()  # gone from the folder: its row must go too
    assert main([a for a in args if a != "--quiet"] + ["--resume"]) == 0
    assert "resuming: 2 row(s) kept" in capsys.readouterr().err
    now = {r["path"]: r for r in csv_rows(out)}
    assert sorted(Path(p).name for p in now) == ["x0.png", "x1.png", "x2.png"]
    assert now[str(folder / "x0.png")] == first[str(folder / "x0.png")]
    fresh = model.predict(folder / "x1.png")
    assert float(now[str(folder / "x1.png")]["probability"]) == pytest.approx(fresh.probability, abs=1e-6)


# --- bad input -----------------------------------------------------------------------------------------------

def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


def _interrupted_journal(tmp_path, folder, model_path, out, threshold="screening", **options) -> Path:
    """A run killed after its first rows (in process: the journal a SIGKILL leaves behind); ``options``: of
    ``load_model``, as the command line passes them (prevalence, max_pixels)."""
    from pneumoscan.archive import ArchiveWriter, predict_local, run_settings
    from pneumoscan.predict import load_model

    model = load_model(model_path, **options)
    files = sorted(folder.iterdir())
    writer = ArchiveWriter([(out, "csv")], model, run_settings(model, threshold, False), files).open()
    for _, row in predict_local(model, files[:2], threshold=threshold, batch_size=2):
        writer.add(row)
    writer.journal.close()
    return journal_path(out)


@pytest.fixture
def small(tmp_path) -> Path:
    for i in range(3):
        save_gray(tmp_path / "in" / f"x{i}.png", synthetic_xray(64, seed=i))
    return tmp_path / "in"


def test_resume_with_another_model_is_refused_naming_both_sha256(tmp_path, small, tiny_model_path, capsys):
    from pneumoscan.modelfile import sha256_file

    out = tmp_path / "r.csv"
    journal = _interrupted_journal(tmp_path, small, tiny_model_path, out)
    before = journal.read_bytes()
    other = make_model_file(tmp_path / "other.safetensors", seed=1)
    code = main(["predict", str(small), "--model", str(other), "--csv", str(out), "--resume", "--quiet"])
    line = _one_error_line(capsys)
    assert code == 2
    assert line.startswith(f"pneumoscan: error: {journal}: cannot resume: its rows were written by model ")
    assert sha256_file(tiny_model_path) in line and sha256_file(other) in line
    assert journal.read_bytes() == before and not out.exists()  # nothing lost


def test_resume_with_another_threshold_is_refused(tmp_path, small, tiny_model_path, capsys):
    out = tmp_path / "r.csv"
    journal = _interrupted_journal(tmp_path, small, tiny_model_path, out)
    code = main(["predict", str(small), "--model", str(tiny_model_path), "--csv", str(out), "--resume",
                 "--threshold", "balanced", "--quiet"])
    assert code == 2 and "cannot resume" in _one_error_line(capsys) and journal.exists()


CALIBRATION_CHANGES = [  # (options of the interrupted run, of the resume, what the refusal says)
    ({"prevalence": 0.3}, ["--prevalence", "0.6"], "with --prevalence 0.3, this run has --prevalence 0.6; use the "
                                                   "same --prevalence"),
    ({"prevalence": 0.3}, [], "with --prevalence 0.3, this run has no --prevalence; use the same --prevalence"),
    ({}, ["--prevalence", "0.3"], "with no --prevalence, this run has --prevalence 0.3; use the same --prevalence"),
    ({"max_pixels": 50_000_000}, ["--max-megapixels", "20"],
     "with --max-megapixels 50, this run has --max-megapixels 20; use the same --max-megapixels"),
    # a numeric threshold does not move with the prevalence: only the recorded prevalence tells the runs apart
    ({"prevalence": 0.3, "threshold": "0.4"}, ["--threshold", "0.4", "--prevalence", "0.6"],
     "with --prevalence 0.3, this run has --prevalence 0.6; use the same --prevalence"),
]


@pytest.mark.parametrize("first, then, says", CALIBRATION_CHANGES)
def test_resume_with_other_calibration_options_is_refused_naming_the_option(tmp_path, small, tiny_model_path,
                                                                            capsys, first, then, says):
    out = tmp_path / "r.csv"
    journal = _interrupted_journal(tmp_path, small, tiny_model_path, out, **first)
    before = journal.read_bytes()
    code = main(["predict", str(small), "--model", str(tiny_model_path), "--csv", str(out), "--resume", "--quiet",
                 *then])
    assert code == 2
    assert _one_error_line(capsys) == (f"pneumoscan: error: {journal}: cannot resume: its rows were written {says}, "
                                       "or remove the file to start again")
    assert journal.read_bytes() == before and not out.exists()  # nothing mixed, nothing lost


def test_resume_with_the_same_prevalence_finishes_and_every_row_says_how_it_was_made(tmp_path, small,
                                                                                     tiny_model_path, capsys):
    from pneumoscan.predict import load_model

    out, out_pq = tmp_path / "r.csv", tmp_path / "r.parquet"
    journal = _interrupted_journal(tmp_path, small, tiny_model_path, out, prevalence=0.3)
    journal.rename(journal_path(out_pq))  # the journal sits beside the first destination, --out
    assert main(["predict", str(small), "--model", str(tiny_model_path), "--out", str(out_pq), "--csv", str(out),
                 "--resume", "--prevalence", "0.3"]) == 0
    assert "resuming: 2 row(s) kept" in capsys.readouterr().err
    model = load_model(tiny_model_path, prevalence=0.3)
    assert model.bias != 0.0  # re-based: the arithmetic differs from the file's
    for c, p in zip(csv_rows(out), parquet_rows(out_pq), strict=True):
        assert c["prevalence"] == "0.3" and p["prevalence"] == 0.3
        assert float(c["bias"]) == p["bias"] == model.bias and float(c["temperature"]) == p["temperature"] == 1.5
        assert c["model_sha256"] == p["model_sha256"] == model.sha256
        assert float(c["threshold"]) == pytest.approx(model.thresholds["screening"], abs=1e-6)


def test_a_journal_of_an_older_version_is_refused_not_mixed(tmp_path, small, tiny_model_path, capsys):
    out = tmp_path / "r.csv"
    journal = _interrupted_journal(tmp_path, small, tiny_model_path, out)
    lines = journal.read_text().splitlines(keepends=True)
    old = json.loads(lines[0])
    for key in ("prevalence", "max_pixels", "temperature", "bias"):  # what format 1 did not record
        del old[key]
    journal.write_text(json.dumps({**old, "format": "pneumoscan-journal/1"}) + "\n" + "".join(lines[1:]))
    code = main(["predict", str(small), "--model", str(tiny_model_path), "--csv", str(out), "--resume", "--quiet"])
    assert code == 2
    assert _one_error_line(capsys) == (f"pneumoscan: error: {journal}: cannot resume: written by another pneumoscan "
                                       "version (pneumoscan-journal/1), which did not record --prevalence and "
                                       "--max-megapixels; remove it to start again")


@pytest.mark.parametrize("then, says", [(["--prevalence", "0.6"], "--prevalence 0.3, this run has --prevalence 0.6"),
                                        ([], "--prevalence 0.3, this run has no --prevalence")])
def test_engine_ray_resume_of_parts_with_another_prevalence_is_refused_before_ray_starts(
        tmp_path, small, tiny_model_path, capsys, then, says):
    pytest.importorskip("ray")
    from pneumoscan.archive import RayParquetFolder, parts_path, run_settings
    from pneumoscan.predict import load_model

    model = load_model(tiny_model_path, prevalence=0.3)
    dest = tmp_path / "r.parquet"
    RayParquetFolder(dest, run_settings(model, "screening", False), sorted(small.iterdir())).open()
    before = sorted(os.listdir(parts_path(dest)))
    code = main(["predict", str(small), "--model", str(tiny_model_path), "--engine", "ray", "--out", str(dest),
                 "--resume", "--quiet", *then])
    assert code == 2
    assert _one_error_line(capsys) == (f"pneumoscan: error: {parts_path(dest)}: cannot resume: its rows were written "
                                       f"with {says}; use the same --prevalence, or remove the file to start again")
    assert sorted(os.listdir(parts_path(dest))) == before and not dest.exists()


@pytest.mark.parametrize("umask, mode", [(0o077, 0o600), (0o022, 0o644)])
def test_every_file_of_a_run_follows_the_umask(tmp_path, small, tiny_model_path, monkeypatch, capsys, umask, mode):
    """The journal of an interrupted run, then the final CSV and Parquet: the umask's mode, no exceptions."""
    from pneumoscan import pipeline

    original = pipeline.screen

    def interrupted(*args, **kwargs):
        for n, screened in enumerate(original(*args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt
            yield screened

    out = tmp_path / "out"
    args = ["predict", str(small), "--model", str(tiny_model_path), "--out", str(out / "r.parquet"), "--csv",
            str(out / "r.csv"), "--quiet"]
    previous = os.umask(umask)
    try:
        monkeypatch.setattr(pipeline, "screen", interrupted)
        assert main(args) == 130
        assert os.listdir(out) == ["r.parquet.partial"]
        assert oct(os.stat(out / "r.parquet.partial").st_mode & 0o777) == oct(mode)
        monkeypatch.setattr(pipeline, "screen", original)
        assert main([*args, "--resume"]) == 0
    finally:
        os.umask(previous)
    assert {name: oct(os.stat(out / name).st_mode & 0o777) for name in os.listdir(out)} == {
        "r.csv": oct(mode), "r.parquet": oct(mode)}


def test_a_new_run_does_not_overwrite_partial_results(tmp_path, small, tiny_model_path, capsys):
    out = tmp_path / "r.csv"
    journal = _interrupted_journal(tmp_path, small, tiny_model_path, out)
    before = journal.read_bytes()
    assert main(["predict", str(small), "--model", str(tiny_model_path), "--csv", str(out), "--quiet"]) == 2
    assert _one_error_line(capsys) == (f"pneumoscan: error: {journal}: partial results of an interrupted run "
                                       "(2 rows) are there: add --resume to continue it, or remove the file to "
                                       "start again")
    assert journal.read_bytes() == before
    assert main(["predict", str(small), "--model", str(tiny_model_path), "--csv", str(out), "--quiet",
                 "--resume"]) == 0
    assert len(csv_rows(out)) == 3 and not journal.exists()


def test_files_that_vanish_between_listing_and_reading_are_error_rows(tmp_path, small, tiny_model_path, capsys,
                                                                    monkeypatch):
    import importlib

    import pneumoscan.cli as cli

    listed = cli.Inputs
    cli = importlib.import_module(listed.__module__)  # where the predict command uses it

    class Vanishing(listed):
        def __init__(self, items):
            super().__init__(items)
            (small / "x1.png").unlink()  # listed, then gone before it is read

    monkeypatch.setattr(cli, "Inputs", Vanishing)
    out = tmp_path / "r.parquet"
    assert main(["predict", str(small), "--model", str(tiny_model_path), "--out", str(out), "--quiet"]) == 1
    rows = {Path(r["path"]).name: r for r in parquet_rows(out)}
    assert rows["x1.png"]["status"] == "error" and rows["x1.png"]["message"] == f"{small / 'x1.png'}: file not found"
    assert rows["x0.png"]["status"] == rows["x2.png"]["status"] == "ok"
    assert _one_error_line(capsys) == "pneumoscan: 1 file(s) could not be read"


def test_out_in_a_missing_folder_is_created(tmp_path, small, tiny_model_path):
    out = tmp_path / "new" / "deeper" / "r.parquet"
    assert main(["predict", str(small), "--model", str(tiny_model_path), "--out", str(out), "--quiet"]) == 0
    assert len(parquet_rows(out)) == 3 and os.listdir(out.parent) == ["r.parquet"]


@pytest.mark.parametrize("engine", ["local", "ray"])  # ray: the folder form, checked before Ray starts
def test_out_in_a_read_only_folder_is_one_line_before_any_work(tmp_path, small, tiny_model_path, capsys,
                                                              monkeypatch, engine):
    import errno
    import tempfile

    if engine == "ray":
        pytest.importorskip("ray")

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    target = tmp_path / "mnt" / "r.parquet"
    code = main(["predict", str(small), "--model", str(tmp_path / "gone.safetensors"), "--out", str(target),
                 "--engine", engine])
    assert code == 2  # the destination fails before the (missing) model is even looked at
    assert _one_error_line(capsys) == (f"pneumoscan: error: {target}: cannot write --out in {tmp_path} "
                                       "(Read-only file system)")
    assert not (tmp_path / "mnt").exists()


@pytest.mark.parametrize("name, message", [
    ("r.txt", "--out must name a .csv or .parquet file"),
    ("folder", "--out names a folder"),
])
def test_out_with_a_wrong_name_is_one_line(tmp_path, small, tiny_model_path, capsys, name, message):
    target = tmp_path / name
    if name == "folder":
        target = tmp_path / "folder.parquet"
        target.mkdir()
    assert main(["predict", str(small), "--model", str(tiny_model_path), "--out", str(target)]) == 2
    assert message in _one_error_line(capsys)


def test_resume_without_a_destination_is_one_line(small, tiny_model_path, capsys):
    assert main(["predict", str(small), "--model", str(tiny_model_path), "--resume"]) == 2
    assert "--resume continues the partial results of --csv or --out" in _one_error_line(capsys)


def test_missing_pyarrow_or_ray_is_one_line_naming_what_to_install(tmp_path, small, tiny_model_path, capsys,
                                                                   monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow -> ImportError
    assert main(["predict", str(small), "--model", str(tiny_model_path), "--out", str(tmp_path / "r.parquet")]) == 2
    assert "--out .parquet needs pyarrow" in _one_error_line(capsys)
    monkeypatch.setitem(sys.modules, "ray", None)
    assert main(["predict", str(small), "--model", str(tiny_model_path), "--engine", "ray"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("pneumoscan: error: --engine ray needs Ray Data and pyarrow") and "[cluster]" in line
    assert os.listdir(tmp_path) == ["in"]


def test_run_stopped_by_an_exception_keeps_its_rows_and_says_how_to_resume(tmp_path, small, tiny_model_path,
                                                                          capsys, monkeypatch):
    from pneumoscan import pipeline

    original = pipeline.screen
    out = tmp_path / "r.csv"

    def interrupted(*args, **kwargs):
        for n, screened in enumerate(original(*args, **kwargs)):
            if n == 2:
                raise KeyboardInterrupt
            yield screened

    monkeypatch.setattr(pipeline, "screen", interrupted)
    args = ["predict", str(small), "--model", str(tiny_model_path), "--csv", str(out), "--quiet"]
    assert main(args) == 130
    err = capsys.readouterr().err
    assert f"pneumoscan: 2 finished row(s) kept in {journal_path(out)}: rerun the same command with --resume" in err
    assert not out.exists()
    monkeypatch.setattr(pipeline, "screen", original)
    assert main(args + ["--resume"]) == 0
    assert [Path(r["path"]).name for r in csv_rows(out)] == ["x0.png", "x1.png", "x2.png"]


def test_resume_with_nothing_to_resume_screens_everything_and_says_so(tmp_path, small, tiny_model_path, capsys):
    out = tmp_path / "r.csv"
    assert main(["predict", str(small), "--model", str(tiny_model_path), "--csv", str(out), "--resume"]) == 0
    assert f"pneumoscan: no {journal_path(out)} to resume: screening every file" in capsys.readouterr().err
    assert len(csv_rows(out)) == 3


def test_engine_ray_with_no_cluster_at_the_address_is_one_line(tmp_path, small, tiny_model_path, capsys,
                                                              monkeypatch):
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray instance is running in this process")
    from ray._private.services import find_gcs_addresses

    if find_gcs_addresses():  # "auto" joins any Ray instance running on this machine (another user's, a benchmark)
        pytest.skip("a Ray instance is running on this machine")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "ray"))  # no cluster of this machine's other users found
    out = tmp_path / "r.parquet"
    code = main(["predict", str(small), "--model", str(tiny_model_path), "--engine", "ray", "--address", "auto",
                 "--out", str(out), "--quiet"])
    assert code == 2
    line = _one_error_line(capsys)
    assert line.startswith("pneumoscan: error: cannot start or join the Ray cluster at --address auto (")
    assert not out.exists() and not journal_path(out).exists()


def test_engine_ray_out_folder_holding_other_things_is_one_line(tmp_path, small, tiny_model_path, capsys):
    pytest.importorskip("ray")
    target = tmp_path / "r.parquet"
    target.mkdir()
    (target / "notes.txt").write_text("mine")
    code = main(["predict", str(small), "--model", str(tiny_model_path), "--engine", "ray", "--out", str(target)])
    assert code == 2
    assert _one_error_line(capsys) == (f"pneumoscan: error: {target}: --out names a folder that holds other "
                                       "things than Parquet files (notes.txt); give a new name")
    assert os.listdir(target) == ["notes.txt"] and sorted(os.listdir(tmp_path)) == ["in", "r.parquet"]


@pytest.mark.parametrize("address", ["127.0.0.1:1", "ray://127.0.0.1:1", "192.0.2.1:6379"])
def test_engine_ray_with_an_unreachable_address_fails_fast_in_one_line(tmp_path, small, tiny_model_path, capsys,
                                                                       monkeypatch, address):
    """Nothing listening (refused at once) or nothing answering (TEST-NET-1: no route, or the connect timeout):
    ray.init alone would retry such a GCS address forever."""
    ray = pytest.importorskip("ray")
    if ray.is_initialized():
        pytest.skip("a Ray instance is running in this process")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    out = tmp_path / "r.parquet"
    start = time.monotonic()
    code = main(["predict", str(small), "--model", str(tiny_model_path), "--engine", "ray", "--address", address,
                 "--out", str(out), "--quiet"])
    took = time.monotonic() - start
    assert code == 2 and took < 20, took
    line = _one_error_line(capsys)
    host = address.removeprefix("ray://")
    assert line.startswith(f"pneumoscan: error: cannot reach the Ray cluster at --address {address}: {host} did "
                           "not accept a connection within 5 s ("), line
    assert sorted(os.listdir(tmp_path)) == ["in"]  # no output, no parts folder, nothing half-written
