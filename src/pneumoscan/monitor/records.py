"""Reading what the routes recorded: audit logs (rotated copies too), the DICOM node's JSON lines, JSON
documents, and the archive's CSV and Parquet outputs, each row normalised to one record shape (``normalise``),
so that every later step reads one format whatever route wrote it."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from datetime import datetime, timezone
from pathlib import Path

from ..pipeline import STATUSES
from .fields import ABSENT, CATEGORIES, CONTINUOUS, MonitorError


def normalise(row: dict) -> dict | None:
    """One record as the monitor reads it, or None when it is no screening result (an audit line of a health
    check or a refused request). Tolerant: a figure the route did not record is None. The facts may be flat or
    under ``facts``; an audit line's ``status`` is the HTTP status and its ``prediction`` the result's."""
    if isinstance(row.get("facts"), dict):
        row = {**row, **row["facts"]}
    status = next((v for v in (row.get("prediction"), row.get("prediction_status"), row.get("status"))
                   if isinstance(v, str) and v in STATUSES), None)
    if status is None:
        return None
    out: dict = {"status": status}
    for key in CONTINUOUS:
        out[key] = _number(row.get(key))
    if status != "ok":
        out["probability"] = None
    for key in CATEGORIES:
        value = row.get(key, ABSENT)
        out[key] = None if value is None or value == "" else str(value)
    out["prevalence"] = _number(row.get("prevalence"))  # the share the route re-based probabilities to, if any
    out["time"] = _time(row.get("time", row.get("timestamp")))
    out["model_sha256"] = row.get("model_sha256") or None
    return out


def _number(value) -> float | None:
    if value is None or value == "":
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _time(value) -> datetime | None:
    if value is None or value == "":
        return None
    if isinstance(value, int | float):
        return datetime.fromtimestamp(float(value), timezone.utc)
    try:
        when = datetime.fromisoformat(str(value).replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=timezone.utc)


SUFFIXES = (".jsonl", ".json", ".log", ".ndjson", ".csv", ".parquet")


def read_records(sources: Sequence[str | Path]) -> tuple[list[dict], int]:
    """(screening records in the order given, how many lines were no screening result) of audit logs (JSON
    lines, rotated ``.log.N`` copies too), JSON files (a list of rows, or an object holding one), CSV and Parquet
    outputs, and folders of them. Anything unreadable is an error naming the file and line."""
    rows: list[dict] = []
    other = 0
    for source in sources:
        for path in _files(Path(source)):
            for row in _rows(path):
                record = normalise(row)
                if record is None:
                    other += 1
                else:
                    rows.append(record)
    return rows, other


def _files(path: Path) -> list[Path]:
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.is_file() and _readable_kind(p) is not None)
        if not found:
            raise MonitorError(f"{path}: no records in this folder (looked for {', '.join(SUFFIXES)})")
        return found
    if not path.exists():
        raise MonitorError(f"{path}: no such file")
    if _readable_kind(path) is None:
        raise MonitorError(f"{path}: not a record file the monitor reads ({', '.join(SUFFIXES)}, or a rotated "
                           "audit log NAME.log.N)")
    return [path]


def _readable_kind(path: Path) -> str | None:
    suffixes = [s.lower() for s in path.suffixes]
    if not suffixes:
        return None
    if suffixes[-1] == ".parquet":
        return "parquet"
    if suffixes[-1] == ".csv":
        return "csv"
    if suffixes[-1] in (".jsonl", ".json", ".log", ".ndjson") or (
            len(suffixes) >= 2 and suffixes[-2] == ".log" and suffixes[-1][1:].isdigit()):
        return "json"
    return None


def _rows(path: Path) -> Iterator[dict]:
    kind = _readable_kind(path)
    if kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            yield from pq.read_table(path).to_pylist()
        except (pa.ArrowException, OSError) as exc:
            raise MonitorError(f"{path}: unreadable Parquet file ({str(exc).splitlines()[0][:200]})") from None
        return
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MonitorError(f"{path}: cannot read ({getattr(exc, 'strerror', None) or exc})") from None
    if kind == "csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "status" not in reader.fieldnames:
            raise MonitorError(f"{path}: not a results CSV (no status column)")
        yield from reader
        return
    stripped = text.lstrip()
    if stripped.startswith("["):
        yield from _json_list(path, stripped)
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            if number == 1:  # one JSON document over several lines
                yield from _json_list(path, stripped)
                return
            raise MonitorError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(row, dict):
            raise MonitorError(f"{path}:{number}: a record must be a JSON object")
        yield row


def _json_list(path: Path, text: str) -> list[dict]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise MonitorError(f"{path}: neither JSON lines nor a JSON document ({exc})") from None
    if isinstance(data, dict):
        data = next((v for k in ("results", "rows", "predictions", "records") if isinstance(v := data.get(k), list)),
                    None)
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise MonitorError(f"{path}: expected a list of records (or an object with a 'results' list)")
    return data
