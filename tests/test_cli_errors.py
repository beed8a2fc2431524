"""Bad input on the command line: exit code 2, one line on stderr starting "pneumoscan: error:", no traceback,
and nothing left behind that could pass for a result (no model file, no JSON)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from pneumoscan.cli import main


def run_cli(capsys, *argv: str) -> str:
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert code == 2, captured.err
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("pneumoscan: error:") and "Traceback" not in captured.err
    assert captured.out == ""
    return lines[0]


def left_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*")) if folder.exists() else []


def test_train_with_missing_data_folder(tmp_path, capsys):
    line = run_cli(capsys, "train", "--data", tmp_path / "nowhere", "--out", tmp_path / "run", "--quiet")
    assert "nowhere: data folder not found" in line
    assert left_in(tmp_path / "run") == []


def test_train_with_wrong_layout_names_the_missing_folder(tmp_path, capsys):
    (tmp_path / "data" / "train" / "NORMAL").mkdir(parents=True)
    (tmp_path / "data" / "train" / "sick").mkdir()
    line = run_cli(capsys, "train", "--data", tmp_path / "data", "--out", tmp_path / "run", "--quiet")
    assert "missing class folder(s) PNEUMONIA" in line
    assert left_in(tmp_path / "run") == []


def test_train_with_images_in_a_flat_folder(tmp_path, capsys):
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.jpeg").write_bytes(b"")
    line = run_cli(capsys, "train", "--data", tmp_path / "flat", "--out", tmp_path / "run", "--quiet")
    assert "no 'train' folder" in line


def test_train_with_unknown_config_key_names_key_and_file(tmp_path, tiny_dataset, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text("epochs: 1\nbatchsize: 8\n")
    line = run_cli(capsys, "train", "--data", tiny_dataset, "--out", tmp_path / "run", "--config", config)
    assert str(config) in line and "unknown key(s) batchsize" in line
    assert not (tmp_path / "run").exists()


def test_train_with_missing_config_file(tmp_path, tiny_dataset, capsys):
    line = run_cli(capsys, "train", "--data", tiny_dataset, "--out", tmp_path / "run", "--config", tmp_path / "c.yml")
    assert "config file not found" in line


@pytest.mark.parametrize("text, message", [
    ("standardize_region: 0.7\n", "standardize_region was removed after it lost on validation (experiment 10 in "
                                   "docs/experiments.md); git checkout 184cb07 to rerun it"),
    ("augment:\n  zoom_out: 1.5\n", "augment.zoom_out must be in (0, 1], got 1.5"),
])
def test_train_with_a_config_value_that_cannot_apply_names_it(tmp_path, tiny_dataset, capsys, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    line = run_cli(capsys, "train", "--data", tiny_dataset, "--out", tmp_path / "run", "--config", config)
    assert line == f"pneumoscan: error: {config}: {message}"
    assert not (tmp_path / "run").exists()


def test_train_with_a_fold_outside_the_split_names_the_range(tmp_path, tiny_dataset, capsys):
    line = run_cli(capsys, "train", "--data", tiny_dataset, "--out", tmp_path / "run", "--fold", "5")
    assert line == ("pneumoscan: error: config: fold must be in 0..4 (val_fraction 0.2 makes 5 patient-grouped "
                    "folds), got 5")
    assert not (tmp_path / "run").exists()


def test_train_with_invalid_yaml(tmp_path, tiny_dataset, capsys):
    config = tmp_path / "cfg.yaml"
    config.write_text("epochs: [1\n")
    assert "invalid YAML" in run_cli(capsys, "train", "--data", tiny_dataset, "--out", tmp_path / "run",
                                     "--config", config)


def test_train_with_unknown_architecture(tmp_path, tiny_dataset, capsys):
    line = run_cli(capsys, "train", "--data", tiny_dataset, "--out", tmp_path / "run", "--arch", "vgg99")
    assert "unknown architecture 'vgg99'" in line


def test_evaluate_with_missing_model_file_writes_no_json(tmp_path, tiny_dataset, capsys):
    line = run_cli(capsys, "evaluate", "--model", tmp_path / "gone.safetensors", "--data", tiny_dataset,
                   "--json", tmp_path / "out.json", "--report", tmp_path / "plots")
    assert "gone.safetensors: model file not found" in line
    assert left_in(tmp_path) == []


def test_evaluate_with_unreadable_model_file_writes_no_json(tmp_path, tiny_dataset, capsys):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"\x00garbage, not safetensors" * 10)
    line = run_cli(capsys, "evaluate", "--model", bad, "--data", tiny_dataset, "--json", tmp_path / "out.json")
    assert "not a pneumoscan model file" in line
    assert left_in(tmp_path) == ["model.safetensors"]


def test_evaluate_with_missing_data_folder_writes_no_json(tmp_path, tiny_model_path, capsys):
    line = run_cli(capsys, "evaluate", "--model", tiny_model_path, "--data", tmp_path / "nowhere",
                   "--json", tmp_path / "out.json")
    assert "data folder not found" in line
    assert not (tmp_path / "out.json").exists()


def test_evaluate_with_missing_split_writes_no_json(tmp_path, tiny_model_path, tiny_dataset, capsys):
    line = run_cli(capsys, "evaluate", "--model", tiny_model_path, "--data", tiny_dataset, "--split", "val",
                   "--json", tmp_path / "out.json")
    assert "no 'val' folder" in line
    assert not (tmp_path / "out.json").exists()


def test_data_summary_of_missing_folder(tmp_path, capsys):
    assert "data folder not found" in run_cli(capsys, "data", "summary", tmp_path / "nowhere")


@pytest.mark.slow
def test_installed_entry_point_prints_one_line_and_no_traceback(tmp_path):
    """The same through a real process: what a user sees in a terminal."""
    proc = subprocess.run([sys.executable, "-m", "pneumoscan.cli", "evaluate", "--model", str(tmp_path / "x"),
                           "--data", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [f"pneumoscan: error: {tmp_path / 'x'}: model file not found"]


def test_evaluate_on_a_split_of_only_unreadable_images_writes_no_json(tmp_path, tiny_model_path, capsys):
    for name in ("NORMAL", "PNEUMONIA"):
        (tmp_path / "data" / "test" / name).mkdir(parents=True)
        (tmp_path / "data" / "test" / name / "broken.jpeg").write_bytes(b"not a jpeg")
    line = run_cli(capsys, "evaluate", "--model", tiny_model_path, "--data", tmp_path / "data",
                   "--json", tmp_path / "out.json")
    assert "no image in the test split could be judged (2 unreadable)" in line
    assert not (tmp_path / "out.json").exists()


# --- destinations are checked before any work (issue 14.1, 14.2) --------------------------------------------

@pytest.fixture
def xrays(tmp_path) -> Path:
    from conftest import save_gray, synthetic_xray

    for i in range(3):
        save_gray(tmp_path / "in" / f"x{i}.png", synthetic_xray(64, seed=i))
    return tmp_path / "in"


def test_predict_csv_naming_an_existing_folder_fails_before_scoring(tmp_path, tiny_model_path, xrays, capsys):
    out = tmp_path / "results"
    out.mkdir()
    line = run_cli(capsys, "predict", xrays, "--model", tiny_model_path, "--csv", out, "--quiet")
    assert line == (f"pneumoscan: error: {out}: --csv names a folder; give a file name, e.g. "
                    f"{out / 'results.csv'}")
    assert left_in(out) == []  # no hidden temporary file holding the rows


def test_predict_destination_is_checked_before_the_model_is_even_loaded(tmp_path, xrays, capsys):
    """Order proof: with a missing model file the destination error still comes first, so no image is scored."""
    line = run_cli(capsys, "predict", xrays, "--model", tmp_path / "gone.safetensors", "--csv", tmp_path)
    assert "--csv names a folder" in line


@pytest.mark.parametrize("option, where, reason", [
    ("--csv", "/proc/pneumoscan.csv", "cannot write --csv in /proc"),  # procfs: no regular files, even for root
    ("--csv", "/sys/pneumoscan.csv", "cannot write --csv in /sys"),  # sysfs likewise
    ("--heatmaps", "/sys/pneumoscan-maps/run1", "cannot write --heatmaps in /sys"),
])
def test_predict_unwritable_destination_is_one_line(tiny_model_path, xrays, capsys, option, where, reason):
    line = run_cli(capsys, "predict", xrays, "--model", tiny_model_path, option, where, "--quiet")
    assert line.startswith(f"pneumoscan: error: {where}: {reason} (")


@pytest.mark.parametrize("option", ["--csv", "--heatmaps"])
def test_predict_on_a_read_only_file_system_is_one_line(tmp_path, tiny_model_path, xrays, capsys, monkeypatch,
                                                       option):
    """errno 30 as a read-only mount gives it (root is not exempt from EROFS, but tests cannot mount)."""
    import errno
    import tempfile

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    target = tmp_path / "mnt" / ("out.csv" if option == "--csv" else "maps")
    line = run_cli(capsys, "predict", xrays, "--model", tiny_model_path, option, target, "--quiet")
    assert line == f"pneumoscan: error: {target}: cannot write {option} in {tmp_path} (Read-only file system)"
    assert not (tmp_path / "mnt").exists()


def test_predict_csv_on_a_fifo_is_refused_rather_than_replaced(tmp_path, tiny_model_path, xrays, capsys):
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    line = run_cli(capsys, "predict", xrays, "--model", tiny_model_path, "--csv", fifo, "--quiet")
    assert line == f"pneumoscan: error: {fifo}: --csv names something that is not a regular file"
    assert fifo.is_fifo()


def test_predict_destination_below_a_file_is_one_line(tmp_path, tiny_model_path, xrays, capsys):
    (tmp_path / "notes.txt").write_text("x")
    line = run_cli(capsys, "predict", xrays, "--model", tiny_model_path, "--csv", tmp_path / "notes.txt" / "o.csv")
    assert line == (f"pneumoscan: error: {tmp_path / 'notes.txt' / 'o.csv'}: cannot write --csv there: "
                    f"{tmp_path / 'notes.txt'} is a file, not a folder")


def test_predict_heatmaps_naming_a_file_is_one_line(tmp_path, tiny_model_path, xrays, capsys):
    (tmp_path / "maps.png").write_bytes(b"x")
    line = run_cli(capsys, "predict", xrays, "--model", tiny_model_path, "--heatmaps", tmp_path / "maps.png")
    assert line == f"pneumoscan: error: {tmp_path / 'maps.png'}: --heatmaps names a file; give a folder"


def test_evaluate_json_naming_a_folder_fails_before_scoring(tmp_path, tiny_model_path, tiny_dataset, capsys):
    line = run_cli(capsys, "evaluate", "--model", tiny_model_path, "--data", tiny_dataset, "--json", tmp_path)
    assert line.startswith(f"pneumoscan: error: {tmp_path}: --json names a folder")
    assert left_in(tmp_path) == []


@pytest.mark.parametrize("extra, named", [(["--tta"], "--tta"), (["--report", "plots"], "--report"),
                                          (["--tta", "--report", "plots"], "--tta and --report")])
def test_evaluate_shifts_refuses_options_it_would_ignore(tmp_path, tiny_model_path, tiny_dataset, capsys, extra,
                                                         named):
    extra = [str(tmp_path / a) if a == "plots" else a for a in extra]
    line = run_cli(capsys, "evaluate", "--model", tiny_model_path, "--data", tiny_dataset, "--split", "validation",
                   "--shifts", *extra)
    assert line.startswith(f"pneumoscan: error: --shifts cannot be combined with {named}:")
    assert left_in(tmp_path) == []


# --- counts must be positive (issue 14.3) ----------------------------------------------------------------------

@pytest.mark.parametrize("argv, option", [
    (["predict", "x.png", "--batch-size", "0"], "--batch-size"),
    (["predict", "x.png", "--batch-size", "-3"], "--batch-size"),
    (["predict", "x.png", "--batch-size", "two"], "--batch-size"),
    (["evaluate", "--data", "d", "--batch-size", "0"], "--batch-size"),
    (["serve", "--concurrency", "0"], "--concurrency"),
    (["serve", "--max-upload-mb", "-1"], "--max-upload-mb"),
    (["serve", "--max-upload-mb", "nan"], "--max-upload-mb"),
    (["serve", "--port", "70000"], "--port"),
    (["export", "--onnx", "m.onnx", "--tolerance", "0"], "--tolerance"),
])
def test_a_count_or_size_that_is_not_positive_is_refused_by_the_parser(tmp_path, capsys, argv, option):
    """Refused before anything is loaded: argparse's usage message and exit 2 (before, --batch-size 0 ran)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert f"argument {option}: must be" in err and "Traceback" not in err


