"""The data-exploration table: per split and class, images, patients, sizes, modes and balance, for a Kaggle-layout
folder, a MedMNIST ``.npz`` (which has no patient ids: its patients column says "-"), or labelled site data (a labels
CSV or a folder with NORMAL/ and PNEUMONIA/: one split, ``site``, patients as ``data.labels`` groups them)."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .labels import LabelledSet, is_labelled_set, read_labelled
from .layout import CLASSES, Sample, find_splits, list_split


@dataclass(frozen=True)
class ClassSummary:
    split: str
    label: str
    images: int
    patients: int | None  # None: the source records no patients (MedMNIST)
    min_size: tuple[int, int]
    median_size: tuple[int, int]
    max_size: tuple[int, int]
    modes: dict[str, int]
    unreadable: int


def summarize(data_dir: str | Path) -> list[ClassSummary]:
    """Reads only image headers, so it takes seconds even for the full dataset."""
    from .medmnist import is_npz

    if is_npz(data_dir):
        return _summarize_npz(data_dir)
    if is_labelled_set(data_dir):
        return summarize_labelled(read_labelled(data_dir))
    rows = []
    for split in find_splits(data_dir):
        rows += _summarize_samples(split, list_split(data_dir, split))
    return rows


def summarize_labelled(labelled: LabelledSet) -> list[ClassSummary]:
    """The table of labelled site data, one split ``site`` (its left-out rows are ``labelled.problems``)."""
    from .sources import SITE

    return _summarize_samples(SITE, labelled.samples)


def _summarize_samples(split: str, samples: list[Sample]) -> list[ClassSummary]:
    rows = []
    for label, name in enumerate(CLASSES):
        items = [s for s in samples if s.label == label]
        sizes, modes, bad = [], Counter(), 0
        for s in items:
            found = _size_and_mode(s.path)
            if found is None:
                bad += 1
            else:
                sizes.append(found[0])
                modes[found[1]] += 1
        a = np.array(sizes) if sizes else np.zeros((1, 2), int)
        by_area = a[np.argsort(a[:, 0] * a[:, 1])]
        rows.append(ClassSummary(split, name, len(items), len({s.patient for s in items}),
                                 tuple(by_area[0]), tuple(by_area[len(by_area) // 2]), tuple(by_area[-1]),
                                 dict(modes), bad))
    return rows


def _size_and_mode(path: Path) -> tuple[tuple[int, int], str] | None:
    """((W, H), mode) from the file's header: Pillow's mode, or a DICOM file's photometric interpretation and
    bits stored ("MONOCHROME2 12-bit"); None when neither can read it."""
    try:
        with Image.open(path) as im:
            return im.size, im.mode
    except Exception:
        pass
    try:
        import pydicom

        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return (int(ds.Columns), int(ds.Rows)), f"{ds.PhotometricInterpretation} {int(ds.BitsStored)}-bit"
    except Exception:
        return None


def _summarize_npz(path: str | Path) -> list[ClassSummary]:
    """The same table for a MedMNIST file: every image of a split has the array's size and is 8-bit gray."""
    import zipfile

    from .medmnist import SPLITS, MedMNISTError, read_split

    path = Path(path)
    if not path.is_file():
        raise MedMNISTError(f"{path}: file not found")
    try:
        with np.load(path, allow_pickle=False) as npz:
            keys = set(npz.files)
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise MedMNISTError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0]})") from None
    splits = [split for split in SPLITS if f"{split}_images" in keys]
    if not splits:
        raise MedMNISTError(f"{path}: no MedMNIST split in this file (expected keys "
                            f"{', '.join(f'{s}_images, {s}_labels' for s in SPLITS)})")
    rows = []
    for split in splits:
        images, labels = read_split(path, split)
        size = (int(images.shape[2]), int(images.shape[1]))  # (W, H), as PIL reports sizes
        for label, name in enumerate(CLASSES):
            n = int((labels == label).sum())
            rows.append(ClassSummary(split, name, n, None, size, size, size, {"L": n} if n else {}, 0))
    return rows


def format_summary(rows: list[ClassSummary]) -> str:
    head = f"{'split':<6} {'class':<10} {'images':>6} {'patients':>8} {'share':>6}  {'min WxH':>10} {'median WxH':>11} {'max WxH':>10}  modes"
    lines = [head, "-" * len(head)]
    totals = Counter()
    for r in rows:
        totals[r.split] += r.images
    for r in rows:
        share = r.images / totals[r.split] if totals[r.split] else 0.0
        size = lambda s: f"{s[0]}x{s[1]}"  # noqa: E731
        modes = ", ".join(f"{m} {n}" for m, n in sorted(r.modes.items()))
        bad = f"  ({r.unreadable} unreadable)" if r.unreadable else ""
        patients = "-" if r.patients is None else r.patients
        lines.append(f"{r.split:<6} {r.label:<10} {r.images:>6} {patients:>8} {share:>6.1%}  {size(r.min_size):>10} "
                     f"{size(r.median_size):>11} {size(r.max_size):>10}  {modes}{bad}")
    for split, n in totals.items():
        counts = [r.images for r in rows if r.split == split]
        ratio = max(counts) / max(1, min(counts))
        lines.append(f"{split}: {n} images, class ratio {ratio:.2f}:1")
    return "\n".join(lines)
