"""fit(): train a classifier on a data source (Kaggle-layout folder or MedMNIST .npz), write a self-describing model.

The loop is plain PyTorch in the style of torchvision's references/classification: ``fit`` runs ``prepare_run``,
``load_data``, ``build_optimizer``, then ``train_one_epoch`` and ``validate`` per epoch, and ``finalize``. What makes
it fast on a CPU: every image is decoded once into a uint8 cache, batches are augmented at one intra-op thread
(``one_thread``), the early high-resolution stages stay frozen (no backward through them), channels_last and bf16
autocast for the training steps where the CPU supports it. It runs on CUDA when a GPU is visible (config ``device``:
auto), with bf16 or fp16 autocast there. Under torchrun it runs DistributedDataParallel (gloo on CPU, nccl on CUDA);
rank 0 evaluates, logs and writes files. ``max_train_images`` and ``max_steps`` give a quick run for trying things
(configs/quick.yaml).

Validation is scored through the screening stage (``calibrate.stage_scores``: ``pipeline.decide`` on the uint8
cache), in float32: the epoch is selected, and calibration, thresholds and guard are fitted, on the arithmetic the
model file records as its ``precision``, so prediction computes exactly the numbers the thresholds were chosen on.
The model file is written through the typed ``ModelRecord``, with the drift monitor's reference: the validation
images as the finished model answers them (``drift_reference``).
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm import tqdm

from . import __version__
from .augment import build_augment
from .backends.torch import TorchBackend
from .calibrate import fit_decision_rule, softmax_pneumonia, stage_scores
from .config import TrainConfig
from .data.labels import require
from .data.layout import CLASSES, Sample
from .data.sources import DataSource, ImageCache, LabelsSource, open_source
from .errors import PneumoscanError
from .guard import Guard
from .metrics import expected_calibration_error, operating_point, pr_auc, roc_auc
from .modelfile import atomic_write, save_model_file
from .models import arch_spec, cpu_has_bf16, create_model, freeze_stages
from .monitor import CATEGORIES as HEADER_FACTS
from .monitor import MonitorError, build_reference
from .predict import Model
from .preprocess import STANDARD_INTENSITY, Preprocessing
from .record import GuardSettings, ModelRecord
from .run import RunFolder

# The arithmetic validation is scored in and the thresholds are fitted on; the model file records it as "precision".
SCORING_PRECISION = "float32"

# Fewest usable images of labelled site data (a labels CSV or a NORMAL/PNEUMONIA folder) training starts on: its
# validation is carved out of them by patient (five folds at val_fraction 0.2), so 20 leave about four images to
# choose the epoch, the calibration and the thresholds on; fewer and the run would be noise with a model file.
MIN_SITE_IMAGES = 20


class TrainError(PneumoscanError):
    pass


@dataclass(frozen=True)
class Runtime:
    rank: int
    world: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype | None

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_runtime(amp: str, device: str = "auto") -> Runtime:
    """Single process, or one rank of a torchrun job (the env vars WORLD_SIZE/RANK/LOCAL_RANK).

    device: "auto" trains on CUDA when a GPU is visible, else on the CPU; "cpu" and "cuda" ask for one."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in ("auto", "cpu", "cuda"):
        raise TrainError(f"device must be auto, cpu or cuda, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise TrainError("device cuda asked for, but PyTorch sees no CUDA GPU (use device: auto or cpu)")
    if device != "cpu" and torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if amp not in ("auto", "off"):
        raise TrainError(f"amp must be 'auto' or 'off', got {amp!r}")
    return Runtime(rank, world, local_rank, device, autocast_dtype(device) if amp == "auto" else None)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The autocast type of training steps on ``device``: bf16 (fp16 on a GPU without bf16, which then needs a
    GradScaler), or None on a CPU without native bf16, where emulated bf16 is slower than float32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_has_bf16() else None


class CachedImages(torch.utils.data.Dataset):
    """uint8 images in memory -> (float (1, S, S) in [0, 1], label), augmented when training."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, augment=None):
        self.images = torch.from_numpy(images)
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self.augment = augment

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        image = self.images[i][None]
        image = self.augment(image) if self.augment else image.float().div_(255.0)
        return image, self.labels[i]


def one_thread(batches):
    """Iterate ``batches`` (a DataLoader working in this process) with torch at one intra-op thread while each batch
    is produced, and at the training count in between.

    Augmentation is per image, tiny ops on one 224 x 224 plane; splitting each over the cores costs more in
    fork/join than it saves, many times more when another process holds a core. What each op computes does not
    depend on the count, except ColorJitter's contrast mean, which ``build_augment(reduction_threads=...)`` runs
    at the training count, so the batches stay bit-identical (tests/test_train.py)."""
    threads = torch.get_num_threads()
    iterator = iter(batches)
    while True:
        torch.set_num_threads(1)
        try:
            batch = next(iterator, None)
        finally:
            torch.set_num_threads(threads)
        if batch is None:
            return
        yield batch


def epoch_indices(labels: np.ndarray, sampler: str, seed: int, epoch: int, rank: int, world: int) -> list[int]:
    """This rank's sample order for one epoch; the same on every run with the same seed (so resume is exact).

    "weighted" draws with replacement so that both classes are equally likely, as torch's
    WeightedRandomSampler does; it is written out here because torch has no distributed weighted sampler.
    """
    g = torch.Generator().manual_seed(seed * 10_007 + epoch)
    n = len(labels)
    if sampler == "weighted":
        counts = np.bincount(labels, minlength=2).astype(np.float64)
        weights = torch.from_numpy(1.0 / counts[labels])
        order = torch.multinomial(weights, n, replacement=True, generator=g)
    elif sampler == "shuffle":
        order = torch.randperm(n, generator=g)
    else:
        raise TrainError(f"sampler must be 'weighted' or 'shuffle', got {sampler!r}")
    per_rank = n // world
    return order[rank * per_rank:(rank + 1) * per_rank].tolist()


def scoring_model(net: nn.Module, prep: Preprocessing) -> Model:
    """The network as prediction runs it (``TorchBackend`` in ``SCORING_PRECISION``: the BatchNorm-folded float32
    copy), with no calibration, thresholds or guard yet: those are what is being fitted."""
    record = ModelRecord(name="training", arch="", classes=tuple(CLASSES), preprocessing=prep, thresholds={},
                         precision=SCORING_PRECISION)
    return Model(record, TorchBackend(net, prep, SCORING_PRECISION), None, Path("."), "")


def score_images(net: nn.Module, prep: Preprocessing, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, 2), features (N, D)) of cached uint8 images, through the screening stage in float32.

    The caches hold network inputs that ``prepare`` already made, so they enter the stage as
    ``pipeline.from_array`` items (``calibrate.stage_scores``)."""
    logits, feats, _ = stage_scores(scoring_model(net, prep), images)
    return logits.numpy(), feats.numpy()


def preprocessing_for(cfg: TrainConfig) -> Preprocessing:
    """The preprocessing a run trains with, and saves into its model file."""
    spec = arch_spec(cfg.arch)
    return Preprocessing(size=cfg.image_size or 224, mean=spec.mean, std=spec.std,
                         standardize=STANDARD_INTENSITY if cfg.standardize else None)


# ---- checkpoints -----------------------------------------------------------------------------------------------

def _unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def _save_checkpoint(path: Path, net: nn.Module, opt: torch.optim.Optimizer, state: dict) -> None:
    """Everything --resume needs, in safetensors (no pickle): weights, optimizer tensors, loop state as JSON."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in _unwrap(net).state_dict().items()}
    opt_state = opt.state_dict()
    for index, values in opt_state["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = {"state": json.dumps(state), "param_groups": json.dumps(opt_state["param_groups"])}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _load_checkpoint(path: Path, net: nn.Module, opt: torch.optim.Optimizer) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    _unwrap(net).load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return json.loads(meta["state"])


def _checkpoint_state(path: Path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["state"])


def config_changes(saved: Path, cfg: TrainConfig) -> list[str]:
    """What differs from the run's saved config.yaml: resume is bit-exact only when nothing does."""
    from .config import load_config

    try:
        old = load_config(saved).to_dict()
    except PneumoscanError:
        return []
    new = cfg.to_dict()
    return [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]


# ---- the steps of fit() ----------------------------------------------------------------------------------------

def prepare_run(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path,
                resume: bool) -> tuple[RunFolder, DataSource, list[Sample], list[Sample]]:
    """(run folder, data source, train and validation samples), checked before anything is written: a bad data
    folder or output folder must not leave a half-made run behind."""
    run = RunFolder(out_dir)
    if resume and not run.checkpoint_path.is_file():
        raise TrainError(f"{run.path}: nothing to resume (no checkpoint.safetensors)")
    if not resume and run.model_path.exists():
        raise TrainError(f"{run.path}: already holds a trained model; choose another --out or pass --resume")
    source = open_source(data_dir)
    if resume and run.split_path.is_file():
        train, val = run.split(data_dir)
    else:
        if isinstance(source, LabelsSource):  # the rows or files left out, then refuse a set too small
            for line in source.labelled.problems:
                print(f"pneumoscan: left out: {line}", file=sys.stderr)
            require(source.labelled, MIN_SITE_IMAGES, "nothing written")
        train, val = source.training_split(cfg.val_fraction, cfg.validation_seed, cfg.fold)
    if cfg.max_train_images is not None:
        train = subsample(train, cfg.max_train_images, cfg.seed)
    for name, items in (("train", train), ("validation", val)):
        _need_both_classes([s.label for s in items], name, data_dir)
    return run, source, train, val


def subsample(samples: list[Sample], limit: int, seed: int) -> list[Sample]:
    """At most ``limit`` of ``samples``, drawn without replacement with each class keeping its share (seeded, in
    the original order), for a quick run. The validation split is never subsampled: the epoch, calibration and
    thresholds are still chosen on all of it."""
    if len(samples) <= limit:
        return list(samples)
    labels = np.array([s.label for s in samples])
    rng = np.random.default_rng(seed)
    keep: list[int] = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        share = max(1, round(limit * len(members) / len(samples)))
        keep += rng.choice(members, size=min(share, len(members)), replace=False).tolist()
    return [samples[i] for i in sorted(keep)]


def _need_both_classes(labels, name: str, data_dir) -> None:
    if len(set(np.asarray(labels).tolist())) < 2:
        raise TrainError(f"{data_dir}: the {name} subset needs images of both classes")


def record_run(cfg: TrainConfig, run: RunFolder, source: DataSource, train: list[Sample], val: list[Sample],
               resume: bool) -> None:
    """config.yaml and split.csv (kept as they are on resume: the split must not move)."""
    run.path.mkdir(parents=True, exist_ok=True)
    if resume:
        changes = config_changes(run.config_path, cfg)
        if changes:
            print(f"pneumoscan: resuming with a changed configuration ({'; '.join(changes)}): the result will "
                  "differ from an uninterrupted run (e.g. more epochs stretch the learning-rate schedule)",
                  file=sys.stderr)
    if not (resume and run.split_path.is_file()):
        run.write_split(source, train, val)
    run.save_config(cfg)


@dataclass
class TrainData:
    train: ImageCache
    val: ImageCache

    @property
    def skipped(self) -> list[str]:
        return self.train.skipped + self.val.skipped


def load_data(source: DataSource, train: list[Sample], val: list[Sample], prep: Preprocessing, *,
              progress: bool) -> TrainData:
    """Both subsets decoded once into uint8 caches, whatever the source; unreadable files reported and left out."""
    data = TrainData(source.decode(train, prep, desc="decode train", progress=progress),
                     source.decode(val, prep, desc="decode val", progress=progress))
    for name, cache in (("train", data.train), ("validation", data.val)):
        _need_both_classes(cache.labels, name, source.root)
    return data


def build_optimizer(cfg: TrainConfig, net: nn.Module) -> torch.optim.Optimizer:
    """AdamW over the parameters left trainable; ``lr_at`` sets the learning rate of every step."""
    return torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=cfg.lr,
                             weight_decay=cfg.weight_decay)


