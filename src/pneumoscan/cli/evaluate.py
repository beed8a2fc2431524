"""``pneumoscan evaluate``: the figures of a labelled split (or the shift table), printed and optionally written."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from ..constants import BATCH_SIZE
from ..errors import PneumoscanError
from .args import add_device_option, add_model_options, positive_int
from .output import create_missing_folders, model_line, write_json


def _interval(bounds) -> str:
    low, high = bounds
    return "[n/a]" if not (math.isfinite(low) and math.isfinite(high)) else f"[{low:.4f}, {high:.4f}]"


def format_evaluation(result, model) -> str:
    lines = [f"{model_line(model)}, {result.split} split: {result.n} images"
             + (", test-time augmentation" if result.tta else "")
             + f", network on {model.runtime}",
             f"ROC AUC {result.auc:.4f}   PR AUC {result.pr_auc:.4f}   "
             f"ECE {result.ece_uncalibrated:.4f} before calibration, {result.ece:.4f} after "
             f"(temperature {model.temperature:.3f}, bias {model.bias:+.3f}"
             + (f", re-based from prevalence {model.fitted_prevalence:.3f} to {model.prevalence:.3f})"
                if model.prevalence is not None else ")")]
    ci = getattr(result, "intervals", None) or {}
    if ci:
        lines.append(f"95% CI (bootstrap by patient, {ci['groups']} patients, {ci['resamples']} resamples): "
                     f"ROC AUC {_interval(ci['auc'])}   PR AUC {_interval(ci['pr_auc'])}   ECE {_interval(ci['ece'])}")
    refused = getattr(result, "refused", {}) or {}
    if any(refused.values()):
        from ..evaluate import REFUSED

        counts = ", ".join(f"{len(refused[status])} {REFUSED[status]}" for status in refused if refused[status])
        lines.append(f"refused as predict would refuse them, not in these figures: {counts}")
    for name, point in result.points.items():
        lines += ["", f"== {name} operating point: threshold {point.threshold:.4f} ==", result.reports[name].rstrip(),
                  f"sensitivity {point.sensitivity:.4f}  specificity {point.specificity:.4f}  "
                  f"precision {point.precision:.4f}  NPV {point.npv:.4f}",
                  *([f"95% CI (Clopper-Pearson): sensitivity {_interval(ci[name]['sensitivity'])}  specificity "
                     f"{_interval(ci[name]['specificity'])}  accuracy {_interval(ci[name]['accuracy'])}"]
                    if name in ci else []),
                  "confusion matrix (rows true, columns predicted; NORMAL, PNEUMONIA):",
                  f"  [[{point.tn:4d} {point.fp:4d}]", f"   [{point.fn:4d} {point.tp:4d}]]"]
    if any(refused.values()):
        lines.append("")
    for status, items in refused.items():
        for item in items:
            message = item["message"]
            where = message if message.startswith(item["path"]) else f"{item['path']}: {message}"
            lines.append(f"refused ({status}): {where}")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..durable import check_output_dir, check_output_file

    if args.shifts and (args.tta or args.report):
        given = " and ".join(option for option, on in (("--tta", args.tta), ("--report", args.report)) if on)
        raise PneumoscanError(f"--shifts cannot be combined with {given}: the shift table is scored without "
                              "test-time augmentation and has no plots (--json writes it as JSON)")
    check_output_file(args.json, "--json")  # a bad destination fails now, not after minutes of scoring
    check_output_dir(args.report, "--report")

    from ..evaluate import evaluate
    from ..predict import load_model

    data = _labelled_data(args) if not args.shifts else args.data
    model = load_model(args.model, precision=args.precision, prevalence=args.prevalence,
                       max_pixels=round(args.max_megapixels * 1e6), device=args.device)
    if args.shifts:
        return _print_shifts(model, args)
    result = evaluate(model, data, args.split, tta=args.tta, batch_size=args.batch_size)
    print(format_evaluation(result, model))
    create_missing_folders(args, ("json", "--json", False), ("report", "--report", True))
    if args.json:
        write_json(args.json, result.to_dict())
    if args.report:
        from ..report import write_report

        for path in write_report(result, model, args.report, run_dir=Path(args.model) if args.model else None):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _labelled_data(args: argparse.Namespace):
    """``--data`` as given, or labelled site data read now (its left-out rows printed, a set too small refused)
    so that nothing is scored on it; ``--split validation`` reads the run's split.csv instead."""
    from ..data.labels import is_labelled_set, read_labelled, require
    from ..data.sources import SITE
    from ..evaluate import VALIDATION
    from .data import print_left_out

    if args.split == VALIDATION or not is_labelled_set(args.data):
        return args.data
    if args.split not in (None, SITE):
        raise PneumoscanError(f"{args.data}: labelled site data has no {args.split!r} split: all of it is scored "
                              f"as the {SITE!r} split (leave out --split, or give --split {VALIDATION} for the "
                              "run's own validation split)")
    labelled = read_labelled(args.data)
    print_left_out(labelled)
    require(labelled, 2, "nothing scored")
    return labelled


