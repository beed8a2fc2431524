"""Training configuration: the defaults are the shipped recipe, every value is type- and range-checked when it is
loaded (one line naming the key and the file, before any work), removed options load only at their neutral value."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pneumoscan.cli import main
from pneumoscan.config import REMOVED, ConfigError, TrainConfig, load_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_train_config_defaults_are_configs_default_yaml():
    assert load_config(CONFIGS / "default.yaml") == TrainConfig()


@pytest.mark.parametrize("path", sorted((CONFIGS / "experiments").glob("*.yaml")) + [CONFIGS / "pneumoniamnist.yaml"],
                         ids=lambda p: p.name)
def test_experiment_configs_load_and_state_only_what_they_change(path):
    load_config(path)
    text = path.read_text()
    assert text.startswith("#"), "an experiment config starts with a comment saying what it is"
    defaults = TrainConfig().to_dict()
    for key, value in (yaml.safe_load(text) or {}).items():
        if isinstance(value, dict):
            for sub, v in value.items():
                assert (tuple(v) if isinstance(v, list) else v) != defaults[key][sub], f"{key}.{sub} is the default"
        else:
            assert value != defaults[key], f"{key} restates the default"


def test_config_yaml_round_trip(tmp_path):
    cfg = load_config(None, arch="resnet18", epochs=3, seed=7)
    cfg.augment.scale = (0.5, 0.9)
    cfg.save(tmp_path / "c.yaml")
    again = load_config(tmp_path / "c.yaml")
    assert again == cfg and isinstance(again, TrainConfig) and again.augment.scale == (0.5, 0.9)


def test_config_unknown_key_error_names_the_key_and_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("epochs: 2\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=rf"{path}: unknown key\(s\) learning_rate"):
        load_config(path)


def test_config_nested_augment_keys_are_read_and_checked(tmp_path):
    path = tmp_path / "aug.yaml"
    path.write_text("augment:\n  degrees: 3.5\n  gamma: [0.9, 1.1]\n  enabled: false\n")
    cfg = load_config(path)
    assert cfg.augment.degrees == 3.5 and cfg.augment.gamma == (0.9, 1.1) and not cfg.augment.enabled
    assert cfg.augment.brightness == 0.25  # unspecified nested keys keep their defaults
    path.write_text("augment:\n  rotate: 3\n")
    with pytest.raises(ConfigError, match=r"unknown key\(s\) augment.rotate"):
        load_config(path)


def test_command_line_overrides_win_over_the_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 9\nseed: 3\n")
    cfg = load_config(path, epochs=2, seed=None)
    assert cfg.epochs == 2 and cfg.seed == 3


@pytest.mark.parametrize(("text", "message"), [
    ("epochs: 0", "epochs must be an integer >= 1, got 0"),
    ("epochs: -3", "epochs must be an integer >= 1, got -3"),
    ("epochs: two", "epochs must be an integer >= 1, got 'two'"),
    ("epochs: 2.5", "epochs must be an integer >= 1, got 2.5"),
    ("batch_size: 0", "batch_size must be an integer >= 1, got 0"),
    ("standardize: 'yes'", "standardize must be true or false, got 'yes'"),
    ("channels_last: 1", "channels_last must be true or false, got 1"),
    ("lr: -0.001", "lr must be > 0, got -0.001"),
    ("lr: .nan", "lr must be > 0, got nan"),
    ("weight_decay: -1", "weight_decay must be >= 0, got -1"),
    ("target_sensitivity: 1.0", "target_sensitivity must be in (0, 1), got 1.0"),
    ("sampler: random", "sampler must be one of weighted, shuffle, got 'random'"),
    ("pretrained: yes", "pretrained must be one of imagenet, none, got True"),
    ("image_size: 8", "image_size must be an integer >= 32 or null, got 8"),
    ("freeze_stages: -1", "freeze_stages must be an integer >= 0 or null, got -1"),
    ("freeze_stages: 12", "freeze_stages must be at most 9 for efficientnet_lite0, got 12"),
    ("arch: vgg16", "unknown architecture 'vgg16'"),
    ("val_fraction: 0.6", "val_fraction must be in (0, 0.5), got 0.6"),
    ("augment:\n  zoom_out: 1.5", "augment.zoom_out must be in (0, 1], got 1.5"),
    ("augment:\n  blur_p: 2", "augment.blur_p must be in [0, 1], got 2"),
    ("augment:\n  scale: [0.9, 0.5]", "augment.scale must be a pair [low, high] of numbers in (0, 1], low <= high"),
    ("augment:\n  gamma: 1.2", "augment.gamma must be a pair [low, high] of numbers > 0, low <= high, got 1.2"),
    ("augment: [1, 2]", "augment must be a mapping, got list"),
    ("- epochs: 1", "expected a mapping of config keys, got list"),
])
def test_a_bad_value_is_one_line_naming_the_key_and_the_file(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text + "\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value).startswith(f"{path}: {message}") and "\n" not in str(info.value)


def test_a_float_given_as_an_integer_or_in_dotless_exponent_form_is_read_as_a_float(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("lr: 1\nwarmup_epochs: 0\nweight_decay: 5e-5\n")  # PyYAML reads 5e-5 as a string
    cfg = load_config(path)
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float) and isinstance(cfg.warmup_epochs, float)
    assert cfg.weight_decay == 5e-5
    path.write_text("epochs: 1e1\n")
    with pytest.raises(ConfigError, match="epochs must be an integer >= 1, got '1e1'"):
        load_config(path)


def test_a_bad_command_line_override_is_named_as_such(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("epochs: 3\n")
    with pytest.raises(ConfigError, match=rf"^command line \(over {path}\): epochs must be an integer >= 1, got 0$"):
        load_config(path, epochs=0)
    with pytest.raises(ConfigError, match=r"^config: batch_size must be an integer >= 1, got -3$"):
        load_config(None, batch_size=-3)


def test_removed_options_at_their_neutral_value_are_dropped(tmp_path):
    path = tmp_path / "old.yaml"
    path.write_text(yaml.safe_dump({key: neutral for key, (neutral, *_) in REMOVED.items()}))
    assert load_config(path) == TrainConfig()
    path.write_text("mixup: 0\nema: 0\n")  # written as integers by hand
    assert load_config(path) == TrainConfig()


@pytest.mark.parametrize(("key", "value", "experiment"), [
    ("label_smoothing", 0.1, 3), ("mixup", 0.2, 5), ("ema", 0.995, 6), ("equalize", True, 9),
    ("standardize_region", 0.7, 10), ("cutmix", 1.0, 12), ("linear_probe", True, 13),
])
def test_a_removed_option_switched_on_names_the_commit_and_the_experiment(tmp_path, key, value, experiment):
    path = tmp_path / "old.yaml"
    path.write_text(f"{key}: {str(value).lower()}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: {key} was removed after it lost on validation (experiment {experiment} in "
                               "docs/experiments.md); git checkout 184cb07 to rerun it")


def test_progressive_resizing_is_removed_but_run_folders_that_record_it_off_still_load(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("low_res_size: null\nlow_res_epochs: 0\n")  # what run folders of cfaac34 and before record
    assert load_config(path) == TrainConfig()
    path.write_text("low_res_size: 160\nlow_res_epochs: 3\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (f"{path}: low_res_size was removed after it lost on validation (experiment 15 in "
                               "docs/experiments.md); git checkout cfaac34 to rerun it")


@pytest.mark.parametrize("argv", [["--epochs", "0"], ["--batch-size", "0"], ["--epochs", "-3"]])
def test_cli_train_refuses_a_bad_value_before_any_work_and_leaves_no_run_folder(tiny_dataset, tmp_path, capsys, argv):
    run = tmp_path / "run"
    assert main(["train", "--data", str(tiny_dataset), "--out", str(run), "--quiet", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pneumoscan: error: config: ") and "must be an integer >= 1" in err and "\n" not in err
    assert not run.exists()


def test_cli_train_refuses_a_bad_yaml_value_and_leaves_no_run_folder(tiny_dataset, tmp_path, capsys):
    config, run = tmp_path / "c.yaml", tmp_path / "run"
    config.write_text("epochs: two\n")
    assert main(["train", "--data", str(tiny_dataset), "--out", str(run), "--config", str(config), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == f"pneumoscan: error: {config}: epochs must be an integer >= 1, got 'two'"
    assert not run.exists()
