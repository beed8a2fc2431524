"""Training configuration as data: dataclasses, YAML in and out, every value checked when it is loaded.

``TrainConfig()`` is the bundled recipe (configs/default.yaml); an experiment config states only what it changes.
Each field's type annotation drives the check (bool, int, float, str, ``X | None``, pairs, ``Literal`` choices),
and ``Annotated[..., Range(...)]`` adds its bounds, so a bad value fails in one line naming the key and the file
before any data is read or any run folder is created.
"""

from __future__ import annotations

import math
import re
import types
import typing
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml

from .data.layout import check_fold
from .errors import PneumoscanError
from .preprocess import REMOVED as PREPROCESSING_REMOVED
from .preprocess import removed_option as _removed_option


class ConfigError(PneumoscanError):
    pass


@dataclass(frozen=True)
class Range:
    """Bounds of a number (or of both numbers of a pair); ``open_*``: the bound itself is excluded."""

    min: float | None = None
    max: float | None = None
    open_min: bool = False
    open_max: bool = False

    def holds(self, value: float) -> bool:
        if self.min is not None and (value <= self.min if self.open_min else value < self.min):
            return False
        return not (self.max is not None and (value >= self.max if self.open_max else value > self.max))

    def __str__(self) -> str:
        if self.min is not None and self.max is not None:
            return f"in {'(' if self.open_min else '['}{self.min:g}, {self.max:g}{')' if self.open_max else ']'}"
        if self.min is not None:
            return f"{'>' if self.open_min else '>='} {self.min:g}"
        return f"{'<' if self.open_max else '<='} {self.max:g}"


Positive = Annotated[int, Range(1)]
NonNegative = Annotated[int, Range(0)]
PositiveFloat = Annotated[float, Range(0, open_min=True)]
NonNegativeFloat = Annotated[float, Range(0)]
Probability = Annotated[float, Range(0, 1)]
OpenUnit = Annotated[float, Range(0, 1, open_min=True, open_max=True)]  # strictly between 0 and 1
UpToOne = Annotated[float, Range(0, 1, open_min=True)]  # in (0, 1]
UnitPair = Annotated[tuple[float, float], Range(0, 1, open_min=True)]  # (low, high), low <= high
PositivePair = Annotated[tuple[float, float], Range(0, open_min=True)]


@dataclass
class AugmentConfig:
    """X-ray augmentation, chosen to mimic acquisition differences rather than natural-image variety.

    No horizontal flip by default: the heart's side is anatomy, not noise.
    """

    enabled: bool = True
    scale: UnitPair = (0.80, 1.0)  # random resized crop, fraction of the image area kept
    ratio: PositivePair = (0.90, 1.10)
    degrees: Annotated[float, Range(0, 180)] = 7.0
    translate: Annotated[float, Range(0, 1, open_max=True)] = 0.05
    zoom_out: UpToOne = 1.0  # smallest side scale of a random zoom-out (black border), as in a wider field of view
    brightness: NonNegativeFloat = 0.25
    contrast: NonNegativeFloat = 0.25
    gamma: PositivePair = (0.75, 1.35)
    blur_p: Probability = 0.2
    sharpen_p: Probability = 0.2
    noise_std: NonNegativeFloat = 0.02
    jpeg_p: Probability = 0.2
    hflip_p: Probability = 0.0


@dataclass
class TrainConfig:
    """The defaults are the recipe of the bundled model, configs/default.yaml (recipe 8 of docs/experiments.md)."""

    arch: str = "efficientnet_lite0"  # one of pneumoscan.models.ARCHS
    pretrained: Literal["imagenet", "none"] = "imagenet"
    weights: str | None = None  # local state dict to start from instead of downloading ImageNet weights
    image_size: Annotated[int, Range(32)] | None = None  # None: 224
    standardize: bool = True  # rescale each image to a fixed intensity mean and spread (Preprocessing.standardize)
    epochs: Positive = 4
    # A budget for trying things (configs/quick.yaml); None: no limit. max_train_images trains on a seeded sample of
    # the training split with each class keeping its share (the validation split stays whole); max_steps ends the
    # run after that many optimizer steps in all, the learning-rate schedule laid out over them.
    max_train_images: Annotated[int, Range(2)] | None = None
    max_steps: Positive | None = None
    batch_size: Positive = 32
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegativeFloat = 1e-4
    warmup_epochs: NonNegativeFloat = 0.3
    # early stages kept frozen (no backward through them); None: the arch default (efficientnet_lite0: 4)
    freeze_stages: NonNegative | None = None  # None: the arch default (4 for EfficientNet-Lite, 2 for ResNets)
    sampler: Literal["weighted", "shuffle"] = "weighted"  # weighted: balanced classes per batch
    class_weighted_loss: bool = False
    val_fraction: Annotated[float, Range(0, 0.5, open_min=True, open_max=True)] = 0.2
    fold: NonNegative = 0  # which of the round(1 / val_fraction) patient-grouped folds is validation
    seed: NonNegative = 1
    split_seed: NonNegative | None = 0  # seed of the patient-grouped validation split; None: seed
    patience: Positive = 3  # early stopping: epochs without a better validation AUC
    target_sensitivity: OpenUnit = 0.98
    threshold_confidence: OpenUnit = 0.95
    guard_quantile: UpToOne = 0.995
    channels_last: bool = True
    # auto: CUDA when PyTorch sees a GPU (no option needed to use one), else the CPU; cuda: refuse to run without one
    device: Literal["auto", "cpu", "cuda"] = "auto"
    amp: Literal["auto", "off"] = "auto"  # auto: bf16 autocast for training steps on CPUs that support it (CUDA: bf16, else fp16)
    num_workers: Annotated[int, Range(-1)] = -1  # -1: 0 on CPU, 4 on CUDA
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def validation_seed(self) -> int:
        """Seed of the patient-grouped validation split."""
        return self.seed if self.split_seed is None else self.split_seed

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


