"""What the commands print and write for people and scripts: the tab-separated rows, JSON, and the outputs of a
predict run (CSV/Parquet through the archive journal, Grad-CAM heatmaps)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from ..durable import check_output_dir, check_output_file
from ..errors import PneumoscanError

PREDICT_HEADER = "path\tprobability\tdecision\tthreshold or reason"


def model_line(model) -> str:
    """Which model answered, by name and full sha256: a name alone does not tell an edited file from the real
    one, the hash does."""
    return f"model {model.name} (sha256 {model.sha256})"


def row(pred) -> str:
    """One tab-separated line per file: the format scripts parse; do not change it."""
    if pred.status == "ok":
        return (f"{pred.path}\t{pred.probability:.4f}\t{pred.decision}\t({pred.operating_point} "
                f"threshold {pred.threshold:.4f})")
    return f"{pred.path}\t-\t{pred.status.upper()}\t{pred.message}"


def finite(value):
    """JSON-ready: NaN and infinity (an undefined figure) become null, which strict JSON parsers accept."""
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, str | bytes):  # numpy scalars
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def json_line(pred) -> str:
    return json.dumps(finite(pred.to_dict()), default=str)


def write_json(path: str, document: dict, option: str = "--json") -> None:
    from ..durable import atomic_write

    text = json.dumps(finite(document), indent=2)
    try:
        atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))
    except OSError as exc:
        raise PneumoscanError(f"{path}: cannot write {option} ({exc.strerror or exc})") from None


def failed_summary(failed: int, total: int) -> int:
    """The closing stderr line of a run with unreadable files, and the exit status (1 when any)."""
    if failed == total:
        print(f"pneumoscan: none of the {failed} file(s) could be read: nothing was screened", file=sys.stderr)
    elif failed:
        print(f"pneumoscan: {failed} file(s) could not be read", file=sys.stderr)
    return 1 if failed else 0


class PredictionWriter:
    """The outputs of a predict run. Rows go to a journal beside the first destination (``DEST.partial``,
    appended, flushed per row and fsynced at short intervals: a killed run keeps its finished rows, and
    ``resume`` continues it); the CSV (``--csv``, or ``--out x.csv``) and Parquet (``--out x.parquet``) files are
    written from it, in input order, and renamed into place only when the run completes, so a file at the final
    name is always complete. Heatmaps are written before their row, so a row never lacks its heatmap."""

    def __init__(self, csv_path: str | None, heatmap_dir: str | None, model, *, out_path: str | None = None,
                 files: list | None = None, threshold="screening", tta: bool = False, resume: bool = False,
                 heatmap_rule: str = "positive"):
        from ..archive import ArchiveWriter, output_kind, run_settings

        self.csv_path = Path(csv_path) if csv_path else None
        self.heatmap_dir = Path(heatmap_dir) if heatmap_dir else None
        self.heatmap_rule = heatmap_rule
        self.model = model
        destinations = [(Path(out_path), output_kind(out_path))] if out_path else []
        if self.csv_path:
            destinations.append((self.csv_path, "csv"))
        self.files = list(files or [])
        self.archive = ArchiveWriter(destinations, model, run_settings(model, threshold, tta), self.files,
                                     resume=resume)

    @property
    def todo(self) -> list:
        """The files still to score (all of them, unless a resumed journal holds some)."""
        return self.archive.todo

    @property
    def kept(self) -> list[dict]:
        return self.archive.kept

    def __enter__(self) -> PredictionWriter:
        check_output_file(self.csv_path, "--csv")
        check_output_dir(self.heatmap_dir, "--heatmaps")
        try:
            self.archive.open()
            if self.heatmap_dir:
                self.heatmap_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            self.archive.abort()
            where = exc.filename or self.csv_path or self.heatmap_dir
            raise PneumoscanError(f"{where}: cannot write there ({exc.strerror or exc})") from None
        return self

    def add(self, screened, row: dict | None = None):
        """Write the heatmap (when the rule wants one) and journal the row of the stage's ``Screened`` result;
        returns its Prediction, carrying the heatmap's path when one was written. The heatmap is drawn from the
        image the stage decoded (a Ray result, which has none, is decoded from its file)."""
        from ..explain import wants_heatmap

        pred = screened.prediction
        if self.heatmap_dir and wants_heatmap(pred, self.heatmap_rule):
            from ..explain import save_heatmap

            pixels = screened.decoded.pixels if screened.decoded is not None else None
            try:
                pred = pred.with_heatmap(str(save_heatmap(self.model, pred.path, self.heatmap_dir, pred,
                                                          pixels=pixels)))
            except OSError as exc:  # e.g. the disk filled up: one line, and no CSV that looks complete
                raise PneumoscanError(f"{self.heatmap_dir}: cannot write the heatmap of {pred.path} "
                                      f"({exc.strerror or exc})") from None
        if row is None:
            from ..archive import file_key, make_row

            row = make_row(pred, *file_key(pred.path))
        if pred.heatmap is not None:
            row = {**row, "heatmap": pred.heatmap}
        self.archive.add(row)
        return pred

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.archive.finish()
            return
        line = self.archive.abort()
        if line:
            print(f"pneumoscan: {line}", file=sys.stderr)


def create_missing_folders(args, *options: tuple[str, str, bool]) -> list[Path]:
    """The one rule for output destinations whose folder does not exist yet: create it (with its parents) when
    the run is about to write, and say so on stderr, so a mistyped folder is seen rather than silently made.
    ``options``: (attribute of ``args``, option name, whether the option names the folder itself). A Ray run's
    ``--out`` folder is not one of them: only its parent is made here, the folder itself is published whole at
    the end. ``--quiet`` keeps the line off stderr."""
    made = []
    for attribute, option, is_folder in options:
        value = getattr(args, attribute, None)
        if not value:
            continue
        folder = Path(value) if is_folder else Path(value).parent
        if folder.exists():
            continue
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise PneumoscanError(f"{folder}: cannot create the folder for {option} ({exc.strerror or exc})") from None
        if not getattr(args, "quiet", False):
            print(f"pneumoscan: created folder {folder} for {option}", file=sys.stderr)
        made.append(folder)
    return made