# --- model files and devices: plain words and the next step ---------------------------------------------------

def test_an_onnx_file_without_backend_onnx_says_to_add_it(tmp_path, xrays, capsys):
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x07onnx-ish bytes")
    line = run_cli(capsys, "predict", xrays, "--model", model)
    assert line == (f"pneumoscan: error: {model}: an ONNX model file: add --backend onnx to run it "
                    "(in Python: load_model(path, backend='onnx'))")


def test_backend_onnx_without_a_model_says_to_run_export_first(xrays, capsys):
    line = run_cli(capsys, "predict", xrays, "--backend", "onnx")
    assert "pneumoscan export --onnx model.onnx" in line and "--model model.onnx" in line


@pytest.mark.parametrize("device", ["gpu", "cuda:x", "tpu"])
def test_a_misspelt_device_is_a_usage_error_before_any_model_loads(xrays, capsys, device):
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(xrays), "--device", device])
    assert exc.value.code == 2
    assert f"argument --device: must be auto, cpu, cuda or cuda:N, got {device!r}" in capsys.readouterr().err


def test_device_cuda_without_a_gpu_is_one_line_naming_the_way_out(tiny_model_path, xrays, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this test's machine has no GPU, whatever runs it
    for command in (["predict", xrays], ["evaluate", "--data", xrays]):
        line = run_cli(capsys, *command, "--model", tiny_model_path, "--device", "cuda")
        assert line == "pneumoscan: error: device cuda: PyTorch sees no CUDA GPU on this machine; use --device cpu " \
                       "(or auto)"


def test_device_cuda_with_the_onnx_backend_says_onnx_runs_on_the_cpu(xrays, tmp_path, capsys):
    line = run_cli(capsys, "predict", xrays, "--backend", "onnx", "--model", tmp_path / "m.onnx", "--device", "cuda")
    assert "the onnx backend runs on the CPU" in line


def test_device_auto_runs_where_pytorch_says(tiny_model_path):
    import torch

    from pneumoscan import load_model

    model = load_model(tiny_model_path)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert model.backend.device.type == expected
    assert load_model(tiny_model_path, device="cpu").backend.device.type == "cpu"


def test_dicom_pull_without_the_dicom_extra_names_the_extra(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "dicomweb_client", None)  # as on a base install: the import fails
    assert main(["dicom", "pull", "--dicomweb", "http://127.0.0.1:9/dicom-web", "--study", "1.2.3"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'pneumoscan[dicom]'" in err and "Traceback" not in err and len(err.splitlines()) == 1


def test_export_without_the_onnx_extra_names_the_extra(monkeypatch, tmp_path, tiny_model_path, capsys):
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert main(["export", "--model", str(tiny_model_path), "--onnx", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err
    assert "pip install 'pneumoscan[onnx]'" in err and "Traceback" not in err
    assert not (tmp_path / "m.onnx").exists()