# Options that lost on validation and were removed from the code. Old configs and model files that record them at
# their neutral value still load; any other value is refused, naming where the option still exists. The
# preprocessing ones are preprocess.REMOVED (model files are read without this module).
REMOVED: dict[str, tuple[object, str, str]] = {
    # key: (neutral value, experiment of docs/experiments.md, last commit with the option)
    "label_smoothing": (0.0, "experiment 3", "184cb07"),
    "mixup": (0.0, "experiment 5", "184cb07"),
    "ema": (0.0, "experiment 6", "184cb07"),
    **PREPROCESSING_REMOVED,
    "cutmix": (0.0, "experiment 12", "184cb07"),
    "linear_probe": (False, "experiment 13", "184cb07"),
    "low_res_size": (None, "experiment 15", "cfaac34"),  # progressive resizing
    "low_res_epochs": (0, "experiment 15", "cfaac34"),
}


def removed_option(key: str, value: object) -> str | None:
    """Why ``key: value`` cannot be used (None: the key is not a removed option, or it is at its neutral value)."""
    return _removed_option(key, value, REMOVED)


_YAML11_EXPONENT = re.compile(r"[-+]?[0-9]+(\.[0-9]*)?[eE][-+]?[0-9]+")


def _describe(hint) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base, rng = args[0], args[1]
        if typing.get_origin(base) is tuple:
            return f"a pair [low, high] of numbers {rng}, low <= high"
        return str(rng) if base is float else f"{_describe(base)} {rng}"
    if origin in (Union, types.UnionType):
        return " or ".join("null" if a is type(None) else _describe(a) for a in args)
    if origin is Literal:
        return "one of " + ", ".join(map(str, args))
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(hint, str(hint))


def _check(hint, value):
    """``value`` converted to the annotated type (int -> float, list -> tuple), or raise ValueError."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        base, rng = args[0], args[1]
        value = _check(base, value)
        numbers = value if isinstance(value, tuple) else (value,)
        if not all(rng.holds(v) for v in numbers) or (isinstance(value, tuple) and value[0] > value[1]):
            raise ValueError
        return value
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        return _check(next(a for a in args if a is not type(None)), value)
    if origin is Literal:
        if value not in args:
            raise ValueError
        return value
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError
        return tuple(_check(a, v) for a, v in zip(args, value, strict=True))
    if hint is bool:
        if not isinstance(value, bool):
            raise ValueError
    elif hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError
    elif hint is float:
        if isinstance(value, str) and _YAML11_EXPONENT.fullmatch(value):
            value = float(value)  # PyYAML (YAML 1.1) reads 1e-3, without a dot, as a string
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError
        value = float(value)
    elif hint is str and not isinstance(value, str):
        raise ValueError
    return value


def _build(cls, data: dict, where: str, prefix: str = ""):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: {prefix.rstrip('.') or 'the config'} must be a mapping, got "
                          f"{type(data).__name__}")
    for key in [k for k in data if k in REMOVED and not prefix]:
        reason = removed_option(key, data[key])
        if reason:
            raise ConfigError(f"{where}: {reason}")
        data = {k: v for k, v in data.items() if k != key}
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(prefix + k for k in unknown)} "
                          f"(known: {', '.join(known)})")
    hints = typing.get_type_hints(cls, include_extras=True)
    values = {}
    for name, value in data.items():
        hint = hints[name]
        if is_dataclass(hint):
            values[name] = _build(hint, {} if value is None else value, where, f"{prefix}{name}.")
            continue
        try:
            values[name] = _check(hint, value)
        except ValueError:
            raise ConfigError(f"{where}: {prefix}{name} must be {_describe(hint)}, got {value!r}") from None
    return cls(**values)


def load_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """TrainConfig from a YAML file (or defaults), then non-None keyword overrides (from the command line).

    Every value is type- and range-checked here, so a bad one is a one-line ConfigError before any work.
    """
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    where = str(path) if path else "config"
    cfg = _checked(data, where)  # the file's own values first, so an error in them names the file
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if overrides:
        cfg = _checked({**data, **overrides}, f"command line (over {path})" if path else where)
    return cfg


def config_from_dict(data: dict, where: str) -> TrainConfig:
    """A TrainConfig from a dict (a model record's ``training.config``), checked as a YAML file is."""
    return _checked(data, where)


def _checked(data: dict, where: str) -> TrainConfig:
    from .models import ARCHS

    cfg = _build(TrainConfig, data, where)
    if cfg.arch not in ARCHS:
        raise ConfigError(f"{where}: unknown architecture {cfg.arch!r}; choose one of: {', '.join(ARCHS)}")
    stages = len(ARCHS[cfg.arch].stages)
    if cfg.freeze_stages is not None and cfg.freeze_stages > stages:
        raise ConfigError(f"{where}: freeze_stages must be at most {stages} for {cfg.arch}, got {cfg.freeze_stages}")
    try:
        check_fold(cfg.val_fraction, cfg.fold)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return cfg
