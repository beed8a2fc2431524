"""Where labelled images come from, behind one interface: a Kaggle-layout folder, a MedMNIST ``.npz`` file, or a
site's labelled data (a labels CSV or a folder with NORMAL/ and PNEUMONIA/, read by ``data.labels``).

A source lists the images of a split as ``Sample``s, carves training's (train, validation) split its own way, and
decodes samples into the uint8 cache at the network's input size that training, evaluation and export score. Every
sample's path is the source's root joined with an item relative to it, ``train/NORMAL/IM-0001-0001.jpeg`` in a
folder, ``val/17`` (split and index) inside an ``.npz`` and ``scans/a.dcm`` beside a labels CSV, so a run's split.csv records items relative to one root
and works from any working directory (see ``pneumoscan.run``).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from ..preprocess import Preprocessing
from . import medmnist
from .cache import decode_cache
from .labels import LabelledSet, is_labelled_set, read_labelled
from .layout import DatasetError, Sample, list_split, patient_split


@dataclass
class ImageCache:
    """Decoded images of some samples, in order: what every scoring loop reads."""

    images: np.ndarray  # uint8 (N, size, size)
    labels: np.ndarray  # int64 (N,)
    samples: list[Sample] = field(default_factory=list)  # the samples decoded, in the same order
    skipped: list[str] = field(default_factory=list)  # one message per unreadable file left out


class DataSource(ABC):
    """A labelled data set on disk, rooted at ``root`` (a folder or a file)."""

    kind: ClassVar[str]  # how split.csv names it: "folder" | "medmnist" | "labels"

    def __init__(self, root: str | Path):
        self.root = Path(root).resolve()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self.root)!r})"

    @abstractmethod
    def samples(self, split: str) -> list[Sample]:
        """Every image of an official split (train, val, test), in a fixed order; raises DatasetError."""

    @abstractmethod
    def training_split(self, val_fraction: float, seed: int, fold: int = 0) -> tuple[list[Sample], list[Sample]]:
        """(train, validation) samples training fits and selects on; never the test split."""

    @abstractmethod
    def decode(self, samples: list[Sample], prep: Preprocessing, *, desc: str = "decode",
               progress: bool = False) -> ImageCache:
        """The samples as uint8 network inputs resized by ``prep``; unreadable files are reported and left out."""

    def images(self, split: str, prep: Preprocessing, **kwargs) -> ImageCache:
        """A whole official split, decoded."""
        return self.decode(self.samples(split), prep, **kwargs)

    def item(self, sample: Sample) -> str:
        """The sample's path relative to the root, as split.csv records it."""
        return sample.path.relative_to(self.root).as_posix()

    def sample(self, item: str, label: int, patient: str = "") -> Sample:
        """The sample a split.csv row names (the inverse of ``item``)."""
        return Sample(self.root / item, label, patient)


class FolderSource(DataSource):
    """``ROOT/{train,val,test}/{NORMAL,PNEUMONIA}/*``: validation is carved out of train by patient."""

    kind = "folder"

    def samples(self, split: str) -> list[Sample]:
        return list_split(self.root, split)

    def training_split(self, val_fraction: float, seed: int, fold: int = 0) -> tuple[list[Sample], list[Sample]]:
        return patient_split(self.samples("train"), val_fraction, seed, fold)

    def decode(self, samples: list[Sample], prep: Preprocessing, *, desc: str = "decode",
               progress: bool = False) -> ImageCache:
        images, kept, skipped = decode_cache(samples, prep, desc=desc, progress=progress)
        return ImageCache(images, np.array([s.label for s in kept], dtype=np.int64), kept, skipped)


