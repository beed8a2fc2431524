"""``pneumoscan predict --dicom-out DIR``: the node's SR and Secondary Capture for every DICOM input of a batch run.

The Prediction comes from ``predict_files`` (the batch run's own answer); this reads the file's first 132 bytes
to see whether it is DICOM at all, then parses it once: its header only, or the whole dataset when the heatmap
rule wants a Secondary Capture (then decoded from that parse). Non-DICOM inputs are left out; a DICOM file
without the identifiers a result must reference gets one line on stderr.
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..data.images import is_dicom
from .screen import Screener, UnreadableInstance, parse
from .spool import atomic_write, safe_name

PREAMBLE = 132  # 128-byte preamble and "DICM"


class DicomOut:
    def __init__(self, folder: Path, screener: Screener):
        self.folder = folder
        self.screener = screener
        self.written = 0

    def __call__(self, prediction) -> list[Path]:
        path = Path(prediction.path)
        try:
            with open(path, "rb") as handle:
                head = handle.read(PREAMBLE + 1)
        except OSError:
            return []
        if not is_dicom(head):
            return []
        heatmap = self.screener.wants_heatmap(prediction)
        try:
            header = parse(path, str(path), pixels=heatmap)
        except UnreadableInstance as exc:
            print(f"pneumoscan: --dicom-out: {exc}; no SR written", file=sys.stderr)
            return []
        written = []
        try:
            decoded = self.screener.model.decode(header, str(path)) if heatmap else None
            made = self.screener.results_for(header, prediction, decoded)
        except Exception as exc:  # noqa: BLE001 - a header highdicom cannot build on: that file's results, not the run
            print(f"pneumoscan: --dicom-out: {path}: cannot build its results ({type(exc).__name__}: "
                  f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); none written", file=sys.stderr)
            return []
        for ds in made:
            target = self.folder / safe_name(str(ds.StudyInstanceUID)) / f"{safe_name(str(ds.SOPInstanceUID))}.dcm"
            atomic_write(target, lambda handle, ds=ds: ds.save_as(handle, enforce_file_format=True))
            written.append(target)
        self.written += len(written)
        return written
