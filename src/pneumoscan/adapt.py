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
   (not the default: its gain on validation was inside the intervals, and it lowered specificity on real new
   sites) the screening and balanced thresholds are then refit on the site's images with the EM posteriors
   standing in for the labels (``em_thresholds``).
3. The feature guard's statistics are refit on the site's features (PCA on a seeded half, the limit at the base
   model's quantile of the other half).

Labelled (``--data SITE``, a folder with ``NORMAL/`` and ``PNEUMONIA/`` or a labels CSV): calibration and the
screening and balanced thresholds are refit on the site's labelled images with ``calibrate.fit_decision_rule``,
after the unlabelled step when ``--images`` is given too; ``--finetune`` fine-tunes the network instead
(``pneumoscan.finetune``). The screening threshold keeps its sensitivity lower bound at 95% confidence, so a
sample with too few positives for the requested sensitivity is refused.

The site's images are screened by the base model through the screening stage (``pipeline.screen``), exactly as
``predict`` screens them: those it does not answer "ok" (unreadable, no chest X-ray, outside the intended
population, rejected by the guard) are left out and counted with the stage's message. Every score adapt computes
afterwards (EM, thresholds, the labelled refit, the guard's features) goes through the stage too
(``calibrate.stage_scores``), on the BatchNorm-folded copy every route runs, so the adapted file predicts exactly
the numbers it was fitted on; only AdaBN's statistics pass runs the network as trained. The output is a normal
model file: its record's ``adaptation`` says what was refit, on how many images, a digest of their sha256 list,
and the base model's sha256, and its ``prevalence`` the pneumonia share its calibration now holds at; ``name`` is
``<base>-site-<digest>``. Its ``drift_reference`` (what ``pneumoscan monitor`` and the services' drift gauges
compare with) is refit too: the images the last step fitted on, as the adapted model answers them. Parsing and
printing live in ``pneumoscan.cli.adapt``; this module returns values.
"""

from __future__ import annotations

import copy
import hashlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from . import __version__, pipeline
from .backends.torch import TorchBackend
from .calibrate import fit_decision_rule, prior_estimate, prior_shift, softmax_pneumonia, stage_scores
from .constants import BATCH_SIZE
from .data.labels import LabelledSet
from .data.layout import CLASSES
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
EXCLUDED = ("unreadable", "not_xray", "out_of_distribution")  # always counted; other statuses when they occur


class AdaptError(PneumoscanError):
    pass


# --- the site's images -------------------------------------------------------------------------------------------

def image_files(folder: str | Path) -> list[Path]:
    """Image files under ``folder`` (recursive, sorted; hidden files and folders left out), as ``data.labels``
    walks every folder of site images."""
    from .data.labels import image_files as walk_images

    root = Path(folder)
    if not root.is_dir():
        raise AdaptError(f"{root}: not a folder of site images")
    return walk_images(root)


def labelled_files(site: str | Path) -> LabelledSet:
    """The labelled site data ``--data`` names: a folder with ``NORMAL/`` and ``PNEUMONIA/`` or a labels CSV
    (``data.labels``: its samples with their patient groups, and one line per row or file left out)."""
    from .data.labels import read_labelled

    return read_labelled(site)


@dataclass
class Site:
    """A site's usable images as the screening stage prepared them, the base model's scores, and what was left
    out (by status: the stage's ``unreadable``, ``not_xray``, ``out_of_distribution``, ...) with the stage's
    messages."""

    files: list[str]
    sha256: list[str]
    images: torch.Tensor  # (N, S, S) uint8 network inputs
    labels: np.ndarray | None  # (N,) 0/1, or None for unlabelled images
    excluded: dict[str, int] = field(default_factory=lambda: dict.fromkeys(EXCLUDED, 0))
    messages: list[str] = field(default_factory=list)
    base_logits: torch.Tensor | None = None  # (N, 2) the base model's logits, through the stage
    base_features: torch.Tensor | None = None  # (N, D) and its pooled features

    def __len__(self) -> int:
        return len(self.files)

    def subset(self, index: Sequence[int]) -> Site:
        index = list(index)
        return Site([self.files[i] for i in index], [self.sha256[i] for i in index], self.images[index],
                    None if self.labels is None else self.labels[index], dict(self.excluded),
                    list(self.messages), None if self.base_logits is None else self.base_logits[index],
                    None if self.base_features is None else self.base_features[index])

    def digest(self) -> str:
        """sha256 of the sorted list of the images' sha256: which images, whatever their names or order."""
        return hashlib.sha256("\n".join(sorted(self.sha256)).encode()).hexdigest()


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def load_site(model: Model, files: Sequence[str | Path], labels: Sequence[int] | None = None, *,
              batch_size: int = BATCH_SIZE, workers: int | None = None) -> Site:
    """Screen the site's files with the base model through the stage (``pipeline.screen``: decode, checks, the
    base model's guard); keep the images it screens as ok, count the others by status with the stage's message."""
    torch_network(model)
    names = [str(p) for p in files]
    inputs: dict[str, np.ndarray] = {}

    def keep_input(item: pipeline.Prepared) -> None:  # the uint8 network input, for AdaBN and re-scoring
        if item.image is not None:
            inputs[item.name] = item.image

    results = pipeline.screen(model, names, batch_size=batch_size, workers=workers, on_prepared=keep_input)
    return _site(results, labels, inputs=inputs)


def site_from_images(model: Model, images: torch.Tensor | np.ndarray, files: Sequence[str],
                     sha256: Sequence[str], labels: Sequence[int] | None = None, *,
                     batch_size: int = BATCH_SIZE) -> Site:
    """A site from uint8 network inputs (N, S, S) that passed the image checks (a training cache): scored by the
    base model through the stage (``pipeline.from_array`` items), the images its guard rejects left out."""
    torch_network(model)
    images = np.asarray(images)
    _, _, results = stage_scores(model, images, list(map(str, files)), batch_size=batch_size)
    return _site(results, labels, inputs=dict(zip(map(str, files), images, strict=True)),
                 sha256=dict(zip(map(str, files), sha256, strict=True)))


def _site(results, labels: Sequence[int] | None, *, inputs: dict[str, np.ndarray],
          sha256: dict[str, str] | None = None) -> Site:
    """The Site of the stage's results, in order: ok rows kept, every other row counted by its status."""
    excluded = dict.fromkeys(EXCLUDED, 0)
    messages: list[str] = []
    kept: list[tuple[pipeline.Screened, str, int]] = []  # (the stage's result, sha256, source index)
    for i, screened in enumerate(results):
        prediction = screened.prediction
        if prediction.status == "error":
            excluded["unreadable"] += 1
            messages.append(prediction.message)
            continue
        if prediction.status != "ok":
            excluded[prediction.status] = excluded.get(prediction.status, 0) + 1
            messages.append(f"{prediction.path}: {prediction.message}")
            continue
        try:
            digest = sha256[prediction.path] if sha256 is not None else _sha256(prediction.path)
        except OSError as exc:  # gone since it was read: unreadable now
            excluded["unreadable"] += 1
            messages.append(pipeline.unreadable(prediction.path, exc))
            continue
        kept.append((screened, digest, i))
    files = [k[0].prediction.path for k in kept]
    size = next(iter(inputs.values())).shape[-1] if inputs else 0
    return Site(files, [k[1] for k in kept],
                torch.from_numpy(np.stack([inputs[f] for f in files])) if kept
                else torch.zeros((0, size, size), dtype=torch.uint8),
                None if labels is None else np.asarray([int(labels[k[2]]) for k in kept], dtype=np.int64),
                excluded, messages,
                torch.stack([k[0].logits for k in kept]) if kept else torch.zeros((0, 2)),
                torch.stack([k[0].features for k in kept]) if kept else torch.zeros((0, 0)))


# --- the network ------------------------------------------------------------------------------------------------

def frozen_stage_count(record: ModelRecord) -> int:
    """How many of the architecture's stages training kept frozen (its config, else the architecture default)."""
    spec = arch_spec(record.arch)
    count = (record.training.get("config") or {}).get("freeze_stages")
    return spec.default_freeze if count is None else int(count)


def torch_network(model: Model) -> nn.Module:
    """The PyTorch network of a loaded model, as trained (adapt and fine-tuning need its weights, not ONNX)."""
    if not getattr(model.backend, "gradcam", False):
        raise AdaptError("adapt needs the PyTorch model file (.safetensors), not an ONNX file")
    return model.backend.network


def _stage_modules(network: nn.Module, record: ModelRecord, stages: slice) -> list[nn.Module]:
    return [network.get_submodule(name) for stage in arch_spec(record.arch).stages[stages] for name in stage]


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

    This is the one pass adapt runs outside the screening stage: it needs the network as trained (unfolded),
    with the chosen BatchNorm layers in training mode, and it computes statistics, not scores. Every score taken
    afterwards goes through the stage (``Adapted.scores``).
    ``order``: which site images, in which order (with repeats), the statistics are taken over; default all once."""
    layers = bn_layers(network, record, which)
    if not layers:
        return 0
    images = site.images if order is None else site.images[np.asarray(order)]
    device = next(network.parameters()).device
    network.eval()
    saved = [(m, m.momentum) for m in layers]
    for m in layers:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average: every batch counts the same
        m.train()
    try:
        for s in range(0, len(images), ADABN_BATCH):
            x = record.preprocessing.normalize(images[s:s + ADABN_BATCH].to(device))
            network.forward_features(x.contiguous(memory_format=torch.channels_last))
    finally:
        for m, momentum in saved:
            m.momentum = momentum
        network.eval()
    return len(layers)


# --- prevalence by EM ----------------------------------------------------------------------------------------------

def em_prevalence(p: np.ndarray, fitted: float) -> float:
    """The site's class prior from calibrated posteriors ``p`` fitted at prior ``fitted``: Saerens et al.'s (2002)
    EM fixed point (``calibrate.prior_estimate``, the one estimate monitoring uses too), kept off 0 and 1."""
    return float(np.clip(prior_estimate(p, fitted), 1e-3, 1 - 1e-3))


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
    network_changed: bool = False  # AdaBN re-estimated some layer: the base model's scores no longer hold
    site_logits: torch.Tensor | None = field(default=None, repr=False)  # the last adaptation images' logits
    reference_site: Site | None = field(default=None, repr=False)  # the images the last step fitted on
    _backend: TorchBackend | None = field(default=None, repr=False)

    @classmethod
    def of(cls, model: Model) -> Adapted:
        net = copy.deepcopy(torch_network(model)).float().eval()
        guard = copy.deepcopy(model.guard)
        return cls(net, model.record, guard, model.sha256)

    def scoring_model(self) -> Model:
        """The adapted network as the saved file will run: the record's precision on the same backend as every
        route (BatchNorm folded again whenever AdaBN changed the statistics), no guard (adapt scores every kept
        image; the guard is what it refits)."""
        if self._backend is None:
            self._backend = TorchBackend(self.network, self.record.preprocessing, self.record.precision)
        return Model(self.record, self._backend, None, Path(self.record.name), self.base_sha256)

    def scores(self, site: Site) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, features) of the site's images through the screening stage, as the saved file scores them."""
        if not self.network_changed and site.base_logits is not None and site.base_features is not None:
            return site.base_logits, site.base_features
        logits, feats, _ = stage_scores(self.scoring_model(), site.images.numpy(), site.files)
        return logits, feats

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
        reference, why = self.drift_reference(record)
        if why is not None:
            record = record.with_(adaptation={**record.adaptation, "drift_reference": why})
        record = record.with_(drift_reference=reference)
        tensors = {**self.network.state_dict(), **(self.guard.to_tensors() if self.guard is not None else {})}
        return save_model_file(path, tensors, record.to_dict())

    def drift_reference(self, record: ModelRecord) -> tuple[dict | None, str | None]:
        """(the drift monitor's reference, None) of the site images the last step fitted on, as the adapted model
        answers them (its calibration, thresholds and refit guard): the base model's reference describes answers
        this model no longer gives. (None, why) when there is none. The images are uint8 network inputs with no
        file behind them, so the header categories are left out (not recorded). No sha256: the reference is
        inside the file it describes."""
        from .monitor import CATEGORIES, MonitorError, build_reference

        site = self.reference_site
        if site is None or len(site) == 0:
            return None, "none: no site images"
        final = Model(record, self.scoring_model().backend, self.guard, Path(record.name), "")
        _, _, results = stage_scores(final, site.images.numpy(), site.files)
        facts = [{k: v for k, v in r.facts().items() if k not in CATEGORIES} for r in results]
        try:
            return build_reference(facts, prior=record.fitted_prevalence,
                                   source=f"{len(site)} site images the adaptation fitted on").to_dict(), None
        except MonitorError as exc:
            return None, f"none: {exc}"


def _check_size(site: Site, what: str, minimum: int = MIN_IMAGES) -> None:
    left_out = ", ".join(f"{k} {v}" for k, v in site.excluded.items() if v)
    if len(site) == 0:
        raise AdaptError(f"no readable chest X-ray among the {what}" + (f" ({left_out})" if left_out else "")
                         + ": nothing written")
    if len(site) < minimum:
        raise AdaptError(f"only {len(site)} usable {what} (at least {minimum} needed)"
                         + (f"; left out: {left_out}" if left_out else "") + ": nothing written")


THRESHOLDS = ("keep", "em")


# Chosen on validation by the rules in docs/experiments.md: every AdaBN variant lost screening sensitivity there
# (0.90-0.96 against 0.974), so AdaBN is off unless asked for. Refitting the thresholds from the EM posteriors won
# on validation by 2 NORMAL images of 180, inside the intervals, and lowered specificity on real new sites: by the
# rule of "the unlabelled default, re-examined", a refit from unlabelled images must win by more than its interval.
DEFAULT_BN_LAYERS = "none"
DEFAULT_THRESHOLDS = "keep"


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
    out.network_changed = out.network_changed or layers > 0
    logits, feats = out.scores(site)
    record = out.record
    step: dict = {"images": len(site), "sha256_digest": site.digest(), "excluded": dict(site.excluded),
                  "bn_layers": which, "bn_layers_reestimated": layers,
                  "bn_class_balanced": order is not None}
    if fitted is not None:
        prevalence = em_prevalence(out.probability(logits), fitted)
        shift = prior_shift(fitted, prevalence)
        moved = {k: float(torch.sigmoid(torch.logit(torch.tensor(v, dtype=torch.float64)) + shift))
                 for k, v in record.thresholds.items()}
        # the prevalence the calibration now holds at, so that --prevalence re-bases from it
        record = record.with_(bias=record.bias + shift, prevalence=prevalence)
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
        out.guard, step["guard"] = refit_guard(feats, record.guard.quantile, seed)
        record = record.with_(guard=GuardSettings(out.guard.threshold, record.guard.quantile, record.guard.min_side))
    step["seconds"] = round(time.perf_counter() - started, 2)
    out.record = record
    out.steps["unlabelled"] = step
    out.site_logits = logits
    out.reference_site = site
    return out


def refit_guard(feats: torch.Tensor, quantile: float, seed: int = 0) -> tuple[Guard, dict]:
    """The feature guard refit on a site's features (N >= 4): PCA on a seeded half, the limit at ``quantile`` of
    the other half's distances; (guard, what was done, for the record)."""
    order = np.random.default_rng(seed).permutation(len(feats))
    half = len(feats) // 2
    # as many components as the base guard (32) when there are images enough, and at most one per five fit
    # images: a subspace spanned by nearly all of them leaves no residual to measure distances with
    components = max(1, min(32, half // 5))
    guard = Guard.fit(feats[order[:half]], feats[order[half:]], components=components, quantile=quantile)
    return guard, {"fit_images": half, "limit_images": len(feats) - half, "components": components,
                   "threshold": guard.threshold}


def min_positives(target_sensitivity: float, confidence: float = CONFIDENCE) -> int:
    """Fewest positives whose one-sided Clopper-Pearson lower bound can reach the target (with no miss at all)."""
    return math.ceil(math.log(1 - confidence) / math.log(target_sensitivity) - 1e-12)


def sensitivity_target(record: ModelRecord, requested: float | None) -> float:
    """The screening sensitivity a labelled refit keeps: the one asked for, else the model's own (0.98 if unset)."""
    target = requested if requested is not None else (record.target_sensitivity or 0.98)
    if not 0 < target < 1:
        raise AdaptError(f"the target sensitivity must be in (0, 1), got {target}")
    return target


def check_positives(site: Site, target: float) -> None:
    """Refuse a labelled site with fewer PNEUMONIA images than the sensitivity rule needs at ``target``."""
    positives = int(np.sum(site.labels)) if site.labels is not None else 0
    needed = min_positives(target)
    if positives < needed:
        raise AdaptError(f"{positives} PNEUMONIA images cannot support sensitivity {target} at {CONFIDENCE:.0%} "
                         f"confidence (at least {needed} needed, with none missed): nothing written")


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
    target = sensitivity_target(out.record, target_sensitivity)
    check_positives(site, target)
    started = time.perf_counter()
    if logits is None:
        logits = site.base_logits if adapted is None and site.base_logits is not None else out.scores(site)[0]
    temperature, bias, thresholds = fit_decision_rule(logits.numpy(), site.labels, target, CONFIDENCE)
    out.record = out.record.with_(temperature=temperature, bias=bias, thresholds=thresholds,
                                  target_sensitivity=target,  # the calibration now holds at the sample's prevalence
                                  prevalence=float(counts[1] / counts.sum()))
    out.steps["labelled"] = {"images": len(site), "counts": counts.tolist(), "sha256_digest": site.digest(),
                             "excluded": dict(site.excluded), "target_sensitivity": target,
                             "confidence": CONFIDENCE, "seconds": round(time.perf_counter() - started, 2)}
    out.reference_site = site
    return out
