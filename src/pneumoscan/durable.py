"""Files on disk: one permission policy, atomic and durable writes, and checks that an output can be written.

Shared by every route that writes (the batch journal and outputs, the DICOM node's spool, the service's audit
log, heatmaps, plots, model files); no torch here, so the command line's ``--help`` stays light.

Permission policy (docs: "Files and permissions"): every file pneumoscan writes is created with the mode the
process's umask gives a new file (0666 & ~umask; folders 0777 & ~umask), as ``cp`` and every Unix tool does, so
one setting decides them all and none differs from its neighbours. Atomic writes, whose temporary file
``mkstemp`` creates owner-only, are given that mode before they are renamed into place. The long-running services
(``pneumoscan serve`` and ``pneumoscan dicom listen``) set the umask to ``SERVICE_UMASK`` (owner-only) at start
unless ``--umask`` says otherwise: they run unattended and write patient-linked data (audit logs, the spool,
result objects). The one exception is a secret: an API key file is always 0600.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import PneumoscanError

SERVICE_UMASK = 0o077


def current_umask() -> int:
    """The process's umask (reading it means setting it; restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def file_mode() -> int:
    """The mode a new file gets under the current umask."""
    return 0o666 & ~current_umask()


def parse_umask(text: str) -> int:
    """An octal umask such as 077 or 0022, for ``--umask``."""
    try:
        value = int(text, 8)
    except ValueError:
        raise ValueError(f"expected an octal umask such as 077 or 022, got {text!r}") from None
    if not 0 <= value <= 0o777:
        raise ValueError(f"a umask is between 000 and 777, got {text!r}")
    return value


def fsync_dir(folder: str | Path) -> None:
    """Make a rename or a new file in ``folder`` durable (best effort: not every file system can)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write, *, mode: int | None = None) -> None:
    """Call ``write(tmp_path)`` then rename over ``path``: readers never see a half-written file. The file gets
    the policy's mode (``file_mode()``), or ``mode`` for a secret."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode() if mode is None else mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _nearest_existing(folder: Path) -> Path:
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return folder


def check_writable(folder: Path, target: Path, option: str) -> None:
    """Create (and remove) a probe file in the nearest existing folder: the only test that tells a read-only
    mount, a permission problem or a pseudo file system from a writable place, for root too."""
    existing = _nearest_existing(Path(folder))
    if not existing.is_dir():
        raise PneumoscanError(f"{target}: cannot write {option} there: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".pneumoscan-probe-")
    except OSError as exc:
        raise PneumoscanError(f"{target}: cannot write {option} in {existing} ({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(path: str | Path | None, option: str) -> None:
    """Fail now, in one line, when ``path`` could not receive the file this run writes at its end (a folder or a
    device there, an unwritable location), instead of losing the finished work. Creates nothing."""
    if path is None:
        return
    target = Path(path)
    if target.is_dir():
        raise PneumoscanError(f"{target}: {option} names a folder; give a file name, e.g. {target / 'results.csv'}")
    if target.exists() and not target.is_file():  # a device, a FIFO: the final rename would replace it
        raise PneumoscanError(f"{target}: {option} names something that is not a regular file")
    check_writable(target.parent, target, option)


def check_output_dir(path: str | Path | None, option: str) -> None:
    """The same for a folder the run fills (heatmaps, plots): it must be a folder, or creatable. Creates nothing."""
    if path is None:
        return
    target = Path(path)
    if target.exists() and not target.is_dir():
        raise PneumoscanError(f"{target}: {option} names a file; give a folder")
    check_writable(target, target, option)
