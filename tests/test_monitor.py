"""``pneumoscan monitor`` and ``monitor.SlidingMonitor`` on records of real X-rays screened by the stage, written
in the format each route writes: the service's audit log (its AuditLog class), the archive's CSV (its row
cells) and Parquet, the DICOM node's results (JSON lines of ``Screened.facts()``)."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import KERMANY

from pneumoscan import monitor, pipeline
from pneumoscan.monitor.stream import _at_reference_prior
from pneumoscan.record import ModelRecord

ROOT = Path(__file__).resolve().parents[1]
N = 30


@pytest.fixture(scope="module")
def model():
    from pneumoscan.predict import load_model

    return load_model()


@pytest.fixture(scope="module")
def screened(model) -> dict[str, list]:
    """30 of the bundled model's validation X-rays, as they are and inverted (MONOCHROME1 shown raw)."""
    if not KERMANY.is_dir():
        pytest.fail(f"{KERMANY}: the real data set is missing")
    from pneumoscan.run import RunFolder

    samples = RunFolder(ROOT / "docs" / "results" / "default_run").split()[1]
    picked = [samples[i] for i in np.random.default_rng(0).choice(len(samples), N, replace=False)]
    decoded = [model.decode(str(s.path)) for s in picked]
    inverted = [replace(d, data=255 - d.data) for d in decoded]
    op = model.resolve_threshold("screening")
    clean = pipeline.decide(model, [pipeline.prepare(model, d, d.name) for d in decoded], op)
    dark = pipeline.decide(model, [pipeline.prepare(model, d, d.name) for d in inverted], op)
    return {"clean": clean, "inverted": dark}


def write_audit(path: Path, results, model_sha256: str) -> Path:
    """The service's audit lines (serve.audit.AuditLog), as serve/routes.py fills them: HTTP status in ``status``,
    the result's in ``prediction``, ``Screened.facts()`` under ``facts``; one health check line that is no
    screening result."""
    from pneumoscan.serve.audit import AuditLog

    log = AuditLog(path)
    log.write({"time": 1764979200.0, "method": "GET", "route": "/healthz", "status": 200})
    for i, s in enumerate(results):
        p = s.prediction
        log.write({"time": 1764979200.0 + 60 * i, "method": "POST", "route": "/predict", "status": 200,
                   "model_sha256": model_sha256, "prediction": p.status, "probability": p.probability,
                   "decision": p.decision, "operating_point": p.operating_point, "threshold": p.threshold,
                   "facts": s.facts()})
    log.close()
    return path


def write_archive_csv(path: Path, results, model) -> Path:
    """The archive's CSV: its columns and cells (archive.rows), facts included."""
    from pneumoscan.archive.rows import CSV_COLUMNS, csv_cells, how_made, screened_row

    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(CSV_COLUMNS)
        for s in results:
            writer.writerow(csv_cells(screened_row(s, 1, 1, how_made(model))))
    return path


def write_parquet(path: Path, results, model) -> Path:
    """The archive's Parquet columns (archive.rows)."""
    import pyarrow.parquet as pq

    from pneumoscan.archive.outputs import parquet_table
    from pneumoscan.archive.rows import how_made, screened_row

    pq.write_table(parquet_table([screened_row(s, 1, 1, how_made(model)) for s in results]), path)
    return path


def write_node_results(path: Path, results) -> Path:
    """The DICOM node's results: one JSON line per instance, its SOP Instance UID and the facts."""
    with open(path, "w") as f:
        for i, s in enumerate(results):
            f.write(json.dumps({"sop_instance_uid": f"1.2.826.0.1.3680043.10.1.{i}", "facts": s.facts()}) + "\n")
    return path


def run_monitor(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pneumoscan.cli", "monitor", *args], capture_output=True,
                          text=True, timeout=600, cwd=ROOT)


# --- the reference ------------------------------------------------------------------------------------------------

def test_bundled_reference_is_the_bundled_models_validation_and_is_found_by_its_sha256(model):
    from pneumoscan.predict import BUNDLED_SHA256

    ref = monitor.reference_of_model()
    assert monitor.reference_for(model) == ref  # what a service loads beside the model
    assert ref.model_sha256 == BUNDLED_SHA256
    assert ref.n == 1043 and ref.statuses["ok"] == ref.counts["probability"]
    assert abs(ref.prior - 775 / 1043) < 1e-9  # the validation share the calibration was fitted at
    assert abs(ref.share() - ref.prior) < 0.02  # a calibrated model's EM share on its own validation


