"""Screening an archive: resumable runs whose rows say how they were made, on this machine or on Ray.

One idea per module:
  rows.py      what a row holds (the decision, the file's identity, DICOM UIDs, how it was made) and its columns
  journal.py   the crash-safe journal ``DEST.partial``, the run settings a resume must match, resume planning
  outputs.py   the final CSV and Parquet files, and the checks that they can be written
  local.py     the local engine: the pipeline stage (``Model.predict_files``) into the journal (``ArchiveWriter``)
  ray.py       the Ray Data engine: the stage's ``prepare`` in tasks, its ``decide`` in actors; joining a cluster
  parts.py     a Ray run's Parquet folder (``DEST.parts/`` while it runs, ``DEST`` once it has finished)

Both engines give the same row per file. The names callers use are importable from here; those of ``ray.py`` and
``parts.py`` load on first use, so a run without Ray never imports them.
"""

from __future__ import annotations

from importlib import import_module

from .journal import (
    FSYNC_ROWS,
    FSYNC_SECONDS,
    JOURNAL_FORMAT,
    JOURNAL_SUFFIX,
    Journal,
    check_resumable,
    file_key,
    journal_path,
    ordered,
    plan_resume,
    read_journal,
    run_settings,
)
from .local import ArchiveWriter, predict_local
from .outputs import (
    OUTPUT_SUFFIXES,
    PARQUET_HINT,
    check_output_folder,
    output_kind,
    parquet_schema,
    parquet_table,
    require_pyarrow,
    write_csv,
    write_parquet,
)
from .rows import (
    CSV_COLUMNS,
    FACT_COLUMNS,
    MADE_KEYS,
    PARQUET_COLUMNS,
    ROW_KEYS,
    UID_COLUMNS,
    csv_cells,
    how_made,
    make_row,
    screened_row,
)

_LAZY = {
    "ray": ("CLUSTER_HINT", "CONNECT_TIMEOUT_S", "DECODE_MEMORY", "check_reachable", "predict_ray",
            "predict_ray_folder", "predictions_dataset", "ray_session", "require_ray"),
    "parts": ("KEPT_PREFIX", "PARTS_FORMAT", "PARTS_SETTINGS", "PARTS_SUFFIX", "RAY_COLUMNS", "RayParquetFolder",
              "parts_path", "ray_row"),
}
_LAZY_NAMES = {name: module for module, names in _LAZY.items() for name in names}

__all__ = [
    "ArchiveWriter", "CSV_COLUMNS", "FACT_COLUMNS", "FSYNC_ROWS", "FSYNC_SECONDS", "JOURNAL_FORMAT", "JOURNAL_SUFFIX", "Journal",
    "MADE_KEYS", "OUTPUT_SUFFIXES", "PARQUET_COLUMNS", "PARQUET_HINT", "ROW_KEYS", "UID_COLUMNS",
    "check_output_folder", "check_resumable", "csv_cells", "file_key", "how_made", "journal_path", "make_row",
    "ordered", "output_kind", "parquet_schema", "parquet_table", "plan_resume", "predict_local", "read_journal",
    "require_pyarrow", "run_settings", "screened_row", "write_csv", "write_parquet", *_LAZY_NAMES,
]


def __getattr__(name: str):
    """The Ray engine's names, imported when first asked for (PEP 562)."""
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{module}", __name__), name)
