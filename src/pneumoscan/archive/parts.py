"""The output of ``--engine ray --out DEST``: a folder of Parquet files, complete at its name or absent.

While scoring, Ray Data writes the rows (every journal column) into ``DEST.parts/``, one file per block, a
settings file beside them; a file torn by a crash has no Parquet footer and is dropped. ``--resume`` keeps the
rows of its complete files (and of a local run's ``DEST.partial`` journal) whose file is unchanged, after the same
settings check as the journal's. At the end each part is rewritten, file by file, with the local engine's columns
and nulls, into a hidden sibling folder that is renamed to ``DEST``.

Part columns have one type each whatever a block holds (a block of only error rows included): NaN, -1 or "" where
a figure does not apply; ``ray_row`` turns such a row back into the journal row (None there). Ray's workers write
the part files with their own umask (on a cluster, another machine's); the driver gives each the permission
policy's mode as soon as the write returns, in a folder that already had it.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

from ..durable import atomic_write, file_mode, fsync_dir
from ..errors import PneumoscanError
from .journal import check_format, check_resumable, journal_path, ordered, plan_resume, read_journal
from .outputs import parquet_schema, write_csv
from .rows import (
    CSV_COLUMNS,
    FACT_COLUMNS,
    FLOAT_COLUMNS,
    INT_COLUMNS,
    PARQUET_COLUMNS,
    ROW_KEYS,
    UID_COLUMNS,
)

PARTS_SUFFIX = ".parts"
PARTS_FORMAT = "pneumoscan-parts/2"  # 2: as the journal's format 2
PARTS_SETTINGS = "_pneumoscan.json"  # "_" prefix: pyarrow's and Ray's dataset readers skip it
KEPT_PREFIX = "kept-"
RAY_COLUMNS = ROW_KEYS  # what a part file holds
_NULLABLE_STR_KEYS = ("decision", *UID_COLUMNS, *(k for k in FACT_COLUMNS if k not in FLOAT_COLUMNS + INT_COLUMNS))


def parts_path(destination: str | Path) -> Path:
    destination = Path(destination)
    return destination.with_name(destination.name + PARTS_SUFFIX)


def typed(columns: dict[str, list]):
    """An Arrow table of fixed schema (``parquet_schema(list(columns))``): every block, and every part file of a
    Ray run, has the same column types whatever its rows."""
    import pyarrow as pa

    out = {}
    for k, values in columns.items():
        if k in FLOAT_COLUMNS:
            out[k] = [float("nan") if v is None else float(v) for v in values]
        elif k in INT_COLUMNS:
            out[k] = [-1 if v is None else int(v) for v in values]
        else:
            out[k] = ["" if v is None else str(v) for v in values]
    return pa.table(out, schema=parquet_schema(list(columns)))


def ray_row(item) -> dict:
    """The journal row (None where a figure does not apply) of a part row or a ``predictions_dataset`` row."""
    row = {}
    for k in ROW_KEYS:
        value = _plain(item[k])
        if (k in INT_COLUMNS and value == -1) or (k in _NULLABLE_STR_KEYS and value == ""):
            value = None
        row[k] = value
    return row


def _plain(value):
    """numpy scalars from Ray batches as Python values (JSON-ready); NaN as None (no figure)."""
    if hasattr(value, "item") and not isinstance(value, str | bytes):
        value = value.item()
    if isinstance(value, float) and value != value:
        return None
    return value


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
        if name not in table.column_names:  # heatmap: a Ray run's parts have none
            columns.append(pa.nulls(table.num_rows, pa.string()))
            continue
        col = table.column(name)
        if name in FLOAT_COLUMNS:
            col = pc.if_else(pc.is_nan(col), pa.scalar(None, pa.float64()), col)
        elif name in INT_COLUMNS:
            col = pc.if_else(pc.equal(col, -1), pa.scalar(None, pa.int64()), col)
        elif name in _NULLABLE_STR_KEYS:
            col = pc.if_else(pc.equal(col, ""), pa.scalar(None, pa.string()), col)
        columns.append(col)
    return pa.Table.from_arrays(columns, schema=parquet_schema())


def _part_rows(path: Path) -> Iterator[dict]:
    import pyarrow.parquet as pq

    for batch in pq.ParquetFile(path).iter_batches(columns=RAY_COLUMNS):
        for item in batch.to_pylist():
            yield ray_row(item)


def _write_part(rows: list[dict], path: Path) -> None:
    """Journal rows as one part file (the parts' types), complete at its name or absent."""
    import pyarrow.parquet as pq

    table = typed({k: [r[k] for r in rows] for k in RAY_COLUMNS})
    atomic_write(path, lambda tmp: _durably(tmp, lambda: pq.write_table(table, tmp)))


def _durably(path, write) -> None:
    write()
    with open(path, "rb") as f:
        os.fsync(f.fileno())


class RayParquetFolder:
    """``DEST.parts/`` while a Ray run writes, ``DEST`` once it has finished (see the module's docstring)."""

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
                _write_part(self.kept, self.kept_file)
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
        check_format(self.parts, found, PARTS_FORMAT, "not the partial results of a pneumoscan Ray run; remove it "
                     "or choose another --out")
        return found

    def _create_parts(self) -> None:
        """``DEST.parts/`` with its settings file, created whole (a hidden folder renamed into place)."""
        self.parts.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.parts.with_name(f".{self.parts.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        text = json.dumps({"format": PARTS_FORMAT, **self.settings}) + "\n"
        atomic_write(tmp / PARTS_SETTINGS, lambda f: _durably(f, lambda: Path(f).write_text(text, "utf-8")))
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
        finally:
            self._own_parts()

    def _own_parts(self) -> None:
        """The permission policy's mode for the part files Ray's workers wrote (with their own umask)."""
        mode = file_mode()
        for path in _part_files(self.parts) if self.parts.is_dir() else []:
            try:
                os.chmod(path, mode)
            except OSError:  # gone (a retried block's file replaced) or not ours: ``finish`` rewrites it anyway
                continue

    def new_rows(self) -> Iterator[dict]:
        """The journal rows this run scored, read back file by file (never all at once)."""
        for path in _readable_parts(self.parts)[0]:
            if path != self.kept_file:
                yield from _part_rows(path)

    def finish(self) -> None:
        """The CSV (when asked) and the folder at DEST, both complete or absent; then the parts go.

        Each part file is rewritten with the local engine's columns, batch by batch (pyarrow; a result row is
        about 150 bytes, so this is seconds for a million rows and never holds them all), into a hidden sibling
        folder that is renamed to DEST. (Ray's read_parquet is not used here: its threaded path listing trips over
        an fsspec without aiohttp, see ``ray._settle_fsspec_http``.)"""
        import pyarrow as pa
        import pyarrow.parquet as pq

        parent = self.destination.parent
        tmp = parent / f".{self.destination.name}.{os.getpid()}.writing"
        old = parent / f".{self.destination.name}.{os.getpid()}.old"
        mode = file_mode()
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
                os.chmod(target, mode)
                with open(target, "rb") as f:  # on the disk before the folder is renamed into place
                    os.fsync(f.fileno())
            fsync_dir(tmp)
            if self.csv_path is not None:
                write_csv(ordered(self._published_rows(tmp), self.files), self.csv_path)
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

    @staticmethod
    def _published_rows(folder: Path) -> list[dict]:
        """The published folder's rows with the CSV's columns (Parquet nulls as the journal's None)."""
        import pyarrow.parquet as pq

        return pq.read_table(folder, columns=CSV_COLUMNS).to_pylist()
