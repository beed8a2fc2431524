"""Labelled site data as a hospital keeps it: one reader for ``train``, ``evaluate``, ``adapt`` and ``data summary``.

Two forms, told apart by ``is_labelled_set``:

- a labels CSV (``.csv``): a header row with ``path`` and ``label`` and optionally ``patient_id`` (any case; other
  columns ignored; UTF-8, a byte-order mark tolerated). Labels are NORMAL/PNEUMONIA (any case) or 0/1; relative
  paths resolve from the CSV's folder, absolute ones are taken as they are. A row with an empty path, a file that
  is not there, an unknown label, or a file an earlier row already named is left out with one problem line naming
  the CSV and its line number; the other rows are used.
- a labelled folder: ``DIR/NORMAL`` and ``DIR/PNEUMONIA`` (any case) directly inside, walked recursively as
  ``data.walk`` walks a screening run's folders (sorted; accepted suffixes and files without one, as DICOM from a
  PACS often has none; hidden files skipped; other files and duplicates reported).

Each sample's patient (the group a patient-grouped split or bootstrap keeps together) is, in this order: the CSV's
``patient_id``; a DICOM file's PatientID; the Kermany file-name pattern (``layout.kermany_patient``); else the file
alone. A CSV's patient_id and a DICOM PatientID identify a person, so neither is kept: each becomes an opaque label
(``csv-patient-0003``, ``dicom-patient-0007``) numbered in order of first appearance in the sorted samples. The
identifiers live only in this function's memory; split.csv, logs and messages see the opaque labels.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path

from .layout import CLASSES, DatasetError, Sample, kermany_patient

PATH, LABEL, PATIENT = "path", "label", "patient_id"
_LABELS = {"normal": 0, "0": 0, "pneumonia": 1, "1": 1}
DICOM_SUFFIXES = (".dcm", "")  # files whose header is read for a PatientID; any other name is not DICOM here


@dataclass(frozen=True)
class LabelledSet:
    """The usable samples of a labels CSV or a labelled folder, and one line per row or file left out."""

    root: Path  # the CSV's folder, or the labelled folder (absolute)
    samples: list[Sample]  # sorted by path
    problems: list[str] = field(default_factory=list)
    given: Path | None = None  # the CSV file or folder as named, for messages
    rows: int = 0  # rows (CSV) or files (folder) read, the usable and the left-out ones

    @property
    def name(self) -> str:
        return str(self.given if self.given is not None else self.root)

    @property
    def is_csv(self) -> bool:
        return self.given is not None and self.given.suffix.lower() == ".csv"

    @property
    def counts(self) -> list[int]:
        """[NORMAL, PNEUMONIA] sample counts."""
        return [sum(1 for s in self.samples if s.label == label) for label in range(len(CLASSES))]

    @property
    def patients(self) -> int:
        return len({s.patient for s in self.samples})

    def files(self) -> list[Path]:
        return [s.path for s in self.samples]

    def labels(self) -> list[int]:
        return [s.label for s in self.samples]


def is_labelled_set(path: str | Path) -> bool:
    """A ``.csv`` file (it need not exist yet: reading it says so), or a folder with NORMAL/ and PNEUMONIA/ directly
    inside (any case)."""
    path = Path(path)
    if path.suffix.lower() == ".csv" and not path.is_dir():
        return True
    return path.is_dir() and _class_folders(path) is not None


def read_labelled(path: str | Path) -> LabelledSet:
    """The labelled set at ``path``; raises DatasetError (one line) when it is neither form, cannot be read, or
    has no usable sample."""
    given = Path(path)
    if given.suffix.lower() == ".csv" and not given.is_dir():
        found = _read_csv(given)
    elif given.is_dir() and _class_folders(given) is not None:
        found = _read_folder(given)
    elif given.is_dir():
        raise DatasetError(f"{given}: a labelled folder needs {' and '.join(CLASSES)} folders directly inside "
                           "(or give a labels CSV with path,label columns)")
    else:
        raise DatasetError(f"{given}: not found (expected a labels CSV or a folder with {'/'.join(CLASSES)})")
    if not found.samples:
        what = "row" if found.is_csv else "image file"
        first = f"; the first: {found.problems[0]}" if found.problems else ""
        raise DatasetError(f"{given}: no usable {what} ({found.rows} read, {len(found.problems)} left out{first})")
    return found


def require(labelled: LabelledSet, minimum: int, what: str = "nothing done") -> None:
    """Refuse with one line when fewer than ``minimum`` samples are usable or a class has none; ``what`` says
    what the refusal spared ("nothing written")."""
    unit = "rows" if labelled.is_csv else "images"
    n, left = len(labelled.samples), len(labelled.problems)
    listed = f" ({left} left out)" if left else ""
    if n < minimum:
        raise DatasetError(f"{labelled.name}: {n} usable {unit} of {labelled.rows}{listed}; at least {minimum} "
                           f"needed: {what}")
    empty = [name for name, count in zip(CLASSES, labelled.counts, strict=True) if not count]
    if empty:
        other = CLASSES[1 - CLASSES.index(empty[0])]
        raise DatasetError(f"{labelled.name}: the usable {unit} are all {other} ({n}, no {empty[0]}){listed}; both "
                           f"classes needed: {what}")


def image_files(folder: str | Path) -> list[Path]:
    """The image files under ``folder`` as a screening run walks it (``data.walk``: recursive, sorted, accepted
    suffixes and none, hidden files skipped, one name per file)."""
    from .walk import walk

    return walk([Path(folder)]).files


# --- the two forms -------------------------------------------------------------------------------------------------

def _class_folders(root: Path) -> dict[str, Path] | None:
    try:
        found = {p.name.upper(): p for p in root.iterdir() if p.is_dir()}
    except OSError:
        return None
    if not all(c in found for c in CLASSES):
        return None
    return {c: found[c] for c in CLASSES}


def _read_folder(given: Path) -> LabelledSet:
    from .walk import HIDDEN, walk

    root = given.resolve()
    folders = _class_folders(root)
    assert folders is not None
    problems: list[str] = []
    found = walk(list(folders.values()))
    entries: list[tuple[Path, int]] = []
    for path in found.files:
        if path in found.broken:
            problems.append(f"{_show(given, root, path)}: broken link, file not found")
            continue
        label = next(i for i, c in enumerate(CLASSES) if path.is_relative_to(folders[c]))
        entries.append((path, label))
    for further, first in found.duplicates:
        problems.append(f"{_show(given, root, further)}: the same file as {_show(given, root, first)} (kept there)")
    for link, target, loop in found.revisits:
        problems.append(f"{_show(given, root, link)}: " + ("a link back into its own folder" if loop else
                                                           f"a second name of {_show(given, root, target)}")
                        + ", not walked again")
    for folder, reason in found.unlistable:
        problems.append(f"{_show(given, root, folder)}: cannot list this folder ({reason})")
    skipped = {suffix: n for suffix, n in found.skipped.items() if suffix != HIDDEN}
    if skipped:
        kinds = ", ".join(f"{suffix} {n}" for suffix, n in sorted(skipped.items()))
        problems.append(f"{given}: {sum(skipped.values())} file(s) under {' and '.join(CLASSES)} not taken: not an "
                        f"image file name ({kinds})")
    rows = len(found.files) + len(found.duplicates) + sum(skipped.values())
    return LabelledSet(root, _grouped(root, entries, {}), problems, given, rows)


def _read_csv(given: Path) -> LabelledSet:
    if not given.is_file():
        raise DatasetError(f"{given}: labels CSV not found")
    root = given.resolve().parent
    try:
        with open(given, newline="", encoding="utf-8-sig") as f:
            lines = list(_csv_rows(f, given))
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{given}: not a UTF-8 text file ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise DatasetError(f"{given}: cannot read ({exc.strerror or exc})") from None
    if not lines:
        raise DatasetError(f"{given}: empty file (expected a header row with {PATH},{LABEL} and optionally "
                           f"{PATIENT})")
    header_line, header = lines[0]
    columns = [c.strip().lower() for c in header]
    missing = [c for c in (PATH, LABEL) if c not in columns]
    if missing:
        shown = ",".join(c for c in header) or "nothing"
        raise DatasetError(f"{given}:{header_line}: no {' or '.join(repr(c) for c in missing)} column in the header "
                           f"row (found {shown}; expected {PATH},{LABEL} and optionally {PATIENT})")
    at = {name: columns.index(name) for name in (PATH, LABEL, PATIENT) if name in columns}
    problems: list[str] = []
    entries: list[tuple[Path, int]] = []
    patients: dict[Path, str] = {}
    first_line: dict[Path, int] = {}
    rows = 0
    for line, row in lines[1:]:
        if not any(cell.strip() for cell in row):
            continue  # a blank line is no row
        rows += 1
        cells = {column: row[i].strip() if i < len(row) else "" for column, i in at.items()}
        where = f"{given}:{line}"
        name, label_text = cells[PATH], cells[LABEL]
        if not name:
            problems.append(f"{where}: empty path")
            continue
        label = _LABELS.get(label_text.lower())
        if label is None:
            problems.append(f"{where}: {name}: label {label_text!r} is not {', '.join(CLASSES)}, 0 or 1")
            continue
        path = Path(os.path.normpath(root / name))
        if not path.is_file():
            problems.append(f"{where}: {name}: " + ("not a file" if path.exists() else "file not found"))
            continue
        key = path.resolve()
        if key in first_line:
            problems.append(f"{where}: {name}: the same file as line {first_line[key]} (kept there)")
            continue
        first_line[key] = line
        entries.append((path, label))
        if cells.get(PATIENT):
            patients[path] = cells[PATIENT]
    return LabelledSet(root, _grouped(root, entries, patients), problems, given, rows)


def _csv_rows(f, given: Path):
    """(line number, cells) of each CSV record; the line number is where the record starts."""
    reader = csv.reader(f, strict=True)  # an unclosed quote is an error, not a row swallowing the rest
    start = 1
    try:
        for row in reader:
            yield start, row
            start = reader.line_num + 1
    except csv.Error as exc:
        raise DatasetError(f"{given}:{reader.line_num}: not a readable CSV row ({exc})") from None


def _show(given: Path, root: Path, path: Path) -> str:
    """A path under the folder as the user named the folder."""
    try:
        return str(given / Path(path).relative_to(root))
    except ValueError:
        return str(path)


# --- patients ------------------------------------------------------------------------------------------------------

def _grouped(root: Path, entries: list[tuple[Path, int]], csv_patients: dict[Path, str]) -> list[Sample]:
    """Samples sorted by path, each with its patient group (module docstring); identifiers become opaque labels."""
    opaque: dict[tuple[str, str], str] = {}

    def label(kind: str, identifier: str) -> str:
        key = (kind, identifier)
        if key not in opaque:
            opaque[key] = f"{kind}-patient-{sum(1 for k in opaque if k[0] == kind) + 1:04d}"
        return opaque[key]

    samples = []
    for path, cls in sorted(entries, key=lambda e: str(e[0])):
        if path in csv_patients:
            patient = label("csv", csv_patients[path])
        elif (identifier := dicom_patient_id(path)) is not None:
            patient = label("dicom", identifier)
        else:
            patient = kermany_patient(path.name) or os.path.relpath(path, root).replace(os.sep, "/")
        samples.append(Sample(path, cls, patient))
    return samples


def dicom_patient_id(path: Path) -> str | None:
    """A DICOM file's PatientID, or None (not DICOM by name or magic, unreadable header, no or empty PatientID).

    Only the header up to PatientID is parsed. The value identifies a person: callers keep it in memory and never
    write or log it."""
    if path.suffix.lower() not in DICOM_SUFFIXES:
        return None
    from .images import sniff

    try:
        with open(path, "rb") as f:
            if sniff(f.read(256)) != "dicom":
                return None
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["PatientID"])
        # the raw bytes, never converted: pydicom's value validation would warn and log an odd value verbatim
        raw = ds.get_item("PatientID")
        value = bytes(raw.value or b"").strip(b" \0") if raw is not None else b""
    except Exception:  # any unreadable header: the file is its own patient, and decoding reports it later
        return None
    return value.decode("latin-1") or None
