"""``pneumoscan predict --dicom-out DIR``: the node's SR and Secondary Capture for every DICOM input of a batch run.

The Prediction comes from ``predict_files`` (the batch run's own answer); this only reads the file's header again
(and, for a Secondary Capture, its pixels through ``Model.decode``) to make the objects. Non-DICOM inputs and
files without the identifiers a result must reference are left out, with one line on stderr for the latter.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..data.images import is_dicom
from .screen import Screener, UnreadableInstance, read_header
from .spool import atomic_write, safe_name


class DicomOut:
    def __init__(self, folder: Path, screener: Screener):
        self.folder = folder
        self.screener = screener
        self.written = 0

    def __call__(self, prediction) -> list[Path]:
        path = Path(prediction.path)
        try:
            data = path.read_bytes()
        except OSError:
            return []
        if not is_dicom(data):
            return []
        try:
            header = read_header(data, str(path))
        except UnreadableInstance as exc:
            print(f"pneumoscan: --dicom-out: {exc}; no SR written", file=sys.stderr)
            return []
        decoded = None
        if prediction.status == "ok" and self.screener.heatmaps:
            decoded = self.screener.model.decode(data, str(path))
        written = []
        try:
            made = self.screener.results_for(header, prediction, decoded)
        except Exception as exc:  # a header highdicom cannot build on: that file's results, not the run
            print(f"pneumoscan: --dicom-out: {path}: cannot build its SR ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); none written", file=sys.stderr)
            return []
        for ds in made:
            target = self.folder / safe_name(str(ds.StudyInstanceUID)) / f"{safe_name(str(ds.SOPInstanceUID))}.dcm"
            atomic_write(target, lambda handle, ds=ds: ds.save_as(handle, enforce_file_format=True))
            written.append(target)
        self.written += len(written)
        return written
