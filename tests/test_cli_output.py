"""What `pneumoscan predict` and `evaluate` print and accept: plain rows when piped, a model line and a header
on a terminal, JSON Lines with --json, TIFF and BMP found in folders as when named, skipped files counted, and a
run that screens nothing saying so with a non-zero exit."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import KERMANY, save_gray, synthetic_xray
from PIL import Image

from pneumoscan.cli import PREDICT_HEADER, main

# a small real test-split X-ray (728x368, grayscale JPEG)
REAL_XRAY = KERMANY / "test" / "PNEUMONIA" / "person78_bacteria_378.jpeg"


@pytest.fixture(scope="module")
def sha256(tiny_model_path) -> str:
    from pneumoscan.modelfile import sha256_file

    return sha256_file(tiny_model_path)


@pytest.fixture
def images(tmp_path) -> Path:
    folder = tmp_path / "in"
    for i, name in enumerate(("a.jpeg", "b.png", "sub/c.png")):
        save_gray(folder / name, synthetic_xray(64, seed=i))
    return folder


def _rows(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def test_piped_output_is_plain_rows_and_the_model_goes_to_stderr(tiny_model_path, sha256, images, capsys):
    assert main(["predict", str(images), "--model", str(tiny_model_path)]) == 0
    captured = capsys.readouterr()
    lines = captured.out.splitlines()
    assert [line.split("\t")[0] for line in lines] == [str(images / n) for n in ("a.jpeg", "b.png", "sub/c.png")]
    assert all(len(line.split("\t")) == 4 and "(screening threshold 0.3000)" in line for line in lines)
    assert f"pneumoscan: model tiny-test-model (sha256 {sha256})" in captured.err.splitlines()


def test_quiet_piped_output_keeps_stderr_empty(tiny_model_path, images, capsys):
    assert main(["predict", str(images), "--model", str(tiny_model_path), "--quiet"]) == 0
    captured = capsys.readouterr()
    assert captured.err == "" and len(captured.out.splitlines()) == 3


def test_terminal_output_starts_with_the_model_line_and_a_header(tiny_model_path, sha256, images, capsys,
                                                                 monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["predict", str(images / "a.jpeg"), "--model", str(tiny_model_path), "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[:2] == [f"model tiny-test-model (sha256 {sha256})", PREDICT_HEADER]
    assert PREDICT_HEADER.split("\t")[:3] == ["path", "probability", "decision"]
    assert len(lines) == 3 and lines[2].startswith(f"{images / 'a.jpeg'}\t")


@pytest.mark.slow
def test_terminal_header_in_a_real_pseudo_terminal(tiny_model_path, sha256, images):
    """The same through a real process whose stdout is a pty, as in a user's shell."""
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.run([sys.executable, "-m", "pneumoscan.cli", "predict", str(images / "b.png"), "--model",
                           str(tiny_model_path), "--quiet"], stdout=follower, stderr=subprocess.PIPE, timeout=300)
    os.close(follower)
    out = b""
    try:
        while chunk := os.read(leader, 4096):
            out += chunk
    except OSError:  # EIO: the other end is closed
        pass
    os.close(leader)
    assert proc.returncode == 0, proc.stderr
    lines = out.decode().splitlines()
    assert lines[:2] == [f"model tiny-test-model (sha256 {sha256})", PREDICT_HEADER]
    assert lines[2].startswith(f"{images / 'b.png'}\t")


