"""Bad input on the command line: exit code 2, one line on stderr starting "pneumoscan: error:", no traceback,
and nothing left behind that could pass for a result (no model file, no JSON)."""

from __future__ import annotations

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
    ("standardize_region: 0.7\n", "standardize_region only applies with standardize: true"),
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
    assert "no readable image in the test split (2 unreadable)" in line
    assert not (tmp_path / "out.json").exists()