def test_reference_round_trips_through_the_model_record_and_a_model_file(screened, model, tmp_path):
    from pneumoscan.modelfile import save_model_file

    ref = monitor.build_reference([s.facts() for s in screened["clean"]], prior=0.74, model_sha256="abc",
                                  source="30 validation images")
    record = model.record.with_(drift_reference=ref.to_dict())
    again = ModelRecord.from_json(record.to_json())
    assert monitor.Reference.from_dict(again.drift_reference) == ref
    assert ModelRecord.from_json(model.record.to_json()).drift_reference is None  # older files still load

    import torch

    path = save_model_file(tmp_path / "m.safetensors", {"w": torch.zeros(1)}, record.to_dict())
    assert path
    assert monitor.reference_of_model(tmp_path / "m.safetensors") == ref


def test_a_model_without_a_reference_is_refused_naming_the_file(model, tmp_path):
    import torch

    from pneumoscan.modelfile import save_model_file

    save_model_file(tmp_path / "old.safetensors", {"w": torch.zeros(1)}, model.record.to_dict())
    result = run_monitor("--model", str(tmp_path / "old.safetensors"), str(tmp_path / "x.jsonl"))
    assert result.returncode == 2
    assert "old.safetensors: the model record has no drift reference" in result.stderr
    assert "Traceback" not in result.stderr


# --- each route's records ---------------------------------------------------------------------------------------------

def test_records_of_every_route_read_the_same_and_missing_figures_are_none(screened, model, tmp_path):
    results = screened["clean"]
    audit, other = monitor.read_records([write_audit(tmp_path / "audit.log", results, model.sha256)])
    node, _ = monitor.read_records([write_node_results(tmp_path / "node.jsonl", results)])
    table, _ = monitor.read_records([write_archive_csv(tmp_path / "out.csv", results, model)])
    parquet, _ = monitor.read_records([write_parquet(tmp_path / "out.parquet", results, model)])
    assert other == 1  # the health check line, counted, not judged
    for rows in (audit, node, table, parquet):
        assert [r["status"] for r in rows] == [s.status for s in results]
        for r, s in zip(rows, results, strict=True):
            p = s.prediction.probability
            assert (r["probability"] is None and p is None) or abs(r["probability"] - p) < 1e-6
    for rows in (audit, node):
        assert [r["guard_score"] for r in rows] == pytest.approx([s.prediction.guard_score for s in results])
    assert {r["format"] for r in table} == {"jpeg"} and {r["manufacturer"] for r in table} == {None}


# --- the command --------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_exit_0_on_validation_xrays_for_every_route_with_a_table_json_and_plot(screened, model, tmp_path):
    results = screened["clean"]
    sources = [write_audit(tmp_path / "audit.log", results, model.sha256),
               write_archive_csv(tmp_path / "out.csv", results, model),
               write_parquet(tmp_path / "out.parquet", results, model),
               write_node_results(tmp_path / "node.jsonl", results)]
    for source in sources:
        result = run_monitor(str(source), "--window", str(N), "--simulations", "300",
                             "--json", str(tmp_path / "m.json"), "--plot", str(tmp_path / "m.png"))
        assert result.returncode == 0, (source, result.stdout, result.stderr)
        assert "0 of 1 window(s) alarm" in result.stdout
        report = json.loads((tmp_path / "m.json").read_text())
        assert report["alarm"] is False and report["windows"][0]["n"] == N
        assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_exit_1_when_inverted_images_arrive_and_the_score_says_which_figures_moved(screened, model, tmp_path):
    stream = screened["clean"] + screened["inverted"]
    source = write_node_results(tmp_path / "node.jsonl", stream)
    result = run_monitor(str(source), "--window", str(N), "--simulations", "300", "--json", "-")
    assert result.returncode == 1, result.stderr
    report = json.loads(result.stdout)
    first, second = report["windows"]
    assert not first["alarm"] and second["alarm"]
    assert second["score"] > second["threshold"]
    assert min(second["p_values"], key=second["p_values"].get) in ("input_mean", "guard_score", "probability",
                                                                   "rejection")


def test_windows_by_day_use_the_audit_times(screened, model, tmp_path):
    rows, _ = monitor.read_records([write_audit(tmp_path / "audit.log", screened["clean"], model.sha256)])
    later = [{**r, "time": r["time"].replace(day=7)} for r in rows]  # the same results a day later
    days = monitor.windows(rows + later, by_day=True)
    assert [label for label, _ in days] == ["2025-12-06", "2025-12-07"] and len(days[0][1]) == N
    ref = monitor.bundled_reference()
    report = monitor.monitor(rows, ref, by_day=True, null=monitor.NullModel(ref, simulations=300))
    (day,) = report.windows
    assert day.label == "2025-12-06" and day.n == N and day.threshold is not None and not day.alarm
    assert day.start.startswith("2025-12-06T00:00") and report.other_lines == 0


