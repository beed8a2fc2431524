"""Adapt a model to a site's own X-rays: ``pneumoscan adapt``.

A model's thresholds and calibration are fitted on its validation split, which shares the training images'
acquisition; another hospital's machines shift the images, and with them the scores. Two ways to follow a site:

Unlabelled (``--images``), in this order:
1. AdaBN (Li et al. 2016), when asked for (``--bn-layers``; off by default): BatchNorm statistics re-estimated on
   the site's images, every weight kept. ``"trained"`` re-estimates only the BatchNorm layers of the stages that
   were fine-tuned. The early stages were frozen in training (EfficientNet-Lite0: the stem and blocks 0-2), so
   their BatchNorm kept the ImageNet statistics, and every later weight was learnt on features normalised by
   exactly those: AdaBN's premise (the statistics are the source domain's) does not hold for them, and their
   high-resolution input is already standardised per image. ``"all"`` re-estimates them too. ``balance``
   (``--bn-balance``) takes the statistics over a resample weighted to the training batches' class mix. On
   validation every variant lost screening sensitivity (docs/experiments.md, site adaptation), hence the default.
2. The site's pneumonia prevalence, estimated from the model's own calibrated probabilities by EM (Saerens,
   Latinne and Decaestecker 2002), re-bases the calibration the way ``--prevalence`` does: the bias and the named
   thresholds move by the same log-odds, so the probabilities mean the site's prevalence. With ``thresholds="em"``
   (the default, chosen on validation) the screening and balanced thresholds are then refit on the site's images
   with the EM posteriors standing in for the labels (``em_thresholds``).
3. The feature guard's statistics are refit on the site's features (PCA on a seeded half, the limit at the base
   model's quantile of the other half).

Labelled (``--data DIR`` with ``DIR/NORMAL`` and ``DIR/PNEUMONIA``): calibration and the screening and balanced
thresholds are refit on the site's labelled images with ``calibrate.fit_decision_rule``, after the unlabelled step
when ``--images`` is given too. The screening threshold keeps its sensitivity lower bound at 95% confidence, so a
sample with too few positives for the requested sensitivity is refused.

Images the checks call no chest X-ray, or the base model's guard rejects, are left out and counted. The output is a
normal model file: its record's ``adaptation`` says what was refit, on how many images, a digest of their sha256
list, and the base model's sha256; ``name`` is ``<base>-site-<digest>``.
"""

from __future__ import annotations

import copy
import hashlib
import math
import os
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__
from .calibrate import fit_decision_rule, prior_shift, softmax_pneumonia
from .constants import BATCH_SIZE
from .data.images import ImageReadError
from .data.layout import CLASSES, IMAGE_SUFFIXES
from .errors import PneumoscanError
from .guard import Guard
from .modelfile import save_model_file
from .models import arch_spec
from .predict import Model
from .record import GuardSettings, ModelRecord

# Fewer site images than this and adaptation is refused. At 25 images the EM prevalence estimate has a standard
# error near 0.1 (sqrt(0.25 / 25)), the re-estimated BatchNorm statistics of the deepest 7 px stage rest on 25 x 49
# positions per channel, and the guard's limit is the largest of about 12 held-out scores; below that each of them
# is mostly noise. 25 is also the smallest sample of the site-size curve in docs/experiments.md.
MIN_IMAGES = 25
BN_LAYERS = ("trained", "all", "none")
CONFIDENCE = 0.95  # the screening threshold's one-sided Clopper-Pearson confidence, as in training
ADABN_BATCH = 32


class AdaptError(PneumoscanError):
    pass


# --- the site's images -------------------------------------------------------------------------------------------

