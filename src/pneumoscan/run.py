"""A training run's folder, the one place that knows its files and how to read them back.

``RUN/config.yaml`` (the recipe), ``split.csv`` (which image went where), ``checkpoint.safetensors`` (everything
``--resume`` needs), ``best.safetensors`` (the selected epoch's weights), ``model.safetensors`` (the model file),
``metrics.csv``, ``val_predictions.csv``, ``skipped.txt`` and ``tensorboard/``. train, calibrate, evaluate and export
all read a run through ``RunFolder``, so they agree on it.

split.csv is one schema for every data source, a CSV with a short comment header::

    # pneumoscan split, format 2: each path is relative to root
    # source: folder
    # root: /data/chest_xray
    path,label,patient,subset
    train/NORMAL/IM-0115-0001.jpeg,NORMAL,IM-0115,train

A MedMNIST row's path is ``SPLIT/INDEX`` inside the ``.npz`` root (patient empty). Labelled site data (source
``labels``) has the labels CSV's folder (or the labelled folder) as root and each path as the CSV resolves it, ``../``
included; its patient column holds what ``data.labels`` grouped by, a DICOM PatientID or a CSV patient_id only as an
opaque label (``dicom-patient-0007``), never the identifier. Because the root is absolute and
the paths relative to it, every command finds the images from any working directory; ``data_root`` arguments
point at a dataset that moved. Two older schemas are still read: ``path,label,patient,subset`` with paths as given
to ``train`` (relative to where it ran) and MedMNIST's ``source,index,label,subset``.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from .data.layout import CLASSES, DatasetError, Sample
from .data.sources import DataSource, FolderSource, MedMNISTSource, decode_samples, source_kinds
from .errors import PneumoscanError
from .preprocess import Preprocessing

SPLIT_FORMAT = "2"
_COLUMNS = ("path", "label", "patient", "subset")


class RunFolderError(PneumoscanError):
    """A run folder lacks a file a command needs, or holds one it cannot read; the message names it."""


class RunFolder:
    """The folder of one training run; ``RunFolder(path)`` reads nothing until asked."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunFolder({str(self.path)!r})"

    @classmethod
    def of_model(cls, model_path: str | Path, *, split_sha256: str | None = None) -> RunFolder | None:
        """The run folder a model file sits in (None when no split.csv is beside it). With ``split_sha256`` (what
        the model file recorded), also None when that split.csv is another run's: its validation images may be
        this model's training images."""
        run = cls(Path(model_path).parent)
        if not run.split_path.is_file():
            return None
        if split_sha256 and split_sha256 != run.split_sha256():
            return None
        return run

    # ---- files ------------------------------------------------------------------------------------------------
    config_path = property(lambda self: self.path / "config.yaml")
    split_path = property(lambda self: self.path / "split.csv")
    checkpoint_path = property(lambda self: self.path / "checkpoint.safetensors")
    best_path = property(lambda self: self.path / "best.safetensors")
    model_path = property(lambda self: self.path / "model.safetensors")
    metrics_path = property(lambda self: self.path / "metrics.csv")
    val_predictions_path = property(lambda self: self.path / "val_predictions.csv")
    skipped_path = property(lambda self: self.path / "skipped.txt")
    tensorboard_dir = property(lambda self: self.path / "tensorboard")

    def require(self, *paths: Path, what: str = "a finished run folder") -> None:
        """Raise RunFolderError naming the first of ``paths`` that is missing."""
        for path in paths:
            if not path.is_file():
                raise RunFolderError(f"{self.path}: not {what} (no {path.name})")

    def split_sha256(self) -> str:
        from .modelfile import sha256_file

        return sha256_file(self.split_path)

    # ---- config -----------------------------------------------------------------------------------------------
    def config(self):
        """The run's TrainConfig (config.yaml, checked like any config)."""
        from .config import load_config

        self.require(self.config_path, what="a run folder")
        return load_config(self.config_path)

    def save_config(self, cfg) -> None:
        cfg.save(self.config_path)

    def write_skipped(self, messages: list[str]) -> None:
        if messages:
            self.skipped_path.write_text("\n".join(messages) + "\n")

    # ---- split ------------------------------------------------------------------------------------------------
    def write_split(self, source: DataSource, train: list[Sample], val: list[Sample]) -> None:
        """Record which image went where, relative to the source's root, so it can be reproduced and audited."""
        buffer = io.StringIO()
        buffer.write(f"# pneumoscan split, format {SPLIT_FORMAT}: each path is relative to root\n"
                     f"# source: {source.kind}\n# root: {source.root}\n")
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(_COLUMNS)
        for subset, items in (("train", train), ("val", val)):
            for s in items:
                writer.writerow([source.item(s), CLASSES[s.label], s.patient, subset])
        tmp = self.split_path.with_name(".split.csv.tmp")
        tmp.write_text(buffer.getvalue())
        tmp.replace(self.split_path)

    def source(self, data_root: str | Path | None = None) -> DataSource:
        """The data source split.csv was written from (``data_root``: where that data is now)."""
        return self._read(data_root)[0]

    def split(self, data_root: str | Path | None = None) -> tuple[list[Sample], list[Sample]]:
        """(train, validation) samples, their paths usable from any working directory."""
        _, train, val = self._read(data_root)
        return train, val

    def validation_images(self, prep: Preprocessing, data_root: str | Path | None = None,
                          ) -> tuple[np.ndarray, np.ndarray]:
        """uint8 (N, S, S) network inputs and labels of the run's validation split (unreadable files left out)."""
        cache = decode_samples(self.split(data_root)[1], prep)
        return cache.images, cache.labels

    def _read(self, data_root) -> tuple[DataSource, list[Sample], list[Sample]]:
        self.require(self.split_path, what="a run folder")
        lines = self.split_path.read_text().splitlines()
        header = {}
        while lines and lines[0].startswith("#"):
            key, sep, value = lines.pop(0)[1:].partition(":")
            if sep:
                header[key.strip()] = value.strip()
        rows = list(csv.DictReader(lines))
        columns = set(rows[0]) if rows else set()
        try:
            if "root" in header:
                return self._current(header, rows, data_root)
            if {"source", "index"} <= columns:
                return self._legacy_medmnist(rows, data_root)
            if set(_COLUMNS) <= columns:
                return self._legacy_folder(rows, data_root)
        except (KeyError, ValueError) as exc:
            if isinstance(exc, PneumoscanError):
                raise
            raise DatasetError(f"{self.split_path}: unreadable split record ({exc!r})") from None
        raise DatasetError(f"{self.split_path}: not a pneumoscan split.csv (columns {', '.join(sorted(columns))})")

    def _current(self, header: dict, rows: list[dict], data_root) -> tuple[DataSource, list[Sample], list[Sample]]:
        kinds = source_kinds()
        if header.get("source") not in kinds:
            raise DatasetError(f"{self.split_path}: unknown source {header.get('source')!r} "
                               f"(known: {', '.join(kinds)})")
        source = kinds[header["source"]](data_root or header["root"])
        if not source.root.exists():
            raise DatasetError(f"{self.split_path}: the data root {source.root} is not there; pass --data with the "
                               "dataset's new location")
        out: dict[str, list[Sample]] = {"train": [], "val": []}
        for row in rows:
            out[row["subset"]].append(source.sample(row["path"], CLASSES.index(row["label"]), row["patient"]))
        return source, out["train"], out["val"]

    def _legacy_folder(self, rows: list[dict], data_root) -> tuple[DataSource, list[Sample], list[Sample]]:
        """``path,label,patient,subset`` with each path as given to ``train``, relative to where it ran."""
        relocate = self._relocation(Path(rows[0]["path"]) if rows else Path(), data_root)
        out: dict[str, list[Sample]] = {"train": [], "val": []}
        for row in rows:
            out[row["subset"]].append(Sample(relocate(Path(row["path"])), CLASSES.index(row["label"]),
                                             row["patient"]))
        first = next(iter(out["train"] + out["val"]), None)
        root = data_root or next((p.parent for p in (first.path.parents if first else ())
                                  if p.name.lower() in ("train", "val", "test")), Path.cwd())
        return FolderSource(root), out["train"], out["val"]

    def _legacy_medmnist(self, rows: list[dict], data_root) -> tuple[DataSource, list[Sample], list[Sample]]:
        """MedMNIST's ``source,index,label,subset``: the .npz as given to ``train`` and an index into its split."""
        npz = Path(rows[0]["source"]) if rows else Path()
        source = MedMNISTSource(data_root or self._relocation(npz, None)(npz))
        out: dict[str, list[Sample]] = {"train": [], "val": []}
        for row in rows:
            out[row["subset"]].append(source.sample(f"{row['subset']}/{int(row['index'])}",
                                                    CLASSES.index(row["label"])))
        return source, out["train"], out["val"]

    def _relocation(self, example: Path, data_root):
        """How to turn an old split.csv's paths into existing ones, found on its first path: as written (from
        here), from a folder above the run (where training ran), or the tail of the path under ``data_root``."""
        if example.is_absolute() or example.exists():
            return lambda path: path
        for parent in self.path.resolve().parents:
            if (parent / example).exists():
                return lambda path, parent=parent: parent / path
        if data_root is not None:
            for i in range(len(example.parts)):
                if (Path(data_root) / Path(*example.parts[i:])).exists():
                    return lambda path, i=i: Path(data_root) / Path(*path.parts[i:])
        return lambda path: path  # not found: decoding reports each file by name