@pytest.mark.parametrize("case", ["missing", "json", "csv", "reference", "by-day", "suffix"])
def test_bad_input_exits_2_with_one_line_naming_the_file(case, screened, tmp_path):
    args = []
    if case == "missing":
        args, expect = [str(tmp_path / "nope.jsonl")], "nope.jsonl: no such file"
    elif case == "json":
        (tmp_path / "a.jsonl").write_text('{"status": "ok", "probability": 0.5}\n{broken\n')
        args, expect = [str(tmp_path / "a.jsonl")], "a.jsonl:2: not a JSON line"
    elif case == "csv":
        (tmp_path / "a.csv").write_text("path,probability\nx.png,0.5\n")
        args, expect = [str(tmp_path / "a.csv")], "a.csv: not a results CSV (no status column)"
    elif case == "reference":
        (tmp_path / "ref.json").write_text('{"version": 99}')
        write_node_results(tmp_path / "n.jsonl", screened["clean"])
        args, expect = ["--reference", str(tmp_path / "ref.json"), str(tmp_path / "n.jsonl")], "ref.json: drift " \
            "reference version 99"
    elif case == "by-day":
        write_node_results(tmp_path / "n.jsonl", screened["clean"])
        args, expect = ["--by-day", str(tmp_path / "n.jsonl")], "have no time; windows by day need"
    else:
        (tmp_path / "a.txt").write_text("")
        args, expect = [str(tmp_path / "a.txt")], "a.txt: not a record file the monitor reads"
    result = run_monitor(*args)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pneumoscan: error: ") and expect in lines[0], result.stderr


# --- statistics ---------------------------------------------------------------------------------------------------

def test_em_share_recovers_a_known_pneumonia_share_within_its_interval():
    rng = np.random.default_rng(0)
    prior, share = 0.74, 0.30
    y = rng.random(3000) < share
    x = rng.normal(np.where(y, 1.0, -1.0), 1.0)
    p = 1 / (1 + np.exp(-(2 * x + np.log(prior / (1 - prior)))))  # Bayes posterior at the prior
    estimate, low, high = monitor.em_share(p, prior)
    assert low < share < high and high - low < 0.1
    assert abs(estimate - y.mean()) < 0.03


def test_probabilities_rebased_to_another_prevalence_are_moved_back_to_the_reference_prior():
    record = {"status": "ok", "probability": 0.5, "prevalence": 0.3}
    moved = _at_reference_prior(record, 0.74)
    odds = 0.5 / 0.5 / (0.3 / 0.7) * (0.74 / 0.26)
    assert moved["probability"] == pytest.approx(odds / (1 + odds))


# --- inside a service ---------------------------------------------------------------------------------------------

def test_sliding_monitor_alarms_off_the_request_path_and_exports_gauges(screened):
    from prometheus_client import CollectorRegistry, generate_latest

    ref = monitor.bundled_reference()
    sliding = monitor.SlidingMonitor(ref, window=N, every=5, null=monitor.NullModel(ref, simulations=300)).start()
    try:
        for s in screened["clean"]:
            sliding.submit(s.facts())
        calm = sliding.wait_for(N)
        assert calm is not None and calm.n == N and calm.score is not None and not calm.alarm
        for s in screened["inverted"]:
            sliding.submit(s.facts())
        alarmed = sliding.wait_for(2 * N)
        assert alarmed.alarm and alarmed.n == N
        registry = CollectorRegistry()
        sliding.register(registry)
        text = generate_latest(registry).decode()
        assert "pneumoscan_drift_alarm 1.0" in text and "pneumoscan_drift_score " in text
    finally:
        sliding.stop()


def test_sliding_monitor_reads_rebased_probabilities_at_the_reference_prior(screened):
    import math

    ref = monitor.bundled_reference()

    def rebased(facts: dict, prevalence: float) -> dict:  # what a service started with --prevalence records
        p = min(max(facts["probability"], 1e-12), 1 - 1e-12) if facts["probability"] is not None else None
        if p is None:
            return {**facts, "prevalence": prevalence}
        z = math.log(p / (1 - p)) - math.log(ref.prior / (1 - ref.prior)) + math.log(prevalence / (1 - prevalence))
        return {**facts, "probability": 1 / (1 + math.exp(-z)), "prevalence": prevalence}

    shares = []
    for prevalence in (None, 0.3):
        sliding = monitor.SlidingMonitor(ref, window=N, every=5, null=monitor.NullModel(ref, simulations=50)).start()
        try:
            for s in screened["clean"]:
                facts = s.facts()
                sliding.submit(facts if prevalence is None else rebased(facts, prevalence))
            shares.append(sliding.wait_for(N).pneumonia_share[0])
        finally:
            sliding.stop()
    assert shares[1] == pytest.approx(shares[0], abs=1e-6)


def test_sliding_monitor_submit_never_blocks_a_full_queue_drops_and_counts():
    ref = monitor.bundled_reference()
    sliding = monitor.SlidingMonitor(ref, window=N, queue_size=1)  # not started: nothing drains the queue
    sliding.submit({"status": "ok", "probability": 0.5})
    sliding.submit({"status": "ok", "probability": 0.5})
    assert sliding.dropped == 1 and sliding.gauges()["dropped"] == 1.0
