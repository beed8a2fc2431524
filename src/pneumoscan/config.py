"""Training configuration as data: dataclasses, YAML in and out, unknown keys are errors."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path

import yaml

from .data.layout import check_fold
from .errors import PneumoscanError


class ConfigError(PneumoscanError):
    pass


@dataclass
class AugmentConfig:
    """X-ray augmentation, chosen to mimic acquisition differences rather than natural-image variety.

    No horizontal flip by default: the heart's side is anatomy, not noise.
    """

    enabled: bool = True
    scale: tuple[float, float] = (0.80, 1.0)  # random resized crop, fraction of the image area kept
    ratio: tuple[float, float] = (0.90, 1.10)
    degrees: float = 7.0
    translate: float = 0.05
    zoom_out: float = 1.0  # smallest side scale of a random zoom-out (black border), as in a wider field of view
    brightness: float = 0.25
    contrast: float = 0.25
    gamma: tuple[float, float] = (0.75, 1.35)
    blur_p: float = 0.2
    sharpen_p: float = 0.2
    noise_std: float = 0.02
    jpeg_p: float = 0.2
    hflip_p: float = 0.0


@dataclass
class TrainConfig:
    arch: str = "efficientnet_lite0"
    pretrained: str = "imagenet"  # imagenet | none
    weights: str | None = None  # local state dict to start from instead of downloading ImageNet weights
    image_size: int | None = None  # None: 224
    standardize: bool = False  # rescale each image to a fixed intensity mean and spread (Preprocessing.standardize)
    equalize: bool = False  # histogram-equalise each image (Preprocessing.equalize)
    standardize_region: float = 1.0  # central fraction of each side that standardize takes its statistics from
    epochs: int = 6
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.3
    label_smoothing: float = 0.0
    mixup: float = 0.0  # alpha of mixup's Beta(alpha, alpha) mixing weight; 0: off
    cutmix: float = 0.0  # alpha of CutMix (torchvision): a box of a paired image pasted in, labels mixed by area
    linear_probe: bool = False  # LP-FT: fit the classifier on the frozen ImageNet features before fine-tuning
    ema: float = 0.0  # decay of an exponential moving average of the weights, updated every step; 0: off
    freeze_stages: int | None = None  # early stages kept frozen; None: the arch default (cheaper backward)
    sampler: str = "weighted"  # weighted (WeightedRandomSampler-style, balanced classes) | shuffle
    class_weighted_loss: bool = False
    val_fraction: float = 0.2
    fold: int = 0  # which of the round(1 / val_fraction) patient-grouped folds is validation (k-fold: one run each)
    seed: int = 0
    split_seed: int | None = None  # seed of the patient-grouped validation split; None: seed (set it to compare seeds)
    patience: int = 3  # early stopping: epochs without a better validation AUC
    target_sensitivity: float = 0.98
    threshold_confidence: float = 0.95
    guard_quantile: float = 0.995
    channels_last: bool = True
    amp: str = "auto"  # auto (bf16 on CPUs that support it, fp16 on CUDA) | off
    num_workers: int = -1  # -1: 0 on CPU, 4 on CUDA
    augment: AugmentConfig = field(default_factory=AugmentConfig)

    @property
    def validation_seed(self) -> int:
        """Seed of the patient-grouped validation split."""
        return self.seed if self.split_seed is None else self.split_seed

    def to_dict(self) -> dict:
        return asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(known)})")
    values = {}
    for name, value in data.items():
        default = getattr(cls(), name)
        if is_dataclass(default):
            value = _build(type(default), value or {}, f"{where}.{name}")
        elif isinstance(default, tuple):
            value = tuple(value)
        values[name] = value
    return cls(**values)


def load_config(path: str | Path | None = None, **overrides) -> TrainConfig:
    """TrainConfig from a YAML file (or defaults), then non-None keyword overrides (from the command line)."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: invalid YAML ({str(exc).splitlines()[0]})") from None
    data.update({k: v for k, v in overrides.items() if v is not None})
    where = str(path) if path else "config"
    cfg = _build(TrainConfig, data, where)
    if cfg.standardize_region != 1.0 and not cfg.standardize:
        raise ConfigError(f"{where}: standardize_region only applies with standardize: true")
    if not 0 < cfg.augment.zoom_out <= 1:
        raise ConfigError(f"{where}: augment.zoom_out must be in (0, 1], got {cfg.augment.zoom_out}")
    try:
        check_fold(cfg.val_fraction, cfg.fold)
    except ValueError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return cfg
