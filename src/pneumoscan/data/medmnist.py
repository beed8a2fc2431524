"""The MedMNIST ``.npz`` source (PneumoniaMNIST): official splits as arrays instead of folders of files.

A MedMNIST file holds ``{split}_images`` (N, H, W) uint8 and ``{split}_labels`` (N, 1) for the splits train, val
and test. It has no patient ids, so its official train/val split is the grouping: pneumoscan trains on ``train``,
selects and calibrates on ``val`` and never carves its own split. Images are upscaled with ``Preprocessing`` (the
single definition of resizing) into the same uint8 cache form that ``decode_cache`` produces for files;
``sources.MedMNISTSource`` puts this file behind the interface the folder source has, so training, evaluation and
export do not know which source they read.
"""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np

from ..preprocess import Preprocessing
from .layout import CLASSES, DatasetError

SPLITS: tuple[str, ...] = ("train", "val", "test")


class MedMNISTError(DatasetError):
    """The .npz file is not a usable binary MedMNIST file; the message names the file and what is wrong."""


def is_npz(path: str | Path) -> bool:
    """Whether ``--data`` names a MedMNIST file rather than a Kaggle-layout folder (decided by the suffix)."""
    return Path(path).suffix.lower() == ".npz"


def read_split(path: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, H, W), labels int64 (N,)) of one official split, checked before anything trains on it."""
    path = Path(path)
    if split not in SPLITS:
        raise MedMNISTError(f"{path}: no split {split!r} in a MedMNIST file (choose {', '.join(SPLITS)})")
    if not path.is_file():
        raise MedMNISTError(f"{path}: file not found")
    try:
        # allow_pickle=False: a data file must never be able to run code.
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
            for key in (f"{split}_images", f"{split}_labels"):
                if key not in keys:
                    raise MedMNISTError(f"{path}: missing key '{key}' (a MedMNIST .npz has "
                                        f"{', '.join(f'{s}_images, {s}_labels' for s in SPLITS)})")
            images, labels = npz[f"{split}_images"], npz[f"{split}_labels"]
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        if isinstance(exc, MedMNISTError):
            raise
        raise MedMNISTError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0]})") from None
    if images.dtype != np.uint8 or images.ndim != 3:
        raise MedMNISTError(f"{path}: '{split}_images' must be grayscale uint8 (N, H, W), "
                            f"got {images.dtype} {tuple(images.shape)}")
    labels = labels.reshape(len(labels), -1) if labels.ndim else labels
    if labels.ndim != 2 or labels.shape[1] != 1 or len(labels) != len(images):
        raise MedMNISTError(f"{path}: '{split}_labels' must have shape ({len(images)}, 1) to match "
                            f"'{split}_images', got {tuple(labels.shape)}")
    labels = labels[:, 0].astype(np.int64)
    bad = sorted(set(np.unique(labels).tolist()) - {0, 1})
    if bad:
        raise MedMNISTError(f"{path}: '{split}_labels' must be 0 ({CLASSES[0]}) or 1 ({CLASSES[1]}), found {bad[:5]}")
    return images, labels


def load_split(path: str | Path, split: str, prep: Preprocessing) -> tuple[np.ndarray, np.ndarray]:
    """(uint8 (N, size, size), labels): one split resized by ``prep`` exactly as file images are."""
    images, labels = read_split(path, split)
    resized = np.empty((len(images), prep.size, prep.size), np.uint8)
    for i, image in enumerate(images):
        resized[i] = prep.to_uint8(image)  # uint8 in, resized in 8 bits like any 8-bit file
    return resized, labels
