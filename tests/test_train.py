"""fit() end to end on the generated tiny dataset: files written, resume, early stopping, --weights, DDP,
corrupt images. Everything runs at 64 px from random init so the whole module takes well under a minute."""

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
    with (trained_run / "split.csv").open() as f:
        split = list(csv.DictReader(f))
    sides: dict[str, set[str]] = {}
    for row in split:
        sides.setdefault(row["patient"], set()).add(row["subset"])
    assert len(split) == 48 and all(len(s) == 1 for s in sides.values())
    assert {r["subset"] for r in split} == {"train", "val"}
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


# ---- configuration -------------------------------------------------------------------------------------------

def test_config_yaml_round_trip(tmp_path):
    from pneumoscan.config import TrainConfig

    cfg = load_config(None, arch="resnet18", epochs=3, seed=7)
    cfg.augment.scale = (0.5, 0.9)
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and isinstance(again, TrainConfig) and again.augment.scale == (0.5, 0.9)


def test_config_unknown_key_error_names_the_key_and_the_file(tmp_path):
    from pneumoscan.config import ConfigError

    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key\(s\) learning_rate"):
        load_config(path)


def test_config_nested_augment_keys_are_read_and_checked(tmp_path):
    from pneumoscan.config import ConfigError

    path = tmp_path / "aug.yaml"
    path.write_text("augment:\n  degrees: 3.5\n  gamma: [0.9, 1.1]\n  enabled: false\n")
    cfg = load_config(path)
    assert cfg.augment.degrees == 3.5 and cfg.augment.gamma == (0.9, 1.1) and not cfg.augment.enabled
    assert cfg.augment.brightness == 0.25  # unspecified nested keys keep their defaults
    path.write_text("augment:\n  rotate: 3\n")
    with pytest.raises(ConfigError, match=r"augment: unknown key\(s\) rotate"):
        load_config(path)


def test_command_line_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 9\nseed: 3\n")
    cfg = load_config(path, epochs=2, seed=None)
    assert cfg.epochs == 2 and cfg.seed == 3


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


@pytest.mark.parametrize("mixing", ["mixup", "cutmix"])
def test_mixing_trains_on_mixed_pairs_and_stays_reproducible(tiny_dataset, tmp_path, mixing):
    runs = {"a": 0.4, "b": 0.4, "plain": 0.0}
    for name, alpha in runs.items():
        fit(fast_config(epochs=1, **{mixing: alpha}), tiny_dataset, tmp_path / name, progress=False)
    a, b, plain = (load_file(str(tmp_path / name / "best.safetensors")) for name in runs)
    assert all(torch.equal(a[k], b[k]) for k in a)  # same seed, same mixing weights and pairs
    assert not all(torch.equal(a[k], plain[k]) for k in a)
    with (tmp_path / "a" / "metrics.csv").open() as f:
        assert np.isfinite(float(next(csv.DictReader(f))["train_loss"]))


def test_split_seed_keeps_the_validation_patients_when_the_seed_changes(tiny_dataset, tmp_path):
    from pneumoscan.data.layout import read_split

    fit(fast_config(epochs=1, seed=5, split_seed=0), tiny_dataset, tmp_path / "s5", progress=False)
    fit(fast_config(epochs=1, seed=0), tiny_dataset, tmp_path / "s0", progress=False)
    val5 = sorted(str(s.path) for s in read_split(tmp_path / "s5" / "split.csv")[1])
    val0 = sorted(str(s.path) for s in read_split(tmp_path / "s0" / "split.csv")[1])
    assert val5 == val0


