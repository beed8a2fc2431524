"""Outputs people read: the per-file CSV and heatmaps of ``predict``, and the plots of ``evaluate``."""

from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path

CSV_COLUMNS = ["path", "probability", "decision", "threshold", "status", "message"]


class PredictionWriter:
    """Collects predictions into a CSV written to a temporary file and renamed only when the run completes,
    so an interrupted run never leaves a CSV that looks complete."""

    def __init__(self, csv_path: str | None, heatmap_dir: str | None, model):
        self.csv_path = Path(csv_path) if csv_path else None
        self.heatmap_dir = Path(heatmap_dir) if heatmap_dir else None
        self.model = model
        self._file = None
        self._tmp = None

    def __enter__(self) -> PredictionWriter:
        if self.csv_path:
            self.csv_path.parent.mkdir(parents=True, exist_ok=True)
            fd, self._tmp = tempfile.mkstemp(dir=self.csv_path.parent, prefix=f".{self.csv_path.name}.", suffix=".tmp")
            self._file = os.fdopen(fd, "w", newline="")
            self._csv = csv.writer(self._file)
            self._csv.writerow(CSV_COLUMNS)
        if self.heatmap_dir:
            self.heatmap_dir.mkdir(parents=True, exist_ok=True)
        return self

    def add(self, pred) -> None:
        if self._file:
            probability = "" if pred.probability is None else f"{pred.probability:.6f}"
            self._csv.writerow([pred.path, probability, pred.decision or "", f"{pred.threshold:.6f}", pred.status,
                                pred.message])
        if self.heatmap_dir and pred.status == "ok":
            from .explain import save_heatmap

            save_heatmap(self.model, pred.path, self.heatmap_dir)

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._file:
            self._file.close()
            if exc_type is None:
                os.replace(self._tmp, self.csv_path)
            else:
                Path(self._tmp).unlink(missing_ok=True)