class MedMNISTSource(DataSource):
    """A MedMNIST ``.npz`` (PneumoniaMNIST): no patient ids, so its official train/val split is the grouping."""

    kind = "medmnist"

    def __init__(self, root: str | Path):
        super().__init__(root)
        self._arrays: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    def _split(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        if split not in self._arrays:
            self._arrays[split] = medmnist.read_split(self.root, split)
        return self._arrays[split]

    def samples(self, split: str) -> list[Sample]:
        _, labels = self._split(split)
        return [Sample(self.root / split / str(i), int(label), "") for i, label in enumerate(labels)]

    def training_split(self, val_fraction: float, seed: int, fold: int = 0) -> tuple[list[Sample], list[Sample]]:
        if fold != 0:
            raise DatasetError(f"{self.root}: a MedMNIST file has one official train/val split; fold {fold} "
                               "applies to folder data only")
        return self.samples("train"), self.samples("val")

    def decode(self, samples: list[Sample], prep: Preprocessing, *, desc: str = "decode",
               progress: bool = False) -> ImageCache:
        images = np.empty((len(samples), prep.size, prep.size), np.uint8)
        for i, sample in enumerate(samples):
            split, index = self._member(sample)
            images[i] = prep.to_uint8(self._split(split)[0][index])  # uint8, resized as any 8-bit file
        return ImageCache(images, np.array([s.label for s in samples], dtype=np.int64), list(samples), [])

    def _member(self, sample: Sample) -> tuple[str, int]:
        item = self.item(sample)
        split, _, index = item.partition("/")
        if not index.isdigit() or int(index) >= len(self._split(split)[1]):
            raise DatasetError(f"{self.root}: no image {item!r} in this file (expected SPLIT/INDEX)")
        return split, int(index)


SITE = "site"  # the one split of labelled site data: all of it


class LabelsSource(DataSource):
    """A site's labelled data (``data.labels``: a labels CSV or a folder with NORMAL/ and PNEUMONIA/ directly
    inside). It has no official splits: evaluation scores all of it as the split ``site``, and training carves its
    validation out of all of it by patient (a DICOM file's PatientID, as an opaque label). The root is the CSV's
    folder (or the labelled folder), so split.csv records each path as the CSV gave it; the CSV itself is read
    only when samples are asked for, never when a run's split.csv is read back."""

    kind = "labels"

    def __init__(self, root: str | Path, labelled: LabelledSet | None = None):
        given = Path(root)
        csv_file = given.suffix.lower() == ".csv" and not given.is_dir()
        super().__init__(given.parent if csv_file else given)
        self.given = given
        self._labelled = labelled

    @property
    def labelled(self) -> LabelledSet:
        """The labelled set, read on first use (raises DatasetError)."""
        if self._labelled is None:
            self._labelled = read_labelled(self.given)
        return self._labelled

    def samples(self, split: str = SITE) -> list[Sample]:
        if split != SITE:
            raise DatasetError(f"{self.given}: labelled site data has no {split!r} split: all of it is the "
                               f"{SITE!r} split")
        return list(self.labelled.samples)

    def training_split(self, val_fraction: float, seed: int, fold: int = 0) -> tuple[list[Sample], list[Sample]]:
        samples = self.labelled.samples
        try:
            return patient_split(samples, val_fraction, seed, fold)
        except ValueError as exc:  # scikit-learn: fewer patients than folds
            raise DatasetError(f"{self.labelled.name}: {len(samples)} images of {self.labelled.patients} patients "
                               f"cannot be split by patient for validation ({exc})") from None

    def decode(self, samples: list[Sample], prep: Preprocessing, *, desc: str = "decode",
               progress: bool = False) -> ImageCache:
        images, kept, skipped = decode_cache(samples, prep, desc=desc, progress=progress)
        return ImageCache(images, np.array([s.label for s in kept], dtype=np.int64), kept, skipped)

    def item(self, sample: Sample) -> str:
        """Relative to the root, ``../`` included, as a CSV may name files beside its folder."""
        return Path(os.path.relpath(sample.path, self.root)).as_posix()

    def sample(self, item: str, label: int, patient: str = "") -> Sample:
        return Sample(Path(os.path.normpath(self.root / item)), label, patient)


def open_source(path: str | Path) -> DataSource:
    """The source ``--data`` names: a ``.npz`` file is MedMNIST, a ``.csv`` file or a folder with NORMAL/ and
    PNEUMONIA/ directly inside is labelled site data, anything else a Kaggle-layout folder."""
    if Path(path).suffix.lower() == ".npz":
        return MedMNISTSource(path)
    return LabelsSource(path) if is_labelled_set(path) else FolderSource(path)


def source_kinds() -> dict[str, type[DataSource]]:
    """split.csv's ``source`` names and the classes that read them."""
    return {cls.kind: cls for cls in (FolderSource, MedMNISTSource, LabelsSource)}


def decode_samples(samples: list[Sample], prep: Preprocessing, **kwargs) -> ImageCache:
    """Decode samples whatever source listed them: a path inside an ``.npz`` file is one of its images."""
    containers = {next((p for p in s.path.parents if p.suffix.lower() == ".npz"), None) for s in samples}
    if len(containers) > 1:
        raise DatasetError("cannot decode samples of several sources at once")
    container = containers.pop() if containers else None
    source = MedMNISTSource(container) if container is not None else FolderSource(Path.cwd())
    return source.decode(samples, prep, **kwargs)
