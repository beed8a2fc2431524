"""Screening an archive: a crash-safe journal of finished rows, resumable runs, CSV and Parquet outputs, and a
cluster engine on Ray Data.

Every finished row is appended to ``DEST.partial`` (JSON Lines: one row per line, so a row torn by SIGKILL is
recognisable and dropped), flushed at once and fsynced every ``FSYNC_ROWS`` rows or ``FSYNC_SECONDS``. Only at the
end are the final files (CSV, Parquet) written from the journal, in input order, and renamed into place; then the
journal is removed. ``--resume`` keeps the journal's rows whose file still has the same path, size and
modification time, and scores only the rest.

The journal's first line records what produced the rows (model sha256, operating point and threshold,
test-time augmentation, network arithmetic): a resume with anything else is refused, so one output never mixes
two models' answers.

Both engines give the same row per file: the local one through ``Model.predict_files``; the Ray one through the
same ``Model.decode``/``prepare`` (Ray tasks) and ``Model.score``/``result`` (an actor pool, the model loaded once
per actor).

With ``--engine ray --out DEST.parquet`` the rows are not streamed to the driver while scoring: Ray Data writes
them, one file per block, into ``DEST.parquet.parts/`` (every journal column, so ``--resume`` works there too; a
file torn by a crash has no Parquet footer and is dropped). At the end each part is rewritten, file by file, with
the local engine's columns and nulls, into a hidden sibling folder that is renamed to ``DEST.parquet``: a folder at
the final name is always complete.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from .durable import fsync_dir
from .errors import PneumoscanError

JOURNAL_SUFFIX = ".partial"
JOURNAL_FORMAT = "pneumoscan-journal/1"
FSYNC_ROWS = 64
FSYNC_SECONDS = 2.0
CLUSTER_HINT = "pip install 'pneumoscan[cluster]' (Ray Data and pyarrow)"
PARQUET_HINT = "pip install pyarrow (or 'pneumoscan[cluster]')"

CSV_COLUMNS = ["path", "probability", "decision", "threshold", "status", "message"]
UID_COLUMNS = ["study_instance_uid", "series_instance_uid", "sop_instance_uid"]
PARQUET_COLUMNS = [*CSV_COLUMNS, "model_sha256", *UID_COLUMNS]
# what the journal keeps per row: everything any output needs, and the file's identity for --resume
ROW_KEYS = ["path", "probability", "decision", "operating_point", "threshold", "status", "message", "guard_score",
            "size", "mtime_ns", *UID_COLUMNS]
OUTPUT_SUFFIXES = (".csv", ".parquet")
PARTS_SUFFIX = ".parts"
PARTS_FORMAT = "pneumoscan-parts/1"
PARTS_SETTINGS = "_pneumoscan.json"  # "_" prefix: pyarrow's and Ray's dataset readers skip it
KEPT_PREFIX = "kept-"
# seconds a TCP connection to an explicit --address may take: ray.init itself retries an absent GCS forever
CONNECT_TIMEOUT_S = 5.0
# bytes reserved per Ray decoding task: a worker with numpy, PIL and torch peaked at 444 MiB on Kermany originals
DECODE_MEMORY = 768 * 2**20


# --- files ---------------------------------------------------------------------------------------------------

def file_key(path: str | Path) -> tuple[int | None, int | None]:
    """(size, mtime_ns) of a file now; (None, None) when it cannot be stat'ed (gone, unreadable)."""
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def output_kind(path: str | Path, option: str = "--out", engine: str = "local") -> str:
    """"csv" or "parquet" (one file); with the Ray engine a .parquet or suffix-less name is "dataset" (a folder
    of Parquet files written by Ray)."""
    suffix = Path(path).suffix.lower()
    if engine == "ray" and (suffix == ".parquet" or (suffix == "" and option == "--out")):
        return "dataset"
    if suffix not in OUTPUT_SUFFIXES:
        raise PneumoscanError(f"{path}: {option} must name a .csv or .parquet file"
                              + (" (or, with --engine ray, a folder)" if option == "--out" else ""))
    return suffix[1:]


def check_output_folder(path: str | Path, option: str = "--out") -> None:
    """Fail now, in one line, when the Parquet folder of a Ray run could not be put at ``path``: something there
    that is neither a file nor a folder of Parquet files (replaced at the end, as a file is), or an unwritable
    place. Creates nothing."""
    from .durable import check_writable as _check_writable

    target = Path(path)
    if target.is_dir():
        other = sorted(p.name for p in target.iterdir() if p.suffix != ".parquet" or not p.is_file())
        if other:
            raise PneumoscanError(f"{target}: {option} names a folder that holds other things than Parquet files "
                                  f"({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); give a new name")
    elif target.exists() and not target.is_file():
        raise PneumoscanError(f"{target}: {option} names something that is neither a file nor a folder")
    _check_writable(target.parent, target, option)


def require_pyarrow(why: str = "--out .parquet") -> None:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise PneumoscanError(f"{why} needs pyarrow, which is not installed: {PARQUET_HINT}") from None


