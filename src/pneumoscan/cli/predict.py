"""``pneumoscan predict``: screen files and folders, print a row per file, write what was asked."""

from __future__ import annotations

import argparse
import atexit
import gc
import os
import sys

from ..constants import BATCH_SIZE
from ..data.walk import Walk, walk
from ..errors import PneumoscanError
from .args import HEATMAP_RULES, add_device_option, add_model_options, positive_float, positive_int
from .output import (
    PREDICT_HEADER,
    PredictionWriter,
    create_missing_folders,
    failed_summary,
    json_line,
    model_line,
)
from .output import row as format_row

# data.images.FORMAT_NAMES, written out so the parser loads no PIL (tests/test_cli_help.py keeps them equal)
FORMAT_NAMES = "JPEG, PNG, TIFF, BMP, GIF, WebP, PNM (PGM/PPM) or DICOM"


class Inputs(Walk):
    """The files a predict run will screen, found before any model is loaded, and what the walk left out
    (``pneumoscan.data.walk`` says the rules)."""

    def __init__(self, items: list[str]):
        super().__init__(**vars(walk(items)))


def _supported() -> str:
    from ..data.images import SUFFIXES

    return ", ".join(sorted(SUFFIXES)) + " or no suffix (DICOM)"


def _sleep_between_operators_for_one_batch(files: int, batch_size: int) -> None:
    """A local run of one network call: OpenMP's threads sleep between operators instead of spinning.

    Spinning pays back over many batches (cli/__init__.py gives the figures), but a one-image run makes one forward
    pass, and beside other jobs the two spinning threads wait on each other: at load average 4 on two cores a
    one-image predict took 3.3 CPU s with the default and 1.6 with this (benchmarks/cold_start.py; docs/experiments.md,
    "Cold start of a one-image predict"). It must be set before torch loads OpenMP; a value the user set is kept.
    """
    if files <= batch_size and "torch" not in sys.modules:
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def _skip_last_collections() -> None:
    """At exit the interpreter's last garbage collections walk every object still alive, PyTorch's included
    (benchmarks/cold_start.py); objects frozen then are skipped. Objects freed by reference
    counting are still freed; cyclic garbage left at exit is not finalised, which CPython does not promise anyway.
    Registered at exit, not done now, so that a caller of ``main`` in a longer-lived process keeps its collections.
    """
    atexit.unregister(gc.freeze)
    atexit.register(gc.freeze)


def cmd_predict(args: argparse.Namespace) -> int:
    from ..archive import output_kind, require_pyarrow, require_ray
    from ..durable import check_output_dir, check_output_file

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
    if args.engine == "local":  # Ray's workers start their own processes and keep the defaults
        _sleep_between_operators_for_one_batch(len(inputs.files), args.batch_size)
    _skip_last_collections()

    from ..predict import load_model

    model = load_model(args.model, backend=args.backend, precision=args.precision, prevalence=args.prevalence,
                       max_pixels=round(args.max_megapixels * 1e6), device=args.device)
    model.resolve_threshold(args.threshold)
    from .dicom import dicom_out

    write_dicom = dicom_out(args.dicom_out, model)  # SR + SC per DICOM input; None without --dicom-out
    if not inputs.files:
        if inputs.unlistable:
            for folder, reason in inputs.unlistable:
                print(f"pneumoscan: error: {folder}: cannot list this folder ({reason})", file=sys.stderr)
            return 1
        skipped = inputs.skipped_summary()
        print(f"pneumoscan: error: no image to screen in {', '.join(inputs.folders)}"
              + (f": {skipped}" if skipped else " (empty)") + f"; supported: {_supported()}", file=sys.stderr)
        return 1
    for folder, reason in inputs.unlistable:  # a failure like an unreadable file: reported even with --quiet
        print(f"pneumoscan: error: {folder}: cannot list this folder ({reason}): its files were not screened",
              file=sys.stderr)
    if not args.quiet:
        for line in inputs.notices():
            print(f"pneumoscan: {line}", file=sys.stderr)
        if inputs.skipped:
            print(f"pneumoscan: {inputs.skipped_summary()}", file=sys.stderr)
    create_missing_folders(args, ("csv", "--csv", False), ("out", "--out", False),
                           ("heatmaps", "--heatmaps", True), ("dicom_out", "--dicom-out", True))
    table = sys.stdout.isatty() and not args.json
    if table:  # a person reads this: say which model answered and what the columns are
        print(model_line(model))
        print(PREDICT_HEADER)
    elif not args.quiet:  # piped: stdout stays rows only, the model goes to stderr
        print(f"pneumoscan: {model_line(model)}", file=sys.stderr)
    if out_kind == "dataset":
        return _predict_ray_folder(model, inputs, args, write_dicom, table)
    with PredictionWriter(args.csv, args.heatmaps, model, out_path=args.out, files=inputs.files,
                          threshold=args.threshold, tta=args.tta, resume=args.resume,
                          heatmap_rule=args.heatmap_rule) as writer:
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
            from .. import pipeline

            results = ((screened, None) for screened in pipeline.screen(
                model, inputs.files, threshold=args.threshold, batch_size=args.batch_size, tta=args.tta))
        if not args.quiet and sys.stderr.isatty():  # a person watches: a progress bar (tqdm loads only then)
            from tqdm import tqdm

            results = tqdm(results, desc="screening", unit="img", total=len(writer.todo))
        for screened, row in results:
            failed += screened.status == "error"
            pred = writer.add(screened, row)  # with its heatmap's path when one was written
            if write_dicom is not None:
                write_dicom(pred)
            print(json_line(pred) if args.json else format_row(pred), flush=table)
    return failed_summary(failed, len(inputs.files)) or int(bool(inputs.unlistable))


