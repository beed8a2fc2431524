"""The local engine: the pipeline stage on this machine, its rows into the journal, the final files at the end.

``predict_local`` streams files through ``pipeline.screen`` (what ``Model.predict_files`` wraps) and adds only
what a row needs beyond the decision: the file's identity, read before the file is; its DICOM identifiers and
facts come with the stage's result. ``ArchiveWriter`` owns a run's journal and final files.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from contextlib import suppress
from pathlib import Path

from .. import pipeline
from ..errors import PneumoscanError
from .journal import Journal, check_resumable, file_key, journal_path, ordered, plan_resume, read_journal
from .outputs import write_csv, write_parquet
from .rows import MADE_KEYS, how_made, screened_row


def predict_local(model, paths: list, *, threshold="screening", batch_size: int, tta: bool = False
                  ) -> Iterator[tuple[pipeline.Screened, dict]]:
    """(the stage's Screened result, journal row) per file, in order, through the pipeline stage.

    A file's size and mtime are read as it is handed to decoding (before it is read, so a file that changes
    later is scored again on --resume), its DICOM identifiers as it is decoded."""
    keys: dict[str, list] = defaultdict(list)
    made = how_made(model)

    def listed():
        for path in paths:
            keys[str(path)].append(file_key(path))
            yield str(path)

    for screened in pipeline.screen(model, listed(), threshold=threshold, batch_size=batch_size, tta=tta):
        path = screened.prediction.path
        yield screened, screened_row(screened, *(_first(keys, path) or file_key(path)), made)


def _first(entries: dict[str, list], path: str):
    """Pop the oldest entry recorded for ``path`` (a path listed twice has one per listing), or None."""
    found = entries.get(path)
    if not found:
        return None
    value = found.pop(0)
    if not found:
        del entries[path]
    return value


class ArchiveWriter:
    """Rows of a predict run: into the journal as they come; the final CSV and/or Parquet files at the end.

    ``destinations``: [(path, "csv" | "parquet")]; the journal sits beside the first. On an exception the journal
    stays (its rows are the finished work) and ``abort`` says how to continue."""

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
        self._made = {k: settings[k] for k in MADE_KEYS}

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
        """Journal one row; a row made without ``how_made`` (``make_row`` alone) gets this run's."""
        if self.journal is not None:
            row = {**self._made, **row}
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
                    write_parquet(rows, path)
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