def require_ray() -> None:
    try:
        import pyarrow  # noqa: F401
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as exc:
        missing = (exc.name or "ray").split(".")[0]
        raise PneumoscanError(f"--engine ray needs Ray Data and pyarrow ({missing} is not installed): "
                              f"{CLUSTER_HINT}") from None


# --- rows ----------------------------------------------------------------------------------------------------

def _uids(header) -> dict[str, str | None]:
    return {k: (getattr(header, k, None) if header is not None else None) for k in UID_COLUMNS}


def make_row(pred, size: int | None, mtime_ns: int | None, header=None) -> dict:
    """The journal row of one Prediction (``header``: the file's DicomHeader, or None)."""
    return {"path": pred.path, "probability": pred.probability, "decision": pred.decision,
            "operating_point": pred.operating_point, "threshold": pred.threshold, "status": pred.status,
            "message": pred.message, "guard_score": pred.guard_score, "size": size, "mtime_ns": mtime_ns,
            **_uids(header)}


def csv_cells(row: dict) -> list[str]:
    """The CSV row, formatted as ``pneumoscan predict --csv`` always wrote it."""
    probability = "" if row["probability"] is None else f"{row['probability']:.6f}"
    return [row["path"], probability, row["decision"] or "", f"{row['threshold']:.6f}", row["status"],
            row["message"]]


def predict_local(model, paths: list, *, threshold="screening", batch_size: int, tta: bool = False
                  ) -> Iterator[tuple[object, dict]]:
    """(Prediction, journal row) per file, in order, through ``model.predict_files``.

    A file's size and mtime are read as it is handed to decoding (before it is read, so a file that changes
    later is scored again on --resume), its DICOM identifiers as it is decoded."""
    keys: dict[str, list] = defaultdict(list)
    headers: dict[str, list] = defaultdict(list)

    def listed():
        for path in paths:
            keys[str(path)].append(file_key(path))
            yield path

    def seen(item) -> None:
        headers[item.name].append(item.decoded.dicom if item.decoded is not None else None)

    for pred in model.predict_files(listed(), threshold=threshold, batch_size=batch_size, tta=tta,
                                    on_prepared=seen):
        size, mtime = _first(keys, pred.path) or file_key(pred.path)
        yield pred, make_row(pred, size, mtime, _first(headers, pred.path))


def _first(entries: dict[str, list], path: str):
    """Pop the oldest entry recorded for ``path`` (a path listed twice has one per listing), or None."""
    found = entries.get(path)
    if not found:
        return None
    value = found.pop(0)
    if not found:
        del entries[path]
    return value


# --- the journal ---------------------------------------------------------------------------------------------

def journal_path(destination: str | Path) -> Path:
    destination = Path(destination)
    return destination.with_name(destination.name + JOURNAL_SUFFIX)


def run_settings(model, threshold, tta: bool) -> dict:
    """What decides the rows' values: a journal is resumed only with the same."""
    op = model.resolve_threshold(threshold)
    return {"model_sha256": model.sha256, "model": model.name, "operating_point": op[0],
            "threshold": op[1], "tta": bool(tta), "runtime": model.runtime}


