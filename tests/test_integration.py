"""On the real Kermany data beside the repository (../shared/data/chest_xray): counts, patient split, and a
very short training run on a small subset. Images are linked, never copied into the repository."""

from __future__ import annotations

import time

import pytest

from pneumoscan.cli import main

pytestmark = pytest.mark.integration

EXPECTED = {("train", "NORMAL"): 1341, ("train", "PNEUMONIA"): 3875, ("val", "NORMAL"): 8,
            ("val", "PNEUMONIA"): 8, ("test", "NORMAL"): 234, ("test", "PNEUMONIA"): 390}


def test_data_summary_shows_the_official_image_counts(kermany, capsys):
    assert main(["data", "summary", str(kermany)]) == 0
    rows = {tuple(line.split()[:2]): int(line.split()[2]) for line in capsys.readouterr().out.splitlines()
            if line.split()[:1] in (["train"], ["val"], ["test"]) and len(line.split()) > 3
            and line.split()[2].isdigit()}
    assert rows == EXPECTED


def test_patient_split_of_real_train_keeps_patients_apart(kermany):
    from pneumoscan.data.layout import list_split, patient_split

    samples = list_split(kermany, "train")
    train, val = patient_split(samples, 0.2, seed=0)
    assert not {s.patient for s in train} & {s.patient for s in val}
    assert len(train) + len(val) == len(samples) == 5216
    # several images per patient exist, so grouping matters here
    assert len({s.patient for s in samples}) < len(samples)


def test_short_training_on_a_real_subset(kermany, tmp_path):
    from pneumoscan.config import load_config
    from pneumoscan.data.layout import CLASSES
    from pneumoscan.modelfile import read_model_file
    from pneumoscan.train import fit

    data = tmp_path / "subset"
    for name in CLASSES:
        (data / "train" / name).mkdir(parents=True)
        for src in sorted((kermany / "train" / name).iterdir())[:40]:
            (data / "train" / name / src.name).symlink_to(src)
    cfg = load_config(None, image_size=64, epochs=1, batch_size=16, num_workers=0, val_fraction=0.25)
    started = time.time()
    fit(cfg, data, tmp_path / "run", progress=False)
    seconds = time.time() - started
    _, meta = read_model_file(tmp_path / "run" / "model.safetensors")
    assert meta["training"]["train_images"] + meta["training"]["val_images"] == 80
    assert meta["training"]["skipped_images"] == 0
    assert 0.0 <= meta["validation"]["auc"] <= 1.0
    assert seconds < 60, f"took {seconds:.0f} s"