def _ray_results(model, files: list, args: argparse.Namespace):
    """(Screened, row) per file from the Ray engine, on the cluster at --address or a local instance: the
    Prediction alone (the decoded image stays in the Ray task that made it)."""
    from .. import pipeline
    from ..archive import predict_ray, ray_session

    with ray_session(args.address, args.quiet):
        for pred, row in predict_ray(model, files, threshold=args.threshold, batch_size=args.batch_size,
                                     tta=args.tta, num_cpus=args.num_cpus, num_gpus=args.num_gpus,
                                     concurrency=args.concurrency, backend=args.backend, precision=args.precision):
            yield pipeline.Screened(pred), row


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
        print(json_line(pred) if args.json else format_row(pred), flush=table)

    predict_ray_folder(model, inputs.files, args.out, emit=emit, csv_path=args.csv, resume=args.resume,
                       threshold=args.threshold, tta=args.tta, batch_size=args.batch_size, num_cpus=args.num_cpus,
                       num_gpus=args.num_gpus, concurrency=args.concurrency, backend=args.backend,
                       precision=args.precision, address=args.address, quiet=args.quiet, on_open=resumed)
    return failed_summary(failed[0], len(inputs.files)) or int(bool(inputs.unlistable))




def add_predict_command(sub) -> None:
    p = sub.add_parser(
        "predict", help="screen images, folders of images, DICOM files",
        description=f"Screen {FORMAT_NAMES} files. Folders are walked recursively (symbolic links to folders "
                    "followed, loops reported) for those suffixes and for files without a suffix (DICOM); other "
                    "and hidden files are counted on stderr, a file reached under two names is screened once "
                    "(the second name is reported), a broken link gets an error row. Output: one tab-separated "
                    "line per file (path, probability, decision, threshold or reason); on a terminal a model line "
                    "(name, sha256) and a header line come first, when piped the model line goes to stderr. A "
                    "missing output folder (--csv, --out, --heatmaps, --dicom-out) is created and said on stderr. "
                    "Exit 0 when every file was read, 1 when one could not be (or a folder could not be listed) "
                    "or nothing was found, 2 for bad options.")
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
    p.add_argument("--heatmaps", metavar="DIR",
                   help="folder for Grad-CAM overlays (PNG); each row's heatmap path is in --json and the journal")
    p.add_argument("--heatmap-rule", choices=HEATMAP_RULES, default="positive",
                   help="which images get a heatmap: positive (default: those decided PNEUMONIA; a map on a NORMAL "
                        "image still lights up somewhere and invites a finding the model did not make) or all "
                        "judged images")
    from .dicom import add_dicom_out_option  # --dicom-out DIR

    add_dicom_out_option(p)
    p.add_argument("--json", action="store_true",
                   help="print JSON Lines instead of tab-separated rows: one object per file, the fields of "
                        "pneumoscan.Prediction (path, probability, decision, operating_point, threshold, status, "
                        "message, guard_score, heatmap); null where a figure does not apply")
    p.add_argument("--tta", action="store_true", help="test-time augmentation")
    p.add_argument("--batch-size", type=positive_int, default=BATCH_SIZE, metavar="N")
    p.add_argument("--quiet", action="store_true", help="on stderr only errors: no progress bar, model line or count of skipped files")
    p.add_argument("--backend", choices=["torch", "onnx"], default="torch",
                   help="onnx: run an .onnx file from `pneumoscan export` on onnxruntime")
    add_model_options(p)
    add_device_option(p)
    p.set_defaults(func=cmd_predict)

