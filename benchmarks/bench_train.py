"""Training throughput and time-to-accuracy: pneumoscan's default recipe against a naive notebook baseline.

Both arms train on the same data: the Kermany train split, divided by patient with
pneumoscan's ``layout.patient_split`` (the split seed and val_fraction of the config), the same architecture
(efficientnet_lite0 from ``pneumoscan.models.create_model`` with ImageNet weights) and batch size.

(a) pneumoscan: configs/default.yaml (or --config, or any CONFIG.yaml given in --arms) through fit()'s own
    training loop, ``train.train_one_epoch`` (decode once into a uint8 cache, balanced sampler, batches augmented
    at one thread, frozen early stages, channels_last, bf16 autocast where the CPU has it, AdamW with warmup +
    cosine over the config's epochs). The one-off decode is
    counted in its wall time.
(b) baseline, as the published notebooks do it: torchvision ``ImageFolder`` decoding every JPEG at every step,
    Resize(224) + RandomHorizontalFlip + RandomRotation(10) + ToTensor + Normalize, float32, every layer trained,
    Adam at a constant learning rate, a plain shuffled DataLoader.

Each arm runs in a process of its own, so that neither inherits the other's memory or threads: the pneumoscan
arms with the allocator settings ``pneumoscan train`` applies (``pneumoscan.allocator``), the baseline with glibc's
and PyTorch's defaults, as a notebook runs (``--baseline-allocator tuned`` gives it the same settings).

Every ``--eval-every`` steps each arm scores a fixed, seeded subset of the validation patients; the clock is
paused while it does, because how often a benchmark looks is not part of training. Printed per arm: training
images/second, the wall time to the first validation AUC >= ``--target-auc`` and the ratio between arms.
Figures go to docs/benchmarks.md by hand. Example (about 2 x --max-minutes plus set-up):

    nice -n 19 python benchmarks/bench_train.py --max-minutes 10 --eval-every 25 --json runs/bench_train.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from pneumoscan import allocator

allocator.tune()  # as `pneumoscan train` does, before torch loads; each arm's process is told by main()
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from pneumoscan import train as train_module  # noqa: E402
from pneumoscan.augment import build_augment  # noqa: E402
from pneumoscan.calibrate import softmax_pneumonia  # noqa: E402
from pneumoscan.config import load_config  # noqa: E402
from pneumoscan.data.cache import decode_cache  # noqa: E402
from pneumoscan.data.layout import CLASSES, Sample, list_split, patient_split  # noqa: E402
from pneumoscan.metrics import roc_auc  # noqa: E402
from pneumoscan.models import arch_spec, create_model, freeze_stages  # noqa: E402
from pneumoscan.train import (  # noqa: E402
    CachedImages,
    build_criterion,
    build_optimizer,
    epoch_loader,
    lr_at,
    preprocessing_for,
    score_images,
    setup_runtime,
    train_one_epoch,
    training_augment,
)

ROOT = Path(__file__).resolve().parents[1]


class Clock:
    """Wall time that can be paused (for validation), so only the work of training is counted."""

    def __init__(self) -> None:
        self.start, self.paused_total, self.paused_at = time.perf_counter(), 0.0, None

    def pause(self) -> None:
        self.paused_at = time.perf_counter()

    def resume(self) -> None:
        self.paused_total += time.perf_counter() - self.paused_at
        self.paused_at = None

    def seconds(self) -> float:
        now = self.paused_at if self.paused_at is not None else time.perf_counter()
        return now - self.start - self.paused_total


@dataclass
class ArmResult:
    name: str
    setup_seconds: float = 0.0  # counted in the time to target: decode cache (a), model creation (both)
    train_seconds: float = 0.0  # inside training steps only
    images: int = 0
    steps: int = 0
    time_to_target: float | None = None
    curve: list[tuple[float, int, float]] = field(default_factory=list)  # (wall s, images seen, val AUC)

    @property
    def images_per_second(self) -> float:
        return self.images / self.train_seconds if self.train_seconds else 0.0

    @property
    def best_auc(self) -> float:
        return max((auc for _, _, auc in self.curve), default=float("nan"))


class Budget:
    """Shared bookkeeping of both arms: evaluate every N steps, stop at the target AUC or the time limit."""

    def __init__(self, result: ArmResult, clock: Clock, args, evaluate) -> None:
        self.result, self.clock, self.args, self.evaluate = result, clock, args, evaluate

    def after_step(self, batch: int, step_seconds: float) -> bool:
        """Record one step; True when the arm should stop."""
        r = self.result
        r.steps += 1
        r.images += batch
        r.train_seconds += step_seconds
        if r.steps % self.args.eval_every == 0 or self.clock.seconds() >= self.args.max_minutes * 60:
            self.clock.pause()
            auc = self.evaluate()
            self.clock.resume()
            wall = self.clock.seconds()
            r.curve.append((round(wall, 1), r.images, round(auc, 5)))
            print(f"  {r.name}: step {r.steps:5d}  {wall:7.1f} s  {r.images:6d} images  "
                  f"{r.images_per_second:6.1f} img/s  val AUC {auc:.4f}", file=sys.stderr, flush=True)
            if auc >= self.args.target_auc:
                r.time_to_target = wall
                return True
        return self.clock.seconds() >= self.args.max_minutes * 60


def run_pneumoscan(cfg, train_s: list[Sample], val_s: list[Sample], args, name: str = "pneumoscan",
                   before: bool = False) -> ArmResult:
    """(a) The recipe of ``cfg`` through fit()'s own training loop (``train_one_epoch`` and the pieces around it).

    ``before``: batches made at the training thread count, as fit() did before ``train.one_thread`` (the same
    batches and losses, bit for bit; only the speed differs)."""
    result = ArmResult(name)
    torch.manual_seed(cfg.seed)
    rt = setup_runtime(cfg.amp)
    prep = preprocessing_for(cfg)
    val_x, val_kept, _ = decode_cache(val_s, prep, desc="decode val subset", progress=False)
    val_y = np.array([s.label for s in val_kept])

    clock = Clock()
    train_x, kept, _ = decode_cache(train_s, prep, desc="decode train", progress=False)
    train_y = np.array([s.label for s in kept])
    net = create_model(cfg.arch, pretrained=cfg.pretrained, weights=cfg.weights).to(rt.device)
    frozen = freeze_stages(net, cfg.arch, cfg.freeze_stages)
    if cfg.channels_last:
        net = net.to(memory_format=torch.channels_last)
    opt = build_optimizer(cfg, net)
    criterion = build_criterion(cfg, train_y, rt.device)
    scaler = torch.amp.GradScaler(enabled=rt.amp_dtype == torch.float16)
    augment = build_augment(cfg.augment, cfg.image_size or 224) if before else training_augment(cfg)
    dataset = CachedImages(train_x, train_y, augment)
    steps_per_epoch = max(1, len(train_y) // cfg.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = max(1, int(cfg.warmup_epochs * steps_per_epoch))
    result.setup_seconds = clock.seconds()
    print(f"  {name}: decoded {len(train_y)} images and built the model in {result.setup_seconds:.1f} s "
          f"(amp {rt.amp_dtype}, {torch.get_num_threads()} threads)", file=sys.stderr, flush=True)

    def evaluate() -> float:
        logits, _ = score_images(net, prep, val_x)  # as fit() validates: the one scoring function, float32
        net.train()  # what train_one_epoch set at the start of the epoch: frozen stages in eval mode
        for module in frozen:
            module.eval()
        return roc_auc(val_y, softmax_pneumonia(logits))

    budget = Budget(result, clock, args, evaluate)
    state = {"t": 0.0, "stop": False}

    def on_step(batch: int) -> bool:
        state["stop"] = budget.after_step(batch, time.perf_counter() - state["t"])
        state["t"] = time.perf_counter()  # after the evaluation: it is not training time
        return state["stop"]

    original = train_module.one_thread
    if before:  # batches made at the training thread count: fit()'s helper replaced for this arm only
        train_module.one_thread = lambda batches: batches
    try:
        for epoch in range(10_000):  # the budget ends the loop; epochs beyond cfg.epochs run at the final lr
            loader = epoch_loader(cfg, dataset, rt, epoch)
            state["t"] = time.perf_counter()
            train_one_epoch(net, criterion, opt, scaler, loader, prep, rt, frozen=frozen,
                            schedule=lambda step, epoch=epoch: lr_at(epoch * steps_per_epoch + step, total_steps,
                                                                     warmup, cfg.lr),
                            channels_last=cfg.channels_last, desc="", progress=False, on_step=on_step)
            if state["stop"]:
                return result
    finally:
        train_module.one_thread = original
    return result


def run_baseline(cfg, train_s: list[Sample], val_s: list[Sample], args) -> ArmResult:
    """(b) The notebook pipeline: ImageFolder + transforms decoding JPEGs every step, float32, full fine-tune."""
    from torchvision import datasets, transforms

    result = ArmResult("baseline")
    torch.manual_seed(cfg.seed)
    spec = arch_spec(cfg.arch)
    normalize = transforms.Normalize(spec.mean, spec.std)  # the weights' own normalisation, not a handicap
    train_tf = transforms.Compose([transforms.Resize((224, 224)), transforms.RandomHorizontalFlip(),
                                   transforms.RandomRotation(10), transforms.ToTensor(), normalize])
    val_tf = transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor(), normalize])

    clock = Clock()
    root = Path(args.data) / "train"
    train_folder = datasets.ImageFolder(str(root), transform=train_tf)
    val_folder = datasets.ImageFolder(str(root), transform=val_tf)
    if [c.upper() for c in train_folder.classes] != list(CLASSES):
        raise SystemExit(f"{root}: ImageFolder classes {train_folder.classes} are not {CLASSES}")
    index_of = {os.path.realpath(path): i for i, (path, _) in enumerate(train_folder.samples)}
    train_set = torch.utils.data.Subset(train_folder, [index_of[os.path.realpath(s.path)] for s in train_s])
    val_set = torch.utils.data.Subset(val_folder, [index_of[os.path.realpath(s.path)] for s in val_s])
    loader = torch.utils.data.DataLoader(train_set, batch_size=cfg.batch_size, shuffle=True,
                                         num_workers=args.baseline_workers,
                                         persistent_workers=args.baseline_workers > 0)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=64, num_workers=args.baseline_workers)
    net = create_model(cfg.arch, pretrained="imagenet")
    opt = torch.optim.Adam(net.parameters(), lr=args.baseline_lr)
    loss_fn = nn.CrossEntropyLoss()
    result.setup_seconds = clock.seconds()

    @torch.no_grad()
    def evaluate() -> float:
        net.eval()
        labels, scores = [], []
        for x, y in val_loader:
            labels.append(y)
            scores.append(torch.softmax(net(x), 1)[:, 1])
        net.train()
        return roc_auc(torch.cat(labels).numpy(), torch.cat(scores).numpy())

    budget = Budget(result, clock, args, evaluate)
    net.train()
    while True:
        t = time.perf_counter()
        for x, y in loader:
            loss = loss_fn(net(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            if budget.after_step(len(y), time.perf_counter() - t):
                return result
            t = time.perf_counter()


def _val_subset(val_s: list[Sample], n: int, seed: int) -> list[Sample]:
    """A fixed, class-stratified subset of the validation patients' images, the same for both arms."""
    if n <= 0 or n >= len(val_s):
        return val_s
    rng = np.random.default_rng(seed)
    labels = np.array([s.label for s in val_s])
    chosen = []
    for label in (0, 1):
        pool = np.flatnonzero(labels == label)
        chosen += rng.choice(pool, size=round(n * len(pool) / len(val_s)), replace=False).tolist()
    return [val_s[i] for i in sorted(chosen)]