def build_criterion(cfg: TrainConfig, train_labels: np.ndarray, device: torch.device) -> nn.Module:
    weight = None
    if cfg.class_weighted_loss:
        counts = np.bincount(train_labels, minlength=2)
        weight = torch.tensor(len(train_labels) / (2.0 * counts), dtype=torch.float32, device=device)
    return nn.CrossEntropyLoss(weight=weight)


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up, then cosine decay to 0 over the remaining steps."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def training_augment(cfg: TrainConfig):
    """The training augmentation at the network's input size; its reductions run at the training thread count."""
    return build_augment(cfg.augment, cfg.image_size or 224, reduction_threads=torch.get_num_threads())


def epoch_loader(cfg: TrainConfig, dataset: CachedImages, rt: Runtime, epoch: int) -> torch.utils.data.DataLoader:
    """This rank's batches of one epoch; sampling and augmentation are seeded per epoch, so resume is exact."""
    torch.manual_seed(cfg.seed * 1000 + epoch * rt.world + rt.rank)  # the augmentation stream
    indices = epoch_indices(dataset.labels.numpy(), cfg.sampler, cfg.seed, epoch, rt.rank, rt.world)
    workers = cfg.num_workers if cfg.num_workers >= 0 else (4 if rt.device.type == "cuda" else 0)
    return torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=indices, drop_last=True,
                                       num_workers=workers, pin_memory=rt.device.type == "cuda")