def image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted; hidden files and folders left out)."""
    root = Path(folder)
    if not root.is_dir():
        raise AdaptError(f"{root}: not a folder of site images")
    return [p for p in sorted(root.rglob("*")) if p.is_file()
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and (p.suffix.lower() in IMAGE_SUFFIXES or p.suffix == "")]


def labelled_files(folder: str | Path) -> tuple[list[Path], list[int]]:
    """(files, labels) of ``folder/NORMAL`` and ``folder/PNEUMONIA`` (any case)."""
    root = Path(folder)
    if not root.is_dir():
        raise AdaptError(f"{root}: not a folder of labelled site images")
    found = {p.name.upper(): p for p in root.iterdir() if p.is_dir()}
    missing = [c for c in CLASSES if c not in found]
    if missing:
        raise AdaptError(f"{root}: a labelled site folder needs {' and '.join(CLASSES)} subfolders "
                         f"(missing {', '.join(missing)})")
    files, labels = [], []
    for label, name in enumerate(CLASSES):
        for path in image_files(found[name]):
            files.append(path)
            labels.append(label)
    return files, labels


@dataclass
class Site:
    """A site's usable images as the frozen stages of the base network see them, and what was left out."""

    files: list[str]
    sha256: list[str]
    images: torch.Tensor  # (N, S, S) uint8 network inputs
    prefix: torch.Tensor  # (N, C, H, W) the base network's frozen stages' outputs (normalised images if none)
    labels: np.ndarray | None  # (N,) 0/1, or None for unlabelled images
    excluded: dict[str, int] = field(default_factory=dict)  # not_xray, out_of_distribution, unreadable
    messages: list[str] = field(default_factory=list)
    base_logits: torch.Tensor | None = None  # (N, 2) the base model's logits, when computed
    base_features: torch.Tensor | None = None  # (N, D) and its pooled features

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: Sequence[int]) -> Site:
        index = list(index)
        return Site([self.files[i] for i in index], [self.sha256[i] for i in index], self.images[index],
                    self.prefix[index], None if self.labels is None else self.labels[index], dict(self.excluded),
                    list(self.messages), None if self.base_logits is None else self.base_logits[index],
                    None if self.base_features is None else self.base_features[index])

    def digest(self) -> str:
        """sha256 of the sorted list of the images' sha256: which images, whatever their names or order."""
        return hashlib.sha256("\n".join(sorted(self.sha256)).encode()).hexdigest()


def _read(model: Model, path: Path) -> tuple[np.ndarray, str | None, str] | str:
    try:
        data = path.read_bytes()
        small, reason = model.prepare(model.decode(data, name=str(path)))
    except (ImageReadError, OSError) as exc:
        return str(exc)
    except Exception as exc:  # whatever a malformed file makes a library raise: that file is left out, not the run
        return f"{path}: unreadable ({type(exc).__name__})"
    return small, reason, hashlib.sha256(data).hexdigest()


def load_site(model: Model, files: Sequence[str | Path], labels: Sequence[int] | None = None, *,
              batch_size: int = BATCH_SIZE, workers: int | None = None) -> Site:
    """Decode and check the site's files; keep those the checks and the base model's guard accept."""
    _network(model)
    kept, sha, small, kept_labels, messages = [], [], [], [], []
    excluded = {"unreadable": 0, "not_xray": 0, "out_of_distribution": 0}
    with ThreadPoolExecutor(max_workers=workers or min(4, os.cpu_count() or 1)) as pool:
        for i, (path, item) in enumerate(zip(files, pool.map(lambda p: _read(model, Path(p)), files), strict=True)):
            if isinstance(item, str):
                excluded["unreadable"] += 1
                messages.append(item)
            elif item[1] is not None:
                excluded["not_xray"] += 1
                messages.append(f"{path}: not a frontal chest X-ray: {item[1]}")
            else:
                kept.append(str(path))
                small.append(item[0])
                sha.append(item[2])
                if labels is not None:
                    kept_labels.append(int(labels[i]))
    images = torch.from_numpy(np.stack(small)) if small else torch.zeros((0, model.preprocessing.size,
                                                                          model.preprocessing.size), dtype=torch.uint8)
    return site_from_images(model, images, kept, sha, None if labels is None else kept_labels,
                            excluded=excluded, messages=messages, batch_size=batch_size)


def site_from_images(model: Model, images: torch.Tensor, files: Sequence[str], sha256: Sequence[str],
                     labels: Sequence[int] | None = None, *, excluded: dict | None = None,
                     messages: list[str] | None = None, batch_size: int = BATCH_SIZE) -> Site:
    """A site from uint8 network inputs (N, S, S) that passed the image checks: the frozen stages are run once,
    and the images the base model's guard rejects are left out and counted."""
    excluded = {"unreadable": 0, "not_xray": 0, "out_of_distribution": 0, **(excluded or {})}
    messages = list(messages or [])
    y = None if labels is None else np.asarray(labels, dtype=np.int64)
    if len(images) == 0:
        return Site([], [], images, torch.zeros(0), None if y is None else y[:0], excluded, messages)
    network = _network(model)
    prefix = prefix_outputs(network, model.record, images, batch_size=batch_size)
    site = Site(list(map(str, files)), list(sha256), images, prefix, y, excluded, messages)
    if model.guard is None:
        return site
    site.base_logits, site.base_features = feats = tail_scores(network, model.record, site.prefix,
                                                               batch_size=batch_size)
    feats = site.base_features
    scores = model.guard.score(feats).numpy()
    rejected = set(np.flatnonzero(scores > model.guard.threshold).tolist())
    for i in sorted(rejected):
        messages.append(f"{site.files[i]}: outside the base model's training population (guard distance "
                        f"{scores[i]:.2f}, limit {model.guard.threshold:.2f})")
    site = site.subset([i for i in range(len(site)) if i not in rejected])
    site.excluded["out_of_distribution"] += len(rejected)
    site.messages = messages
    return site


