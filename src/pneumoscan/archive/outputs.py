"""The final files of an archive run: which kind a name asks for, whether it can be written, and the writers.

A run's final files (CSV, Parquet) are written only at its end, from the journal, in input order, each complete
at its name or absent (``durable.atomic_write``, which gives them the permission policy's mode). The checks here
run before the model loads, so a bad destination costs nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path

from ..durable import atomic_write, check_writable
from ..errors import PneumoscanError
from .rows import CSV_COLUMNS, FLOAT_COLUMNS, INT_COLUMNS, PARQUET_COLUMNS, csv_cells

OUTPUT_SUFFIXES = (".csv", ".parquet")
PARQUET_HINT = "pip install pyarrow (or 'pneumoscan[cluster]')"


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
    target = Path(path)
    if target.is_dir():
        other = sorted(p.name for p in target.iterdir() if p.suffix != ".parquet" or not p.is_file())
        if other:
            raise PneumoscanError(f"{target}: {option} names a folder that holds other things than Parquet files "
                                  f"({', '.join(other[:3])}{', ...' if len(other) > 3 else ''}); give a new name")
    elif target.exists() and not target.is_file():
        raise PneumoscanError(f"{target}: {option} names something that is neither a file nor a folder")
    check_writable(target.parent, target, option)


def require_pyarrow(why: str = "--out .parquet") -> None:
    try:
        import pyarrow  # noqa: F401
        import pyarrow.parquet  # noqa: F401
    except ImportError:
        raise PneumoscanError(f"{why} needs pyarrow, which is not installed: {PARQUET_HINT}") from None


def write_csv(rows: Iterable[dict], path: Path) -> None:
    import csv

    def write(tmp):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(CSV_COLUMNS)
            for row in rows:
                out.writerow(csv_cells(row))
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)


def parquet_schema(columns=PARQUET_COLUMNS):
    """The Arrow types of the output columns (both engines, every file of a Ray run's folder)."""
    import pyarrow as pa

    return pa.schema([(k, pa.float64() if k in FLOAT_COLUMNS else pa.int64() if k in INT_COLUMNS else pa.string())
                      for k in columns])


def parquet_table(rows: list[dict]):
    import pyarrow as pa

    return pa.table({k: [r.get(k) for r in rows] for k in PARQUET_COLUMNS}, schema=parquet_schema())


def write_parquet(rows: list[dict], path: Path) -> None:
    import pyarrow.parquet as pq

    atomic_write(path, lambda tmp: pq.write_table(parquet_table(rows), tmp))