def train_one_epoch(model: nn.Module, criterion: nn.Module, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, loader, prep: Preprocessing, rt: Runtime, *,
                    frozen: list[nn.Module], schedule, channels_last: bool, desc: str,
                    progress: bool, on_step=None, max_steps: int | None = None) -> tuple[float, float]:
    """One pass over ``loader``; (mean training loss, last learning rate). ``schedule(step)``: the learning rate.

    ``on_step(batch_size)``, if given, runs after every optimizer step; the epoch ends early when it returns True
    (benchmarks/bench_train.py measures time to a validation AUC with it). ``max_steps``: end the epoch after
    that many steps (the quick mode's step budget)."""
    model.train()
    for module in frozen:  # frozen stages keep their ImageNet BatchNorm statistics
        module.eval()
    total, count, lr = 0.0, 0, 0.0
    in_process = getattr(loader, "num_workers", 1) == 0
    bar = tqdm(one_thread(loader) if in_process else loader, desc=desc, disable=not progress, leave=False,
               total=len(loader))
    for step, (x, y) in enumerate(bar):
        lr = schedule(step)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = prep.normalize(x).to(rt.device, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        y = y.to(rt.device, non_blocking=True)
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.bfloat16, enabled=rt.amp_dtype is not None):
            loss = criterion(model(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        total += float(loss.detach()) * len(y)
        count += len(y)
        bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{lr:.2e}")
        if on_step is not None and on_step(len(y)):
            break
        if max_steps is not None and step + 1 >= max_steps:
            break
    return total / max(1, count), lr


def validate(net: nn.Module, prep: Preprocessing, val: ImageCache) -> tuple[float, float, tuple[np.ndarray, np.ndarray]]:
    """(loss, ROC AUC, (logits, features)) on the validation cache, scored as prediction scores (float32, the one
    scoring function). The scores are kept for ``finalize`` when this epoch is the best: the same weights through
    the same function give the same numbers, so scoring them again would only cost time."""
    logits, feats = score_images(net, prep, val.images)
    loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(val.labels)))
    return loss, roc_auc(val.labels, softmax_pneumonia(logits)), (logits, feats)