def test_ema_saves_the_weight_average_and_resumes_it_exactly(tiny_dataset, tmp_path, monkeypatch):
    fit(fast_config(epochs=1, ema=0.9), tiny_dataset, tmp_path / "one", progress=False)
    ckpt = load_file(str(tmp_path / "one" / "checkpoint.safetensors"))
    best = load_file(str(tmp_path / "one" / "best.safetensors"))
    average = {k[len("ema.module."):]: v for k, v in ckpt.items() if k.startswith("ema.module.")}
    raw = {k[len("model."):]: v for k, v in ckpt.items() if k.startswith("model.")}
    assert average.keys() == raw.keys() == best.keys()
    assert int(ckpt["ema.n_averaged"]) > 1
    assert any(raw[k].is_floating_point() and not torch.equal(average[k], raw[k]) for k in raw)
    assert all(torch.equal(best[k], average[k]) for k in best)  # the average is what is evaluated and kept

    real_save = train_mod._save_checkpoint

    def save_then_interrupt(*args, **kwargs):
        real_save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(train_mod, "_save_checkpoint", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        fit(fast_config(ema=0.9), tiny_dataset, tmp_path / "cut", progress=False)
    monkeypatch.setattr(train_mod, "_save_checkpoint", real_save)
    fit(fast_config(ema=0.9), tiny_dataset, tmp_path / "cut", resume=True, progress=False)
    fit(fast_config(ema=0.9), tiny_dataset, tmp_path / "whole", progress=False)
    resumed = load_file(str(tmp_path / "cut" / "checkpoint.safetensors"))
    whole = load_file(str(tmp_path / "whole" / "checkpoint.safetensors"))
    assert resumed.keys() == whole.keys() and all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_ema_outside_zero_to_one_is_a_clear_error(tiny_dataset, tmp_path):
    with pytest.raises(PneumoscanError, match=r"ema must be a decay in \[0, 1\)"):
        fit(fast_config(ema=1.5), tiny_dataset, tmp_path / "bad", progress=False)
    assert not (tmp_path / "bad").exists()


def test_standardize_and_equalize_are_trained_with_and_saved_in_the_model(tiny_dataset, tmp_path):
    from pneumoscan import load_model
    from pneumoscan.preprocess import STANDARD_INTENSITY

    run = tmp_path / "std"
    fit(fast_config(epochs=1, standardize=True, equalize=True), tiny_dataset, run, progress=False)
    prep = load_model(run / "model.safetensors").preprocessing
    assert prep.standardize == STANDARD_INTENSITY and prep.equalize
    default = train_mod.preprocessing_for(fast_config())
    assert default.standardize is None and not default.equalize  # off unless the config asks
    assert train_mod.preprocessing_for(fast_config(standardize=True, standardize_region=0.7)).standardize_region == 0.7


def test_linear_probe_starts_fine_tuning_from_a_head_that_already_separates_the_classes(tiny_dataset, tmp_path):
    from sklearn.metrics import roc_auc_score

    from pneumoscan.augment import build_augment
    from pneumoscan.models import create_model

    cfg = fast_config(linear_probe=True)
    prep, rt = train_mod.preprocessing_for(cfg), train_mod.setup_runtime("off")
    train_s, _ = train_mod._split(cfg, tiny_dataset, tmp_path, rt, resume=False)
    images, kept, _ = train_mod.decode_cache(train_s, prep, desc="", progress=False)
    labels = np.array([s.label for s in kept])
    torch.manual_seed(0)
    net = create_model(cfg.arch, pretrained="none")
    random_head, _ = train_mod.infer(net, images, prep, rt)
    train_mod.linear_probe(net, images, labels, build_augment(cfg.augment, prep.size), prep, rt)
    probed, _ = train_mod.infer(net, images, prep, rt)
    assert roc_auc_score(labels, probed[:, 1] - probed[:, 0]) > 0.95
    assert roc_auc_score(labels, probed[:, 1] - probed[:, 0]) > roc_auc_score(labels, random_head[:, 1] - random_head[:, 0])


def test_linear_probe_run_keeps_batchnorm_statistics_through_fine_tuning(tiny_dataset, tmp_path):
    fit(fast_config(epochs=1, linear_probe=True), tiny_dataset, tmp_path / "lp", progress=False)
    fit(fast_config(epochs=1), tiny_dataset, tmp_path / "plain", progress=False)
    lp, plain = (load_file(str(tmp_path / name / "best.safetensors")) for name in ("lp", "plain"))
    key = "conv_head.weight"  # trained in both runs
    assert not torch.equal(lp[key], plain[key])
    stats = [k for k in lp if k.startswith("bn2.running_")]  # the last BatchNorm: not frozen by freeze_stages
    assert stats and all(torch.equal(lp[k], torch.zeros_like(lp[k]) if k.endswith("mean") else torch.ones_like(lp[k]))
                         for k in stats)
    assert not all(torch.equal(plain[k], lp[k]) for k in stats)


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
