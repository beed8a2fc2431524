"""Fine-tune a model to a site's labelled X-rays: ``pneumoscan adapt --data SITE --finetune``.

Recalibration (``adapt.recalibrate``) only moves the calibration and thresholds; here the network itself learns
the site's images. The steps, each one plain:

1. The site's labelled images are screened by the base model through the stage (``adapt.load_site``); those it
   does not answer ok are left out and counted, as every adapt step does.
2. The site is cut by patient into ``folds`` stratified folds (``StratifiedGroupKFold``). For each fold, a copy
   of the base network is fine-tuned on the other folds with the base model's own training recipe (its
   augmentation, balanced sampler, frozen stages and AdamW), at ``lr`` with a warm-up and cosine decay over
   ``epochs``, and after every epoch the held-out fold is scored through the screening stage. These are the
   internal splits: every site image is scored by a network that never trained on it.
3. Stopping: the epoch whose pooled out-of-fold scores have the best ROC AUC (ties: lower loss), as training
   selects its epoch on validation.
4. Calibration (Platt scaling with Platt's smoothed targets: a few hundred out-of-fold scores may separate
   perfectly), the screening and balanced thresholds (the model's sensitivity rule: its target at 95%
   confidence) are fitted on those out-of-fold scores at that epoch. A site of 300 images has too few positives
   for the rule in any single held-out part (149 are needed at 0.98), so the rule is checked on all of them;
   fewer positives than that are refused before any training.
5. The final network is fine-tuned on every site image with the same schedule and stopped at the same epoch; its
   guard is refit on its features of the site images (``adapt.refit_guard``) and its drift reference on the site.

The output is a normal model file; its record's ``adaptation.finetune`` says on how many images and patients,
from which base model, with which settings, the chosen epoch and the out-of-fold figures.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from .adapt import (
    CONFIDENCE,
    Adapted,
    AdaptError,
    Site,
    check_positives,
    frozen_stage_count,
    refit_guard,
    sensitivity_target,
    torch_network,
)
from .augment import build_augment
from .calibrate import fit_decision_rule, softmax_pneumonia, stage_scores
from .config import TrainConfig, config_from_dict
from .metrics import roc_auc
from .models import freeze_stages
from .predict import Model
from .record import GuardSettings
from .train import CachedImages, Runtime, autocast_dtype, epoch_indices, lr_at, train_one_epoch


@dataclass(frozen=True)
class FinetuneSettings:
    """What fine-tuning runs with; the defaults are the recipe fixed in docs/experiments.md (fine-tuning to a site),
    where the learning rate was chosen on validation (1e-4 against 3e-4)."""

    epochs: int = 6
    lr: float = 1e-4
    folds: int = 3
    batch_size: int = 32
    weight_decay: float = 1e-4
    warmup_epochs: float = 0.5
    seed: int = 0


class _Fold:
    """One network being fine-tuned: its optimizer, schedule and data, one epoch at a time."""

    def __init__(self, base: nn.Module, record, images: np.ndarray, labels: np.ndarray, settings: FinetuneSettings,
                 rt: Runtime, seed: int):
        self.net = copy.deepcopy(base).float().to(rt.device).to(memory_format=torch.channels_last)
        self.frozen = freeze_stages(self.net, record.arch, frozen_stage_count(record))
        self.opt = torch.optim.AdamW([p for p in self.net.parameters() if p.requires_grad], lr=settings.lr,
                                     weight_decay=settings.weight_decay)
        self.data = CachedImages(images, labels, _augment(record))
        self.labels = labels
        self.settings, self.rt, self.seed = settings, rt, seed
        self.batch = min(settings.batch_size, len(labels))  # a 25-image site still takes steps
        self.steps = max(1, len(labels) // self.batch)
        self.total = self.steps * settings.epochs
        self.warmup = max(1, int(settings.warmup_epochs * self.steps))
        self.prep = record.preprocessing

    def epoch(self, epoch: int) -> float:
        torch.manual_seed(self.seed * 1000 + epoch)  # the augmentation stream
        order = epoch_indices(self.labels, "weighted", self.seed, epoch, 0, 1)
        loader = torch.utils.data.DataLoader(self.data, batch_size=self.batch, sampler=order,
                                             drop_last=True, num_workers=0)
        loss, _ = train_one_epoch(
            self.net, nn.CrossEntropyLoss(), self.opt, torch.amp.GradScaler(enabled=self.rt.amp_dtype == torch.float16), loader, self.prep,
            self.rt, frozen=self.frozen, channels_last=True, desc=f"fine-tune epoch {epoch + 1}", progress=False,
            schedule=lambda step: lr_at(epoch * self.steps + step, self.total, self.warmup, self.settings.lr))
        return loss

    def scores(self, record, images: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) through the stage, as the saved file would score them."""
        net = copy.deepcopy(self.net).to(memory_format=torch.contiguous_format).eval()
        logits, feats, _ = stage_scores(Adapted(net, record, None, "").scoring_model(), images)
        return logits, feats


