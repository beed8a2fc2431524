"""Durability on disk, shared by the crash-safe batch journal and the DICOM node's spool (no torch here, so
the command line's ``--help`` stays light)."""

from __future__ import annotations

import os
from pathlib import Path


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
