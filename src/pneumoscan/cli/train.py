"""``pneumoscan train`` and ``pneumoscan calibrate``."""

from __future__ import annotations

import argparse
import os

from ..constants import ARCH_NAMES


def cmd_train(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..train import fit

    cfg = load_config(args.config, arch=args.arch, epochs=args.epochs, pretrained=args.pretrained,
                      weights=args.weights, seed=args.seed, sampler=args.sampler, batch_size=args.batch_size,
                      fold=args.fold, device=args.device)
    path = fit(cfg, args.data, args.out, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line of output, not one per process
        print(path)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..train import recalibrate

    print(recalibrate(args.run, args.data, device=args.device or "auto"))
    return 0


def add_train_command(sub) -> None:
    p = sub.add_parser("train", help="fine-tune a network and write RUN_DIR/model.safetensors")
    p.add_argument("--data", required=True,
                   help="Kaggle-layout folder (its train split, split by patient), MedMNIST .npz (official "
                        "train/val), or labelled site data: a labels CSV (path,label[,patient_id]) or a folder "
                        "with NORMAL/ and PNEUMONIA/ (all of it, split by patient)")
    p.add_argument("--out", required=True, help="run directory")
    p.add_argument("--arch", help=" | ".join(ARCH_NAMES))
    p.add_argument("--config", help="YAML file of TrainConfig keys")
    p.add_argument("--epochs", type=int)
    p.add_argument("--batch-size", type=int)
    p.add_argument("--pretrained", choices=["imagenet", "none"])
    p.add_argument("--weights", help="local state dict to start from (.safetensors or .pth)")
    p.add_argument("--sampler", choices=["weighted", "shuffle"])
    p.add_argument("--seed", type=int)
    p.add_argument("--fold", type=int, help="which patient-grouped fold is validation (0 to 4 with val_fraction "
                                            "0.2; default 0): one run per fold is a k-fold cross-validation")
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.safetensors")
    _add_train_device_option(p)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)


def add_calibrate_command(sub) -> None:
    p = sub.add_parser("calibrate", help="refit calibration, thresholds and guard of a run on its validation split")
    p.add_argument("run", help="run directory of a finished `pneumoscan train`")
    p.add_argument("--data", help="dataset folder (or labels CSV), if it moved since training")
    _add_train_device_option(p)
    p.set_defaults(func=cmd_calibrate)


def _add_train_device_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default=None,
                   help="where the network trains: auto (the default, and the config's unless it says otherwise) "
                        "uses CUDA when PyTorch sees a GPU, else the CPU; under torchrun each process takes its "
                        "local rank's GPU")