def _print_shifts(model, args: argparse.Namespace) -> int:
    """The validation images scored as they are and under fixed acquisition shifts: a recipe-selection aid."""
    from ..data.sources import MedMNISTSource, open_source
    from ..evaluate import VALIDATION, evaluate_shifts, mean_of_shifts, validation_images

    if args.split != ("val" if isinstance(open_source(args.data), MedMNISTSource) else VALIDATION):
        raise PneumoscanError("--shifts scores the validation split only (--split validation, or val for a .npz): "
                              "recipes are chosen on it")
    images, labels = validation_images(model, args.data)
    results = evaluate_shifts(model, images, labels, batch_size=args.batch_size)
    create_missing_folders(args, ("json", "--json", False))
    print(f"{model_line(model)}, validation split under acquisition shifts: {len(labels)} images, "
          f"network on {model.runtime}")
    print(f"{'shift':<18} {'AUC':>7} {'screening sens':>15} {'spec':>7} {'balanced acc':>13}")
    for r in results:
        print(f"{r.shift:<18} {r.auc:7.4f} {r.screening.sensitivity:15.4f} {r.screening.specificity:7.4f} "
              f"{r.balanced_accuracy:13.4f}")
    mean = mean_of_shifts(results)
    print(f"{'mean of shifts':<18} {mean['auc']:7.4f} {mean['screening_sensitivity']:15.4f} "
          f"{mean['screening_specificity']:7.4f} {mean['balanced_accuracy']:13.4f}")
    if args.json:
        write_json(args.json, {
            "model": {"name": model.name, "sha256": model.sha256}, "split": "validation", "n": int(len(labels)),
            "runtime": model.runtime,
            "shifts": [{"shift": r.shift, "auc": r.auc, "screening": r.screening.to_dict(),
                        "balanced_accuracy": r.balanced_accuracy} for r in results],
            "mean_of_shifts": mean,
        })
    return 0


def add_evaluate_command(sub) -> None:
    p = sub.add_parser(
        "evaluate", help="classification report, AUC, calibration at each stored threshold",
        description="Figures of a labelled split at every operating point the model stores. Every image goes "
                    "through predict's checks: images predict would refuse (not a frontal chest X-ray, outside "
                    "the training population, unreadable) are listed apart and not counted in the figures. A "
                    "missing folder for --json or --report is created and said on stderr.")
    p.add_argument("--model", help="model file or run directory (default: the bundled model)")
    p.add_argument("--data", required=True,
                   help="Kaggle-layout folder, MedMNIST .npz, or labelled site data: a labels CSV "
                        "(path,label[,patient_id]) or a folder with NORMAL/ and PNEUMONIA/, scored whole as the "
                        "split 'site'")
    p.add_argument("--split", default=None,
                   help="train | val | test folder of --data (default test), or validation: the run's own "
                        "patient-grouped split; labelled site data is always all of it ('site')")
    p.add_argument("--tta", action="store_true", help="test-time augmentation")
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, metavar="N")
    p.add_argument("--json", metavar="FILE", help="write the figures (with --shifts: the shift table) as JSON")
    p.add_argument("--report", help="folder for plots (confusion matrix, ROC, PR, reliability, training curves)")
    p.add_argument("--shifts", action="store_true",
                   help="score the validation split under fixed acquisition shifts (gamma, contrast, blur, ...)")
    add_model_options(p)
    add_device_option(p)
    p.set_defaults(func=cmd_evaluate)
