"""Which files a screening run is given: files and folders named by a person, walked without silent gaps.

The rules (the CLI prints what they found; this module only returns it):

- A file named directly is taken whatever its suffix; a name that does not exist is taken too (its row says
  "file not found"), so a typo is never silently dropped.
- A folder is walked recursively in sorted order. Inside it, files with an accepted suffix
  (``data.images.SUFFIXES``) and files without a suffix (DICOM from a PACS export often has none) are taken;
  every other file is counted by suffix, hidden files and folders (a leading ".") are counted as "hidden".
- Symbolic links to folders are followed. A link back to a folder that contains it (a loop), or to a folder
  already walked through another name, is not walked again and is reported once.
- A broken symbolic link with an accepted (or no) suffix is taken like a missing named file: its row says it
  cannot be read, and the run exits 1 as for any unreadable file. It is also counted in ``broken``.
- One file reached under two names (named twice, a folder and a file in it, a link, a hard link) is screened
  once, under the first name; each further name is reported in ``duplicates``. Identity is the file system's
  (device, inode), so a copy with the same bytes is not a duplicate.
- A folder that cannot be listed (permissions) is reported in ``unlistable`` and counts as a failure.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

HIDDEN = "hidden"


@dataclass
class Walk:
    """What walking the inputs found: the files to screen, in order, and everything left out, with why."""

    files: list[Path] = field(default_factory=list)
    folders: list[str] = field(default_factory=list)  # the folders named on the command line
    skipped: Counter = field(default_factory=Counter)  # suffix (or "hidden") -> files not taken
    broken: list[Path] = field(default_factory=list)  # broken symbolic links (taken: their rows say so)
    duplicates: list[tuple[Path, Path]] = field(default_factory=list)  # (a further name, the name screened)
    revisits: list[tuple[Path, Path, bool]] = field(default_factory=list)  # (link, folder it leads to, loop?)
    unlistable: list[tuple[Path, str]] = field(default_factory=list)  # (folder, reason)

    def skipped_summary(self) -> str:
        """e.g. '3 files skipped (not images: .txt 2, .csv 1; hidden: 1)'; empty when nothing was skipped."""
        total = sum(self.skipped.values())
        if not total:
            return ""
        kinds = [f"{suffix} {n}" for suffix, n in self.skipped.most_common() if suffix != HIDDEN]
        parts = ([f"not images: {', '.join(kinds)}"] if kinds else []) + (
            [f"hidden: {self.skipped[HIDDEN]}"] if self.skipped[HIDDEN] else [])
        return f"{total} file{'s' if total != 1 else ''} skipped ({'; '.join(parts)})"

    def notices(self) -> list[str]:
        """One line per thing a person should know was not screened as named (no line for plain skips, which
        ``skipped_summary`` counts)."""
        lines = [f"{link}: a link to {target}, {'which contains it (a loop)' if loop else 'already walked'}: "
                 "not walked again" for link, target, loop in self.revisits]
        lines += [f"{again}: the same file as {first}: screened once, as {first}" for again, first in self.duplicates]
        if self.broken:
            lines.append(f"{len(self.broken)} broken symbolic link{'s' if len(self.broken) != 1 else ''} "
                         "(each has an error row)")
        return lines


def accepted(path: Path) -> bool:
    """Whether a file found in a folder is taken: an accepted image suffix, or none (DICOM)."""
    from .images import SUFFIXES  # here, not at import: the command line's parser must not load PIL and numpy

    return path.suffix.lower() in SUFFIXES or path.suffix == ""


def walk(items: list[str | Path]) -> Walk:
    """Walk files and folders as the module docstring says; never raises for what it finds."""
    found = Walk()
    seen_files: dict[tuple[int, int] | str, Path] = {}
    walked_dirs: dict[tuple[int, int], Path] = {}

    def take(path: Path) -> None:
        try:
            st = path.stat()
            key: tuple[int, int] | str = (st.st_dev, st.st_ino)
        except OSError:  # missing or broken: its row says so; identity by name
            key = os.path.normpath(str(path))
        first = seen_files.get(key)
        if first is not None:
            found.duplicates.append((path, first))
            return
        seen_files[key] = path
        found.files.append(path)

    def visit(folder: Path, ancestors: frozenset) -> None:
        try:
            st = folder.stat()
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as exc:
            found.unlistable.append((folder, exc.strerror or str(exc)))
            return
        key = (st.st_dev, st.st_ino)
        walked_dirs[key] = folder
        ancestors = ancestors | {key}
        for entry in entries:
            path = Path(entry.path)
            if entry.name.startswith("."):
                found.skipped[HIDDEN] += _count_hidden(path)
                continue
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                try:
                    target = path.stat()
                except OSError as exc:
                    found.unlistable.append((path, exc.strerror or str(exc)))
                    continue
                tkey = (target.st_dev, target.st_ino)
                if tkey in walked_dirs or tkey in ancestors:
                    found.revisits.append((path, walked_dirs.get(tkey, path.resolve()), tkey in ancestors))
                    continue
                visit(path, ancestors)
                continue
            if entry.is_symlink() and not path.exists():
                if accepted(path):
                    found.broken.append(path)
                    take(path)
                else:
                    found.skipped[path.suffix.lower()] += 1
                continue
            if accepted(path):
                take(path)
            else:
                found.skipped[path.suffix.lower()] += 1

    for item in items:
        path = Path(item)
        if path.is_dir():
            found.folders.append(str(item))
            try:
                key = (path.stat().st_dev, path.stat().st_ino)
            except OSError:
                key = None
            if key is not None and key in walked_dirs:
                found.revisits.append((path, walked_dirs[key], False))
                continue
            visit(path, frozenset())
        else:
            if path.is_symlink() and not path.exists():
                found.broken.append(path)
            take(path)  # a missing or unreadable file becomes an error row, not a crash
    return found


def _count_hidden(path: Path) -> int:
    """A hidden file counts once; a hidden folder counts its files (not walked, but not silently lost)."""
    if not path.is_dir() or path.is_symlink():
        return 1
    count = 0
    for _root, _dirs, files in os.walk(path):
        count += len(files)
    return count
