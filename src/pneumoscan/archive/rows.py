"""One row per screened file, the same on every engine and in every output, saying how it was made.

A row holds the decision (``Prediction``), the file's identity for ``--resume`` (size, modification time), its
DICOM identifiers, and what made it: the model's sha256, the prevalence the probabilities were re-based to (None
when none was given) and the calibration arithmetic in force (temperature and bias: probability =
sigmoid((z1 - z0) / temperature + bias)). With those in every row, an output that mixed two calibrations could be
seen for what it is afterwards, and a row can be recomputed from its logits by anyone.

A row also holds the result's ``Screened.facts()`` (``FACT_COLUMNS``: network-input statistics, the image's size
and format, the DICOM categories and an age band; no name or identifier), what drift monitoring reads, recorded
by every route alike, and the guard's feature distance (``guard_score``, last), so the monitor's guard-distance
test runs on archive outputs too.

A row whose image got a heatmap (``predict --heatmaps``) names its file in ``heatmap`` (last column), so two
inputs with one file name can be told apart by their rows.

The journal keeps ``ROW_KEYS`` (and ``heatmap`` where there is one); the CSV and Parquet files show ``CSV_COLUMNS`` and ``PARQUET_COLUMNS`` (their
older columns first, in their old order; the newer ones after, so scripts that read by position keep working).
"""

from __future__ import annotations

UID_COLUMNS = ["study_instance_uid", "series_instance_uid", "sop_instance_uid"]
# how a row was made (beside its operating point and threshold, which every row has had)
MADE_KEYS = ["model_sha256", "prevalence", "temperature", "bias"]
# ``pipeline.Screened.facts()`` beyond what a row already has (status, probability, guard_score)
FACT_COLUMNS = ["input_mean", "input_std", "width", "height", "format", "modality", "manufacturer", "view",
                "photometric", "age_band"]
# the guard's feature distance last: the drift monitor's guard-distance test reads it (issue 26)
CSV_COLUMNS = ["path", "probability", "decision", "threshold", "status", "message",
               "operating_point", "prevalence", "temperature", "bias", "model_sha256", *FACT_COLUMNS, "guard_score",
               "heatmap"]
PARQUET_COLUMNS = ["path", "probability", "decision", "threshold", "status", "message", "model_sha256",
                   *UID_COLUMNS, "operating_point", "prevalence", "temperature", "bias", *FACT_COLUMNS, "guard_score",
                   "heatmap"]
# what the journal keeps per row: everything any output needs, and the file's identity for --resume
ROW_KEYS = ["path", "probability", "decision", "operating_point", "threshold", "status", "message", "guard_score",
            "size", "mtime_ns", *UID_COLUMNS, *MADE_KEYS, *FACT_COLUMNS]

# Arrow types of the columns (every other column is a string)
FLOAT_COLUMNS = ("probability", "threshold", "guard_score", "prevalence", "temperature", "bias", "input_mean",
                 "input_std")
INT_COLUMNS = ("size", "mtime_ns", "width", "height")


def how_made(model) -> dict:
    """What a row of ``model`` records about how it was made (``MADE_KEYS``)."""
    return {"model_sha256": model.sha256, "prevalence": model.prevalence, "temperature": float(model.temperature),
            "bias": float(model.bias)}


def uids(header) -> dict[str, str | None]:
    """The DICOM identifiers of a file (``header``: its DicomHeader, or None for other formats)."""
    return {k: (getattr(header, k, None) if header is not None else None) for k in UID_COLUMNS}


def make_row(pred, size: int | None, mtime_ns: int | None, header=None, made: dict | None = None,
             facts: dict | None = None) -> dict:
    """The journal row of one Prediction (``header``: the file's DicomHeader, or None; ``made``: ``how_made``
    of the model that scored it, without it the writer adds its run's, see ``ArchiveWriter.add``; ``facts``:
    the result's ``Screened.facts()``, None where not known)."""
    facts = facts or {}
    return {"path": pred.path, "probability": pred.probability, "decision": pred.decision,
            "operating_point": pred.operating_point, "threshold": pred.threshold, "status": pred.status,
            "message": pred.message, "guard_score": pred.guard_score, "size": size, "mtime_ns": mtime_ns,
            **uids(header), **(made or {}), **{k: facts.get(k) for k in FACT_COLUMNS}}


def screened_row(screened, size: int | None, mtime_ns: int | None, made: dict) -> dict:
    """The journal row of one ``pipeline.Screened`` result: its decision, DICOM UIDs and facts."""
    decoded = screened.decoded
    return make_row(screened.prediction, size, mtime_ns, decoded.dicom if decoded is not None else None, made,
                    screened.facts())


def _number(value) -> str:
    """A figure as Python writes it back exactly (shortest round-trip), empty when there is none."""
    return "" if value is None else repr(float(value))


def csv_cells(row: dict) -> list[str]:
    """The CSV row: the first six cells as ``pneumoscan predict --csv`` always wrote them, then how it was made."""
    probability = "" if row["probability"] is None else f"{row['probability']:.6f}"
    return [row["path"], probability, row["decision"] or "", f"{row['threshold']:.6f}", row["status"],
            row["message"], row["operating_point"], _number(row["prevalence"]), _number(row["temperature"]),
            _number(row["bias"]), row["model_sha256"],
            *(_number(row[k]) if k in FLOAT_COLUMNS else "" if row[k] is None else str(row[k]) for k in FACT_COLUMNS),
            _number(row["guard_score"]), row.get("heatmap") or ""]