def keep_if_best(state: dict, net: nn.Module, run: RunFolder, epoch: int, val_loss: float, val_auc: float) -> None:
    """Selection by validation AUC (ties: lower loss); the best weights go to best.safetensors."""
    if (val_auc, -val_loss) > (state["best_auc"], -state["best_loss"]):
        state.update(best_auc=val_auc, best_loss=val_loss, best_epoch=epoch, bad_epochs=0)
        best = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
        atomic_write(run.best_path, lambda tmp: save_file(best, tmp))
    else:
        state["bad_epochs"] += 1
    state["epoch"] = epoch


class EpochLog:
    """metrics.csv, TensorBoard when installed, and one line per epoch on stderr (rank 0 only)."""

    def __init__(self, run: RunFolder, resume: bool):
        self.run, self.writer = run, None
        try:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(run.tensorboard_dir))
        except ImportError:
            print("pneumoscan: tensorboard not installed (pip install 'pneumoscan[train]'); logging to metrics.csv only", file=sys.stderr)
        if not resume:
            run.metrics_path.write_text("epoch,train_loss,val_loss,val_auc,lr,seconds\n")

    def write(self, epoch: int, epochs: int, train_loss: float, val_loss: float, val_auc: float, lr: float,
              seconds: float) -> None:
        with self.run.metrics_path.open("a") as f:
            f.write(f"{epoch},{train_loss:.6f},{val_loss:.6f},{val_auc:.6f},{lr:.3e},{seconds:.1f}\n")
        if self.writer:
            for key, value in (("loss/train", train_loss), ("loss/val", val_loss), ("auc/val", val_auc)):
                self.writer.add_scalar(key, value, epoch)
        print(f"epoch {epoch}/{epochs}: train loss {train_loss:.4f}  val loss {val_loss:.4f}  "
              f"val AUC {val_auc:.4f}  ({seconds:.0f} s)", file=sys.stderr)

    def close(self) -> None:
        if self.writer:
            self.writer.close()


