"""The spool: a folder that holds everything the node must not lose.

    SPOOL/tmp/        files being written (a crash leaves only these; they are removed at start)
    SPOOL/incoming/   received instances, fsynced, not yet screened (screened again after a restart)
    SPOOL/outbox/     results (SR, SC) waiting to be delivered to --forward (retried until delivered)
    SPOOL/failed/     received files that cannot be parsed as DICOM at all (kept for a person to look at)

Every file appears under its final name only complete: written under tmp/, fsynced, renamed, and the folder
fsynced, so a power cut or SIGKILL leaves either the whole file or nothing.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..durable import file_mode, fsync_dir

_UID = re.compile(r"^[0-9.]{1,64}$")


def safe_name(uid: str | None, data: bytes | None = None) -> str:
    """A file name for a UID (digits and dots only); anything else, or no UID, gets a content hash."""
    if uid and _UID.match(uid) and not uid.startswith("."):
        return uid
    return "x" + hashlib.sha256((uid or "").encode() + (data or b"")).hexdigest()[:40]


def atomic_write(path: Path, write: Callable[[object], None] | bytes, tmp_dir: Path | None = None) -> Path:
    """Write ``path`` so that it appears complete or not at all, and durably (fsynced, with its folder):
    ``write(fileobj)`` or bytes. ``durable.atomic_write`` does not fsync; the spool's promise to a sender needs it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tmp_dir) if tmp_dir is not None else path.parent
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".part-", suffix=".dcm")
    try:
        with os.fdopen(fd, "wb") as handle:
            if isinstance(write, bytes | bytearray):
                handle.write(write)
            else:
                write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, file_mode())  # mkstemp made it owner-only; the umask decides (durable's one policy)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


class Spool:
    def __init__(self, root: str | Path):
        self.root = Path(root)
        self.tmp = self.root / "tmp"
        self.incoming = self.root / "incoming"
        self.outbox = self.root / "outbox"
        self.failed = self.root / "failed"
        for folder in (self.tmp, self.incoming, self.outbox, self.failed):
            folder.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.glob(".part-*"):  # half-written by a process that died
            leftover.unlink(missing_ok=True)

    def receive(self, name: str, data: bytes) -> Path:
        """Store a received instance under incoming/ (fsynced) before the sender is told it was stored."""
        return atomic_write(self.incoming / f"{name}.dcm", data, self.tmp)

    def pending(self, limit: int | None = None) -> list[Path]:
        """Received instances not yet screened, oldest first."""
        files = []
        for path in self.incoming.glob("*.dcm"):
            try:
                files.append((path.stat().st_mtime, path))
            except FileNotFoundError:
                continue
        files.sort()
        return [p for _, p in files[:limit]]

    def queue_result(self, name: str, write: Callable[[object], None]) -> Path:
        return atomic_write(self.outbox / f"{name}.dcm", write, self.tmp)

    def outgoing(self) -> list[Path]:
        return sorted(self.outbox.glob("*.dcm"), key=lambda p: p.stat().st_mtime if p.exists() else 0)

    def fail(self, path: Path) -> Path:
        target = self.failed / path.name
        os.replace(path, target)
        return target
