"""Command-line layer: parse arguments, call the Python API, print. No logic of its own."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

from .. import allocator
from ..constants import ARCH_NAMES, BATCH_SIZE, PRECISIONS
from ..errors import PneumoscanError


def number_type(parse, ok, expected: str):
    """An argparse type: ``parse`` the text and keep the value if ``ok``; anything else is a usage error saying
    what was expected (0 or a negative count would otherwise be accepted and fail or hang deep inside a run)."""
    def convert(text: str):
        try:
            value = parse(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"must be {expected}, got {text!r}")
        return value

    return convert


positive_int = number_type(int, lambda v: v >= 1, "a whole number of at least 1")  # counts: batch sizes, workers
positive_float = number_type(float, lambda v: 0 < v < float("inf"), "a number above 0")  # sizes, tolerances
port_number = number_type(int, lambda v: 1 <= v <= 65535, "a TCP port from 1 to 65535")


def cmd_data_summary(args: argparse.Namespace) -> int:
    from ..data.summary import format_summary, summarize

    print(format_summary(summarize(args.data_dir)))
    return 0


def cmd_data_download(args: argparse.Namespace) -> int:
    from ..data.download import DATASET, download

    counts = download(args.dest)
    print(f"{args.dest}: Kaggle {DATASET}, " + ", ".join(f"{split} {n} images" for split, n in counts.items()))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..config import load_config
    from ..train import fit

    cfg = load_config(args.config, arch=args.arch, epochs=args.epochs, pretrained=args.pretrained,
                      weights=args.weights, seed=args.seed, sampler=args.sampler, batch_size=args.batch_size,
                      fold=args.fold)
    path = fit(cfg, args.data, args.out, resume=args.resume, progress=not args.quiet)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one line of output, not one per process
        print(path)
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..train import recalibrate

    print(recalibrate(args.run, args.data))
    return 0


def _model_line(model) -> str:
    """Which model answered, by name and full sha256: a name alone does not tell an edited file from the real
    one, the hash does."""
    return f"model {model.name} (sha256 {model.sha256})"


def _interval(bounds) -> str:
    low, high = bounds
    return "[n/a]" if not (math.isfinite(low) and math.isfinite(high)) else f"[{low:.4f}, {high:.4f}]"


def _format_evaluation(result, model) -> str:
    lines = [f"{_model_line(model)}, {result.split} split: {result.n} images"
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
    if result.guard_rejected:
        lines.append(f"guard: {result.guard_rejected} of these X-rays would be rejected as not a chest X-ray")
    for name, point in result.points.items():
        lines += ["", f"== {name} operating point: threshold {point.threshold:.4f} ==", result.reports[name].rstrip(),
                  f"sensitivity {point.sensitivity:.4f}  specificity {point.specificity:.4f}  "
                  f"precision {point.precision:.4f}  NPV {point.npv:.4f}",
                  *([f"95% CI (Clopper-Pearson): sensitivity {_interval(ci[name]['sensitivity'])}  specificity "
                     f"{_interval(ci[name]['specificity'])}  accuracy {_interval(ci[name]['accuracy'])}"]
                    if name in ci else []),
                  "confusion matrix (rows true, columns predicted; NORMAL, PNEUMONIA):",
                  f"  [[{point.tn:4d} {point.fp:4d}]", f"   [{point.fn:4d} {point.tp:4d}]]"]
    for error in result.errors:
        lines.append(f"skipped: {error}")
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..report import check_output_dir, check_output_file

    if args.shifts and (args.tta or args.report):
        given = " and ".join(option for option, on in (("--tta", args.tta), ("--report", args.report)) if on)
        raise PneumoscanError(f"--shifts cannot be combined with {given}: the shift table is scored without "
                              "test-time augmentation and has no plots (--json writes it as JSON)")
    check_output_file(args.json, "--json")  # a bad destination fails now, not after minutes of scoring
    check_output_dir(args.report, "--report")

    from ..evaluate import evaluate
    from ..predict import load_model

    model = load_model(args.model, precision=args.precision, prevalence=args.prevalence,
                       max_pixels=round(args.max_megapixels * 1e6))
    if args.shifts:
        return _print_shifts(model, args)
    result = evaluate(model, args.data, args.split, tta=args.tta, batch_size=args.batch_size)
    print(_format_evaluation(result, model))
    if args.json:
        _write_json(args.json, result.to_dict())
    if args.report:
        from ..report import write_report

        for path in write_report(result, model, args.report, run_dir=Path(args.model) if args.model else None):
            print(f"wrote {path}", file=sys.stderr)
    return 0


def _write_json(path: str, document: dict) -> None:
    from ..modelfile import atomic_write

    text = json.dumps(document, indent=2)
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))
    except OSError as exc:
        raise PneumoscanError(f"{path}: cannot write --json ({exc.strerror or exc})") from None


def _print_shifts(model, args: argparse.Namespace) -> int:
    """The validation images scored as they are and under fixed acquisition shifts: a recipe-selection aid."""
    import numpy as np

    from ..data.sources import MedMNISTSource, open_source
    from ..evaluate import VALIDATION, evaluate_shifts, validation_images

    if args.split != ("val" if isinstance(open_source(args.data), MedMNISTSource) else VALIDATION):
        raise PneumoscanError("--shifts scores the validation split only (--split validation, or val for a .npz): "
                              "recipes are chosen on it")
    images, labels = validation_images(model, args.data)
    results = evaluate_shifts(model, images, labels, batch_size=args.batch_size)
    print(f"{_model_line(model)}, validation split under acquisition shifts: {len(labels)} images, "
          f"network on {model.runtime}")
    print(f"{'shift':<18} {'AUC':>7} {'screening sens':>15} {'spec':>7} {'balanced acc':>13}")
    for r in results:
        print(f"{r.shift:<18} {r.auc:7.4f} {r.screening.sensitivity:15.4f} {r.screening.specificity:7.4f} "
              f"{r.balanced_accuracy:13.4f}")
    shifted = results[1:]
    mean = {"auc": float(np.mean([r.auc for r in shifted])),
            "screening_sensitivity": float(np.mean([r.screening.sensitivity for r in shifted])),
            "screening_specificity": float(np.mean([r.screening.specificity for r in shifted])),
            "balanced_accuracy": float(np.mean([r.balanced_accuracy for r in shifted]))}
    print(f"{'mean of shifts':<18} {mean['auc']:7.4f} {mean['screening_sensitivity']:15.4f} "
          f"{mean['screening_specificity']:7.4f} {mean['balanced_accuracy']:13.4f}")
    if args.json:
        _write_json(args.json, _finite({
            "model": {"name": model.name, "sha256": model.sha256}, "split": "validation", "n": int(len(labels)),
            "runtime": model.runtime,
            "shifts": [{"shift": r.shift, "auc": r.auc, "screening": r.screening.to_dict(),
                        "balanced_accuracy": r.balanced_accuracy} for r in results],
            "mean_of_shifts": mean,
        }))
    return 0


def _finite(value):
    """JSON-ready: NaN and infinity (an undefined figure) become null, which strict JSON parsers accept."""
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Inputs:
    """The files a predict run will screen, found before any model is loaded, and what the folder walk left out.

    Files named on the command line are screened whatever their suffix (an unreadable one becomes an error row);
    inside folders (walked recursively, sorted) only image suffixes and suffix-less files (DICOM often has no
    suffix) are taken, hidden files and folders are left out, and every left-out file is counted by suffix."""

    def __init__(self, items: list[str]):
        from collections import Counter

        from ..data.layout import IMAGE_SUFFIXES

        self.files: list[Path] = []
        self.skipped: Counter[str] = Counter()  # suffix (or "hidden") -> files left out
        self.folders: list[str] = []
        for item in items:
            path = Path(item)
            if not path.is_dir():
                self.files.append(path)  # a missing or unreadable file becomes an error row, not a crash
                continue
            self.folders.append(item)
            for child in sorted(path.rglob("*")):
                if not child.is_file():
                    continue
                if any(part.startswith(".") for part in child.relative_to(path).parts):
                    self.skipped["hidden"] += 1
                elif child.suffix.lower() in IMAGE_SUFFIXES or child.suffix == "":
                    self.files.append(child)
                else:
                    self.skipped[child.suffix.lower()] += 1

    def skipped_summary(self) -> str:
        """e.g. '3 files skipped (not images: .txt 2, .csv 1)'; empty when nothing was skipped."""
        total = sum(self.skipped.values())
        if not total:
            return ""
        kinds = [f"{suffix} {n}" for suffix, n in self.skipped.most_common() if suffix != "hidden"]
        parts = ([f"not images: {', '.join(kinds)}"] if kinds else []) + (
            [f"hidden: {self.skipped['hidden']}"] if self.skipped["hidden"] else [])
        return f"{total} file{'s' if total != 1 else ''} skipped ({'; '.join(parts)})"


def _supported() -> str:
    from ..data.layout import IMAGE_SUFFIXES

    return ", ".join(sorted(IMAGE_SUFFIXES)) + " or no suffix (DICOM)"


PREDICT_HEADER = "path\tprobability\tdecision\tthreshold or reason"


def _row(pred) -> str:
    """One tab-separated line per file: the format scripts parse; do not change it."""
    if pred.status == "ok":
        return (f"{pred.path}\t{pred.probability:.4f}\t{pred.decision}\t({pred.operating_point} "
                f"threshold {pred.threshold:.4f})")
    return f"{pred.path}\t-\t{pred.status.upper()}\t{pred.message}"


def cmd_predict(args: argparse.Namespace) -> int:
    from ..archive import output_kind, require_pyarrow, require_ray
    from ..report import check_output_dir, check_output_file

    if args.heatmaps and args.backend != "torch":
        raise PneumoscanError("--heatmaps (Grad-CAM) needs the PyTorch model: use --backend torch")
    if args.heatmaps and args.engine == "ray":
        raise PneumoscanError("--heatmaps (Grad-CAM) runs on the local engine only: drop --engine ray")
    if args.resume and not (args.csv or args.out):
        raise PneumoscanError("--resume continues the partial results of --csv or --out: give the same one")
    # Destinations fail first (before the model loads); then bad options (model, threshold: exit 2) before
    # an empty input (exit 1); no image is decoded before all of that passed.
    check_output_file(args.csv, "--csv")
    out_kind = output_kind(args.out, engine=args.engine) if args.out else None
    if out_kind in ("parquet", "dataset"):
        require_pyarrow()
    if out_kind == "dataset":  # --engine ray: a folder of Parquet files written by Ray
        from ..archive import check_output_folder

        check_output_folder(args.out, "--out")
    else:
        check_output_file(args.out, "--out")
    check_output_dir(args.heatmaps, "--heatmaps")
    check_output_dir(args.dicom_out, "--dicom-out")
    if args.engine == "ray":
        require_ray()
    inputs = Inputs(args.inputs)

    from tqdm import tqdm

    from ..predict import load_model
    from ..report import PredictionWriter

    model = load_model(args.model, backend=args.backend, precision=args.precision, prevalence=args.prevalence,
                       max_pixels=round(args.max_megapixels * 1e6))
    model.resolve_threshold(args.threshold)
    from .dicom import dicom_out

    write_dicom = dicom_out(args.dicom_out, model)  # SR + SC per DICOM input; None without --dicom-out
    if not inputs.files:
        skipped = inputs.skipped_summary()
        print(f"pneumoscan: error: no image to screen in {', '.join(inputs.folders)}"
              + (f": {skipped}" if skipped else " (empty)") + f"; supported: {_supported()}", file=sys.stderr)
        return 1
    if inputs.skipped and not args.quiet:
        print(f"pneumoscan: {inputs.skipped_summary()}", file=sys.stderr)
    table = sys.stdout.isatty() and not args.json
    if table:  # a person reads this: say which model answered and what the columns are
        print(_model_line(model))
        print(PREDICT_HEADER)
    elif not args.quiet:  # piped: stdout stays rows only, the model goes to stderr
        print(f"pneumoscan: {_model_line(model)}", file=sys.stderr)
    if out_kind == "dataset":
        return _predict_ray_folder(model, inputs, args, write_dicom, table)
    with PredictionWriter(args.csv, args.heatmaps, model, out_path=args.out, files=inputs.files,
                          threshold=args.threshold, tta=args.tta, resume=args.resume) as writer:
        failed = sum(row["status"] == "error" for row in writer.kept)
        if args.resume and not args.quiet:
            print(f"pneumoscan: resuming: {len(writer.kept)} row(s) kept from {writer.archive.path}, "
                  f"{len(writer.todo)} file(s) to screen" if writer.archive.resumed else
                  f"pneumoscan: no {writer.archive.path} to resume: screening every file", file=sys.stderr)
        if args.engine == "ray":
            results = _ray_results(model, writer.todo, args)
        elif args.csv or args.out:
            from ..archive import predict_local

            results = predict_local(model, writer.todo, threshold=args.threshold, batch_size=args.batch_size,
                                    tta=args.tta)
        else:
            results = ((pred, None) for pred in model.predict_files(
                inputs.files, threshold=args.threshold, batch_size=args.batch_size, tta=args.tta))
        for pred, row in tqdm(results, desc="screening", unit="img", total=len(writer.todo),
                              disable=args.quiet or not sys.stderr.isatty()):
            failed += pred.status == "error"
            writer.add(pred, row)
            if write_dicom is not None:
                write_dicom(pred)
            print(json.dumps(_finite(pred.to_dict()), default=str) if args.json else _row(pred), flush=table)
    return _failed_summary(failed, len(inputs.files))


def _failed_summary(failed: int, total: int) -> int:
    if failed == total:
        print(f"pneumoscan: none of the {failed} file(s) could be read: nothing was screened", file=sys.stderr)
    elif failed:
        print(f"pneumoscan: {failed} file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


def _ray_results(model, files: list, args: argparse.Namespace):
    """(Prediction, row) per file from the Ray engine, on the cluster at --address or a local instance."""
    from ..archive import predict_ray, ray_session

    with ray_session(args.address, args.quiet):
        yield from predict_ray(model, files, threshold=args.threshold, batch_size=args.batch_size, tta=args.tta,
                               num_cpus=args.num_cpus, num_gpus=args.num_gpus, concurrency=args.concurrency,
                               backend=args.backend, precision=args.precision)


def _predict_ray_folder(model, inputs: Inputs, args: argparse.Namespace, write_dicom, table: bool) -> int:
    """--engine ray --out DEST(.parquet): Ray writes the Parquet folder; the rows are printed once written."""
    from ..archive import predict_ray_folder

    failed = [0]

    def resumed(folder) -> None:
        failed[0] += sum(row["status"] == "error" for row in folder.kept)
        if args.resume and not args.quiet:
            print(f"pneumoscan: resuming: {len(folder.kept)} row(s) kept, {len(folder.todo)} file(s) to screen"
                  if folder.resumed else f"pneumoscan: no {folder.parts} to resume: screening every file",
                  file=sys.stderr)

    def emit(pred) -> None:
        failed[0] += pred.status == "error"
        if write_dicom is not None:
            write_dicom(pred)
        print(json.dumps(_finite(pred.to_dict()), default=str) if args.json else _row(pred), flush=table)

    predict_ray_folder(model, inputs.files, args.out, emit=emit, csv_path=args.csv, resume=args.resume,
                       threshold=args.threshold, tta=args.tta, batch_size=args.batch_size, num_cpus=args.num_cpus,
                       num_gpus=args.num_gpus, concurrency=args.concurrency, backend=args.backend,
                       precision=args.precision, address=args.address, quiet=args.quiet, on_open=resumed)
    return _failed_summary(failed[0], len(inputs.files))


def cmd_export(args: argparse.Namespace) -> int:
    from ..export import check_images, export_onnx, int8_inputs, quantize_int8
    from ..predict import load_model

    if not args.onnx.lower().endswith(".onnx"):
        raise PneumoscanError(f"--onnx must name an .onnx file, got {args.onnx!r}")
    model = load_model(args.model, precision="float32")  # the ONNX graph is float32; check it against that
    int8 = int8_inputs(model, args.data) if args.int8 else None  # fail before the slow export
    images, source = check_images(model, args.data)
    result = export_onnx(model, args.onnx, images=images, checked_on=source, input_dtype=args.input_dtype,
                         tolerance=args.tolerance)
    print(f"wrote {result.path} (sha256 {result.sha256[:12]}; input {args.input_dtype} (N, 1, "
          f"{model.preprocessing.size}, {model.preprocessing.size}); outputs logits, features)")
    print(f"onnxruntime vs PyTorch on {source}: max |logit difference| {result.max_logit_diff:.2e} "
          f"(tolerance {args.tolerance:g}), max |feature difference| {result.max_feature_diff:.2e}")
    if int8 is not None:
        calibration, val_images, val_labels, described = int8
        q = quantize_int8(result.path, calibration=calibration, val_images=val_images, val_labels=val_labels,
                          validated_on=described)
        print(f"wrote {q.path} ({q.method} int8 quantisation, calibrated on {len(calibration)} training images)")
        print(f"int8 on validation ({described}): AUC {q.auc_fp32:.4f} -> {q.auc_int8:.4f} "
              f"(change {q.auc_change:+.4f}), max |probability difference| {q.max_probability_diff:.4f}, "
              f"{q.decisions_changed} screening decision(s) changed")
    return 0


def _add_model_options(p: argparse.ArgumentParser) -> None:
    """Options of every command that loads a model to answer with it."""
    p.add_argument("--precision", choices=PRECISIONS, default="auto",
                   help="PyTorch network arithmetic: auto (the precision the model's thresholds were fitted in, "
                        "recorded in the model file: float32 for the bundled model) or bfloat16 (faster on CPUs "
                        "with native bf16; answers differ slightly from the fitted ones)")
    p.add_argument("--prevalence", type=float, default=None, metavar="P",
                   help="pneumonia share where the model is used (0-1): re-bases probabilities from the validation "
                        "prevalence they were calibrated at; decisions at the named thresholds do not change")
    p.add_argument("--max-megapixels", type=positive_float, default=50.0, metavar="MP",
                   help="larger images are refused before decoding, as possible decompression bombs (default 50 "
                        "MP; a 2752 px radiograph is 7.6 MP)")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(prog="pneumoscan", description="Pneumonia screening on chest X-rays.")
    parser.add_argument("--version", action="version", version=f"pneumoscan {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="inspect or fetch a dataset").add_subparsers(dest="data_command", required=True)
    p = data.add_parser("summary", help="images, patients, sizes and class balance per split")
    p.add_argument("data_dir")
    p.set_defaults(func=cmd_data_summary)
    p = data.add_parser("download", help="fetch the Kermany dataset from Kaggle (needs Kaggle credentials)")
    p.add_argument("dest", help="new folder that receives {train,val,test}/{NORMAL,PNEUMONIA}")
    p.set_defaults(func=cmd_data_download)

    p = sub.add_parser("train", help="fine-tune a network and write RUN_DIR/model.safetensors")
    p.add_argument("--data", required=True,
                   help="Kaggle-layout folder (its train split, split by patient) or MedMNIST .npz (official train/val)")
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("calibrate", help="refit calibration, thresholds and guard of a run on its validation split")
    p.add_argument("run", help="run directory of a finished `pneumoscan train`")
    p.add_argument("--data", help="dataset folder, if it moved since training")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("evaluate", help="classification report, AUC, calibration at each stored threshold")
    p.add_argument("--model", help="model file or run directory (default: the bundled model)")
    p.add_argument("--data", required=True, help="Kaggle-layout folder or MedMNIST .npz")
    p.add_argument("--split", default="test", help="train | val | test folder of --data, or validation: the run's own patient-grouped split")
    p.add_argument("--tta", action="store_true", help="test-time augmentation")
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, metavar="N")
    p.add_argument("--json", metavar="FILE", help="write the figures (with --shifts: the shift table) as JSON")
    p.add_argument("--report", help="folder for plots (confusion matrix, ROC, PR, reliability, training curves)")
    p.add_argument("--shifts", action="store_true",
                   help="score the validation split under fixed acquisition shifts (gamma, contrast, blur, ...)")
    _add_model_options(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser(
        "predict", help="screen images, folders of images, DICOM files",
        description="Screen JPEG, PNG, TIFF, BMP and DICOM files. Folders are walked recursively for those "
                    "suffixes and for files without a suffix (DICOM); other and hidden files are skipped and "
                    "counted on stderr. Output: one tab-separated line per file (path, probability, decision, "
                    "threshold or reason); on a terminal a model line (name, sha256) and a header line come "
                    "first, when piped the model line goes to stderr. Exit 0 when every file was read, 1 when "
                    "one could not be or nothing was found, 2 for bad options.")
    p.add_argument("inputs", nargs="+", metavar="IMAGE_OR_DIR")
    p.add_argument("--model", help="model file or run directory (default: the bundled model)")
    p.add_argument("--threshold", default="screening", help="screening | balanced | a number in (0, 1)")
    p.add_argument("--csv", metavar="FILE", help="write one row per file (path, probability, decision, threshold, "
                                                 "status, message); the file appears only when the run completes, "
                                                 "finished rows are kept in FILE.partial until then (--resume)")
    p.add_argument("--out", metavar="FILE", help="results.csv or results.parquet (pyarrow): the CSV's columns, and "
                                                 "in Parquet also model_sha256 and the DICOM Study, Series and SOP "
                                                 "Instance UIDs; crash-safe like --csv. With --engine ray a "
                                                 ".parquet (or suffix-less) name is a folder of Parquet files "
                                                 "written by Ray (read it with pyarrow.parquet.read_table)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from FILE.partial: keep its rows, screen only the files whose "
                        "path, size and modification time have no row yet (same model and options only)")
    p.add_argument("--engine", choices=["local", "ray"], default="local",
                   help="ray: decode in Ray tasks and score in a pool of Ray actors (pip install "
                        "'pneumoscan[cluster]'), on a local instance or the cluster at --address")
    p.add_argument("--address", default=None, help="Ray cluster to join, e.g. auto (the one `ray start --head` "
                                                   "started) or ray://host:10001; default: a local instance")
    p.add_argument("--num-cpus", type=positive_float, default=1.0, metavar="N", help="CPUs per Ray actor (default 1)")
    p.add_argument("--num-gpus", type=float, default=0.0, metavar="G", help="GPUs per Ray actor (default 0)")
    p.add_argument("--concurrency", type=positive_int, default=1, metavar="K",
                   help="Ray actors scoring at once, each with its own copy of the model (default 1)")
    p.add_argument("--heatmaps", metavar="DIR", help="folder for Grad-CAM overlays (PNG)")
    from .dicom import add_dicom_out_option  # --dicom-out DIR

    add_dicom_out_option(p)
    p.add_argument("--json", action="store_true",
                   help="print JSON Lines instead of tab-separated rows: one object per file, the fields of "
                        "pneumoscan.Prediction (path, probability, decision, operating_point, threshold, status, "
                        "message, guard_score); null where a figure does not apply")
    p.add_argument("--tta", action="store_true", help="test-time augmentation")
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, metavar="N")
    p.add_argument("--quiet", action="store_true", help="on stderr only errors: no progress bar, model line or count of skipped files")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="onnx: run an .onnx file from `pneumoscan export` on onnxruntime")
    _add_model_options(p)
    p.set_defaults(func=cmd_predict)

    p = sub.add_parser("export", help="write an ONNX model (preprocessing inside), checked against PyTorch")
    p.add_argument("--model", help="model file or run directory (default: the bundled model)")
    p.add_argument("--onnx", required=True, help="output .onnx file")
    p.add_argument("--int8", action="store_true",
                   help="also write OUT.int8.onnx and report its AUC change on validation images")
    p.add_argument("--data", help="Kaggle-layout folder: check on its val/test images; its train/val for --int8 "
                                  "when the model is not a run directory")
    p.add_argument("--input-dtype", choices=["float32", "uint8"], default="float32",
                   help="graph input: float images in [0, 1] (default) or uint8")
    p.add_argument("--tolerance", type=positive_float, default=1e-3, help="largest allowed |logit| difference")
    p.set_defaults(func=cmd_export)

    from .serve import add_keys_command, add_serve_command  # torch-free; `pneumoscan serve`, `keys`

    add_serve_command(sub, _add_model_options)
    add_keys_command(sub)
    from .dicom import add_dicom_command  # torch-free; `pneumoscan dicom listen | pull`

    add_dicom_command(sub)
    _add_adapt_command(sub)
    return parser


def cmd_adapt(args: argparse.Namespace) -> int:
    from ..adapt import cmd_adapt as run

    return run(args)


def _add_adapt_command(sub) -> None:
    p = sub.add_parser(
        "adapt", help="fit a model to a site's own X-rays (unlabelled: --images; labelled: --data)",
        description="Write a site-adapted model file. --images DIR (no labels): estimate the site's pneumonia "
                    "prevalence by EM and re-base the calibration to it, refit the thresholds from the EM "
                    "posteriors and the guard on the site's features; --bn-layers re-estimates BatchNorm "
                    "statistics on the site's images (AdaBN; off by default). --data DIR "
                    "(DIR/NORMAL, DIR/PNEUMONIA): refit calibration and the screening and balanced thresholds on "
                    "the site's labelled images, after the unlabelled step when --images is given too. Images "
                    "that are no chest X-ray or that the base model's guard rejects are left out and counted. "
                    "Needs at least 25 usable unlabelled images, and enough PNEUMONIA images for the screening "
                    "sensitivity at 95%% confidence (149 for 0.98); otherwise exit 2 with one line, nothing written.")
    p.add_argument("--model", help="model file to adapt (default: the bundled model)")
    p.add_argument("--images", metavar="SITE_DIR", help="folder of the site's unlabelled X-rays (recursive)")
    p.add_argument("--data", metavar="SITE_LABELLED_DIR", help="folder with NORMAL/ and PNEUMONIA/ site X-rays")
    p.add_argument("--out", required=True, metavar="SITE_MODEL", help="the adapted model file to write")
    p.add_argument("--sensitivity", type=float, default=None, metavar="S",
                   help="screening sensitivity the labelled refit keeps at 95%% confidence (default: the model's "
                        "target, 0.98 for the bundled model)")
    p.add_argument("--bn-layers", choices=("trained", "all", "none"), default="none",
                   help="BatchNorm layers AdaBN re-estimates: none (default: AdaBN lost on validation, "
                        "docs/experiments.md), those of the fine-tuned stages, or all")
    p.add_argument("--bn-balance", action="store_true",
                   help="take AdaBN's statistics over a resample of the site's images weighted to the training "
                        "batches' class mix (by the unadapted model's EM posteriors)")
    p.add_argument("--thresholds", choices=("keep", "em"), default="em",
                   help="unlabelled: refit the thresholds with the EM posteriors standing in for labels (default, "
                        "chosen on validation), or keep the base thresholds moved with the prevalence")
    p.add_argument("--quiet", action="store_true", help="no line per left-out image")
    p.set_defaults(func=cmd_adapt)


def _quiet_decoder_warnings() -> None:
    """pydicom and Pillow warn (with a source line) about each malformed file they still read; the command line
    reports every file in its own row instead, so their warnings would only bury the rows."""
    import warnings

    for module in (r"pydicom(\..*)?", r"PIL(\..*)?"):
        warnings.filterwarnings("ignore", category=UserWarning, module=module)


# The services: request handling and decoding run in other threads on the cores the network uses, all the time.
# OpenMP's default is to spin a while after each parallel region, which takes those cores: on a quiet 2-core
# machine, 16 clients got 47.6 requests/s from `serve` (torch, batched) with threads that sleep at once and 13.8
# with spinning ones (benchmarks/bench_http.py, OMP_WAIT_POLICY=PASSIVE vs ACTIVE). Batch jobs (predict, evaluate)
# keep the default: there it was faster (47.5 vs 43.1 images/s end to end, 19 vs 45 ms at batch 1). Must be set
# before torch loads OpenMP, hence here, before any command imports torch.
SERVICE_COMMANDS = frozenset({"serve", "dicom"})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    allocator.tune()  # before any command imports torch: PyTorch reads THP_MEM_ALLOC_ENABLE once
    if args.command in SERVICE_COMMANDS and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    _quiet_decoder_warnings()
    try:
        return args.func(args)
    except PneumoscanError as exc:
        print(f"pneumoscan: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pneumoscan: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into e.g. `head`
        sys.stderr.close()
        return 0