def _fmt_time(r: ArmResult) -> str:
    if r.time_to_target is not None:
        return f"{r.time_to_target:8.1f} s"
    return f"not reached (> {r.curve[-1][0] if r.curve else 0:.0f} s)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--config", default=str(ROOT / "configs" / "default.yaml"))
    parser.add_argument("--arms", default="pneumoscan,baseline",
                        help="comma-separated: pneumoscan (the --config recipe), pneumoscan-before (the same, batches "
                             "made at the training thread count as before train.one_thread), baseline, or CONFIG.yaml "
                             "(that recipe, e.g. configs/experiments/standardize.yaml)")
    parser.add_argument("--max-minutes", type=float, default=10.0, help="per arm, wall time including set-up")
    parser.add_argument("--target-auc", type=float, default=0.99)
    parser.add_argument("--eval-every", type=int, default=25, help="steps between validation AUC checks")
    parser.add_argument("--val-images", type=int, default=400, help="fixed validation subset (0: all)")
    parser.add_argument("--train-images", type=int, default=0, help="limit the train subset (0: all; smoke runs)")
    parser.add_argument("--baseline-lr", type=float, default=1e-4, help="Adam, constant (the notebooks' value)")
    parser.add_argument("--baseline-workers", type=int, default=2, help="DataLoader worker processes")
    parser.add_argument("--json", help="write both arms' figures and AUC curves here")
    parser.add_argument("--baseline-allocator", choices=("default", "tuned"), default="default",
                        help="the baseline's malloc: glibc's and PyTorch's defaults as in a notebook (default), or "
                             "pneumoscan.allocator's settings")
    parser.add_argument("--in-process", action="store_true", help="run the arms in this process, one after another")
    args = parser.parse_args(argv)
    arms = [n.strip() for n in args.arms.split(",")]
    if not args.in_process:
        return _run_arms_apart(arms, argv if argv is not None else sys.argv[1:], args)

    cfg = load_config(args.config)
    samples = list_split(args.data, "train")
    train_s, val_s = patient_split(samples, cfg.val_fraction, cfg.validation_seed)
    if args.train_images:
        train_s = [train_s[i] for i in np.random.default_rng(cfg.seed).permutation(len(train_s))[:args.train_images]]
    val_s = _val_subset(val_s, args.val_images, cfg.validation_seed)
    print(f"data: {len(train_s)} train images, {len(val_s)} validation images (patient-grouped, split seed {cfg.validation_seed}); "
          f"batch {cfg.batch_size}; {torch.get_num_threads()} threads; target AUC {args.target_auc}",
          file=sys.stderr, flush=True)

    print(f"allocator: {allocator.tune()}", file=sys.stderr, flush=True)
    results = []
    for name in arms:
        print(f"arm {name}: up to {args.max_minutes} min", file=sys.stderr, flush=True)
        if name == "baseline":
            results.append(run_baseline(cfg, train_s, val_s, args))
        elif name in ("pneumoscan", "pneumoscan-before"):
            results.append(run_pneumoscan(cfg, train_s, val_s, args, name=name, before=name.endswith("before")))
        else:
            results.append(run_pneumoscan(load_config(name), train_s, val_s, args, name=Path(name).stem))

    _report(results, args)
    if args.json:
        _write_json(args.json, {
            "args": vars(args), "train_images": len(train_s), "val_images": len(val_s),
            "threads": torch.get_num_threads(), "allocator": allocator.tune(),
            "arms": [{**r.__dict__, "images_per_second": r.images_per_second, "best_auc": r.best_auc}
                     for r in results]})
    return 0


