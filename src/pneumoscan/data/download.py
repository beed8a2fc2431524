"""Fetch the Kermany dataset from Kaggle the way the published Colab recipe does, and leave a checked layout.

``kagglehub.dataset_download`` does the transfer (authentication, version lookup, archive extraction). The
archive holds ``chest_xray/{train,val,test}/{NORMAL,PNEUMONIA}`` and, in the published version, a second copy
under ``chest_xray/chest_xray`` plus ``__MACOSX`` debris, so we take the shallowest folder that has the split
folders, move only those into DEST, and check them with the same ``layout`` functions training uses. Work
happens in a staging folder beside DEST: an interrupted or failed download never leaves a half-filled DEST.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from ..errors import PneumoscanError
from .layout import SPLITS, DatasetError, find_splits, list_split

DATASET = "paultimothymooney/chest-xray-pneumonia"
_JUNK = {"__macosx"}


class DownloadError(PneumoscanError):
    """The dataset could not be fetched or is not laid out as expected; the message says what to do."""


def kaggle_fetch(staging: Path) -> Path:
    """Download and unpack the Kaggle dataset into ``staging`` with kagglehub; returns the unpacked folder.

    Credentials come from kagglehub's usual places (KAGGLE_USERNAME/KAGGLE_KEY, KAGGLE_API_TOKEN,
    ~/.kaggle/kaggle.json). kagglehub would fall back to an anonymous client; we refuse up front instead,
    because the user then gets a 401 buried in a long message rather than the fix.
    """
    try:
        import kagglehub
        import requests
        from kagglehub.config import get_kaggle_credentials
    except ImportError:
        raise DownloadError("downloading needs kagglehub: pip install 'pneumoscan[download]'") from None
    try:
        credentials = get_kaggle_credentials()
    except ValueError as exc:  # a malformed kaggle.json
        raise DownloadError(f"{str(exc).splitlines()[0]}; create a new API token on kaggle.com") from None
    if credentials is None:
        raise DownloadError(
            "no Kaggle credentials: create an API token (kaggle.com > Settings > API > Create New Token) and "
            "save it as ~/.kaggle/kaggle.json, or set KAGGLE_USERNAME and KAGGLE_KEY")
    try:
        return Path(kagglehub.dataset_download(DATASET, output_dir=str(staging), force_download=True))
    except (requests.ConnectionError, requests.Timeout) as exc:
        raise DownloadError(
            f"cannot reach Kaggle ({type(exc).__name__}): offline? Download {DATASET} on a connected machine, "
            "copy its chest_xray folder here and check it with `pneumoscan data summary`") from None
    except requests.HTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "?"
        hint = ("Kaggle rejected the credentials: create a new API token"
                if status in (401, 403) else "try again later")
        raise DownloadError(f"Kaggle answered HTTP {status} for {DATASET}: {hint}") from None
    except ValueError as exc:  # kagglehub: "Unsupported archive type." and the like
        raise DownloadError(f"download of {DATASET} failed: {str(exc).splitlines()[0]}") from None


def find_layout_root(folder: Path) -> Path:
    """The shallowest folder under ``folder`` holding train/val/test folders (skips __MACOSX and hidden)."""
    level = [folder]
    while level:
        for candidate in level:
            names = {p.name.lower() for p in candidate.iterdir() if p.is_dir()}
            if names & set(SPLITS):
                return candidate
        level = sorted(p for d in level for p in d.iterdir()
                       if p.is_dir() and p.name.lower() not in _JUNK and not p.name.startswith("."))
    raise DownloadError(f"downloaded archive has no train/val/test folders (expected chest_xray/{{{','.join(SPLITS)}}})")


def check_layout(root: Path) -> dict[str, int]:
    """Images per split; raises DownloadError naming the missing split, class folder or images."""
    try:
        present = find_splits(root)
        missing = [s for s in SPLITS if s not in present]
        if missing:
            raise DownloadError(f"downloaded archive lacks split folder(s) {', '.join(missing)} "
                                f"(found {', '.join(present)} in {root})")
        return {split: len(list_split(root, split)) for split in SPLITS}
    except DatasetError as exc:
        raise DownloadError(f"downloaded archive has a bad layout: {exc}") from None


def download(dest: str | Path, *, fetch: Callable[[Path], Path] = kaggle_fetch) -> dict[str, int]:
    """Fetch into a staging folder next to DEST, check the layout, then move the split folders into DEST.

    ``fetch(staging) -> unpacked folder`` is injectable so tests and mirrors can supply the archive.
    Returns the number of images per split.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DownloadError(f"{dest}: already exists and is not an empty folder; choose a new destination")
    dest.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.download-"))
    try:
        root = find_layout_root(fetch(staging / "kaggle"))
        counts = check_layout(root)
        dest.mkdir(exist_ok=True)
        for split_dir in root.iterdir():
            if split_dir.is_dir() and split_dir.name.lower() in SPLITS:
                split_dir.rename(dest / split_dir.name.lower())
        return counts
    finally:
        shutil.rmtree(staging, ignore_errors=True)