def _augment(record):
    """The base model's own training augmentation (its record's config), at its input size."""
    config = record.training.get("config")
    cfg = config_from_dict(config, f"{record.name}'s training config") if config else TrainConfig()
    return build_augment(cfg.augment, record.preprocessing.size, reduction_threads=torch.get_num_threads())


def _runtime(model: Model) -> Runtime:
    """One process on the device the model was loaded on, with training's autocast there."""
    device = next(torch_network(model).parameters()).device
    return Runtime(0, 1, 0, device, autocast_dtype(device))


def patient_folds(labels: np.ndarray, groups: Sequence[str], folds: int, seed: int) -> list[np.ndarray]:
    """Held-out indices of each of ``folds`` stratified folds, every patient in one fold."""
    from sklearn.model_selection import StratifiedGroupKFold

    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    return [held for _, held in splitter.split(np.zeros(len(labels)), labels, np.asarray(groups))]


def _loss(logits: torch.Tensor, labels: np.ndarray) -> float:
    return float(nn.functional.cross_entropy(logits.float(), torch.from_numpy(labels)))


@dataclass
class Finetuned:
    """A fine-tuned network and the out-of-fold evidence its decision rule is fitted on."""

    network: nn.Module  # fine-tuned on every site image, stopped at ``epoch``
    epoch: int  # 1-based, chosen on the out-of-fold scores
    oof_logits: torch.Tensor  # (N, 2) each site image scored by the fold network that did not train on it
    auc_by_epoch: list[float]
    loss_by_epoch: list[float]
    patients: int


def check_site(site: Site, groups: Sequence[str], folds: int) -> None:
    """Refuse a site that cannot be cut into ``folds`` patient folds holding both classes."""
    if site.labels is None:
        raise AdaptError("fine-tuning needs labelled site images")
    if len(groups) != len(site):
        raise AdaptError(f"{len(groups)} patient labels for {len(site)} site images")
    counts = np.bincount(site.labels, minlength=2)
    patients = len(set(groups))
    if counts.min() < folds or patients < folds:
        raise AdaptError(f"{len(site)} site images of {patients} patients ({counts[0]} NORMAL, {counts[1]} PNEUMONIA) "
                         f"cannot be cut into {folds} patient folds with both classes: nothing written")