# --- the network, split at the end of its frozen stages ----------------------------------------------------------

def frozen_stage_count(record: ModelRecord) -> int:
    """How many of the architecture's stages training kept frozen (its config, else the architecture default)."""
    spec = arch_spec(record.arch)
    count = (record.training.get("config") or {}).get("freeze_stages")
    return spec.default_freeze if count is None else int(count)


def _network(model: Model) -> nn.Module:
    if not getattr(model.backend, "gradcam", False):
        raise AdaptError("adapt needs the PyTorch model file (.safetensors), not an ONNX file")
    return model.backend.network


def _stage_modules(network: nn.Module, record: ModelRecord, stages: slice) -> list[nn.Module]:
    return [network.get_submodule(name) for stage in arch_spec(record.arch).stages[stages] for name in stage]


def _splittable(network: nn.Module) -> bool:
    """EfficientNets (timm): stem, bn1, blocks..., head; the frozen prefix can then be computed once."""
    return all(hasattr(network, a) for a in ("conv_stem", "bn1", "blocks", "conv_head", "bn2", "forward_head"))


def _autocast(model_or_record) -> torch.autocast:
    record = model_or_record if isinstance(model_or_record, ModelRecord) else model_or_record.record
    return torch.autocast("cpu", dtype=torch.bfloat16, enabled=record.precision == "bfloat16")


@torch.no_grad()
def prefix_outputs(network: nn.Module, record: ModelRecord, images: torch.Tensor, *,
                   batch_size: int = BATCH_SIZE) -> torch.Tensor:
    """Outputs of the frozen stages for uint8 images (N, S, S), float32: computed once per site, since AdaBN of
    the fine-tuned stages leaves them as they are (the normalised images when nothing is frozen)."""
    frozen = frozen_stage_count(record)
    was = network.training
    network.eval()
    out = []
    for s in range(0, len(images), batch_size):
        x = record.preprocessing.normalize(images[s:s + batch_size]).contiguous(memory_format=torch.channels_last)
        if _splittable(network) and frozen >= 1:
            with _autocast(record):
                x = network.bn1(network.conv_stem(x))
                for block in network.blocks[:frozen - 1]:
                    x = block(x)
        out.append(x.float())
    network.train(was)
    return torch.cat(out)


