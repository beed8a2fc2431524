"""fit() end to end on the generated tiny dataset: files written, resume, early stopping, --weights, DDP,
corrupt images, validation scored through the one scoring function. Everything runs at 64 px from random init so
the whole module takes well under a minute."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pneumoscan import train as train_mod
from pneumoscan.config import load_config
from pneumoscan.errors import PneumoscanError
from pneumoscan.modelfile import read_model_file
from pneumoscan.run import RunFolder
from pneumoscan.train import fit

FAST = dict(image_size=64, epochs=2, batch_size=8, pretrained="none", num_workers=0)


def fast_config(**overrides):
    return load_config(None, **{**FAST, **overrides})


def checkpoint_weights(run: Path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(run / "checkpoint.safetensors")).items() if k.startswith("model.")}


@pytest.fixture(scope="module")
def trained_run(tiny_dataset, tmp_path_factory) -> Path:
    """One uninterrupted 2-epoch run shared by the tests that only read its files."""
    run = tmp_path_factory.mktemp("runs") / "tiny"
    fit(fast_config(), tiny_dataset, run, progress=False)
    return run


def test_fit_writes_model_file_with_metadata_logs_and_patient_split(trained_run):
    tensors, meta = read_model_file(trained_run / "model.safetensors")
    for key in ("arch", "classes", "preprocessing", "temperature", "thresholds", "guard", "validation", "training",
                "version", "created"):
        assert key in meta, key
    assert set(meta["thresholds"]) == {"screening", "balanced"}
    assert meta["preprocessing"]["size"] == 64 and meta["training"]["epochs_run"] == 2
    assert any(k.startswith("guard.") for k in tensors)
    with (trained_run / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(0 <= float(r["val_auc"]) <= 1 for r in rows)
    train, val = RunFolder(trained_run).split()
    sides: dict[str, set[str]] = {}
    for subset, samples in (("train", train), ("val", val)):
        for s in samples:
            sides.setdefault(s.patient, set()).add(subset)
    assert len(train) + len(val) == 48 and all(len(s) == 1 for s in sides.values()) and train and val
    assert any(p.name.startswith("events.out.tfevents") for p in (trained_run / "tensorboard").iterdir())
    assert not list(trained_run.glob(".*.tmp"))


def test_fit_refuses_to_overwrite_an_existing_run(trained_run, tiny_dataset):
    before = (trained_run / "model.safetensors").stat().st_mtime_ns
    with pytest.raises(PneumoscanError, match="already holds a trained model"):
        fit(fast_config(), tiny_dataset, trained_run, progress=False)
    assert (trained_run / "model.safetensors").stat().st_mtime_ns == before


def test_resume_after_interruption_gives_the_same_weights_as_an_uninterrupted_run(
        trained_run, tiny_dataset, tmp_path, monkeypatch):
    """Sampling and augmentation are seeded per epoch, so stopping after epoch 1 and resuming must reproduce
    the uninterrupted run bit for bit (same config; changing --epochs on resume changes the LR schedule)."""
    real_save = train_mod._save_checkpoint

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    run = tmp_path / "interrupted"
    monkeypatch.setattr(train_mod, "_save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit(fast_config(), tiny_dataset, run, progress=False)
    monkeypatch.setattr(train_mod, "_save_checkpoint", real_save)
    assert not (run / "model.safetensors").exists()
    fit(fast_config(), tiny_dataset, run, resume=True, progress=False)
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 2

    resumed, reference = checkpoint_weights(run), checkpoint_weights(trained_run)
    assert resumed.keys() == reference.keys()
    assert all(torch.equal(resumed[k], reference[k]) for k in reference)
    assert (run / "split.csv").read_text() == (trained_run / "split.csv").read_text()
    assert [line.split(",")[:4] for line in (run / "metrics.csv").read_text().splitlines()] == \
           [line.split(",")[:4] for line in (trained_run / "metrics.csv").read_text().splitlines()]


def test_resume_without_checkpoint_is_a_clear_error(tiny_dataset, tmp_path):
    with pytest.raises(PneumoscanError, match="nothing to resume"):
        fit(fast_config(), tiny_dataset, tmp_path / "new", resume=True, progress=False)


def test_early_stopping_ends_training_after_patience_epochs_without_better_auc(
        tiny_dataset, tmp_path, monkeypatch):
    aucs = iter([0.9, 0.8, 0.7, 0.6, 0.5])
    monkeypatch.setattr(train_mod, "roc_auc", lambda y, p: next(aucs, 0.5))
    run = tmp_path / "early"
    fit(fast_config(epochs=5, patience=1), tiny_dataset, run, progress=False)
    assert len((run / "metrics.csv").read_text().splitlines()) == 1 + 2
    meta = read_model_file(run / "model.safetensors")[1]
    assert meta["training"]["epochs_run"] == 2 and meta["training"]["best_epoch"] == 1


def test_weights_file_starts_resnet18_from_a_local_state_dict(tiny_dataset, tmp_path):
    """How the ResNet ImageNet path is tested offline: a saved resnet18 state dict in place of the download."""
    import timm

    torch.manual_seed(123)
    state = {k: v.contiguous() for k, v in timm.create_model("resnet18", num_classes=1000).state_dict().items()}
    weights = tmp_path / "resnet18.safetensors"
    save_file(state, str(weights))
    run = tmp_path / "r18"
    fit(fast_config(arch="resnet18", weights=str(weights), epochs=1, batch_size=32), tiny_dataset, run,
        progress=False)
    tensors, meta = read_model_file(run / "model.safetensors")
    assert meta["arch"] == "resnet18" and meta["training"]["config"]["weights"] == str(weights)
    # conv1 and layer1 are frozen by default, so they must still be exactly the loaded weights
    assert torch.equal(tensors["conv1.weight"], state["conv1.weight"])
    assert torch.equal(tensors["layer1.0.conv1.weight"], state["layer1.0.conv1.weight"])


def test_resnet18_imagenet_download_offline_is_one_line_with_the_fix(tiny_dataset, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    from pneumoscan.cli import main

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network retries in tests
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # skips pneumoscan's reachability probe: the hub itself fails
    run = tmp_path / "offline"
    code = main(["train", "--data", str(tiny_dataset), "--out", str(run), "--arch", "resnet18",
                 "--pretrained", "imagenet", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("pneumoscan: error: could not download ImageNet weights for resnet18")
    assert "--weights FILE" in err[0] and "--pretrained none" in err[0]
    assert not (run / "model.safetensors").exists()


def test_unreachable_hub_fails_in_seconds_with_one_line(tiny_dataset, tmp_path, monkeypatch, capsys):
    import socket

    from pneumoscan.cli import main

    def refuse(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(socket, "create_connection", refuse)
    run = tmp_path / "unreachable"
    code = main(["train", "--data", str(tiny_dataset), "--out", str(run), "--arch", "resnet50", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith("pneumoscan: error: cannot reach huggingface.co to download ImageNet weights for resnet50")
    assert not run.exists()


def test_corrupt_image_is_reported_and_skipped_not_trained_on(tiny_dataset, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset / "train", data / "train")
    bad = data / "train" / "NORMAL" / "IM-0099-0001.jpeg"
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    run = tmp_path / "run"
    fit(fast_config(epochs=1), data, run, progress=False)
    skipped = (run / "skipped.txt").read_text()
    assert "IM-0099-0001.jpeg" in skipped and len(skipped.strip().splitlines()) == 1
    assert "IM-0099-0001.jpeg" in capsys.readouterr().err
    training = read_model_file(run / "model.safetensors")[1]["training"]
    assert training["skipped_images"] == 1
    assert training["train_images"] + training["val_images"] == 48  # 49 files, the corrupt one left out


@pytest.mark.slow
def test_torchrun_two_processes_gloo_on_cpu_writes_one_model_file(tiny_dataset, tmp_path):
    run = tmp_path / "ddp"
    config = tmp_path / "fast.yaml"
    config.write_text("".join(f"{k}: {v}\n" for k, v in {**FAST, "epochs": 1}.items()))
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "pneumoscan.cli",
         "train", "--data", str(tiny_dataset), "--out", str(run), "--config", str(config), "--quiet"],
        capture_output=True, text=True, timeout=240, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in run.glob("*.safetensors")) == ["best.safetensors", "checkpoint.safetensors",
                                                                  "model.safetensors"]
    with safe_open(str(run / "model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["pneumoscan"])
    assert meta["training"]["hardware"].split(",")[0].endswith("cpu x2")
    assert str(run / "model.safetensors") in proc.stdout


def test_resume_names_configuration_changes_that_break_exactness(tmp_path):
    """Resuming a 1-epoch run with --epochs 2 stretches the cosine schedule, so it cannot equal an uninterrupted
    2-epoch run; fit() says so instead of pretending."""
    from pneumoscan.train import config_changes

    fast_config(epochs=1).save(tmp_path / "config.yaml")
    assert config_changes(tmp_path / "config.yaml", fast_config(epochs=1)) == []
    assert config_changes(tmp_path / "config.yaml", fast_config(epochs=2)) == ["epochs 1 -> 2"]
    assert config_changes(tmp_path / "missing.yaml", fast_config()) == []


def test_shifted_validation_scores_the_run_split_under_every_fixed_shift(trained_run, tiny_dataset, capsys):
    from pneumoscan.cli import main
    from pneumoscan.evaluate import _shift_ops, evaluate_shifts, validation_images
    from pneumoscan.predict import load_model

    model = load_model(trained_run, precision="float32")
    images, labels = validation_images(model)
    assert images.dtype == np.uint8 and images.shape[1:] == (64, 64) and len(images) == len(labels)
    for name, op in _shift_ops(64).items():
        shifted = op(torch.from_numpy(images[0])[None])
        assert shifted.shape == (1, 64, 64) and shifted.dtype == torch.uint8, name
        assert not torch.equal(shifted, torch.from_numpy(images[0])[None]), f"{name} changed nothing"
    results = evaluate_shifts(model, images, labels)
    assert [r.shift for r in results] == ["none", *_shift_ops(64)]
    val_auc = read_model_file(trained_run / "model.safetensors")[1]["validation"]["auc"]
    assert results[0].auc == pytest.approx(val_auc, abs=1e-4)  # "none" is the validation the run reported

    assert main(["evaluate", "--model", str(trained_run), "--data", str(tiny_dataset), "--split", "validation",
                 "--shifts", "--precision", "float32"]) == 0
    out = capsys.readouterr().out
    assert "validation split under acquisition shifts" in out and "jpeg quality 25" in out and "mean of shifts" in out


def test_shifted_evaluation_refuses_the_test_split(trained_run, tiny_dataset, capsys):
    from pneumoscan.cli import main

    assert main(["evaluate", "--model", str(trained_run), "--data", str(tiny_dataset), "--split", "test",
                 "--shifts"]) == 2
    assert "--shifts scores the validation split only" in capsys.readouterr().err


def test_split_seed_keeps_the_validation_patients_when_the_seed_changes(tiny_dataset, tmp_path):
    fit(fast_config(epochs=1, seed=5, split_seed=0), tiny_dataset, tmp_path / "s5", progress=False)
    fit(fast_config(epochs=1, seed=0, split_seed=None), tiny_dataset, tmp_path / "s0", progress=False)
    val5 = sorted(str(s.path) for s in RunFolder(tmp_path / "s5").split()[1])
    val0 = sorted(str(s.path) for s in RunFolder(tmp_path / "s0").split()[1])
    assert val5 == val0


def test_standardize_is_trained_with_and_saved_in_the_model(trained_run):
    from pneumoscan import load_model
    from pneumoscan.preprocess import STANDARD_INTENSITY

    prep = load_model(trained_run / "model.safetensors").preprocessing
    assert prep.standardize == STANDARD_INTENSITY  # on by default, as in the bundled recipe
    assert train_mod.preprocessing_for(fast_config(standardize=False)).standardize is None


def test_thresholds_are_fitted_on_what_prediction_computes_in_float32(trained_run):
    """val_predictions.csv holds the calibrated probabilities the thresholds were chosen on; scoring the same
    validation images through the model file's prediction path in float32 must reproduce them."""
    from pneumoscan import load_model

    meta = read_model_file(trained_run / "model.safetensors")[1]
    assert meta["precision"] == "float32"
    model = load_model(trained_run, precision="float32")
    images, labels = RunFolder(trained_run).validation_images(model.preprocessing)
    scores = model.score(images)
    with (trained_run / "val_predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["label"]) for r in rows] == labels.tolist()
    np.testing.assert_allclose(model.probability(scores.logits).numpy(), [float(r["probability"]) for r in rows],
                               atol=2e-6)
    np.testing.assert_allclose(scores.guard.numpy(), [float(r["guard_score"]) for r in rows], atol=1e-4)


def test_validation_scores_through_the_stage_in_float32(monkeypatch):
    """Training's validation goes through the screening stage (pipeline.decide on the uint8 cache) and so through
    the one scoring function, TorchBackend.forward, in float32 on uint8 batches."""
    from pneumoscan import pipeline
    from pneumoscan.backends.torch import TorchBackend
    from pneumoscan.constants import BATCH_SIZE
    from pneumoscan.models import create_model

    assert not hasattr(train_mod, "infer")
    seen, decided = [], []
    real, real_decide = TorchBackend.forward, pipeline.decide

    def spy(self, images, **kwargs):
        seen.append((self.precision, images.dtype))
        return real(self, images, **kwargs)

    def spy_decide(model, items, op, **kwargs):
        decided.append(len(items))
        return real_decide(model, items, op, **kwargs)

    monkeypatch.setattr(TorchBackend, "forward", spy)
    monkeypatch.setattr(pipeline, "decide", spy_decide)
    cfg = fast_config()
    net = create_model(cfg.arch, pretrained="none")
    n = BATCH_SIZE + 3
    logits, feats = train_mod.score_images(net, train_mod.preprocessing_for(cfg), np.zeros((n, 64, 64), np.uint8))
    assert logits.shape == (n, 2) and len(feats) == n
    assert decided == [BATCH_SIZE, 3] and seen == [("float32", torch.uint8)] * 2


def test_the_model_file_is_written_through_the_typed_record_with_its_version(trained_run):
    """The raw safetensors header holds the record as ModelRecord.to_dict writes it, record_version included."""
    from pneumoscan.record import RECORD_VERSION, ModelRecord

    with safe_open(str(trained_run / "model.safetensors"), framework="pt") as f:
        raw = json.loads(f.metadata()["pneumoscan"])
    assert raw["record_version"] == RECORD_VERSION
    assert json.loads(ModelRecord.from_dict(raw).to_json()) == raw


def test_loading_a_model_imports_nothing_of_training():
    """In a fresh interpreter, loading the bundled model leaves the training modules and TensorBoard unimported,
    and works with YAML made unimportable (timm's huggingface_hub imports YAML when it can; timm works without
    it, so the block shows that nothing of pneumoscan's needs it)."""
    code = ("import sys\nsys.modules['yaml'] = None\nfrom pneumoscan.predict import load_model\n"
            "model = load_model()\nprint(model.name, sorted(m for m in ('pneumoscan.train', 'pneumoscan.config', "
            "'pneumoscan.augment', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip().splitlines()[-1] == "pneumoscan-default []", out.stdout + out.stderr


def test_quick_mode_trains_on_an_image_sample_for_a_step_budget(tiny_dataset, tmp_path):
    """max_train_images samples the training split (each class keeps its share; validation stays whole) and
    max_steps ends the run after that many optimizer steps, whatever epochs says."""
    run = tmp_path / "quick"
    fit(fast_config(epochs=5, max_train_images=16, max_steps=3), tiny_dataset, run, progress=False)
    meta = read_model_file(run / "model.safetensors")[1]
    train, val = RunFolder(run).split()
    assert len(train) == meta["training"]["train_images"] == 16 and {s.label for s in train} == {0, 1}
    with (run / "metrics.csv").open() as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1", "2"]  # 16 images / batch 8 = 2 steps an epoch
    full, _ = RunFolder(run).source().training_split(0.2, 0)
    assert len(val) == 48 - len(full)  # the validation split is not sampled


def test_the_quick_config_loads_with_a_budget():
    cfg = load_config(Path(__file__).parents[1] / "configs" / "quick.yaml")
    assert cfg.max_steps is not None and cfg.max_train_images is not None and cfg.epochs >= 1


def test_device_cuda_without_a_gpu_is_one_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PneumoscanError, match="no CUDA GPU"):
        train_mod.setup_runtime("auto", "cuda")
    assert train_mod.setup_runtime("auto", "auto").device.type == "cpu"


def test_an_old_run_whose_config_records_removed_options_at_neutral_values_still_loads(trained_run, tmp_path):
    run = tmp_path / "old"
    shutil.copytree(trained_run, run)
    old = (run / "config.yaml").read_text()
    (run / "config.yaml").write_text(old + "label_smoothing: 0.0\nmixup: 0.0\ncutmix: 0.0\nema: 0.0\n"
                                           "linear_probe: false\nequalize: false\nstandardize_region: 1.0\n")
    assert RunFolder(run).config() == RunFolder(trained_run).config()
    (run / "config.yaml").write_text(old + "mixup: 0.2\n")
    with pytest.raises(PneumoscanError, match=r"mixup was removed .*experiment 5 in docs/experiments.md"):
        train_mod.recalibrate(run)


def test_zoom_out_shrinks_the_radiograph_inside_a_black_border():
    from pneumoscan.augment import build_augment
    from pneumoscan.config import AugmentConfig

    plain = dict(degrees=0.0, translate=0.0, scale=(1.0, 1.0), ratio=(1.0, 1.0), brightness=0.0, contrast=0.0,
                 gamma=(1.0, 1.0), blur_p=0.0, sharpen_p=0.0, noise_std=0.0, jpeg_p=0.0)
    white = torch.full((1, 64, 64), 255, dtype=torch.uint8)
    torch.manual_seed(0)
    as_is = build_augment(AugmentConfig(**plain), 64)(white)
    shrunk = [build_augment(AugmentConfig(**plain, zoom_out=0.5), 64)(white) for _ in range(8)]
    kept = [float((s > 0.5).float().mean()) for s in shrunk]  # the image's share of the frame: side scale squared
    assert as_is.min() == 1.0
    assert all(s[0, 32, 32] == 1.0 for s in shrunk)  # the radiograph stays centred
    assert all(k >= 0.25 - 0.05 for k in kept) and min(kept) < 0.8 and len(set(kept)) > 1
    assert all(s[0, 0, 0] == 0 for s, k in zip(shrunk, kept, strict=True) if k < 0.9)  # the border is black


def test_zoom_out_off_by_default_leaves_the_augmentation_of_earlier_recipes_unchanged():
    from torchvision.transforms import v2

    from pneumoscan.augment import build_augment
    from pneumoscan.config import AugmentConfig

    affine = build_augment(AugmentConfig(), 64).transforms[1]
    assert affine.scale is None and affine.interpolation == v2.InterpolationMode.NEAREST  # as before zoom_out existed


def test_calibration_of_perfectly_separated_validation_keeps_the_ranking():
    """Separable validation logits drive the NLL's temperature to 0; with the temperature clipped, the bias is refit
    for it, so calibrated probabilities do not all saturate at 1 (which made every tiny run report AUC 0.5)."""
    from pneumoscan.calibrate import fit_decision_rule, softmax_pneumonia
    from pneumoscan.metrics import roc_auc

    y = np.array([0] * 10 + [1] * 30)
    margin = np.where(y == 1, 3.0, 1.0) + np.linspace(0, 0.5, len(y))
    logits = np.stack([np.zeros_like(margin), margin], axis=1)
    temperature, bias, _ = fit_decision_rule(logits, y, 0.98)
    p = softmax_pneumonia(logits, temperature, bias)
    assert temperature == pytest.approx(0.05) and roc_auc(y, p) == 1.0 and p.min() < 0.5 < p.max()


def test_calibrate_reads_an_old_run_from_another_directory(trained_run, tiny_dataset, tmp_path, monkeypatch, capsys):
    """A run written before split.csv format 2 keeps paths relative to where training ran; `pneumoscan calibrate`
    run from elsewhere must still find every image (it once skipped them)."""
    from pneumoscan.cli import main

    repo = tmp_path / "repo"
    shutil.copytree(tiny_dataset, repo / "data")
    run = repo / "runs" / "old"
    shutil.copytree(trained_run, run)
    train, val = RunFolder(trained_run).split()
    rows = ["path,label,patient,subset"]
    for subset, items in (("train", train), ("val", val)):
        rows += [f"data/{s.path.relative_to(tiny_dataset.resolve())},{['NORMAL', 'PNEUMONIA'][s.label]},{s.patient},"
                 f"{subset}" for s in items]
    (run / "split.csv").write_text("\n".join(rows) + "\n")
    monkeypatch.chdir(tmp_path)
    assert main(["calibrate", str(run)]) == 0
    training = read_model_file(run / "model.safetensors")[1]["training"]
    assert (training["train_images"], training["val_images"], training["skipped_images"]) == (len(train), len(val), 0)
    assert training["data"] == str((repo / "data").resolve())
    assert (run / "split.csv").read_text().startswith("path,label")  # the record is read, never rewritten
    capsys.readouterr()


def test_batches_made_at_one_thread_are_bit_identical_to_those_made_at_the_training_count():
    """train.one_thread and ColorJitter's mean at the training count: the same augmented batches as before."""
    from pneumoscan.augment import build_augment
    from pneumoscan.config import AugmentConfig

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (12, 224, 224), dtype=np.uint8)
        labels = np.array([0, 1] * 6)

        def batches(augment, wrap):
            dataset = train_mod.CachedImages(images, labels, augment)
            torch.manual_seed(7)
            loader = torch.utils.data.DataLoader(dataset, batch_size=4, sampler=list(range(12)))
            return [x for x, _ in (wrap(loader) if wrap else loader)]

        before = batches(build_augment(AugmentConfig(), 224), None)
        now = batches(build_augment(AugmentConfig(), 224, reduction_threads=2), train_mod.one_thread)
        assert torch.get_num_threads() == 2
        assert all(torch.equal(a, b) for a, b in zip(before, now, strict=True))
    finally:
        torch.set_num_threads(threads)
