"""RunFolder and the data sources: one split.csv schema for every source, read from any working directory, and the
two older schemas still read."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model_file

from pneumoscan.data.layout import DatasetError, list_split, patient_split
from pneumoscan.data.sources import FolderSource, MedMNISTSource, decode_samples, open_source
from pneumoscan.preprocess import Preprocessing
from pneumoscan.run import RunFolder

PREP = Preprocessing(size=32)


@pytest.fixture
def tiny_npz(tmp_path) -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 12), ("val", 6), ("test", 4)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 2).reshape(n, 1).astype(np.uint8)
    path = tmp_path / "mnist.npz"
    np.savez(path, **arrays)
    return path


def test_open_source_picks_the_source_by_what_data_names(tiny_dataset, tiny_npz):
    assert isinstance(open_source(tiny_dataset), FolderSource)
    assert isinstance(open_source(tiny_npz), MedMNISTSource)


def test_folder_source_splits_train_by_patient_as_the_layout_does(tiny_dataset):
    source = FolderSource(tiny_dataset)
    expected = patient_split(list_split(tiny_dataset.resolve(), "train"), 0.2, 0)
    assert source.training_split(0.2, 0) == expected
    cache = source.decode(expected[1], PREP)
    assert cache.images.shape == (len(expected[1]), 32, 32) and cache.images.dtype == np.uint8
    assert cache.labels.tolist() == [s.label for s in expected[1]]


def test_medmnist_source_keeps_the_official_split_and_names_images_inside_the_file(tiny_npz):
    source = MedMNISTSource(tiny_npz)
    train, val = source.training_split(0.2, 0)
    assert (len(train), len(val)) == (12, 6) and source.item(val[2]) == "val/2"
    raw = np.load(tiny_npz)["val_images"]
    cache = source.decode(val, PREP)
    np.testing.assert_array_equal(cache.images[2], PREP.to_uint8(raw[2] / 255.0))
    np.testing.assert_array_equal(decode_samples(val, PREP).images, cache.images)
    with pytest.raises(DatasetError, match="one official train/val split; fold 1"):
        source.training_split(0.2, 0, fold=1)


@pytest.mark.parametrize("kind", ["folder", "medmnist"])
def test_split_csv_records_the_root_and_relative_paths_and_reads_back_anywhere(
        kind, tiny_dataset, tiny_npz, tmp_path, monkeypatch):
    source = FolderSource(tiny_dataset) if kind == "folder" else MedMNISTSource(tiny_npz)
    train, val = source.training_split(0.2, 0)
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.write_split(source, train, val)
    text = run.split_path.read_text()
    assert f"# source: {kind}\n# root: {source.root}\n" in text and "path,label,patient,subset\n" in text
    assert str(source.root) not in text.split("path,label,patient,subset\n")[1]  # every path relative to the root
    monkeypatch.chdir(tmp_path.parent)
    assert RunFolder(run.path).split() == (train, val)
    assert type(RunFolder(run.path).source()) is type(source)
    images, labels = RunFolder(run.path).validation_images(PREP)
    assert len(images) == len(val) and labels.tolist() == [s.label for s in val]


def test_a_moved_data_root_is_a_clear_error_and_data_root_finds_it(tiny_dataset, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    source = FolderSource(data)
    train, val = source.training_split(0.2, 0)
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    run.write_split(source, train, val)
    data.rename(tmp_path / "moved")
    with pytest.raises(DatasetError, match=r"data root .*/data is not there; pass --data"):
        run.split()
    _, moved_val = run.split(tmp_path / "moved")
    assert all(s.path.is_file() for s in moved_val) and len(moved_val) == len(val)


def _legacy_folder_run(repo: Path, data: Path) -> RunFolder:
    """A run written before format 2: paths as given to `train`, relative to where it ran (``repo``)."""
    run = RunFolder(repo / "runs" / "old")
    run.path.mkdir(parents=True)
    train, val = patient_split(list_split(data, "train"), 0.2, 0)
    rows = ["path,label,patient,subset"]
    for subset, items in (("train", train), ("val", val)):
        rows += [f"{s.path.relative_to(repo)},{['NORMAL', 'PNEUMONIA'][s.label]},{s.patient},{subset}" for s in items]
    run.split_path.write_text("\n".join(rows) + "\n")
    return run


def test_the_old_folder_schema_is_found_from_any_working_directory(tiny_dataset, tmp_path, monkeypatch):
    repo = tmp_path / "repo"
    shutil.copytree(tiny_dataset, repo / "data")
    run = _legacy_folder_run(repo, repo / "data")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    train, val = run.split()
    assert len(train) + len(val) == 48 and all(s.path.is_file() for s in train + val)
    assert run.source().root == (repo / "data").resolve()
    moved = tmp_path / "moved"
    shutil.move(repo / "data", moved)
    assert all(s.path.is_file() for s in run.split(moved)[1])  # the path's tail found under the new root


def test_the_old_medmnist_schema_is_read(tiny_npz, tmp_path, monkeypatch):
    run = RunFolder(tmp_path / "run")
    run.path.mkdir()
    monkeypatch.chdir(tmp_path)
    rows = ["source,index,label,subset"]
    labels = np.load(tiny_npz)
    for subset in ("train", "val"):
        rows += [f"mnist.npz,{i},{['NORMAL', 'PNEUMONIA'][int(y)]},{subset}"
                 for i, y in enumerate(labels[f"{subset}_labels"][:, 0])]
    run.split_path.write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(run.path)  # not where it was written: the .npz is found from the run folder's parents
    train, val = run.split()
    assert (len(train), len(val)) == (12, 6) and isinstance(run.source(), MedMNISTSource)
    images, y = run.validation_images(PREP)
    np.testing.assert_array_equal(images, MedMNISTSource(tiny_npz).images("val", PREP).images)


def test_of_model_finds_the_run_only_when_its_split_is_the_models(tiny_dataset, tmp_path):
    model = make_model_file(tmp_path / "run" / "model.safetensors")
    assert RunFolder.of_model(model) is None  # no split.csv beside it
    source = FolderSource(tiny_dataset)
    RunFolder(tmp_path / "run").write_split(source, *source.training_split(0.2, 0))
    run = RunFolder.of_model(model)
    assert run is not None and run.path == tmp_path / "run"
    assert RunFolder.of_model(model, split_sha256=run.split_sha256()) is not None
    assert RunFolder.of_model(model, split_sha256="0" * 64) is None


def test_a_file_that_is_no_split_record_is_one_line(tmp_path):
    run = RunFolder(tmp_path)
    run.split_path.write_text("a,b\n1,2\n")
    with pytest.raises(DatasetError, match=r"split.csv: not a pneumoscan split.csv \(columns a, b\)"):
        run.split()


def test_evaluate_validation_split_of_an_old_run_from_another_directory(tiny_dataset, tmp_path, monkeypatch):
    from pneumoscan import load_model
    from pneumoscan.evaluate import evaluate

    repo = tmp_path / "repo"
    shutil.copytree(tiny_dataset, repo / "data")
    run = _legacy_folder_run(repo, repo / "data")
    make_model_file(run.model_path)
    monkeypatch.chdir(tmp_path)
    result = evaluate(load_model(run.path, precision="float32"), repo / "data", "validation")
    assert result.n == len(run.split()[1]) and not result.errors
