"""fit(): train a classifier on a Kaggle-layout folder and write a self-describing model file.

The loop is plain PyTorch in the style of torchvision's references/classification. What makes it fast on a CPU:
every image is decoded once into a uint8 cache, the early high-resolution stages stay frozen (no backward through
them), channels_last and bf16 autocast where the CPU supports it. Under torchrun it runs DistributedDataParallel
(gloo on CPU, nccl on CUDA); rank 0 evaluates, logs and writes files.
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import sys
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch import nn
from tqdm import tqdm

from . import __version__
from .augment import build_augment
from .calibrate import fit_decision_rule, softmax_pneumonia
from .config import TrainConfig
from .data import medmnist
from .data.cache import decode_cache
from .data.layout import CLASSES, Sample, list_split, patient_split, read_split, write_split
from .errors import PneumoscanError
from .guard import Guard
from .metrics import expected_calibration_error, operating_point, pr_auc, roc_auc
from .modelfile import atomic_write, save_model_file, sha256_file
from .models import arch_spec, cpu_has_bf16, create_model, freeze_stages, logits_and_features
from .preprocess import STANDARD_INTENSITY, Preprocessing


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


def setup_runtime(amp: str) -> Runtime:
    """Single process, or one rank of a torchrun job (the env vars WORLD_SIZE/RANK/LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    amp_dtype = None
    if amp == "auto":
        if device.type == "cuda":
            amp_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif cpu_has_bf16():
            amp_dtype = torch.bfloat16
    elif amp != "off":
        raise TrainError(f"amp must be 'auto' or 'off', got {amp!r}")
    return Runtime(rank, world, local_rank, device, amp_dtype)


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


@torch.no_grad()
def infer(net: nn.Module, images: np.ndarray | Iterable[torch.Tensor], prep: Preprocessing, rt: Runtime, *,
          batch_size: int = 64, amp: bool = False, channels_last: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(logits (N, 2), features (N, D)) for cached uint8 images (without augmentation), or for any iterable of
    image batches (uint8 or float in [0, 1])."""
    net.eval()
    batches = images
    if isinstance(images, np.ndarray):
        batches = (torch.from_numpy(images[start:start + batch_size]) for start in range(0, len(images), batch_size))
    logits, feats = [], []
    for batch in batches:
        x = prep.normalize(batch).to(rt.device)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.bfloat16, enabled=amp and rt.amp_dtype is not None):
            out, f = logits_and_features(net, x)
        logits.append(out.float().cpu())
        feats.append(f.float().cpu())
    return torch.cat(logits).numpy(), torch.cat(feats).numpy()


LINEAR_PROBE_C = 0.01  # inverse L2 strength of the probe on standardised features; fixed before the experiment


def linear_probe(net: nn.Module, images: np.ndarray, labels: np.ndarray, augment, prep: Preprocessing, rt: Runtime,
                 *, channels_last: bool = True, batch_size: int = 64) -> None:
    """Set the classifier to a logistic regression fitted on the network's frozen features (LP-FT).

    Fine-tuning from a random head lets its first, large gradients reshape the pretrained features; starting from
    a fitted head changes them less, which Kumar et al. (ICLR 2022) found keeps accuracy under distribution shift.
    The probe sees every training image twice, as it is and as one augmented view: the frozen ImageNet features of
    the two differ so much that a probe fitted on either alone ranks the other poorly. BatchNorm is in eval mode
    here, and ``fit`` keeps it so with the probe. Classes are weighted equally, as the balanced sampler does.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    def batches(view):
        loader = torch.utils.data.DataLoader(CachedImages(images, labels, view), batch_size=batch_size)
        return (x for x, _ in loader)

    views = [infer(net, batches(view), prep, rt, amp=True, channels_last=channels_last)[1] for view in (None, augment)]
    feats_np, labels_np = np.concatenate(views), np.concatenate([labels, labels])
    scaler = StandardScaler().fit(feats_np)
    probe = LogisticRegression(C=LINEAR_PROBE_C, class_weight="balanced", max_iter=3000)
    probe.fit(scaler.transform(feats_np), labels_np)
    # Fold the standardisation into one linear map: margin = w . (f - mean) / scale + b
    w = probe.coef_[0] / scaler.scale_
    b = probe.intercept_[0] - float(np.dot(w, scaler.mean_))
    head = net.get_classifier()
    with torch.no_grad():  # two logits whose difference is the probe's margin
        head.weight.copy_(torch.as_tensor(np.stack([-w / 2, w / 2]), dtype=head.weight.dtype))
        head.bias.copy_(torch.as_tensor([-b / 2, b / 2], dtype=head.bias.dtype))


def _unwrap(net: nn.Module) -> nn.Module:
    return net.module if isinstance(net, nn.parallel.DistributedDataParallel) else net


def _save_checkpoint(path: Path, net: nn.Module, opt: torch.optim.Optimizer, state: dict,
                     ema: nn.Module | None = None) -> None:
    """Everything --resume needs, in safetensors (no pickle): weights, optimizer tensors, loop state as JSON."""
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in _unwrap(net).state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v.detach().cpu().contiguous() for k, v in ema.state_dict().items()})
    opt_state = opt.state_dict()
    for index, values in opt_state["state"].items():
        for key, value in values.items():
            tensors[f"optim.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    meta = {"state": json.dumps(state), "param_groups": json.dumps(opt_state["param_groups"])}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def _load_checkpoint(path: Path, net: nn.Module, opt: torch.optim.Optimizer, ema: nn.Module | None = None) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    _unwrap(net).load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
    if ema is not None:
        ema_state = {k[4:]: v for k, v in tensors.items() if k.startswith("ema.")}
        if not ema_state:
            raise TrainError(f"{path}: the checkpoint has no weight average to resume (ema was off)")
        ema.load_state_dict(ema_state)
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, index, name = key.split(".", 2)
            state.setdefault(int(index), {})[name] = value
    opt.load_state_dict({"state": state, "param_groups": json.loads(meta["param_groups"])})
    return json.loads(meta["state"])


def _split(cfg: TrainConfig, data_dir: Path, out_dir: Path, rt: Runtime, resume: bool) -> tuple[list[Sample], list[Sample]]:
    split_file = out_dir / "split.csv"
    if resume and split_file.is_file():
        return read_split(split_file)
    train, val = patient_split(list_split(data_dir, "train"), cfg.val_fraction, cfg.validation_seed, cfg.fold)
    if rt.main:
        write_split(split_file, train, val)
    return train, val


def _load_data(cfg: TrainConfig, data_dir: Path, out_dir: Path, prep: Preprocessing, rt: Runtime, resume: bool,
               progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(train images, labels, val images, labels, skipped-file messages) as uint8 caches, whatever the source.

    A MedMNIST .npz brings its official train/val split (it has no patient ids to group by); a folder is split
    by patient and decoded once.
    """
    if medmnist.is_npz(data_dir):
        train_x, train_y = medmnist.load_split(data_dir, "train", prep)
        val_x, val_y = medmnist.load_split(data_dir, "val", prep)
        if rt.main:
            medmnist.write_split(out_dir / "split.csv", data_dir, train_y, val_y)
        return train_x, train_y, val_x, val_y, []
    train_s, val_s = _split(cfg, data_dir, out_dir, rt, resume)
    train_x, train_s, skipped = decode_cache(train_s, prep, desc="decode train", progress=progress and rt.main)
    val_x, val_s, skipped_val = decode_cache(val_s, prep, desc="decode val", progress=progress and rt.main)
    train_y = np.array([s.label for s in train_s], dtype=np.int64)
    val_y = np.array([s.label for s in val_s], dtype=np.int64)
    return train_x, train_y, val_x, val_y, skipped + skipped_val


def config_changes(saved: Path, cfg: TrainConfig) -> list[str]:
    """What differs from the run's saved config.yaml: resume is bit-exact only when nothing does."""
    from .config import load_config

    try:
        old = load_config(saved).to_dict()
    except PneumoscanError:
        return []
    new = cfg.to_dict()
    return [f"{k} {old[k]!r} -> {new[k]!r}" for k in new if old.get(k) != new[k]]


def _lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def preprocessing_for(cfg: TrainConfig) -> Preprocessing:
    """The preprocessing a run trains with, and saves into its model file."""
    spec = arch_spec(cfg.arch)
    return Preprocessing(size=cfg.image_size or 224, mean=spec.mean, std=spec.std,
                         standardize=STANDARD_INTENSITY if cfg.standardize else None, equalize=cfg.equalize,
                         standardize_region=cfg.standardize_region)


def fit(cfg: TrainConfig, data_dir: str | Path, out_dir: str | Path, *, resume: bool = False,
        progress: bool = True) -> Path:
    """Train, select the best epoch by validation AUC, calibrate on validation, write out_dir/model.safetensors."""
    started = time.time()
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    if not 0.0 <= cfg.ema < 1.0:
        raise TrainError(f"ema must be a decay in [0, 1) (0: off), got {cfg.ema!r}")
    rt = setup_runtime(cfg.amp)
    checkpoint = out_dir / "checkpoint.safetensors"
    if resume and not checkpoint.is_file():
        raise TrainError(f"{out_dir}: nothing to resume (no checkpoint.safetensors)")
    if not resume and (out_dir / "model.safetensors").exists():
        raise TrainError(f"{out_dir}: already holds a trained model; choose another --out or pass --resume")
    torch.manual_seed(cfg.seed)
    prep = preprocessing_for(cfg)
    # Build the network and read the data before writing anything: a bad --weights, an offline ImageNet
    # download or a bad data folder must not leave a half-made run directory behind.
    net = create_model(cfg.arch, pretrained=cfg.pretrained, weights=cfg.weights).to(rt.device)
    if not resume and not medmnist.is_npz(data_dir):
        list_split(data_dir, "train")  # raises DatasetError naming what is missing
    out_dir.mkdir(parents=True, exist_ok=True)

    train_x, train_y, val_x, val_y, skipped = _load_data(cfg, data_dir, out_dir, prep, rt, resume, progress)
    for name, y in (("train", train_y), ("validation", val_y)):
        if len(np.unique(y)) < 2:
            raise TrainError(f"{data_dir}: the {name} subset needs images of both classes")
    if rt.main:
        if resume:
            changes = config_changes(out_dir / "config.yaml", cfg)
            if changes:
                print(f"pneumoscan: resuming with a changed configuration ({'; '.join(changes)}): the result will "
                      "differ from an uninterrupted run (e.g. more epochs stretch the learning-rate schedule)",
                      file=sys.stderr)
        cfg.save(out_dir / "config.yaml")
        if skipped:
            (out_dir / "skipped.txt").write_text("\n".join(skipped) + "\n")

    frozen = freeze_stages(net, cfg.arch, cfg.freeze_stages)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    class_weights = None
    if cfg.class_weighted_loss:
        counts = np.bincount(train_y, minlength=2)
        class_weights = torch.tensor(len(train_y) / (2.0 * counts), dtype=torch.float32, device=rt.device)
    loss_fn = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.label_smoothing)
    cutmix = None
    if cfg.cutmix > 0:
        from torchvision.transforms import v2

        cutmix = v2.CutMix(alpha=cfg.cutmix, num_classes=2)  # soft labels; CrossEntropyLoss takes them as is
    scaler = torch.amp.GradScaler(enabled=rt.amp_dtype == torch.float16)

    # Weight EMA: the average (parameters and BatchNorm statistics) is what gets evaluated, selected and saved.
    ema = None
    if cfg.ema > 0:
        from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

        ema = AveragedModel(net, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema), use_buffers=True)
    state = {"epoch": 0, "best_auc": -1.0, "best_loss": float("inf"), "best_epoch": -1, "bad_epochs": 0}
    if resume:
        state = _load_checkpoint(checkpoint, net, opt, ema)
        if rt.main:
            print(f"resuming after epoch {state['epoch']} (best AUC {state['best_auc']:.4f})", file=sys.stderr)
    augment = build_augment(cfg.augment, prep.size)
    dataset = CachedImages(train_x, train_y, augment)
    if cfg.linear_probe and not resume:
        linear_probe(net, train_x, train_y, augment, prep, rt, channels_last=cfg.channels_last)
    # With a probed head, BatchNorm keeps its ImageNet statistics: batch statistics would move the features the
    # head was fitted on, and its first gradients would be as large as a random head's.
    fixed = frozen + ([m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
                      if cfg.linear_probe else [])
    model = nn.parallel.DistributedDataParallel(net) if rt.world > 1 else net

    workers = cfg.num_workers if cfg.num_workers >= 0 else (4 if rt.device.type == "cuda" else 0)
    steps_per_epoch = max(1, len(train_y) // rt.world // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    writer = None
    if rt.main:
        try:
            from torch.utils.tensorboard import SummaryWriter

            writer = SummaryWriter(str(out_dir / "tensorboard"))
        except ImportError:
            print("pneumoscan: tensorboard not installed; logging to metrics.csv only", file=sys.stderr)
    metrics_csv = out_dir / "metrics.csv"
    if not resume and rt.main:
        metrics_csv.write_text("epoch,train_loss,val_loss,val_auc,lr,seconds\n")

    for epoch in range(state["epoch"], cfg.epochs):
        t0 = time.time()
        torch.manual_seed(cfg.seed * 1000 + epoch * rt.world + rt.rank)  # augmentation stream: resumable
        indices = epoch_indices(train_y, cfg.sampler, cfg.seed, epoch, rt.rank, rt.world)
        loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, sampler=indices, drop_last=True,
                                             num_workers=workers, pin_memory=rt.device.type == "cuda")
        model.train()
        for module in fixed:
            module.eval()
        total, count = 0.0, 0
        bar = tqdm(loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", disable=not (progress and rt.main), leave=False)
        for step, (x, y) in enumerate(bar):
            lr = _lr_at(epoch * steps_per_epoch + step, total_steps, warmup, cfg.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            x = prep.normalize(x).to(rt.device, non_blocking=True)
            if cfg.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            y = y.to(rt.device, non_blocking=True)
            if cfg.mixup > 0:  # mixup: pairs of images blended, and their losses with the same weight
                lam = float(torch.distributions.Beta(cfg.mixup, cfg.mixup).sample())
                perm = torch.randperm(len(y), device=y.device)
                x = lam * x + (1.0 - lam) * x[perm]
            if cutmix is not None:
                x, y = cutmix(x, y)
            with torch.autocast(rt.device.type, dtype=rt.amp_dtype or torch.bfloat16, enabled=rt.amp_dtype is not None):
                out = model(x).float()
                loss = loss_fn(out, y) if cfg.mixup <= 0 else lam * loss_fn(out, y) + (1.0 - lam) * loss_fn(out, y[perm])
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
            if ema is not None:
                ema.update_parameters(net)
            total += float(loss.detach()) * len(y)
            count += len(y)
            bar.set_postfix(loss=f"{total / count:.4f}", lr=f"{lr:.2e}")
        stop = torch.zeros(1)
        if rt.main:
            scored = ema.module if ema is not None else net
            logits, _ = infer(scored, val_x, prep, rt, amp=True, channels_last=cfg.channels_last)
            val_loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(val_y)))
            val_auc = roc_auc(val_y, softmax_pneumonia(logits))
            seconds = time.time() - t0
            with metrics_csv.open("a") as f:
                f.write(f"{epoch + 1},{total / count:.6f},{val_loss:.6f},{val_auc:.6f},{lr:.3e},{seconds:.1f}\n")
            if writer:
                for key, value in (("loss/train", total / count), ("loss/val", val_loss), ("auc/val", val_auc)):
                    writer.add_scalar(key, value, epoch + 1)
            print(f"epoch {epoch + 1}/{cfg.epochs}: train loss {total / count:.4f}  val loss {val_loss:.4f}  "
                  f"val AUC {val_auc:.4f}  ({seconds:.0f} s)", file=sys.stderr)
            better = (val_auc, -val_loss) > (state["best_auc"], -state["best_loss"])
            if better:
                state.update(best_auc=val_auc, best_loss=val_loss, best_epoch=epoch + 1, bad_epochs=0)
                best = {k: v.detach().cpu().contiguous() for k, v in scored.state_dict().items()}
                atomic_write(out_dir / "best.safetensors", lambda tmp, best=best: save_file(best, tmp))
            else:
                state["bad_epochs"] += 1
            state["epoch"] = epoch + 1
            _save_checkpoint(checkpoint, net, opt, state, ema)
            if state["bad_epochs"] >= cfg.patience:
                print(f"early stopping: no better validation AUC for {cfg.patience} epochs", file=sys.stderr)
                stop += 1
        if rt.world > 1:
            dist.broadcast(stop, 0)
        if stop.item():
            break
    if writer:
        writer.close()
    path = out_dir / "model.safetensors"
    if rt.main:
        _finalize(cfg, net, prep, rt, train_x, train_y, val_x, val_y, state, data_dir, out_dir, None,
                  len(train_y), len(val_y), len(skipped), started=started)
    if rt.world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return path


def recalibrate(run_dir: str | Path, data_dir: str | Path | None = None) -> Path:
    """Refit calibration, thresholds and guard of a finished run on its own validation split, no retraining.

    Uses the run's config.yaml, split.csv and best.safetensors, so the result is what ``fit`` would have written
    with the current calibration code; the training summary (wall time, epochs) is carried over.
    """
    from .config import load_config
    from .modelfile import read_model_file

    run_dir = Path(run_dir)
    for needed in ("config.yaml", "split.csv", "best.safetensors", "checkpoint.safetensors", "model.safetensors"):
        if not (run_dir / needed).is_file():
            raise TrainError(f"{run_dir}: not a finished run directory (no {needed})")
    cfg = load_config(run_dir / "config.yaml")
    previous = read_model_file(run_dir / "model.safetensors")[1]
    data_dir = Path(data_dir or previous["training"]["data"])
    rt = setup_runtime("off")
    prep = preprocessing_for(cfg)
    train_x, train_y, val_x, val_y, skipped = _load_data(cfg, data_dir, run_dir, prep, rt, True, False)
    net = create_model(cfg.arch, pretrained="none").to(rt.device)
    from safetensors import safe_open

    with safe_open(str(run_dir / "checkpoint.safetensors"), framework="pt") as f:
        state = json.loads(f.metadata()["state"])
    _finalize(cfg, net, prep, rt, train_x, train_y, val_x, val_y, state, data_dir, run_dir,
              float(previous["training"]["wall_seconds"]), len(train_y), len(val_y), len(skipped))
    return run_dir / "model.safetensors"


def _finalize(cfg, net, prep, rt, train_x, train_y, val_x, val_y, state, data_dir, out_dir, wall_seconds,
              n_train, n_val, n_skipped, started: float | None = None) -> None:
    """Best weights -> calibration, thresholds and guard fitted on validation -> model.safetensors.

    ``wall_seconds``: the training time to record (None: measured from ``started`` to the end of this call).
    """
    from safetensors.torch import load_file

    net.load_state_dict(load_file(str(out_dir / "best.safetensors")))
    net = net.to(memory_format=torch.contiguous_format)
    # Full precision here: thresholds must be chosen on exactly the numbers prediction will compute.
    val_logits, val_feats = infer(net, val_x, prep, rt, channels_last=False)
    rng = np.random.default_rng(cfg.seed)
    subset = np.sort(rng.choice(len(train_x), size=min(len(train_x), 2000), replace=False))
    _, train_feats = infer(net, train_x[subset], prep, rt, channels_last=False)
    temperature, bias, thresholds = fit_decision_rule(val_logits, val_y, cfg.target_sensitivity,
                                                      cfg.threshold_confidence)
    raw = softmax_pneumonia(val_logits)
    p = softmax_pneumonia(val_logits, temperature, bias)
    guard = Guard.fit(torch.from_numpy(train_feats), torch.from_numpy(val_feats), quantile=cfg.guard_quantile)
    with (out_dir / "val_predictions.csv").open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["label", "probability", "guard_score"])
        scores = guard.score(torch.from_numpy(val_feats)).numpy()
        for label, prob, score in zip(val_y, p, scores, strict=True):
            w.writerow([int(label), f"{prob:.6f}", f"{score:.4f}"])
    validation = {
        "n": len(val_y), "auc": roc_auc(val_y, p), "pr_auc": pr_auc(val_y, p),
        "ece_uncalibrated": expected_calibration_error(val_y, raw), "ece": expected_calibration_error(val_y, p),
        "operating_points": {k: operating_point(val_y, p, t).to_dict() for k, t in thresholds.items()},
    }
    meta = {
        "name": out_dir.name,
        "arch": cfg.arch,
        "classes": list(CLASSES),
        "preprocessing": prep.to_dict(),
        "temperature": temperature,
        "bias": bias,
        "thresholds": thresholds,
        "target_sensitivity": cfg.target_sensitivity,
        "guard": {"threshold": guard.threshold, "quantile": cfg.guard_quantile},
        "validation": validation,
        "training": {
            "data": str(data_dir), "train_images": n_train, "val_images": n_val, "skipped_images": n_skipped,
            "train_counts": np.bincount(train_y, minlength=2).tolist(),
            "val_counts": np.bincount(val_y, minlength=2).tolist(),
            "split_sha256": sha256_file(out_dir / "split.csv"),
            "best_epoch": state["best_epoch"], "epochs_run": state["epoch"],
            "wall_seconds": round(wall_seconds if wall_seconds is not None else time.time() - started, 1),
            "hardware": f"{platform.machine()} {rt.device.type} x{rt.world}, {torch.get_num_threads()} threads",
            "config": cfg.to_dict(),
        },
        "version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    tensors = dict(net.state_dict())
    tensors.update(guard.to_tensors())
    sha = save_model_file(out_dir / "model.safetensors", tensors, meta)
    op = validation["operating_points"]
    print(f"model: {out_dir / 'model.safetensors'} (sha256 {sha[:12]}); validation AUC {validation['auc']:.4f}, "
          f"screening sens {op['screening']['sensitivity']:.3f} spec {op['screening']['specificity']:.3f}, "
          f"T={temperature:.2f}, bias={bias:+.2f}", file=sys.stderr)