def _tail(network: nn.Module, record: ModelRecord, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    frozen = frozen_stage_count(record)
    x = x.contiguous(memory_format=torch.channels_last)
    if _splittable(network) and frozen >= 1:
        for block in network.blocks[frozen - 1:]:
            x = block(x)
        pooled = network.forward_head(network.bn2(network.conv_head(x)), pre_logits=True)
    else:
        pooled = network.forward_head(network.forward_features(x), pre_logits=True)
    return network.get_classifier()(pooled), pooled


@torch.no_grad()
def tail_scores(network: nn.Module, record: ModelRecord, prefix: torch.Tensor, *,
                batch_size: int = BATCH_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits (N, 2), features (N, D)) of the network from the frozen stages' outputs: ``Model.score``'s numbers."""
    was = network.training
    network.eval()
    logits, feats = [], []
    with _autocast(record):
        for s in range(0, len(prefix), batch_size):
            out, pooled = _tail(network, record, prefix[s:s + batch_size])
            logits.append(out.float())
            feats.append(pooled.float())
    network.train(was)
    return torch.cat(logits), torch.cat(feats)


def bn_layers(network: nn.Module, record: ModelRecord, which: str) -> list[nn.modules.batchnorm._BatchNorm]:
    """The BatchNorm layers AdaBN re-estimates: those of the fine-tuned stages, all of them, or none."""
    if which not in BN_LAYERS:
        raise AdaptError(f"bn_layers must be one of {', '.join(BN_LAYERS)}, got {which!r}")
    if which == "none":
        return []
    modules = [network] if which == "all" else _stage_modules(network, record, slice(frozen_stage_count(record), None))
    return [m for top in modules for m in top.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def training_prior(record: ModelRecord) -> float | None:
    """The pneumonia share of the batches the BatchNorm statistics were estimated on in training: one half under
    the balanced (weighted) sampler, the training split's share otherwise; None when the record does not say."""
    training = record.training
    if (training.get("config") or {}).get("sampler") == "weighted":
        return 0.5
    counts = training.get("train_counts")
    return counts[1] / sum(counts) if counts and sum(counts) else None


def balanced_order(q: np.ndarray, prevalence: float, prior: float, seed: int = 0) -> np.ndarray:
    """Indices of the site images drawn with replacement (as many as there are) with weights that give the draw
    the training batches' class mix ``prior``: each image counts as a pneumonia case with posterior ``q`` at the
    site's prevalence, so its weight is prior q / prevalence + (1 - prior) (1 - q) / (1 - prevalence)."""
    q = np.asarray(q, dtype=np.float64)
    w = prior * q / prevalence + (1 - prior) * (1 - q) / (1 - prevalence)
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(q), size=len(q), replace=True, p=w / w.sum()))


@torch.no_grad()
def adabn(network: nn.Module, record: ModelRecord, site: Site, which: str = "trained",
          order: np.ndarray | None = None) -> int:
    """Re-estimate the chosen BatchNorm layers' running statistics on the site (a cumulative average over batches
    of ``ADABN_BATCH``, in float32); nothing else changes. Returns the number of layers re-estimated.

    ``order``: which site images, in which order (with repeats), the statistics are taken over; default all once."""
    layers = bn_layers(network, record, which)
    if not layers:
        return 0
    if order is not None:
        site = site.subset(order)
    network.eval()
    saved = [(m, m.momentum) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
        m.train()
    try:
        if which == "all":  # the frozen stages change too: from the images
            for s in range(0, len(site.images), ADABN_BATCH):
                x = record.preprocessing.normalize(site.images[s:s + ADABN_BATCH])
                network.forward_head(network.forward_features(x.contiguous(memory_format=torch.channels_last)),
                                     pre_logits=True)
        else:
            for s in range(0, len(site.prefix), ADABN_BATCH):
                _tail(network, record, site.prefix[s:s + ADABN_BATCH])
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        network.eval()
    return len(layers)


# --- prevalence by EM ----------------------------------------------------------------------------------------------

def em_prevalence(p: np.ndarray, fitted: float, *, tol: float = 1e-7, max_iter: int = 1000) -> float:
    """The site's class prior from calibrated posteriors ``p`` fitted at prior ``fitted`` (Saerens et al. 2002):
    alternate re-weighting the posteriors by the prior ratio and averaging them, until the prior settles."""
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-12, 1 - 1e-12)
    prior = float(fitted)
    for _ in range(max_iter):
        a = prior / fitted * p
        b = (1 - prior) / (1 - fitted) * (1 - p)
        new = float(np.mean(a / (a + b)))
        if abs(new - prior) < tol:
            prior = new
            break
        prior = new
    return float(np.clip(prior, 1e-3, 1 - 1e-3))


def em_thresholds(q: np.ndarray, target_sensitivity: float) -> dict[str, float]:
    """Screening and balanced thresholds from unlabelled images, with the calibrated posteriors ``q`` (at the
    site's EM prevalence) standing in for the labels: the expected sensitivity at t is sum(q [q >= t]) / sum(q),
    the expected specificity sum((1 - q) [q < t]) / sum(1 - q). Screening: the highest t whose expected
    sensitivity reaches the target; balanced: the t maximising expected sensitivity + specificity."""
    q = np.sort(np.asarray(q, dtype=np.float64))
    pos_below = np.concatenate([[0.0], np.cumsum(q)[:-1]])  # expected positives strictly below each q (no ties)
    neg_below = np.concatenate([[0.0], np.cumsum(1 - q)[:-1]])
    sensitivity = 1 - pos_below / q.sum()
    specificity = neg_below / (1 - q).sum()
    ok = np.flatnonzero(sensitivity >= target_sensitivity)
    return {"screening": float(q[ok[-1]] if len(ok) else q[0]),
            "balanced": float(q[int(np.argmax(sensitivity + specificity))])}


