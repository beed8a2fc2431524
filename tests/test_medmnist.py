"""The MedMNIST .npz source: reading and checking the file, training on its official split, evaluating and
exporting from its run folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import synthetic_xray

from pneumoscan import load_model
from pneumoscan.cli import main
from pneumoscan.data import medmnist
from pneumoscan.preprocess import Preprocessing
from pneumoscan.run import RunFolder

SIZES = {"train": 40, "val": 20, "test": 20}


def _arrays(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.arange(n) % 2
    images = np.stack([np.round(synthetic_xray(28, offset + i, opacity=0.5 * y) * 255).astype(np.uint8)
                       for i, y in enumerate(labels)])
    return images, labels.reshape(n, 1).astype(np.uint8)


def _write_npz(path: Path, drop: str | None = None, **replace) -> Path:
    """A file shaped like the official pneumoniamnist.npz (keys, dtypes, (N, 1) labels), 28 px, tiny N."""
    arrays = {}
    for offset, (split, n) in enumerate(SIZES.items()):
        arrays[f"{split}_images"], arrays[f"{split}_labels"] = _arrays(n, 1000 * offset)
    arrays.update(replace)
    arrays.pop(drop, None)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory) -> Path:
    return _write_npz(tmp_path_factory.mktemp("medmnist") / "tiny.npz")


def test_read_split_returns_uint8_images_and_flat_labels(tiny_npz):
    images, labels = medmnist.read_split(tiny_npz, "val")
    assert images.shape == (20, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (20,) and set(labels.tolist()) == {0, 1}


def test_load_split_upscales_with_the_preprocessing_resize(tiny_npz):
    prep = Preprocessing(size=64)
    images, _ = medmnist.load_split(tiny_npz, "test", prep)
    raw, _ = medmnist.read_split(tiny_npz, "test")
    assert images.shape == (20, 64, 64) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[3], prep.to_uint8(raw[3] / 255.0))


def test_only_npz_paths_are_the_medmnist_source(tmp_path):
    assert medmnist.is_npz(tmp_path / "x.NPZ")
    assert not medmnist.is_npz(tmp_path / "chest_xray")


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda p: _write_npz(p, drop="val_labels"), "missing key 'val_labels'"),
        (lambda p: _write_npz(p, val_labels=np.full((20, 1), 3, np.uint8)), "must be 0 (NORMAL) or 1"),
        (lambda p: _write_npz(p, val_labels=np.zeros((19, 1), np.uint8)), "must have shape (20, 1)"),
        (lambda p: _write_npz(p, val_images=np.zeros((20, 28, 28, 3), np.uint8)), "grayscale uint8"),
        (lambda p: (p.write_bytes(b"not a zip"), p)[1], "not a readable .npz"),
        (lambda p: p, "file not found"),
    ],
    ids=["missing-key", "bad-label", "length-mismatch", "rgb", "not-npz", "missing-file"],
)
def test_bad_npz_is_one_line_error_naming_file(tmp_path, make, message):
    path = make(tmp_path / "bad.npz")
    with pytest.raises(medmnist.MedMNISTError) as info:
        medmnist.read_split(path, "val")
    text = str(info.value)
    assert message in text and str(path) in text and "\n" not in text


def test_unknown_split_names_the_choices(tiny_npz):
    with pytest.raises(medmnist.MedMNISTError, match="choose train, val, test"):
        medmnist.read_split(tiny_npz, "validation")


def test_cli_train_with_missing_key_prints_one_line_and_exit_2(tmp_path, capsys):
    bad = _write_npz(tmp_path / "bad.npz", drop="train_images")
    code = main(["train", "--data", str(bad), "--out", str(tmp_path / "run"), "--pretrained", "none", "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == f"pneumoscan: error: {bad}: missing key 'train_images' (a MedMNIST .npz has train_images, " \
                  "train_labels, val_images, val_labels, test_images, test_labels)"
    assert not (tmp_path / "run").exists()  # checked before the run folder is made


@pytest.mark.slow
def test_train_on_official_split_then_evaluate_test(tiny_npz, tmp_path, capsys, monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text("image_size: 32\nbatch_size: 8\nepochs: 1\npretrained: none\n")
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_npz), "--out", str(run), "--config", str(config), "--quiet"]) == 0

    model = load_model(run)
    training = model.record.training
    assert (training["train_images"], training["val_images"]) == (40, 20)  # the official split, untouched
    assert training["train_counts"] == [20, 20] and model.preprocessing.size == 32
    train, val = RunFolder(run).split()
    assert (len(train), len(val)) == (40, 20) and RunFolder(run).source().root == tiny_npz.resolve()
    assert "# source: medmnist" in (run / "split.csv").read_text() and train[3].path == tiny_npz.resolve() / "train/3"

    capsys.readouterr()
    json_path = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(run), "--data", str(tiny_npz), "--split", "test",
                 "--json", str(json_path)]) == 0
    figures = json.loads(json_path.read_text())
    assert f"test split: {figures['n']} images" in capsys.readouterr().out
    assert figures["n"] + sum(figures["refused_counts"].values()) == 20 and 0.0 <= figures["auc"] <= 1.0

    # every command that reads the run works from another directory; export's int8 inputs once failed with
    # KeyError: 'path' on a MedMNIST run
    from pneumoscan.evaluate import evaluate
    from pneumoscan.export import check_images, int8_inputs

    monkeypatch.chdir(tmp_path.parent)
    model = load_model(run, precision="float32")
    model.guard = None  # training's figure counts every validation image; evaluate leaves out what the guard refuses
    result = evaluate(model, tiny_npz, "validation")
    assert result.n == 20 and result.auc == pytest.approx(training_auc(run), abs=1e-6)
    calibration, images, labels, source = int8_inputs(model, None)
    assert calibration.shape == (40, 32, 32) and images.shape == (20, 32, 32) and len(labels) == 20
    assert "split.csv" in source and len(check_images(model, None)[0]) == 20


def training_auc(run: Path) -> float:
    return load_model(run).record.validation["auc"]
