"""pneumoscan adapt --finetune: patient folds, out-of-fold stopping and calibration, refusals before training, the
model file it writes; on the tiny generated model, and once on the bundled model with real Kermany *train* images."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from conftest import make_model_file, save_gray, synthetic_xray

from pneumoscan import load_model, pipeline
from pneumoscan.adapt import AdaptError, load_site
from pneumoscan.calibrate import fit_calibration
from pneumoscan.cli import main
from pneumoscan.data.labels import read_labelled
from pneumoscan.finetune import FinetuneSettings, finetune, patient_folds

QUICK = FinetuneSettings(epochs=2)


def labelled_csv(root, normal: int, pneumonia: int, per_patient: int = 2):
    """A labels CSV of generated X-rays, ``per_patient`` images per patient (patient_id column)."""
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for label, n, opacity in ((0, normal, 0.0), (1, pneumonia, 0.5)):
        for i in range(n):
            name = f"img{label}_{i:03d}.png"
            save_gray(root / name, synthetic_xray(64, 700 + 100 * label + i, opacity=opacity))
            rows.append((name, ("NORMAL", "PNEUMONIA")[label], f"p{label}-{i // per_patient}"))
    with open(root / "site.csv", "w", newline="") as f:
        csv.writer(f).writerows([("path", "label", "patient_id"), *rows])
    return root / "site.csv"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return load_model(make_model_file(tmp_path_factory.mktemp("ft") / "tiny.safetensors"), precision="float32")


@pytest.fixture(scope="module")
def site(tiny, tmp_path_factory):
    labelled = read_labelled(labelled_csv(tmp_path_factory.mktemp("site"), 20, 40))
    patient_of = {str(s.path): s.patient for s in labelled.samples}
    kept = load_site(tiny, labelled.files(), labelled.labels())
    return kept, [patient_of[f] for f in kept.files]


def test_the_default_settings_are_the_recipe_chosen_on_validation():
    assert FinetuneSettings() == FinetuneSettings(epochs=6, lr=1e-4, folds=3, batch_size=32, weight_decay=1e-4,
                                                  warmup_epochs=0.5, seed=0)


def test_patient_folds_keep_each_patient_in_one_fold_and_cover_every_image():
    labels = np.array([0] * 12 + [1] * 24)
    groups = [f"p{i // 3}" for i in range(36)]
    folds = patient_folds(labels, groups, 3, seed=0)
    assert sorted(np.concatenate(folds).tolist()) == list(range(36))
    for held in folds:
        assert set(labels[held]) == {0, 1}
        inside = {groups[i] for i in held}
        assert not inside & {groups[i] for i in np.setdiff1d(np.arange(36), held)}


def test_smoothed_calibration_stays_finite_on_perfectly_separated_scores():
    rng = np.random.default_rng(0)
    margin = np.r_[rng.normal(-6, 1, 40), rng.normal(6, 1, 80)]
    logits = np.c_[np.zeros(120), margin]
    y = np.r_[np.zeros(40), np.ones(80)]
    t_plain, _ = fit_calibration(logits, y)
    t_smoothed, bias = fit_calibration(logits, y, smoothed=True)
    assert t_plain == pytest.approx(0.05)  # the bound: every probability 0 or 1
    assert 0.5 < t_smoothed < 5 and abs(bias) < 5


@pytest.mark.slow
def test_finetune_scores_every_image_out_of_fold_and_saves_what_it_computed(tiny, site, tmp_path):
    kept, groups = site
    lines: list[str] = []
    adapted = finetune(tiny, kept, groups, settings=QUICK, target_sensitivity=0.9, log=lines.append)
    step = adapted.steps["finetune"]
    assert step["images"] == len(kept) and step["patients"] == len(set(groups))
    assert 1 <= step["epoch"] <= QUICK.epochs and len(step["out_of_fold"]["auc_by_epoch"]) == QUICK.epochs
    assert sum(line.startswith("fold ") for line in lines) == 3 * QUICK.epochs and "chosen" in " ".join(lines)
    base = dict(tiny.backend.network.state_dict())
    assert any(not torch.equal(v, base[k]) for k, v in adapted.network.state_dict().items() if v.is_floating_point())
    path = tmp_path / "ft.safetensors"
    adapted.save(path)
    model = load_model(path, precision="float32")
    logits, _ = adapted.scores(kept)
    screened = pipeline.decide(model, [pipeline.from_array(f, im) for f, im in
                                       zip(kept.files, kept.images.numpy(), strict=True)], ("custom", 0.5))
    assert torch.allclose(torch.stack([s.logits for s in screened]), logits, rtol=0, atol=1e-5)
    record = model.record
    assert record.adaptation["base_sha256"] == tiny.sha256 and record.adaptation["finetune"]["epoch"] == step["epoch"]
    assert record.target_sensitivity == 0.9 and record.prevalence == pytest.approx(40 / 60)
    assert record.drift_reference is not None


def test_finetune_refuses_too_few_positives_before_training(tiny, site):
    kept, groups = site
    lines: list[str] = []
    with pytest.raises(AdaptError, match="at least 149 needed"):
        finetune(tiny, kept, groups, settings=QUICK, log=lines.append)  # the model's 0.98 needs 149 positives
    assert lines == []


def test_cli_finetune_needs_data_and_refuses_without_writing(tiny, tmp_path, capsys):
    out = tmp_path / "ft.safetensors"
    assert main(["adapt", "--model", str(tiny.path), "--images", str(tmp_path), "--finetune", "--out", str(out)]) == 2
    assert "--finetune fine-tunes on the labelled site images of --data" in capsys.readouterr().err
    small = labelled_csv(tmp_path / "small", 15, 20)
    assert main(["adapt", "--model", str(tiny.path), "--data", str(small), "--finetune", "--out", str(out),
                 "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "20 PNEUMONIA images cannot support sensitivity 0.98" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.slow
def test_cli_finetunes_the_bundled_model_on_real_train_images(tmp_path, capsys):
    """The whole command on 60 real Kermany train images (a labels CSV with patient ids), sensitivity 0.9."""
    from pathlib import Path

    from pneumoscan.data.layout import patient_id

    root = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "chest_xray" / "train"
    files = {name: sorted((root / name).iterdir())[:n] for name, n in (("NORMAL", 24), ("PNEUMONIA", 36))}
    site = tmp_path / "site.csv"
    with open(site, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id"])
        for name, paths in files.items():
            w.writerows([str(p), name, patient_id(p.name)] for p in paths)
    out = tmp_path / "site.safetensors"
    assert main(["adapt", "--data", str(site), "--finetune", "--sensitivity", "0.9", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "fine-tuned: " in captured.err and "wrote" in captured.out
    model = load_model(out)
    step = model.record.adaptation["finetune"]
    assert step["images"] >= 55 and step["out_of_fold"]["auc"] > 0.9
    predictions = list(model.predict_files([str(p) for p in files["PNEUMONIA"][:4]]))
    assert all(p.status in ("ok", "out_of_distribution") for p in predictions)
