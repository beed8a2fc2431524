"""``pneumoscan adapt``: its options, and the command that calls ``pneumoscan.adapt`` and prints what it did.

Torch-free at import (``pneumoscan --help`` imports every command module); the choices below are the domain
module's ``BN_LAYERS``, ``THRESHOLDS`` and defaults (tests/test_adapt.py keeps them equal).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .args import add_device_option

BN_LAYER_CHOICES = ("trained", "all", "none")
THRESHOLD_CHOICES = ("keep", "em")

# argparse %-formats help strings (a literal percent sign is written %% there) but prints a description as written.
DESCRIPTION = (
    "Write a site-adapted model file. --images DIR (no labels): estimate the site's pneumonia prevalence by EM and "
    "re-base the calibration and thresholds to it, and refit the guard on the site's features; --bn-layers re-estimates BatchNorm statistics on the site's images (AdaBN; off by default). "
    "--data SITE (a folder with NORMAL/ and PNEUMONIA/, or a labels CSV with path,label and optional patient_id "
    "columns): refit calibration and the screening and balanced thresholds on the site's labelled images, after "
    "the unlabelled step when --images is given too; with --finetune, fine-tune the network on them instead. CSV rows that cannot be used (missing file, unknown label, "
    "duplicate) are listed one line each and left out. Images are screened by the "
    "base model as predict screens them; those that are unreadable, no chest X-ray, or that its guard rejects are "
    "left out and counted. Needs at least 25 usable images, labelled ones of both classes, and enough PNEUMONIA "
    "images for the "
    "screening sensitivity at 95% confidence (149 for 0.98); otherwise exit 2 with one line, nothing written.")


def add_adapt_command(sub) -> None:
    p = sub.add_parser("adapt", help="fit a model to a site's own X-rays (unlabelled: --images; labelled: --data)",
                       description=DESCRIPTION)
    p.add_argument("--model", help="model file to adapt (default: the bundled model)")
    p.add_argument("--images", metavar="SITE_DIR", help="folder of the site's unlabelled X-rays (recursive)")
    p.add_argument("--data", metavar="SITE",
                   help="the site's labelled X-rays: a folder with NORMAL/ and PNEUMONIA/, or a labels CSV "
                        "(path,label[,patient_id]; labels NORMAL/PNEUMONIA or 0/1; paths relative to the CSV)")
    p.add_argument("--out", required=True, metavar="SITE_MODEL", help="the adapted model file to write")
    p.add_argument("--sensitivity", type=float, default=None, metavar="S",
                   help="screening sensitivity the labelled refit keeps at 95%% confidence (default: the model's "
                        "target, 0.98 for the bundled model)")
    p.add_argument("--bn-layers", choices=BN_LAYER_CHOICES, default="none",
                   help="BatchNorm layers AdaBN re-estimates: none (default: AdaBN lost on validation, "
                        "docs/experiments.md), those of the fine-tuned stages, or all")
    p.add_argument("--bn-balance", action="store_true",
                   help="take AdaBN's statistics over a resample of the site's images weighted to the training "
                        "batches' class mix (by the unadapted model's EM posteriors)")
    p.add_argument("--finetune", action="store_true",
                   help="with --data: fine-tune the network on the site's labelled images (3 patient-grouped folds "
                        "give every image an out-of-fold score for stopping, calibration and the thresholds; then "
                        "one network on all of them). Needs 149 PNEUMONIA images for sensitivity 0.98 at 95%% "
                        "confidence; minutes, not seconds, on a CPU")
    p.add_argument("--thresholds", choices=THRESHOLD_CHOICES, default="keep",
                   help="unlabelled: keep the base thresholds moved with the prevalence (default), or refit them "
                        "with the EM posteriors standing in for labels (lowered specificity on a real new site, "
                        "docs/experiments.md)")
    add_device_option(p)
    p.add_argument("--quiet", action="store_true", help="no line per left-out image")
    p.set_defaults(func=cmd_adapt)


def cmd_adapt(args: argparse.Namespace) -> int:
    from ..adapt import (
        CONFIDENCE,
        MIN_IMAGES,
        AdaptError,
        adapt_unlabelled,
        image_files,
        labelled_files,
        load_site,
        recalibrate,
    )
    from ..data.labels import require
    from ..durable import check_output_file
    from ..predict import load_model
    from .data import print_left_out

    if not args.images and not args.data:
        raise AdaptError("give --images SITE_DIR (unlabelled) and/or --data SITE (labelled: a folder with NORMAL/ "
                         "and PNEUMONIA/, or a labels CSV)")
    if args.finetune and (not args.data or args.images):
        raise AdaptError("--finetune fine-tunes on the labelled site images of --data, without --images")
    check_output_file(args.out, "--out")
    unlabelled = image_files(args.images) if args.images else None
    labelled = labelled_files(args.data) if args.data else None
    if unlabelled is not None and not unlabelled:
        raise AdaptError(f"{args.images}: no image file (.jpeg, .png, .dcm, ...): nothing written")
    if labelled is not None:
        print_left_out(labelled, quiet=args.quiet)
        require(labelled, MIN_IMAGES, "nothing written")
    model = load_model(args.model, device=args.device)
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
        site = load_site(model, labelled.files(), labelled.labels())  # checked by the base model's guard, as --images are
        _report_left_out(site, args.data, args.quiet)
        if args.finetune:
            adapted = _finetune(model, site, labelled, args)
            step = adapted.steps["finetune"]
            lines.append(f"fine-tuned: {step['images']} images of {step['patients']} patients ({step['counts'][0]} "
                         f"NORMAL, {step['counts'][1]} PNEUMONIA), epoch {step['epoch']} of "
                         f"{step['settings']['epochs']} (out-of-fold ROC AUC {step['out_of_fold']['auc']:.4f}); "
                         f"screening threshold {adapted.record.thresholds['screening']:.4f} (sensitivity >= "
                         f"{step['target_sensitivity']} at {CONFIDENCE:.0%} confidence), balanced "
                         f"{adapted.record.thresholds['balanced']:.4f}")
        else:
            adapted = recalibrate(model, site, target_sensitivity=args.sensitivity, adapted=adapted)
            step = adapted.steps["labelled"]
            lines.append(f"labelled: {step['images']} images ({step['counts'][0]} NORMAL, {step['counts'][1]} PNEUMONIA); "
                         f"T={adapted.record.temperature:.3f} bias={adapted.record.bias:+.3f}, screening threshold "
                         f"{adapted.record.thresholds['screening']:.4f} (sensitivity >= {step['target_sensitivity']} "
                         f"at {CONFIDENCE:.0%} confidence), balanced {adapted.record.thresholds['balanced']:.4f}")
    sha = adapted.save(args.out)
    for line in lines:
        print(f"pneumoscan: {line}", file=sys.stderr)
    print(f"wrote {args.out} (sha256 {sha[:12]}, from {model.name} {model.sha256[:12]}; "
          f"{time.perf_counter() - started:.1f} s)")
    return 0


def _finetune(model, site, labelled, args):
    """Fine-tune on the kept site images, their patients from the labelled set (opaque labels, never printed)."""
    from ..finetune import finetune

    patient_of = {str(sample.path): sample.patient for sample in labelled.samples}
    log = None if args.quiet else (lambda line: print(f"pneumoscan: fine-tune: {line}", file=sys.stderr, flush=True))
    return finetune(model, site, [patient_of[f] for f in site.files], target_sensitivity=args.sensitivity, log=log)


def _report_left_out(site, folder: str, quiet: bool) -> None:
    left = {k: v for k, v in site.excluded.items() if v}
    if not left:
        return
    if not quiet:
        for message in site.messages:
            print(f"pneumoscan: left out: {message}", file=sys.stderr)
    print(f"pneumoscan: warning: {folder}: left out " + ", ".join(f"{v} {k}" for k, v in left.items())
          + f"; adapting on {len(site)}", file=sys.stderr)