# --- the adapted model ---------------------------------------------------------------------------------------------

@dataclass
class Adapted:
    """A model being adapted: its own copy of the network, a record and a guard; ``save`` writes the file."""

    network: nn.Module
    record: ModelRecord
    guard: Guard | None
    base_sha256: str
    steps: dict = field(default_factory=dict)
    frozen_changed: bool = False  # AdaBN re-estimated the frozen stages: a site's cached prefix no longer holds
    network_changed: bool = False  # AdaBN re-estimated some layer: the base model's cached scores no longer hold
    site_logits: torch.Tensor | None = field(default=None, repr=False)  # the last adaptation images' logits

    @classmethod
    def of(cls, model: Model) -> Adapted:
        net = copy.deepcopy(_network(model)).float().eval()
        guard = copy.deepcopy(model.guard)
        return cls(net, model.record, guard, model.sha256)

    def scores(self, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) of the site's images, as ``Model.score`` of the saved file computes them."""
        if not self.network_changed and site.base_logits is not None and site.base_features is not None:
            return site.base_logits, site.base_features
        prefix = prefix_outputs(self.network, self.record, site.images) if self.frozen_changed else site.prefix
        return tail_scores(self.network, self.record, prefix)

    def probability(self, logits: torch.Tensor) -> np.ndarray:
        return softmax_pneumonia(logits.numpy(), self.record.temperature, self.record.bias)

    def save(self, path: str | Path) -> str:
        digests = [s.get("sha256_digest", "") for s in self.steps.values()]
        tag = hashlib.sha256("".join(digests).encode()).hexdigest()[:12]
        base = self.record.adaptation.get("base_name") if self.record.adaptation else self.record.name
        record = self.record.with_(
            name=f"{base}-site-{tag}", storage="float32", version=__version__,
            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            adaptation={"base_name": base, "base_sha256": self.base_sha256, **self.steps,
                        "note": "validation figures are the base model's, measured before adaptation"})
        tensors = {**self.network.state_dict(), **(self.guard.to_tensors() if self.guard is not None else {})}
        return save_model_file(path, tensors, record.to_dict())


def _check_size(site: Site, what: str, minimum: int = MIN_IMAGES) -> None:
    left_out = ", ".join(f"{k} {v}" for k, v in site.excluded.items() if v)
    if len(site) == 0:
        raise AdaptError(f"no readable chest X-ray among the {what}" + (f" ({left_out})" if left_out else "")
                         + ": nothing written")
    if len(site) < minimum:
        raise AdaptError(f"only {len(site)} usable {what} (at least {minimum} needed)"
                         + (f"; left out: {left_out}" if left_out else "") + ": nothing written")


THRESHOLDS = ("keep", "em")


# Chosen on validation by the rule in docs/experiments.md (site adaptation): every AdaBN variant lost screening
# sensitivity there (0.90-0.96 against 0.974), so AdaBN is off unless asked for; refitting the thresholds from the EM
# posteriors tied on AUC and sensitivity (within 0.01) and won on specificity.
DEFAULT_BN_LAYERS = "none"
DEFAULT_THRESHOLDS = "em"