def test_json_prints_one_object_per_file_with_the_prediction_keys(tiny_model_path, images, tmp_path, capsys):
    (images / "broken.png").write_text("not an image")
    out = tmp_path / "rows.csv"
    assert main(["predict", str(images), "--model", str(tiny_model_path), "--json", "--csv", str(out),
                 "--quiet"]) == 1
    objects = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [Path(o["path"]).name for o in objects] == ["a.jpeg", "b.png", "broken.png", "c.png"]
    from pneumoscan import Prediction

    keys = {field.name for field in dataclasses.fields(Prediction)}  # what Prediction.to_dict() holds
    assert keys >= {"path", "probability", "decision", "operating_point", "threshold", "status", "message"}
    assert all(set(o) == keys for o in objects)
    by_name = {Path(o["path"]).name: o for o in objects}
    assert by_name["broken.png"]["status"] == "error" and by_name["broken.png"]["probability"] is None
    for row in _rows(out):  # the same figures as the CSV
        o = by_name[Path(row["path"]).name]
        assert o["status"] == row["status"]
        if o["status"] == "ok":
            assert o["probability"] == pytest.approx(float(row["probability"]), abs=1e-6)
            assert o["decision"] == row["decision"] and o["operating_point"] == "screening"


def test_json_on_a_terminal_stays_json(tiny_model_path, images, capsys, monkeypatch):
    monkeypatch.setattr(sys.stdout, "isatty", lambda: True)
    assert main(["predict", str(images / "a.jpeg"), "--model", str(tiny_model_path), "--json", "--quiet"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    assert json.loads(line)["status"] == "ok"


def test_tiff_and_bmp_in_a_folder_are_screened_as_when_named(kermany, tiny_model_path, tmp_path, capsys):
    """The same real X-ray pixels as 16-bit TIFF (a digitised film), 8-bit TIFF, BMP and PNG: the folder walk
    finds every one, and each gets the probability it gets when named on the command line."""
    pixels = np.asarray(Image.open(REAL_XRAY).convert("L"))
    folder = tmp_path / "films"
    folder.mkdir()
    Image.fromarray(pixels.astype(np.uint16) * 257).save(folder / "film16.tif")  # mode I;16
    Image.fromarray(pixels).save(folder / "film8.TIFF")
    Image.fromarray(pixels).save(folder / "film.bmp")
    Image.fromarray(pixels).save(folder / "film.png")
    walked, named = tmp_path / "walked.csv", tmp_path / "named.csv"
    assert main(["predict", str(folder), "--model", str(tiny_model_path), "--csv", str(walked), "--quiet"]) == 0
    files = sorted(str(p) for p in folder.iterdir())
    assert main(["predict", *files, "--model", str(tiny_model_path), "--csv", str(named), "--quiet"]) == 0
    capsys.readouterr()
    walked_rows, named_rows = _rows(walked), _rows(named)
    assert sorted(r["path"] for r in walked_rows) == files
    assert all(r["status"] == "ok" for r in walked_rows)
    by_path = {r["path"]: r["probability"] for r in named_rows}
    assert {r["path"]: r["probability"] for r in walked_rows} == by_path
    assert len({float(p) for p in by_path.values()}) == 1  # identical pixels, identical answer


def test_skipped_files_are_counted_by_suffix_on_stderr(tiny_model_path, images, capsys):
    for name in ("notes.txt", "more.txt", "labels.csv", ".DS_Store"):
        (images / name).write_text("x")
    assert main(["predict", str(images), "--model", str(tiny_model_path)]) == 0
    captured = capsys.readouterr()
    assert "pneumoscan: 4 files skipped (not images: .txt 2, .csv 1; hidden: 1)" in captured.err.splitlines()
    assert len(captured.out.splitlines()) == 3


def test_files_without_suffix_are_still_walked(tiny_model_path, tmp_path, capsys):
    """DICOM files from a PACS export often have no suffix: the walk keeps them (decoded by content)."""
    folder = tmp_path / "export"
    folder.mkdir()
    Image.fromarray(np.round(synthetic_xray(64) * 255).astype(np.uint8)).save(folder / "IMG0001", format="PNG")
    assert main(["predict", str(folder), "--model", str(tiny_model_path), "--quiet"]) == 0
    (line,) = capsys.readouterr().out.splitlines()
    path, probability, decision, _ = line.split("\t")
    assert path == str(folder / "IMG0001") and probability != "-" and decision in ("NORMAL", "PNEUMONIA")


@pytest.mark.parametrize("content", ["empty", "not-images"])
def test_a_folder_with_nothing_to_screen_exits_1_with_one_line_and_no_csv(tiny_model_path, tmp_path, capsys,
                                                                         content):
    folder = tmp_path / "in"
    folder.mkdir()
    if content == "not-images":
        for name in ("a.txt", "b.txt", "c.csv"):
            (folder / name).write_text("x")
    out = tmp_path / "out.csv"
    assert main(["predict", str(folder), "--model", str(tiny_model_path), "--csv", str(out)]) == 1
    captured = capsys.readouterr()
    (line,) = captured.err.splitlines()
    assert line.startswith(f"pneumoscan: error: no image to screen in {folder}")
    assert ("3 files skipped (not images: .txt 2, .csv 1)" if content == "not-images" else "(empty)") in line
    assert ".tif" in line and ".bmp" in line  # says what would have been taken
    assert captured.out == "" and not out.exists()


def test_a_run_where_no_file_could_be_read_says_nothing_was_screened(tiny_model_path, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    (folder / "a.png").write_text("not an image")
    (folder / "b.jpeg").write_bytes(b"")
    assert main(["predict", str(folder), "--model", str(tiny_model_path), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert captured.err == "pneumoscan: none of the 2 file(s) could be read: nothing was screened\n"
    assert len(captured.out.splitlines()) == 2


def test_evaluate_prints_the_full_sha256_of_the_model(tiny_model_path, sha256, tiny_dataset, capsys):
    assert main(["evaluate", "--model", str(tiny_model_path), "--data", str(tiny_dataset),
                 "--precision", "float32"]) == 0
    first = capsys.readouterr().out.splitlines()[0]
    assert first.startswith(f"model tiny-test-model (sha256 {sha256}), test split: 48 images")


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    """A MedMNIST-format file (28 px, 12 validation images per class): --shifts on its official val split."""
    arrays = {}
    for split, n in (("train", 4), ("val", 12), ("test", 4)):
        labels = np.array([0] * n + [1] * n)
        arrays[f"{split}_images"] = np.stack([np.round(synthetic_xray(28, seed=i, opacity=0.5 * y) * 255)
                                              for i, y in enumerate(labels)]).astype(np.uint8)
        arrays[f"{split}_labels"] = labels[:, None]
    path = tmp_path / "tiny.npz"
    np.savez(path, **arrays)
    return path


def test_evaluate_shifts_writes_the_shift_table_as_json(tiny_model_path, sha256, tiny_npz, tmp_path, capsys):
    out = tmp_path / "shifts.json"
    assert main(["evaluate", "--model", str(tiny_model_path), "--data", str(tiny_npz), "--split", "val",
                 "--shifts", "--json", str(out), "--precision", "float32"]) == 0
    printed = capsys.readouterr().out.splitlines()
    table = json.loads(out.read_text())
    assert table["model"] == {"name": "tiny-test-model", "sha256": sha256} and table["n"] == 24
    assert [s["shift"] for s in table["shifts"]][0] == "none" and len(table["shifts"]) > 2
    for shift in table["shifts"]:  # the figures printed in the table
        row = next(line for line in printed if line.startswith(f"{shift['shift']} "))
        assert f"{shift['auc']:7.4f}" in row
        assert set(shift["screening"]) >= {"threshold", "sensitivity", "specificity", "tn", "fp", "fn", "tp"}
    assert set(table["mean_of_shifts"]) == {"auc", "screening_sensitivity", "screening_specificity",
                                            "balanced_accuracy"}


def _json_rows(text: str) -> dict[str, dict]:
    return {row["path"]: row for row in map(json.loads, text.splitlines())}


def test_two_inputs_with_one_file_name_get_their_own_heatmap_named_in_their_row(tiny_model_path, tmp_path,
                                                                                 capsys):
    first = save_gray(tmp_path / "ward1" / "scan.png", synthetic_xray(64, seed=1))
    second = save_gray(tmp_path / "ward2" / "scan.png", synthetic_xray(64, seed=2))
    maps = tmp_path / "maps"
    table = tmp_path / "rows.csv"
    assert main(["predict", str(first), str(second), "--model", str(tiny_model_path), "--heatmaps", str(maps),
                 "--threshold", "0.01", "--json", "--quiet", "--csv", str(table)]) == 0  # all PNEUMONIA: all mapped
    rows = _json_rows(capsys.readouterr().out)
    heatmaps = {path: row["heatmap"] for path, row in rows.items()}
    assert set(heatmaps) == {str(first), str(second)} and len(set(heatmaps.values())) == 2
    with open(table, newline="") as f:  # the CSV names each row's heatmap too
        assert {r["path"]: r["heatmap"] for r in csv.DictReader(f)} == heatmaps
    for path, heatmap in heatmaps.items():
        assert Path(heatmap).parent == maps
        with Image.open(heatmap) as png:
            assert png.info["Source"] == str(Path(path).resolve())  # the file says which input it shows


def test_heatmaps_by_default_only_for_images_decided_pneumonia(tiny_model_path, images, tmp_path, capsys):
    maps = tmp_path / "maps"
    assert main(["predict", str(images), "--model", str(tiny_model_path), "--heatmaps", str(maps), "--json",
                 "--threshold", "0.99", "--quiet"]) == 0  # nothing decided PNEUMONIA
    rows = _json_rows(capsys.readouterr().out)
    assert [row["decision"] for row in rows.values()] == ["NORMAL"] * 3
    assert all(row["heatmap"] is None for row in rows.values()) and list(maps.iterdir()) == []
    assert main(["predict", str(images), "--model", str(tiny_model_path), "--heatmaps", str(maps), "--json",
                 "--threshold", "0.99", "--heatmap-rule", "all", "--quiet"]) == 0
    rows = _json_rows(capsys.readouterr().out)
    assert sorted(Path(row["heatmap"]).name for row in rows.values()) == ["a.png", "b.png", "c.png"]


def test_a_missing_output_folder_is_created_and_said_on_stderr_for_every_option(tiny_model_path, images,
                                                                                tiny_dataset, tmp_path, capsys):
    """One rule for --csv, --out, --heatmaps, --json and --report: create the folder, say so once."""
    new = tmp_path / "new"
    assert main(["predict", str(images), "--model", str(tiny_model_path), "--csv", str(new / "a" / "rows.csv"),
                 "--out", str(new / "b" / "rows.csv"), "--heatmaps", str(new / "maps"), "--threshold", "0.01"]) == 0
    err = capsys.readouterr().err.splitlines()
    for folder, option in (("a", "--csv"), ("b", "--out"), ("maps", "--heatmaps")):
        assert f"pneumoscan: created folder {new / folder} for {option}" in err
    assert (new / "a" / "rows.csv").is_file() and (new / "b" / "rows.csv").is_file()
    assert len(list((new / "maps").iterdir())) == 3
    assert main(["evaluate", "--model", str(tiny_model_path), "--data", str(tiny_dataset),
                 "--json", str(new / "c" / "figures.json"), "--report", str(new / "plots")]) == 0
    err = capsys.readouterr().err.splitlines()
    assert f"pneumoscan: created folder {new / 'c'} for --json" in err
    assert f"pneumoscan: created folder {new / 'plots'} for --report" in err
    assert (new / "c" / "figures.json").is_file()
    # an existing folder gets no line
    assert main(["predict", str(images), "--model", str(tiny_model_path), "--csv", str(new / "a" / "again.csv"),
                 "--quiet"]) == 0
    assert "created folder" not in capsys.readouterr().err