def read_journal(path: Path) -> tuple[dict | None, list[dict]]:
    """(settings line or None, complete rows). A last line without its newline (the process was killed while
    writing it) or that does not parse is dropped: it is scored again."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, []
    except OSError as exc:
        raise PneumoscanError(f"{path}: cannot read the partial results ({exc.strerror or exc})") from None
    lines = data.split(b"\n")[:-1]  # what follows the last newline is a torn row
    if not lines:
        return None, []
    try:
        settings = json.loads(lines[0])
    except ValueError:
        settings = None
    if not isinstance(settings, dict) or settings.get("format") != JOURNAL_FORMAT:
        raise PneumoscanError(f"{path}: not a pneumoscan partial results file; remove it or choose another "
                              "destination")
    rows = []
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # torn by a crash mid-line (only the last can be): rescored
        if isinstance(row, dict) and set(ROW_KEYS) <= set(row):
            rows.append(row)
    return settings, rows


def check_resumable(path: Path, found: dict, wanted: dict) -> None:
    if found["model_sha256"] != wanted["model_sha256"]:
        raise PneumoscanError(
            f"{path}: cannot resume: its rows were written by model {found.get('model')} (sha256 "
            f"{found['model_sha256']}), this run uses {wanted['model']} (sha256 {wanted['model_sha256']}); "
            "use the same --model, or remove the file to start again")
    for key, option in (("operating_point", "--threshold"), ("threshold", "--threshold"), ("tta", "--tta"),
                        ("runtime", "--backend/--precision")):
        if found.get(key) != wanted[key]:
            raise PneumoscanError(f"{path}: cannot resume: its rows were written with {key} {found.get(key)!r}, "
                                  f"this run has {wanted[key]!r}; use the same {option}, or remove the file")


class Journal:
    """The append-only file of finished rows, fsynced at short intervals."""

    def __init__(self, path: Path, settings: dict, kept: list[dict]):
        self.path = path
        self.rows_written = len(kept)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:  # settings + kept rows, then atomically in place
            f.write(json.dumps({"format": JOURNAL_FORMAT, **settings}) + "\n")
            for row in kept:
                f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._unsynced = 0
        self._synced_at = time.monotonic()

    def add(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()  # in the kernel now: a SIGKILL loses nothing from here on
        self.rows_written += 1
        self._unsynced += 1
        if self._unsynced >= FSYNC_ROWS or time.monotonic() - self._synced_at >= FSYNC_SECONDS:
            self.sync()

    def sync(self) -> None:
        os.fsync(self._file.fileno())  # on the disk: survives a power cut too
        self._unsynced = 0
        self._synced_at = time.monotonic()

    def close(self) -> None:
        if self._file is not None:
            self.sync()
            self._file.close()
            self._file = None


def plan_resume(rows: list[dict], files: list) -> tuple[list[dict], list]:
    """(journal rows to keep, files still to score): a row is kept when a listed file has its path, size and
    mtime; a path listed twice takes one row per listing. Rows of changed or unlisted files are dropped."""
    by_key: dict[tuple, list[dict]] = defaultdict(list)
    for row in rows:
        by_key[(row["path"], row["size"], row["mtime_ns"])].append(row)
    kept, todo = [], []
    for f in files:
        key = (str(f), *file_key(f))
        if by_key.get(key):
            kept.append(by_key[key].pop(0))
        else:
            todo.append(f)
    return kept, todo


def ordered(rows: list[dict], files: list) -> list[dict]:
    """Rows in the order of the listed files (the order of an uninterrupted run)."""
    positions: dict[str, list[int]] = defaultdict(list)
    for i, f in enumerate(files):
        positions[str(f)].append(i)
    seen: dict[str, int] = defaultdict(int)

    def index(row: dict) -> int:
        slots = positions.get(row["path"], [])
        k = seen[row["path"]]
        seen[row["path"]] += 1
        return slots[k] if k < len(slots) else len(files)

    keyed = [(index(row), n, row) for n, row in enumerate(rows)]
    keyed.sort(key=lambda t: (t[0], t[1]))
    return [row for _, _, row in keyed]


# --- final outputs -------------------------------------------------------------------------------------------

def write_csv(rows: Iterable[dict], path: Path) -> None:
    import csv

    from .modelfile import atomic_write

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(CSV_COLUMNS)
            for row in rows:
                out.writerow(csv_cells(row))
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


_FLOAT_COLUMNS = ("probability", "threshold", "guard_score")
_INT_COLUMNS = ("size", "mtime_ns")


def parquet_schema(columns=PARQUET_COLUMNS):
    """The Arrow types of the output columns (both engines, every file of a Ray run's folder)."""
    import pyarrow as pa

    return pa.schema([(k, pa.float64() if k in _FLOAT_COLUMNS else pa.int64() if k in _INT_COLUMNS else pa.string())
                      for k in columns])


def parquet_table(rows: list[dict], model_sha256: str):
    import pyarrow as pa

    columns = {k: [r[k] for r in rows] for k in CSV_COLUMNS + UID_COLUMNS}
    columns["model_sha256"] = [model_sha256] * len(rows)
    return pa.table({k: columns[k] for k in PARQUET_COLUMNS}, schema=parquet_schema())


def write_parquet(rows: list[dict], path: Path, model_sha256: str) -> None:
    import pyarrow.parquet as pq

    from .modelfile import atomic_write

    atomic_write(path, lambda tmp: pq.write_table(parquet_table(rows, model_sha256), tmp))


class ArchiveWriter:
    """Rows of a predict run: into the journal as they come; the final CSV and/or Parquet files at the end.

    ``destinations``: [(path, "csv" | "parquet")]; the journal sits beside the first. On an exception the journal
    stays (its rows are the finished work) and ``__exit__`` says how to continue."""

    def __init__(self, destinations: list[tuple[Path, str]], model, settings: dict, files: list, *,
                 resume: bool = False, quiet: bool = False):
        self.destinations = destinations
        self.model = model
        self.settings = settings
        self.files = files
        self.resume = resume
        self.quiet = quiet
        self.journal: Journal | None = None
        self.kept: list[dict] = []
        self.todo = list(files)
        self.resumed = False  # a journal was found and continued
        self.path = journal_path(destinations[0][0]) if destinations else None

    def open(self) -> ArchiveWriter:
        """Read (with --resume) or refuse an existing journal, then start appending. Nothing scored yet."""
        if self.path is None:
            return self
        found, rows = read_journal(self.path)
        if found is not None and not self.resume:
            raise PneumoscanError(f"{self.path}: partial results of an interrupted run ({len(rows)} rows) are "
                                  "there: add --resume to continue it, or remove the file to start again")
        self.resumed = found is not None
        if found is not None:
            check_resumable(self.path, found, self.settings)
            self.kept, self.todo = plan_resume(rows, self.files)
        for path, _ in self.destinations:
            path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.journal = Journal(self.path, self.settings, self.kept)
        except OSError as exc:
            raise PneumoscanError(f"{self.path}: cannot write there ({exc.strerror or exc})") from None
        return self

    def add(self, row: dict) -> None:
        if self.journal is not None:
            try:
                self.journal.add(row)
            except OSError as exc:
                raise PneumoscanError(f"{self.path}: cannot append a row ({exc.strerror or exc}); the "
                                      f"{self.journal.rows_written} rows before it are kept: free space, then "
                                      "rerun with --resume") from None

    def finish(self) -> None:
        if self.journal is None:
            return
        self.journal.close()
        _, rows = read_journal(self.path)
        rows = ordered(rows, self.files)
        for path, kind in self.destinations:
            try:
                if kind == "csv":
                    write_csv(rows, path)
                else:
                    write_parquet(rows, path, self.settings["model_sha256"])
            except OSError as exc:
                raise PneumoscanError(f"{path}: cannot write it ({exc.strerror or exc}); the rows are kept in "
                                      f"{self.path}: rerun with --resume") from None
        self.path.unlink(missing_ok=True)
        self.journal = None

    def abort(self) -> str | None:
        """Close after a failure; the line to print (where the finished rows are) or None."""
        if self.journal is None:
            return None
        n = self.journal.rows_written
        with suppress(OSError):
            self.journal.close()
        self.journal = None
        if n == 0:
            self.path.unlink(missing_ok=True)
            return None
        return f"{n} finished row(s) kept in {self.path}: rerun the same command with --resume to continue"


# --- the Ray engine ------------------------------------------------------------------------------------------

def _read_error(path: str, exc: BaseException) -> str:
    """The message ``Model.score_files`` gives a file it cannot read (the same text on both engines)."""
    from .data.images import ImageReadError

    if isinstance(exc, ImageReadError):
        return str(exc)
    return f"{path}: unreadable ({type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''})"


def _prepare_row(row: dict, shim, size: int) -> dict:
    """Ray task body: decode and preprocess one file with the model's own ``decode``/``prepare`` (``shim``: the
    model without its network, so only the record travels to the tasks)."""
    import numpy as np

    path = str(row["path"])
    st_size, mtime = file_key(path)
    out = {"path": path, "size": -1 if st_size is None else st_size, "mtime_ns": -1 if mtime is None else mtime,
           "reason": "", "has_reason": False, "error": "", **{k: "" for k in UID_COLUMNS}}
    try:
        decoded = shim.decode(path)
        small, reason = shim.prepare(decoded)
        out.update({k: v or "" for k, v in _uids(decoded.dicom).items()})
        out["reason"] = "" if reason is None else reason
        out["has_reason"] = reason is not None
    except (KeyboardInterrupt, SystemExit, GeneratorExit):
        raise
    except BaseException as exc:  # noqa: BLE001 - as Model.score_files: a decoder's panic too is that file's row
        out["error"] = _read_error(path, exc)
        small = np.zeros((size, size), np.uint8)
    out["pixels"] = np.ascontiguousarray(small, dtype=np.uint8)
    return out


class _Scorer:
    """Ray actor: loads the model once, then scores batches with ``Model.score`` and decides with
    ``Model.result``."""

    def __init__(self, model_path, backend, precision, prevalence, max_pixels, threshold, tta, threads, device,
                 pid_dir=None):
        from . import allocator

        allocator.tune()  # a worker process of its own: the command line's settings (huge pages if torch is not loaded yet)
        import torch

        from .predict import load_model

        if threads:
            torch.set_num_threads(int(threads))
        self.model = load_model(model_path, backend=backend, precision=precision, prevalence=prevalence,
                                max_pixels=max_pixels, device=device)
        self.op = self.model.resolve_threshold(threshold)
        self.tta = tta
        self.pid_dir, self.batches = pid_dir, 0
        if pid_dir:  # tests: which processes are the actors, and how far each got
            Path(pid_dir, f"{os.getpid()}.pid").write_text(str(os.getpid()))

    def __call__(self, batch: dict) -> dict:
        import numpy as np

        from .predict import Prediction

        n = len(batch["path"])
        ok = [i for i in range(n) if not batch["error"][i]]
        if ok:
            scores = self.model.score(np.stack([batch["pixels"][i] for i in ok]), tta=self.tta)
        out = {k: [] for k in ROW_KEYS}
        j = 0
        for i in range(n):
            path = str(batch["path"][i])
            if batch["error"][i]:
                pred = Prediction(path, None, None, self.op[0], self.op[1], "error", str(batch["error"][i]))
            else:
                reason = str(batch["reason"][i]) if batch["has_reason"][i] else None
                pred = self.model.result(path, scores.logits[j], float(scores.guard[j]), self.op, reason)
                j += 1
            row = make_row(pred, int(batch["size"][i]), int(batch["mtime_ns"][i]))
            for k in UID_COLUMNS:
                row[k] = str(batch[k][i])
            for k in ROW_KEYS:
                out[k].append(row[k])
        out["model_sha256"] = [self.model.sha256] * n
        if self.pid_dir:
            self.batches += 1
            Path(self.pid_dir, f"{os.getpid()}.batches").write_text(str(self.batches))
        return _typed(out)


# Ray columns have one type each, whatever a batch holds (a batch of only error rows included): NaN, -1 or ""
# where a figure does not apply; ``ray_row`` turns a Dataset row back into the journal row (None there).
_FLOAT_KEYS = _FLOAT_COLUMNS
_INT_KEYS = _INT_COLUMNS
_NULLABLE_STR_KEYS = ("decision", *UID_COLUMNS)
RAY_COLUMNS = [*ROW_KEYS, "model_sha256"]


def _typed(columns: dict[str, list]):
    """An Arrow table of fixed schema (``parquet_schema(RAY_COLUMNS)``): every block, and every part file of a
    Ray run, has the same column types whatever its rows."""
    import pyarrow as pa

    out = {}
    for k, values in columns.items():
        if k in _FLOAT_KEYS:
            out[k] = [float("nan") if v is None else float(v) for v in values]
        elif k in _INT_KEYS:
            out[k] = [-1 if v is None else int(v) for v in values]
        else:
            out[k] = ["" if v is None else str(v) for v in values]
    return pa.table(out, schema=parquet_schema(list(columns)))


def ray_row(item) -> dict:
    """The journal row (None where a figure does not apply) of a row of ``predictions_dataset``."""
    row = {}
    for k in ROW_KEYS:
        value = _plain(item[k])
        if (k in _INT_KEYS and value == -1) or (k in _NULLABLE_STR_KEYS and value == ""):
            value = None
        row[k] = value
    return row


def predictions_dataset(paths, model=None, *, backend: str = "torch", precision: str = "auto",
                        prevalence: float | None = None, max_pixels: int | None = None,
                        threshold: str | float = "screening", tta: bool = False, batch_size: int | None = None,
                        num_cpus: float = 1, num_gpus: float = 0, concurrency: int = 1,
                        _pid_dir: str | None = None):
    """A Ray Dataset of predictions for ``paths``: a list of paths or a Ray Dataset with a ``path`` column (paths
    every node can read: a shared file system). Columns: path, probability, decision, operating_point, threshold,
    status, message, guard_score, size, mtime_ns, the three DICOM UIDs and model_sha256, each of one type: NaN,
    -1 or "" where a figure does not apply (``ray_row`` gives the row with None there).

    Files are decoded and preprocessed in Ray tasks and scored in a pool of ``concurrency`` actors, each loading
    the model once with ``num_cpus``/``num_gpus`` of resources. Lazy: nothing runs before it is consumed
    (``iter_rows``, ``write_parquet``, ...). A killed actor is restarted and its batches retried.

    ``model``: a model file / run folder path, None for the bundled model, or a loaded Model (its file is
    reloaded in each actor with the same settings)."""
    require_ray()
    import ray

    _settle_fsspec_http()
    from .constants import BATCH_SIZE
    from .data.images import MAX_PIXELS
    from .predict import Model, load_model

    if isinstance(model, Model):
        loaded = model
        model_path = str(model.path)
    else:
        model_path = None if model is None else str(model)
        loaded = load_model(model_path, backend=backend, precision=precision, prevalence=prevalence,
                            max_pixels=max_pixels or MAX_PIXELS)
    loaded.resolve_threshold(threshold)  # a bad threshold fails here, not in every actor
    if isinstance(paths, ray.data.Dataset):
        ds = paths
        if "path" not in ds.columns():
            raise PneumoscanError(f"the Dataset needs a 'path' column, it has {ds.columns()}")
        ds = ds.select_columns(["path"])
    else:
        ds = ray.data.from_items([{"path": str(p)} for p in paths])
    shim = Model(loaded.record, None, None, loaded.path, loaded.sha256, max_pixels=loaded.max_pixels)
    # Decoding in tasks, each reserving about what a worker decoding a large radiograph holds (DECODE_MEMORY;
    # a 50 MP image is 200 MB of float32 pixels, larger ones are reduced while decoding). Resources that
    # differ from the actors' also keep Ray Data from fusing this stage into the actor pool, where decoding
    # would run inside the scoring actors (on GPU nodes: CPU work on the GPU actors).
    prepared = ds.map(_prepare_row, fn_kwargs={"shim": shim, "size": loaded.preprocessing.size}, num_cpus=1,
                      memory=DECODE_MEMORY)
    backend_used = getattr(loaded.backend, "name", backend)
    precision_used = getattr(loaded.backend, "precision", None) or precision
    device = "cuda" if num_gpus and num_gpus > 0 else "cpu"
    # Ray Data restarts a dead actor and retries its batches (max_restarts=-1, max_task_retries=-1 are its
    # defaults for map_batches actors), and retries failed tasks: a killed worker costs time, not rows.
    return prepared.map_batches(
        _Scorer, batch_size=batch_size or BATCH_SIZE, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=num_cpus, num_gpus=num_gpus or None,
        fn_constructor_args=(model_path, backend_used, precision_used, loaded.prevalence, loaded.max_pixels,
                             threshold, tta, max(1, int(num_cpus)), device, _pid_dir))


def predict_ray(model, paths: list, *, threshold="screening", batch_size: int, tta: bool = False,
                num_cpus: float = 1, num_gpus: float = 0, concurrency: int = 1, backend: str = "torch",
                precision: str = "auto") -> Iterator[tuple[object, dict]]:
    """(Prediction, journal row) per file through the Ray engine, in completion order."""
    from .predict import Prediction

    if not paths:
        return
    ds = predictions_dataset(paths, model, backend=backend, precision=precision, threshold=threshold, tta=tta,
                             batch_size=batch_size, num_cpus=num_cpus, num_gpus=num_gpus,
                             concurrency=concurrency)
    for item in ds.iter_rows():
        row = ray_row(item)
        pred = Prediction(row["path"], row["probability"], row["decision"], row["operating_point"],
                          row["threshold"], row["status"], row["message"], row["guard_score"])
        yield pred, row


def _plain(value):
    """numpy scalars from Ray batches as Python values (JSON-ready)."""
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and value != value:  # NaN: no figure
        return None
    return value


# --- joining a cluster ---------------------------------------------------------------------------------------

def check_reachable(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in one line, within ``timeout`` seconds, when nothing accepts a TCP connection at the cluster address:
    ``ray.init`` would wait for that GCS forever. (Something that accepts the connection but is not a GCS, e.g. a
    proxy, is left to ``ray.init``, which gives up after its ``py_gcs_connect_timeout_s``, 20 s, logging a
    warning per retry.) ``None``/"local" start a local instance (nothing to check);
    "auto" is checked at the address of the instance ``ray start`` recorded on this machine, when there is one."""
    given = address
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        return
    default_port = 6379
    hostport = address
    if address.startswith("ray://"):
        hostport, default_port = address[len("ray://"):], 10001
    elif address == "auto":
        try:
            from ray._private.services import find_bootstrap_address

            hostport = find_bootstrap_address(None)
        except Exception:  # noqa: BLE001 - Ray's own lookup then says what it found
            return
        if not hostport:
            return  # nothing recorded: ray.init says "no running instance" at once
    host, sep, port = hostport.rstrip("/").rpartition(":")
    if not sep:
        host, port = hostport.rstrip("/"), str(default_port)
    option = f"--address {given}" if given else f"RAY_ADDRESS {address}"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (getattr(exc, "strerror", None) or str(exc))
        raise PneumoscanError(f"cannot reach the Ray cluster at {option}: {host}:{port} did not accept a "
                              f"connection within {timeout:g} s ({why}); start one there (`ray start --head`) "
                              "or fix the address") from None


def _settle_fsspec_http() -> None:
    """Ray Data resolves every path through ``from fsspec.implementations.http import HTTPFileSystem`` and
    tolerates only ModuleNotFoundError. Where fsspec is installed without aiohttp, that import fails, and one
    racing another import of it (Ray's executor threads) raises a plain ImportError that fails the read or write.
    Import it once here; if it cannot be imported, mark it absent so every later import fails the tolerated way."""
    import sys

    try:
        import fsspec.implementations.http  # noqa: F401
    except ImportError:
        sys.modules["fsspec.implementations.http"] = None  # type: ignore[assignment]


@contextmanager
def ray_session(address: str | None = None, quiet: bool = False):
    """Ray for one CLI run: the cluster at ``address`` (checked first, see ``check_reachable``) or a local
    instance, shut down afterwards; an instance already running in this process is used as it is."""
    require_ray()
    import ray

    started = not ray.is_initialized()
    if started:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=not quiet, include_dashboard=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:  # no cluster there, a bad address
            where = f"the Ray cluster at --address {address}" if address else "a local Ray instance"
            raise PneumoscanError(f"cannot start or join {where} ({str(exc).splitlines()[0][:200]})") from None
    try:
        import logging
        import sys

        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = not quiet and sys.stderr.isatty()
        if quiet:  # only errors on stderr: no execution plans, progress logs or memory advice
            logging.getLogger("ray.data").setLevel(logging.ERROR)
            context.issue_detectors_config.detectors = []
        yield ray
    finally:
        if started:
            ray.shutdown()


# --- a Ray run's Parquet folder ------------------------------------------------------------------------------

def parts_path(destination: str | Path) -> Path:
    destination = Path(destination)
    return destination.with_name(destination.name + PARTS_SUFFIX)


def _part_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix == ".parquet" and not p.name.startswith((".", "_")))


def _readable_parts(folder: Path) -> tuple[list[Path], list[Path]]:
    """(complete part files, torn ones): a file cut short by a crash has no footer and does not open."""
    import pyarrow.parquet as pq

    good, torn = [], []
    for path in _part_files(folder):
        try:
            pq.read_metadata(path)
            good.append(path)
        except Exception:  # noqa: BLE001 - pyarrow's ArrowInvalid (an OSError subclass or not) for a torn file
            torn.append(path)
    return good, torn


def _published(table):
    """A part file's rows as the local engine writes them: its Parquet columns, null where a figure does not
    apply (the parts hold NaN and "" there, so that every block has one type)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    columns = []
    for name in PARQUET_COLUMNS:
        col = table.column(name)
        if name == "probability":
            col = pc.if_else(pc.is_nan(col), pa.scalar(None, pa.float64()), col)
        elif name in _NULLABLE_STR_KEYS:
            col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=parquet_schema())


class RayParquetFolder:
    """The output of ``--engine ray --out DEST``: a folder of Parquet files written by Ray Data.

    Ray writes every journal column into ``DEST.parts/`` (one file per block, a settings file beside them);
    ``--resume`` keeps the rows of its complete files (and of a local run's ``DEST.partial`` journal) whose file
    is unchanged, in one ``kept-*.parquet`` file, and Ray scores the rest. ``finish`` rewrites the parts, with
    the local engine's columns, into a hidden sibling folder that is renamed to DEST."""

    def __init__(self, destination: str | Path, settings: dict, files: list, *, csv_path: str | Path | None = None,
                 resume: bool = False):
        self.destination = Path(destination)
        self.parts = parts_path(destination)
        self.journal = journal_path(destination)  # a local run's journal: resumed from as well
        self.settings = settings
        self.files = files
        self.csv_path = Path(csv_path) if csv_path else None
        self.resume = resume
        self.kept: list[dict] = []
        self.todo = list(files)
        self.resumed = False
        self.kept_file: Path | None = None

    def open(self) -> RayParquetFolder:
        """Read (with --resume) or refuse earlier partial results, leave ``DEST.parts/`` holding the settings
        and the kept rows only. Nothing scored yet."""
        have_parts, have_journal = self.parts.exists(), self.journal.exists()
        if (have_parts or have_journal) and not self.resume:
            where = self.parts if have_parts else self.journal
            raise PneumoscanError(f"{where}: partial results of an interrupted run are there: add --resume to "
                                  "continue it, or remove it to start again")
        rows: list[dict] = []
        old: list[Path] = []
        if have_parts:
            found = self._read_settings()
            check_resumable(self.parts, found, self.settings)
            good, torn = _readable_parts(self.parts)
            rows += [r for path in good for r in _part_rows(path)]
            old = good + torn
        if have_journal:
            found, journal_rows = read_journal(self.journal)
            if found is not None:
                check_resumable(self.journal, found, self.settings)
                rows += journal_rows
        self.resumed = have_parts or have_journal
        if self.resumed:
            self.kept, self.todo = plan_resume(rows, self.files)
        try:
            if not have_parts:
                self._create_parts()
            if self.kept:  # one file of kept rows, in place atomically; then the files it replaces go
                self.kept_file = self.parts / f"{KEPT_PREFIX}{uuid.uuid4().hex}.parquet"
                _write_part(self.kept, self.kept_file, self.settings["model_sha256"])
            for path in old:
                path.unlink(missing_ok=True)
            fsync_dir(self.parts)
            self.journal.unlink(missing_ok=True)  # its kept rows are in the kept file now
        except OSError as exc:
            raise PneumoscanError(f"{self.parts}: cannot write there ({exc.strerror or exc})") from None
        return self

    def _read_settings(self) -> dict:
        try:
            found = json.loads((self.parts / PARTS_SETTINGS).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            found = None
        if not isinstance(found, dict) or found.get("format") != PARTS_FORMAT:
            raise PneumoscanError(f"{self.parts}: not the partial results of a pneumoscan Ray run; remove it or "
                                  "choose another --out")
        return found

    def _create_parts(self) -> None:
        """``DEST.parts/`` with its settings file, created whole (a hidden folder renamed into place)."""
        self.parts.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.parts.with_name(f".{self.parts.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        with open(tmp / PARTS_SETTINGS, "w", encoding="utf-8") as f:
            f.write(json.dumps({"format": PARTS_FORMAT, **self.settings}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        os.rename(tmp, self.parts)
        fsync_dir(self.parts.parent)

    def rows_kept(self) -> int:
        """Rows in the complete part files now: the finished work an interruption leaves."""
        import pyarrow.parquet as pq

        if not self.parts.is_dir():
            return 0
        return sum(pq.read_metadata(p).num_rows for p in _readable_parts(self.parts)[0])

    def write(self, dataset) -> None:
        """Run ``dataset`` (``predictions_dataset``) to its end, its blocks written as part files by Ray. A
        failure inside Ray (a worker's full disk, a lost node) is one line; the complete part files stay."""
        import ray

        try:
            dataset.write_parquet(str(self.parts))
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            why = getattr(cause, "strerror", None) or str(cause).strip().splitlines()[-1][:200]
            raise PneumoscanError(f"{self.parts}: the Ray run failed ({type(cause).__name__}: {why}); "
                                  "its finished rows are kept there: rerun with --resume") from None

    def new_rows(self) -> Iterator[dict]:
        """The journal rows this run scored, read back file by file (never all at once)."""
        for path in _readable_parts(self.parts)[0]:
            if path != self.kept_file:
                yield from _part_rows(path)

    def finish(self) -> None:
        """The CSV (when asked) and the folder at DEST, both complete or absent; then the parts go.

        Each part file is rewritten with the local engine's columns, batch by batch (pyarrow; a result row is
        about 100 bytes, so this is seconds for a million rows and never holds them all), into a hidden sibling
        folder that is renamed to DEST. (Ray's read_parquet is not used here: its threaded path listing trips over
        an fsspec without aiohttp, see ``_settle_fsspec_http``.)"""
        import pyarrow as pa
        import pyarrow.parquet as pq

        parent = self.destination.parent
        tmp = parent / f".{self.destination.name}.{os.getpid()}.writing"
        old = parent / f".{self.destination.name}.{os.getpid()}.old"
        try:
            for left in parent.glob(f".{self.destination.name}.*.writing"):  # a crash while publishing
                shutil.rmtree(left, ignore_errors=True)
            tmp.mkdir()
            good, torn = _readable_parts(self.parts)  # torn: a writer killed mid-file; Ray's retry rewrote its
            for path in torn:  # block under the same name, or (a crashed run) resume scored it again
                path.unlink(missing_ok=True)
            for i, part in enumerate(good):
                target = tmp / f"part-{i:05d}.parquet"
                with pq.ParquetWriter(target, parquet_schema()) as out:
                    for batch in pq.ParquetFile(part).iter_batches(columns=RAY_COLUMNS):
                        out.write_table(_published(pa.Table.from_batches([batch])))
                with open(target, "rb") as f:  # on the disk before the folder is renamed into place
                    os.fsync(f.fileno())
            fsync_dir(tmp)
            if self.csv_path is not None:
                write_csv(ordered(pq.read_table(tmp, columns=CSV_COLUMNS).to_pylist(), self.files), self.csv_path)
            if self.destination.exists():
                os.rename(self.destination, old)  # a folder cannot replace another in one rename
            os.rename(tmp, self.destination)
            fsync_dir(parent)
        except (OSError, pa.ArrowException) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not self.destination.exists():
                os.rename(old, self.destination)
            why = getattr(exc, "strerror", None) or str(exc).splitlines()[0][:200]
            raise PneumoscanError(f"{self.destination}: cannot write it ({why}); the rows are kept in "
                                  f"{self.parts}: rerun with --resume") from None
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
        shutil.rmtree(self.parts, ignore_errors=True)


def _part_rows(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(columns=RAY_COLUMNS):
        for item in batch.to_pylist():
            yield ray_row(item)


def _write_part(rows: list[dict], path: Path, model_sha256: str) -> None:
    """Journal rows as one part file (the parts' types), complete at its name or absent."""
    import pyarrow.parquet as pq

    columns = {k: [r[k] for r in rows] for k in ROW_KEYS}
    columns["model_sha256"] = [model_sha256] * len(rows)
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(_typed(columns), tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def predict_ray_folder(model, files: list, destination: str | Path, *, emit: Callable[[object], None],
                       csv_path=None, resume: bool = False, threshold="screening", tta: bool = False,
                       batch_size: int, num_cpus: float = 1, num_gpus: float = 0, concurrency: int = 1,
                       backend: str = "torch", precision: str = "auto", address: str | None = None,
                       quiet: bool = False, on_open: Callable[[RayParquetFolder], None] | None = None
                       ) -> list[dict]:
    """``pneumoscan predict --engine ray --out DEST``: the Parquet folder written by Ray (``RayParquetFolder``);
    ``emit(prediction)`` for each newly scored row once they are all written. Returns the kept rows (resume).
    Interrupted, it says where the finished rows are and how to continue."""
    import sys

    from .predict import Prediction

    folder = RayParquetFolder(destination, run_settings(model, threshold, tta), files, csv_path=csv_path,
                              resume=resume)
    created = not folder.parts.exists()
    folder.open()
    if on_open is not None:
        on_open(folder)
    try:
        with ray_session(address, quiet):
            if folder.todo:
                folder.write(predictions_dataset(
                    folder.todo, model, backend=backend, precision=precision, threshold=threshold, tta=tta,
                    batch_size=batch_size, num_cpus=num_cpus, num_gpus=num_gpus, concurrency=concurrency))
            for row in folder.new_rows():
                emit(Prediction(row["path"], row["probability"], row["decision"], row["operating_point"],
                                row["threshold"], row["status"], row["message"], row["guard_score"]))
            folder.finish()
    except BaseException:
        with suppress(Exception):
            n = folder.rows_kept()
            if n == 0 and created:  # e.g. no cluster there: nothing to keep, leave nothing behind
                shutil.rmtree(folder.parts, ignore_errors=True)
            elif n:
                print(f"pneumoscan: {n} finished row(s) kept in {folder.parts}: rerun the same command with "
                      "--resume to continue", file=sys.stderr)
        raise
    return folder.kept