def adapt_unlabelled(model: Model, site: Site, *, which: str = DEFAULT_BN_LAYERS,
                     thresholds: str = DEFAULT_THRESHOLDS, seed: int = 0,
                     balance: bool = False, adapted: Adapted | None = None) -> Adapted:
    """AdaBN on the site's images, then the EM prevalence re-basing the calibration, then the guard refit.

    thresholds: "keep" moves the base thresholds with the prevalence (decisions of the base calibration);
    "em" refits them on the site's images with the EM posteriors in place of labels (``em_thresholds``)."""
    if thresholds not in THRESHOLDS:
        raise AdaptError(f"thresholds must be one of {', '.join(THRESHOLDS)}, got {thresholds!r}")
    _check_size(site, "site images")
    started = time.perf_counter()
    out = adapted or Adapted.of(model)
    order = None
    fitted = out.record.fitted_prevalence
    prior = training_prior(out.record)
    if balance and which != "none" and fitted is not None and prior is not None:
        # the site's class mix moves BatchNorm statistics as much as its acquisition does: re-weight the images to
        # the class mix of the training batches, with the unadapted model's EM posteriors as soft labels
        before, _ = out.scores(site)
        p0 = np.clip(out.probability(before), 1e-9, 1 - 1e-9)
        first = em_prevalence(p0, fitted)
        q0 = 1 / (1 + np.exp(-(np.log(p0 / (1 - p0)) + prior_shift(fitted, first))))
        order = balanced_order(q0, first, prior, seed)
    layers = adabn(out.network, out.record, site, which, order)
    out.frozen_changed = out.frozen_changed or (which == "all" and layers > 0)
    out.network_changed = out.network_changed or layers > 0
    logits, feats = out.scores(site)
    record = out.record
    step: dict = {"images": len(site), "sha256_digest": site.digest(), "excluded": dict(site.excluded),
                  "bn_layers": which, "bn_layers_reestimated": layers,
                  "bn_class_balanced": order is not None}
    if fitted is not None:
        prevalence = em_prevalence(out.probability(logits), fitted)
        shift = prior_shift(fitted, prevalence)
        n = len(site)
        training = {**record.training, "base_val_counts": record.training.get("val_counts"),
                    # the prevalence the calibration now holds at, as expected counts of the site images, so that
                    # --prevalence re-bases from it
                    "val_counts": [round(n * (1 - prevalence), 3), round(n * prevalence, 3)]}
        moved = {k: float(torch.sigmoid(torch.logit(torch.tensor(v, dtype=torch.float64)) + shift))
                 for k, v in record.thresholds.items()}
        record = record.with_(bias=record.bias + shift, training=training)
        if thresholds == "em":
            target = record.target_sensitivity or 0.98
            moved = {**moved, **em_thresholds(softmax_pneumonia(logits.numpy(), record.temperature, record.bias),
                                              target)}
        record = record.with_(thresholds=moved)
        step["prevalence"] = {"method": "EM (Saerens et al. 2002)", "fitted": fitted, "site": prevalence,
                              "log_odds_shift": shift}
        step["thresholds"] = thresholds
    else:
        step["prevalence"] = None  # the base records no fitted prevalence: nothing to re-base from
    if out.guard is not None and record.guard is not None and len(site) >= 4:
        order = np.random.default_rng(seed).permutation(len(site))
        half = len(site) // 2
        # as many components as the base guard (32) when there are images enough, and at most one per five fit
        # images: a subspace spanned by nearly all of them leaves no residual to measure distances with
        components = max(1, min(32, half // 5))
        guard = Guard.fit(feats[order[:half]], feats[order[half:]], components=components,
                          quantile=record.guard.quantile)
        out.guard = guard
        record = record.with_(guard=GuardSettings(guard.threshold, record.guard.quantile, record.guard.min_side))
        step["guard"] = {"fit_images": half, "limit_images": len(site) - half, "components": components,
                         "threshold": guard.threshold}
    step["seconds"] = round(time.perf_counter() - started, 2)
    out.record = record
    out.steps["unlabelled"] = step
    out.site_logits = logits
    return out


def min_positives(target_sensitivity: float, confidence: float = CONFIDENCE) -> int:
    """Fewest positives whose one-sided Clopper-Pearson lower bound can reach the target (with no miss at all)."""
    return math.ceil(math.log(1 - confidence) / math.log(target_sensitivity) - 1e-12)


def recalibrate(model: Model, site: Site, *, target_sensitivity: float | None = None,
                adapted: Adapted | None = None, logits: torch.Tensor | None = None) -> Adapted:
    """Refit temperature, bias, screening and balanced thresholds on the site's labelled images.

    ``logits``: the site images' logits under ``adapted`` (or the base model), when already computed."""
    if site.labels is None:
        raise AdaptError("recalibration needs labelled site images")
    _check_size(site, "labelled site images", minimum=1)
    counts = np.bincount(site.labels, minlength=2)
    if counts.min() == 0:
        only = CLASSES[int(np.argmax(counts))]
        raise AdaptError(f"the labelled site images are all {only} ({len(site)} images): calibration and "
                         "thresholds need both classes: nothing written")
    out = adapted or Adapted.of(model)
    target = target_sensitivity if target_sensitivity is not None else (out.record.target_sensitivity or 0.98)
    if not 0 < target < 1:
        raise AdaptError(f"the target sensitivity must be in (0, 1), got {target}")
    needed = min_positives(target)
    if counts[1] < needed:
        raise AdaptError(f"{counts[1]} PNEUMONIA images cannot support sensitivity {target} at "
                         f"{CONFIDENCE:.0%} confidence (at least {needed} needed, with none missed): nothing written")
    started = time.perf_counter()
    if logits is None:
        logits = site.base_logits if adapted is None and site.base_logits is not None else out.scores(site)[0]
    temperature, bias, thresholds = fit_decision_rule(logits.numpy(), site.labels, target, CONFIDENCE)
    training = {**out.record.training, "base_val_counts": out.record.training.get("val_counts"),
                "val_counts": counts.tolist()}  # the calibration now holds at the site sample's prevalence
    out.record = out.record.with_(temperature=temperature, bias=bias, thresholds=thresholds,
                                  target_sensitivity=target, training=training)
    out.steps["labelled"] = {"images": len(site), "counts": counts.tolist(), "sha256_digest": site.digest(),
                             "excluded": dict(site.excluded), "target_sensitivity": target,
                             "confidence": CONFIDENCE, "seconds": round(time.perf_counter() - started, 2)}
    return out


# --- the command ---------------------------------------------------------------------------------------------------

def cmd_adapt(args) -> int:
    from .predict import load_model
    from .report import check_output_file

    if not args.images and not args.data:
        raise AdaptError("give --images SITE_DIR (unlabelled) and/or --data SITE_LABELLED_DIR (labelled)")
    check_output_file(args.out, "--out")
    unlabelled = image_files(args.images) if args.images else None
    labelled = labelled_files(args.data) if args.data else None
    if unlabelled is not None and not unlabelled:
        raise AdaptError(f"{args.images}: no image file (.jpeg, .png, .dcm, ...): nothing written")
    if labelled is not None and not labelled[0]:
        raise AdaptError(f"{args.data}: no image file in NORMAL/ or PNEUMONIA/: nothing written")
    model = load_model(args.model)
    if args.model and Path(args.out).resolve() == model.path.resolve():
        raise AdaptError(f"{args.out}: --out must not overwrite the model being adapted")
    started = time.perf_counter()
    adapted = None
    lines = []
    if unlabelled is not None:
        site = load_site(model, unlabelled)
        _report_left_out(site, args.images, args.quiet)
        adapted = adapt_unlabelled(model, site, which=args.bn_layers, thresholds=args.thresholds,
                                   balance=args.bn_balance)
        step = adapted.steps["unlabelled"]
        prevalence = step["prevalence"]
        lines.append(f"unlabelled: {step['images']} images; BatchNorm re-estimated in {step['bn_layers_reestimated']} "
                     f"layers ({args.bn_layers})"
                     + (f"; prevalence {prevalence['fitted']:.3f} -> {prevalence['site']:.3f} (EM)" if prevalence else "")
                     + (f"; guard limit {step['guard']['threshold']:.2f}" if "guard" in step else ""))
    if labelled is not None:
        site = load_site(model, *labelled)  # checked by the base model's guard, as --images are
        _report_left_out(site, args.data, args.quiet)
        adapted = recalibrate(model, site, target_sensitivity=args.sensitivity, adapted=adapted)
        step = adapted.steps["labelled"]
        lines.append(f"labelled: {step['images']} images ({step['counts'][0]} NORMAL, {step['counts'][1]} PNEUMONIA); "
                     f"T={adapted.record.temperature:.3f} bias={adapted.record.bias:+.3f}, screening threshold "
                     f"{adapted.record.thresholds['screening']:.4f} (sensitivity >= {step['target_sensitivity']} at "
                     f"95% confidence), balanced {adapted.record.thresholds['balanced']:.4f}")
    sha = adapted.save(args.out)
    for line in lines:
        print(f"pneumoscan: {line}", file=sys.stderr)
    print(f"wrote {args.out} (sha256 {sha[:12]}, from {model.name} {model.sha256[:12]}; "
          f"{time.perf_counter() - started:.1f} s)")
    return 0


def _report_left_out(site: Site, folder: str, quiet: bool) -> None:
    left = {k: v for k, v in site.excluded.items() if v}
    if not left:
        return
    if not quiet:
        for message in site.messages:
            print(f"pneumoscan: left out: {message}", file=sys.stderr)
    print(f"pneumoscan: warning: {folder}: left out " + ", ".join(f"{v} {k}" for k, v in left.items())
          + f"; adapting on {len(site)}", file=sys.stderr)