def fit_network(model: Model, site: Site, groups: Sequence[str], settings: FinetuneSettings = FinetuneSettings(),
                log=None) -> Finetuned:
    """Steps 2, 3 and the final network of step 5 of the module docstring; ``log(line)`` gets a line per epoch."""
    check_site(site, groups, settings.folds)
    labels = site.labels
    network, record = torch_network(model), model.record  # each _Fold trains its own copy
    rt = _runtime(model)
    images = site.images.numpy()
    say = log or (lambda line: None)
    oof = torch.zeros((settings.epochs, len(site), 2))  # every epoch's out-of-fold logits
    for k, held in enumerate(patient_folds(labels, groups, settings.folds, settings.seed)):
        fit = np.setdiff1d(np.arange(len(site)), held)
        fold = _Fold(network, record, images[fit], labels[fit], settings, rt, settings.seed + k)
        for epoch in range(settings.epochs):
            loss = fold.epoch(epoch)
            oof[epoch, held] = fold.scores(record, images[held])[0]
            say(f"fold {k + 1}/{settings.folds} epoch {epoch + 1}/{settings.epochs}: train loss {loss:.4f}, "
                f"held-out AUC {roc_auc(labels[held], softmax_pneumonia(oof[epoch, held].numpy())):.4f}")
    aucs = [roc_auc(labels, softmax_pneumonia(oof[e].numpy())) for e in range(settings.epochs)]
    losses = [_loss(oof[e], labels) for e in range(settings.epochs)]
    best = max(range(settings.epochs), key=lambda e: (aucs[e], -losses[e]))
    say(f"out-of-fold: epoch {best + 1} chosen (AUC {aucs[best]:.4f}, loss {losses[best]:.4f})")
    final = _Fold(network, record, images, labels, settings, rt, settings.seed + settings.folds)
    for epoch in range(best + 1):
        loss = final.epoch(epoch)
        say(f"all {len(site)} site images, epoch {epoch + 1}/{best + 1}: train loss {loss:.4f}")
    network = final.net.to(memory_format=torch.contiguous_format).eval()
    return Finetuned(network, best + 1, oof[best], aucs, losses, len(set(groups)))


def decision_rule(model: Model, site: Site, fitted: Finetuned, settings: FinetuneSettings,
                  target_sensitivity: float | None = None, seconds: float | None = None) -> Adapted:
    """Step 4 and the guard of step 5: the fine-tuned network with calibration and thresholds fitted on the
    out-of-fold scores, its guard refit on its own features of the site images."""
    counts = np.bincount(site.labels, minlength=2)
    target = sensitivity_target(model.record, target_sensitivity)
    check_positives(site, target)
    temperature, bias, thresholds = fit_decision_rule(fitted.oof_logits.numpy(), site.labels, target, CONFIDENCE,
                                                      smoothed=True)
    out = Adapted(fitted.network, model.record, model.guard, model.sha256, network_changed=True)
    record = model.record.with_(temperature=temperature, bias=bias, thresholds=thresholds, target_sensitivity=target,
                               prevalence=float(counts[1] / counts.sum()))
    out.record = record
    step: dict = {"images": len(site), "patients": fitted.patients, "counts": counts.tolist(),
                  "sha256_digest": site.digest(), "excluded": dict(site.excluded), "settings": asdict(settings),
                  "target_sensitivity": target, "confidence": CONFIDENCE, "epoch": fitted.epoch,
                  "out_of_fold": {"auc": fitted.auc_by_epoch[fitted.epoch - 1],
                                  "loss": fitted.loss_by_epoch[fitted.epoch - 1],
                                  "auc_by_epoch": fitted.auc_by_epoch}}
    if out.guard is not None and record.guard is not None:
        _, feats = out.scores(site)
        out.guard, step["guard"] = refit_guard(feats, record.guard.quantile, settings.seed)
        out.record = record.with_(guard=GuardSettings(out.guard.threshold, record.guard.quantile,
                                                      record.guard.min_side))
    if seconds is not None:
        step["seconds"] = round(seconds, 1)
    out.steps["finetune"] = step
    out.reference_site = site
    return out


def finetune(model: Model, site: Site, groups: Sequence[str], *, settings: FinetuneSettings = FinetuneSettings(),
             target_sensitivity: float | None = None, log=None) -> Adapted:
    """The base model fine-tuned on the site's labelled images, as the module docstring says; ``groups``: each
    kept site image's patient (any opaque label), in ``site.files`` order. Refuses (AdaptError) before any
    training when the site cannot support the sensitivity rule or the folds."""
    check_site(site, groups, settings.folds)
    check_positives(site, sensitivity_target(model.record, target_sensitivity))
    started = time.perf_counter()
    fitted = fit_network(model, site, groups, settings, log)
    return decision_rule(model, site, fitted, settings, target_sensitivity, time.perf_counter() - started)
