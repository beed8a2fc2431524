"""Dataset layout: folder discovery, clear messages for bad folders, patient ids, the patient-grouped split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import save_gray, synthetic_xray

from pneumoscan.data.layout import (
    DatasetError,
    Sample,
    find_splits,
    list_split,
    patient_id,
    patient_split,
)


def make_layout(root: Path, spec: dict[str, dict[str, list[str]]]) -> Path:
    for split, classes in spec.items():
        for cls, names in classes.items():
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i, name in enumerate(names):
                save_gray(root / split / cls / name, synthetic_xray(16, i))
    return root


def test_class_folders_match_case_insensitively_and_all_image_suffixes_count(tmp_path):
    root = make_layout(tmp_path, {"Train": {"normal": ["IM-0001-0001.jpeg", "IM-0002-0001.PNG"],
                                            "Pneumonia": ["person1_virus_6.jpg", "person2_bacteria_3.jpeg"]}})
    (root / "Train" / "normal" / "notes.txt").write_text("not an image")
    assert find_splits(root) == ["train"]
    samples = list_split(root, "train")
    assert [(s.path.name, s.label) for s in samples] == [
        ("IM-0001-0001.jpeg", 0), ("IM-0002-0001.PNG", 0), ("person1_virus_6.jpg", 1), ("person2_bacteria_3.jpeg", 1)]


def test_missing_data_folder_is_named(tmp_path):
    with pytest.raises(DatasetError, match="data folder not found"):
        find_splits(tmp_path / "nope")
    with pytest.raises(DatasetError, match="data folder not found"):
        list_split(tmp_path / "nope", "train")


def test_folder_without_splits_says_what_is_expected(tmp_path):
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError, match="no split folders found.*train, val, test"):
        find_splits(tmp_path)


def test_missing_split_is_named(tmp_path):
    root = make_layout(tmp_path, {"train": {"NORMAL": ["a.png"], "PNEUMONIA": ["b.png"]}})
    with pytest.raises(DatasetError, match="no 'test' folder"):
        list_split(root, "test")


def test_missing_class_folder_is_named(tmp_path):
    root = make_layout(tmp_path, {"train": {"NORMAL": ["a.png"], "COVID": ["b.png"]}})
    with pytest.raises(DatasetError, match=r"missing class folder\(s\) PNEUMONIA"):
        list_split(root, "train")


def test_empty_class_folder_is_named(tmp_path):
    root = make_layout(tmp_path, {"train": {"NORMAL": ["a.png"], "PNEUMONIA": []}})
    with pytest.raises(DatasetError, match="class PNEUMONIA has no images"):
        list_split(root, "train")


@pytest.mark.parametrize(("name", "patient"), [
    ("person1000_bacteria_2931.jpeg", "person1000"),
    ("person1_virus_6.jpeg", "person1"),
    ("person1_bacteria_1.jpeg", "person1"),
    ("IM-0115-0001.jpeg", "IM-0115"),
    ("NORMAL2-IM-0123-0001.jpeg", "NORMAL2-IM-0123"),
    ("NORMAL2-IM-1440-0001.jpeg", "NORMAL2-IM-1440"),
    ("scan.png", "scan"),  # unknown pattern: its own patient
])
def test_patient_id_from_every_kermany_name_form(name, patient):
    assert patient_id(name) == patient


def synthetic_samples(n_patients: int = 60, seed: int = 0) -> list[Sample]:
    """Patients with 1-4 images each, about a quarter NORMAL, as in Kermany train."""
    rng = np.random.default_rng(seed)
    samples = []
    for p in range(n_patients):
        label = int(p % 4 != 0)
        pid = f"person{p}" if label else f"IM-{p:04d}"
        samples += [Sample(Path(f"{pid}_{i}.jpeg"), label, pid) for i in range(rng.integers(1, 5))]
    return samples


def test_patient_split_keeps_every_patient_on_one_side():
    train, val = patient_split(synthetic_samples(), 0.2, seed=0)
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert len(train) + len(val) == len(synthetic_samples())


def test_patient_split_is_stratified_by_class():
    samples = synthetic_samples(200)
    train, val = patient_split(samples, 0.2, seed=0)
    share = lambda items: np.mean([s.label for s in items])  # noqa: E731
    assert abs(share(val) - share(samples)) < 0.05
    assert 0.15 < len(val) / len(samples) < 0.25


def test_patient_split_is_reproducible_by_seed():
    samples = synthetic_samples()
    first, again, other = (patient_split(samples, 0.2, seed=s)[1] for s in (1, 1, 2))
    assert [s.path for s in first] == [s.path for s in again]
    assert [s.path for s in first] != [s.path for s in other]


def test_patient_split_rejects_a_nonsense_fraction():
    with pytest.raises(ValueError, match="val_fraction"):
        patient_split(synthetic_samples(), 0.7, seed=0)


def test_folds_are_a_patient_grouped_k_fold_whose_validation_sets_cover_train_once():
    samples = synthetic_samples(200)
    vals = [patient_split(samples, 0.2, seed=0, fold=k)[1] for k in range(5)]
    assert sorted(s.path for v in vals for s in v) == sorted(s.path for s in samples)  # each image exactly once
    for k, val in enumerate(vals):
        train, _ = patient_split(samples, 0.2, seed=0, fold=k)
        assert not {s.patient for s in train} & {s.patient for s in val}
    assert patient_split(samples, 0.2, seed=0, fold=0) == patient_split(samples, 0.2, seed=0)  # runs before folds
    with pytest.raises(ValueError, match="fold must be in 0..4"):
        patient_split(samples, 0.2, seed=0, fold=5)


def test_data_summary_reads_a_medmnist_npz_per_split_and_class(tmp_path, capsys):
    """`pneumoscan data summary x.npz` once said "data folder not found"; MedMNIST has no patients ("-")."""
    from pneumoscan.cli import main

    arrays = {}
    for split, n in (("train", 6), ("val", 4), ("test", 2)):
        arrays[f"{split}_images"] = np.zeros((n, 28, 28), np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 3 == 0).astype(np.uint8)[:, None]  # a third PNEUMONIA
    np.savez(tmp_path / "m.npz", **arrays)
    assert main(["data", "summary", str(tmp_path / "m.npz")]) == 0
    lines = capsys.readouterr().out.splitlines()
    table = {tuple(line.split()[:2]): line.split() for line in lines[2:8]}
    assert table[("train", "NORMAL")][2:4] == ["4", "-"] and table[("train", "PNEUMONIA")][2:4] == ["2", "-"]
    assert table[("test", "PNEUMONIA")][5:8] == ["28x28"] * 3 and table[("val", "NORMAL")][-2:] == ["L", "2"]
    assert "train: 6 images, class ratio 2.00:1" in lines


def test_data_summary_of_an_npz_without_medmnist_keys_is_one_line(tmp_path, capsys):
    from pneumoscan.cli import main

    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    assert main(["data", "summary", str(tmp_path / "other.npz")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"pneumoscan: error: {tmp_path / 'other.npz'}: no MedMNIST split in this file")
    assert len(err.splitlines()) == 1