def _write_json(path: str, payload: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=2) + "\n")


def _run_arms_apart(arms: list[str], argv: list[str], args) -> int:
    """Each arm in a fresh interpreter (``--in-process --arms NAME``), its figures read back from JSON."""
    import subprocess
    import tempfile

    rest, skip = [], False
    for item in argv:  # the same options, minus the ones set per arm here
        if skip:
            skip = False
        elif item in ("--arms", "--json"):
            skip = True
        elif not item.startswith(("--arms=", "--json=")):
            rest.append(item)
    results, payloads = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i, name in enumerate(arms):
            untuned = name == "baseline" and args.baseline_allocator == "default"
            env = allocator.untuned_environ() if untuned else None
            out = Path(tmp, f"{i}.json")
            code = subprocess.run([sys.executable, __file__, *rest, "--in-process", "--arms", name, "--json",
                                   str(out)], env=env).returncode
            if code:
                return code
            payload = json.loads(out.read_text())
            payloads.append(payload)
            for arm in payload["arms"]:
                fields = {k: arm[k] for k in ArmResult.__dataclass_fields__}
                fields["curve"] = [tuple(point) for point in fields["curve"]]
                results.append(ArmResult(**fields))
    _report(results, args)
    if args.json:
        _write_json(args.json, {**payloads[0], "args": vars(args),
                                "arms": [arm | {"allocator": p["allocator"]} for p in payloads for arm in p["arms"]]})
    return 0


def _report(results: list[ArmResult], args) -> None:
    print(f"\n{'arm':<20}{'img/s':>8}{'steps':>7}{'set-up s':>10}{'best AUC':>10}   time to AUC {args.target_auc}")
    for r in results:
        print(f"{r.name:<20}{r.images_per_second:8.1f}{r.steps:7d}{r.setup_seconds:10.1f}{r.best_auc:10.4f}   "
              f"{_fmt_time(r)}")
    slow = next((r for r in results if r.name == "baseline"), None)
    for fast in (r for r in results if slow is not None and r is not slow):
        if slow.images_per_second:
            print(f"throughput ratio ({fast.name} / baseline): {fast.images_per_second / slow.images_per_second:.2f}x")
        if fast.time_to_target and slow.time_to_target:
            print(f"time-to-target ratio (baseline / {fast.name}): {slow.time_to_target / fast.time_to_target:.2f}x")
        elif fast.time_to_target and slow.curve:
            print(f"time-to-target ratio (baseline / {fast.name}): > {slow.curve[-1][0] / fast.time_to_target:.2f}x "
                  "(baseline did not reach the target)")


if __name__ == "__main__":
    sys.exit(main())
