"""The journal of finished rows, and resuming from it without mixing two runs' answers.

Every finished row is appended to ``DEST.partial`` (JSON Lines: one row per line, so a row torn by SIGKILL is
recognisable and dropped), flushed at once and fsynced every ``FSYNC_ROWS`` rows or ``FSYNC_SECONDS``. The
journal's first line records everything that decides a row's values (``run_settings``: the model's sha256, the
operating point and threshold, test-time augmentation, the network's arithmetic, the prevalence and the pixel
limit, the calibration in force). ``--resume`` continues a journal only when this run has the same
(``check_resumable`` names the option that differs), and keeps only the rows whose file still has the same path,
size and modification time (``plan_resume``): one output never mixes two models' or two calibrations' answers,
and never holds the answer for a file that has changed since.
"""

from __future__ import annotations

import json
import os
import time
from collections import defaultdict
from pathlib import Path

from ..durable import atomic_write, fsync_dir
from ..errors import PneumoscanError
from .rows import ROW_KEYS

JOURNAL_SUFFIX = ".partial"
JOURNAL_FORMAT = "pneumoscan-journal/2"  # 2: the settings record the calibration options, rows how they were made
FSYNC_ROWS = 64
FSYNC_SECONDS = 2.0

# run settings a resume must match: (key, the option that sets it), after the model's sha256; the prevalence
# before the threshold, as it moves the named thresholds too: the refusal names the option that differs
RESUME_OPTIONS = (("prevalence", "--prevalence"), ("max_pixels", "--max-megapixels"),
                  ("operating_point", "--threshold"), ("threshold", "--threshold"), ("tta", "--tta"),
                  ("runtime", "--backend/--precision"))


def file_key(path: str | Path) -> tuple[int | None, int | None]:
    """(size, mtime_ns) of a file now; (None, None) when it cannot be stat'ed (gone, unreadable)."""
    try:
        st = os.stat(path)
    except OSError:
        return None, None
    return st.st_size, st.st_mtime_ns


def journal_path(destination: str | Path) -> Path:
    destination = Path(destination)
    return destination.with_name(destination.name + JOURNAL_SUFFIX)


def run_settings(model, threshold, tta: bool) -> dict:
    """What decides the rows' values: a journal is resumed only with the same. The calibration options come from
    the loaded model (``--prevalence`` re-bases its bias, ``--max-megapixels`` refuses larger images), so every
    caller records them without passing them."""
    op = model.resolve_threshold(threshold)
    return {"model_sha256": model.sha256, "model": model.name, "operating_point": op[0],
            "threshold": op[1], "tta": bool(tta), "runtime": model.runtime, "prevalence": model.prevalence,
            "max_pixels": int(model.max_pixels), "temperature": float(model.temperature),
            "bias": float(model.bias)}


def _shown(key: str, value) -> str:
    """A setting as the command line gives it."""
    if key == "prevalence":
        return "no --prevalence" if value is None else f"--prevalence {value:g}"
    if key == "max_pixels":
        return "no recorded pixel limit" if value is None else f"--max-megapixels {value / 1e6:g}"
    return f"{key} {value!r}"


def check_format(where, settings, expected: str, other: str) -> None:
    """Refuse, in one line, partial results whose settings are not ``expected`` (``"name/version"``): an older
    version of the same kind did not record every calibration option, so resuming it could mix calibrations."""
    kind = settings.get("format") if isinstance(settings, dict) else None
    family = expected.split("/")[0] + "/"
    if isinstance(kind, str) and kind.startswith(family) and kind != expected:
        raise PneumoscanError(f"{where}: cannot resume: written by another pneumoscan version ({kind}), which did "
                              "not record --prevalence and --max-megapixels; remove it to start again")
    if kind != expected:
        raise PneumoscanError(f"{where}: {other}")


def check_resumable(path: Path, found: dict, wanted: dict) -> None:
    """Refuse, in one line naming the option, to continue rows written with other settings."""
    if found["model_sha256"] != wanted["model_sha256"]:
        raise PneumoscanError(
            f"{path}: cannot resume: its rows were written by model {found.get('model')} (sha256 "
            f"{found['model_sha256']}), this run uses {wanted['model']} (sha256 {wanted['model_sha256']}); "
            "use the same --model, or remove the file to start again")
    for key, option in RESUME_OPTIONS:
        if found.get(key) != wanted[key]:
            raise PneumoscanError(f"{path}: cannot resume: its rows were written with {_shown(key, found.get(key))}, "
                                  f"this run has {_shown(key, wanted[key])}; use the same {option}, or remove the "
                                  "file to start again")


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
    check_format(path, settings, JOURNAL_FORMAT, "not a pneumoscan partial results file; remove it or choose "
                 "another destination")
    rows = []
    for line in lines[1:]:
        try:
            row = json.loads(line)
        except ValueError:
            continue  # torn by a crash mid-line (only the last can be): rescored
        if isinstance(row, dict) and set(ROW_KEYS) <= set(row):
            rows.append(row)
    return settings, rows


class Journal:
    """The append-only file of finished rows, fsynced at short intervals. Created whole (settings and kept rows
    written, then renamed into place by ``durable.atomic_write``: the permission policy's mode)."""

    def __init__(self, path: Path, settings: dict, kept: list[dict]):
        self.path = path
        self.rows_written = len(kept)

        def write(tmp) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps({"format": JOURNAL_FORMAT, **settings}) + "\n")
                for row in kept:
                    f.write(json.dumps(row) + "\n")
                f.flush()
                os.fsync(f.fileno())

        atomic_write(path, write)
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