def fit(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, *, resume: bool = False,
        progress: bool = True) -> Path:
    """Train, select the best epoch by validation AUC, calibrate on validation, write out_dir/model.safetensors."""
    started = time.time()
    rt = setup_runtime(cfg.amp, cfg.device)
    run, source, train_s, val_s = prepare_run(cfg, data_dir, out_dir, resume)
    torch.manual_seed(cfg.seed)
    prep = preprocessing_for(cfg)
    # The network before the run folder: a bad --weights or an offline ImageNet download must not leave one behind.
    net = create_model(cfg.arch, pretrained=cfg.pretrained, weights=cfg.weights).to(rt.device)
    if rt.main:
        record_run(cfg, run, source, train_s, val_s, resume)
    data = load_data(source, train_s, val_s, prep, progress=progress and rt.main)
    if rt.main:
        run.write_skipped(data.skipped)

    frozen = freeze_stages(net, cfg.arch, cfg.freeze_stages)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg, net)
    criterion = build_criterion(cfg, data.train.labels, rt.device)
    scaler = torch.amp.GradScaler(enabled=rt.amp_dtype == torch.float16)
    state = {"epoch": 0, "best_auc": -1.0, "best_loss": float("inf"), "best_epoch": -1, "bad_epochs": 0}
    if resume:
        state = _load_checkpoint(run.checkpoint_path, net, optimizer)
        if rt.main:
            print(f"resuming after epoch {state['epoch']} (best AUC {state['best_auc']:.4f})", file=sys.stderr)
    model = nn.parallel.DistributedDataParallel(net) if rt.world > 1 else net
    dataset = CachedImages(data.train.images, data.train.labels, training_augment(cfg))
    steps_per_epoch = max(1, len(dataset) // rt.world // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps)
    epochs = math.ceil(total_steps / steps_per_epoch)  # cfg.epochs unless the step budget ends the run sooner
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    if cfg.max_steps is not None:  # a step budget keeps half of itself for the decay
        warmup = min(warmup, max(1, total_steps // 2))
    log = EpochLog(run, resume) if rt.main else None

    best_scores = None  # validation (logits, features) of the best epoch of this process (none after a resume)
    for epoch in range(state["epoch"], epochs):
        t0 = time.time()
        train_loss, lr = train_one_epoch(
            model, criterion, optimizer, scaler, epoch_loader(cfg, dataset, rt, epoch), prep, rt, frozen=frozen,
            schedule=lambda step, epoch=epoch: lr_at(epoch * steps_per_epoch + step, total_steps, warmup, cfg.lr),
            channels_last=cfg.channels_last, desc=f"epoch {epoch + 1}/{epochs}", progress=progress and rt.main,
            max_steps=total_steps - epoch * steps_per_epoch)
        stop = torch.zeros(1)
        if rt.main:
            val_loss, val_auc, scores = validate(net, prep, data.val)
            log.write(epoch + 1, epochs, train_loss, val_loss, val_auc, lr, time.time() - t0)
            keep_if_best(state, net, run, epoch + 1, val_loss, val_auc)
            if state["best_epoch"] == epoch + 1:
                best_scores = scores
            _save_checkpoint(run.checkpoint_path, net, optimizer, state)
            if state["bad_epochs"] >= cfg.patience:
                print(f"early stopping: no better validation AUC for {cfg.patience} epochs", file=sys.stderr)
                stop += 1
        if rt.world > 1:
            dist.broadcast(stop, 0)
        if stop.item():
            break
    if rt.main:
        log.close()
        finalize(cfg, net, prep, rt, run, source, data, state, wall_seconds=None, started=started,
                 val_scores=best_scores)
    if rt.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return run.model_path


def recalibrate(run_dir: str | Path, data_dir: str | Path | None = None, *, device: str = "auto") -> Path:
    """Refit calibration, thresholds and guard of a finished run on its own validation split, no retraining.

    Uses the run's config.yaml, split.csv and best.safetensors, so the result is what ``fit`` would have written
    with the current calibration code; the training summary (wall time, epochs) is carried over. ``data_dir``:
    where the run's data is now, if it moved (default: the root split.csv records). ``device``: as training's.
    """
    from .modelfile import read_model_file

    run = RunFolder(run_dir)
    run.require(run.config_path, run.split_path, run.best_path, run.checkpoint_path, run.model_path)
    cfg = run.config()
    previous = read_model_file(run.model_path)[1]
    source = run.source(data_dir)
    train_s, val_s = run.split(data_dir)
    rt = setup_runtime("off", device)
    prep = preprocessing_for(cfg)
    data = load_data(source, train_s, val_s, prep, progress=False)
    net = create_model(cfg.arch, pretrained="none").to(rt.device)
    finalize(cfg, net, prep, rt, run, source, data, _checkpoint_state(run.checkpoint_path),
             wall_seconds=float(previous["training"]["wall_seconds"]))
    return run.model_path


def finalize(cfg: TrainConfig, net: nn.Module, prep: Preprocessing, rt: Runtime, run: RunFolder,
             source: DataSource, data: TrainData, state: dict, *, wall_seconds: float | None,
             started: float | None = None, val_scores: tuple[np.ndarray, np.ndarray] | None = None) -> str:
    """Best weights -> calibration, thresholds and guard fitted on validation -> model.safetensors; its sha256.

    Everything is scored through the one scoring function in ``SCORING_PRECISION``, which the file records.
    ``wall_seconds``: the training time to record (None: measured from ``started`` to the end of this call).
    ``val_scores``: the validation (logits, features) ``validate`` computed with the best weights, if at hand.
    """
    net.load_state_dict(load_file(str(run.best_path)))
    net = net.to(memory_format=torch.contiguous_format)
    val_y = data.val.labels
    val_logits, val_feats = val_scores if val_scores is not None else score_images(net, prep, data.val.images)
    rng = np.random.default_rng(cfg.seed)
    subset = np.sort(rng.choice(len(data.train.images), size=min(len(data.train.images), 2000), replace=False))
    _, train_feats = score_images(net, prep, data.train.images[subset])
    temperature, bias, thresholds = fit_decision_rule(val_logits, val_y, cfg.target_sensitivity,
                                                      cfg.threshold_confidence)
    p = softmax_pneumonia(val_logits, temperature, bias)
    guard = Guard.fit(torch.from_numpy(train_feats), torch.from_numpy(val_feats), quantile=cfg.guard_quantile)
    with run.val_predictions_path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "probability", "guard_score"])
        scores = guard.score(torch.from_numpy(val_feats)).numpy()
        for label, prob, score in zip(val_y, p, scores, strict=True):
            w.writerow([int(label), f"{prob:.6f}", f"{score:.4f}"])
    validation = {
        "n": len(val_y), "auc": roc_auc(val_y, p), "pr_auc": pr_auc(val_y, p),
        "ece_uncalibrated": expected_calibration_error(val_y, softmax_pneumonia(val_logits)),
        "ece": expected_calibration_error(val_y, p),
        "operating_points": {k: operating_point(val_y, p, t).to_dict() for k, t in thresholds.items()},
    }
    if wall_seconds is None:
        wall_seconds = time.time() - started
    record = ModelRecord(
        name=run.path.name, arch=cfg.arch, classes=tuple(CLASSES), preprocessing=prep,
        thresholds=thresholds, temperature=temperature, bias=bias,
        precision=SCORING_PRECISION,  # the arithmetic the calibration and thresholds above were fitted on
        target_sensitivity=cfg.target_sensitivity,
        guard=GuardSettings(guard.threshold, cfg.guard_quantile),
        validation=validation,
        training=_training_summary(cfg, run, source, data, state, rt, wall_seconds),
        version=__version__, created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    )
    try:
        record = record.with_(drift_reference=drift_reference(
            net, prep, record, guard, data.val.images, f"{len(val_y)} validation images of run {run.path.name}",
            [s.patient for s in data.val.samples]))
    except MonitorError as exc:  # too few validation images to describe: the model works, unmonitored
        print(f"pneumoscan: no drift reference in the model file ({exc})", file=sys.stderr)
    sha = save_model_file(run.model_path, {**net.state_dict(), **guard.to_tensors()}, record.to_dict())
    op = validation["operating_points"]
    print(f"model: {run.model_path} (sha256 {sha[:12]}); validation AUC {validation['auc']:.4f}, "
          f"screening sens {op['screening']['sensitivity']:.3f} spec {op['screening']['specificity']:.3f}, "
          f"T={temperature:.2f}, bias={bias:+.2f}", file=sys.stderr)
    return sha


def drift_reference(net: nn.Module, prep: Preprocessing, record: ModelRecord, guard: Guard, images: np.ndarray,
                    source: str, patients: list[str] | None = None) -> dict:
    """The drift monitor's reference (``monitor.Reference``, as a dict for the record): the validation images
    through the stage as the finished model answers them (its calibration, thresholds and guard), so the monitor
    compares a site's answers with the same figures. The images are the cache's uint8 network inputs, with no
    file behind them: no size, format or DICOM header is known, so the header categories are left out of the
    reference (not recorded, rather than "(none)", which every JPEG or DICOM stream would differ from). No
    sha256: the reference is inside the file it describes. ``patients``: one id per image (MedMNIST's are empty),
    for the effective sizes the alarm threshold is simulated at."""
    final = Model(record, TorchBackend(net, prep, SCORING_PRECISION), guard, Path("."), "")
    _, _, results = stage_scores(final, images)
    facts = [{k: v for k, v in r.facts().items() if k not in HEADER_FACTS} for r in results]
    return build_reference(facts, prior=record.fitted_prevalence, source=source,
                           patients=patients if patients and len(patients) == len(facts) else None).to_dict()


def _training_summary(cfg: TrainConfig, run: RunFolder, source: DataSource, data: TrainData, state: dict,
                      rt: Runtime, wall_seconds: float) -> dict:
    return {
        "data": str(source.root), "train_images": len(data.train.labels), "val_images": len(data.val.labels),
        "skipped_images": len(data.skipped),
        "train_counts": np.bincount(data.train.labels, minlength=2).tolist(),
        "val_counts": np.bincount(data.val.labels, minlength=2).tolist(),
        "split_sha256": run.split_sha256(),
        "best_epoch": state["best_epoch"], "epochs_run": state["epoch"], "wall_seconds": round(wall_seconds, 1),
        "hardware": f"{platform.machine()} {rt.device.type} x{rt.world}, {torch.get_num_threads()} threads",
        "config": cfg.to_dict(),
    }
