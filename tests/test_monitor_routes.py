"""Drift monitoring wired into every route: the reference that training and adaptation store in the model record,
the drift gauges on ``/metrics`` of ``serve`` (over a real socket) and of the DICOM node (fed by real C-STOREs),
the node's results log that ``pneumoscan monitor`` reads, and the archive outputs' ``guard_score`` column.

The models are the small, structurally real ones of conftest (a 2-epoch run at 64 px, an adapted tiny model): the
wiring does not depend on what the network learnt. Tests wait on events (the monitor's ``wait_for``), never on
time."""

from __future__ import annotations

import io
import json
import math
import os
import queue
import stat
import sys
import threading
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import make_model_file, save_gray, synthetic_xray
from prometheus_client.parser import text_string_to_metric_families
from test_adapt import site_folder

from pneumoscan import monitor
from pneumoscan.predict import load_model

WINDOW = 20  # monitor.MIN_WINDOW: the smallest sliding window, so few requests fill it


def gauges(text: str) -> dict[str, float]:
    """Prometheus exposition text -> {sample name (with labels): value}."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            out[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return out


@pytest.fixture(scope="module")
def adapted_path(tmp_path_factory) -> Path:
    """A tiny model adapted to 30 site images: its record carries the reference of those images."""
    from pneumoscan.adapt import adapt_unlabelled, image_files, load_site

    root = tmp_path_factory.mktemp("adapted")
    base = load_model(make_model_file(root / "base.safetensors"), precision="float32")
    assert monitor.reference_for(base) is None  # the conftest model predates drift monitoring
    site = load_site(base, image_files(site_folder(root / "site", 30)))
    path = root / "adapted.safetensors"
    adapt_unlabelled(base, site).save(path)
    return path


@pytest.fixture(scope="module")
def adapted(adapted_path):
    return load_model(adapted_path, precision="float32")


def png_bytes(seed: int) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.round(synthetic_xray(64, seed) * 255).astype(np.uint8), "L").save(buf, "PNG")
    return buf.getvalue()


# --- the reference in the model record -------------------------------------------------------------------------------

def test_a_trained_model_carries_the_reference_of_its_validation_images(tmp_path):
    from pneumoscan.config import load_config
    from pneumoscan.train import fit

    data = tmp_path / "data"
    for label, name in enumerate(("NORMAL", "PNEUMONIA")):
        for patient in range(20):
            for image_no in range(2):
                fname = (f"person{patient}_bacteria_{image_no}.jpeg" if label else f"IM-{patient:04d}-{image_no:04d}.jpeg")
                save_gray(data / "train" / name / fname, synthetic_xray(64, label * 100 + patient * 2 + image_no,
                                                                         opacity=0.5 * label), "RGB")
    cfg = load_config(None, image_size=64, epochs=1, batch_size=8, pretrained="none", num_workers=0,
                      val_fraction=0.45)
    fit(cfg, data, tmp_path / "run", progress=False)
    model = load_model(tmp_path / "run" / "model.safetensors", precision="float32")
    ref = monitor.reference_for(model)
    assert ref is not None
    n_val = model.record.validation["n"]
    assert ref.n == n_val >= monitor.MIN_WINDOW
    assert ref.prior == pytest.approx(model.record.fitted_prevalence)
    assert ref.counts["input_mean"] == ref.counts["guard_score"] == n_val  # every image scored through the stage
    assert ref.statuses.get("ok", 0) == ref.counts["probability"]
    # cached uint8 inputs: no file, so no header; left out rather than "(none)", which any real stream would differ from
    assert all(not values for values in ref.categories.values())
    assert ref.model_sha256 is None and f"{n_val} validation images" in ref.source
    # two images per patient: the reference counts its validation patients, and no figure is worth more images
    assert ref.patients == n_val // 2
    assert all(1 <= ref.effective[k] <= ref.counts[k] for k in monitor.CONTINUOUS)


def test_an_adapted_model_carries_the_reference_of_the_site_images_it_was_fitted_on(adapted):
    ref = monitor.reference_for(adapted)
    assert ref is not None and "site images" in ref.source
    assert ref.n == adapted.record.adaptation["unlabelled"]["images"] == 30
    assert ref.prior == pytest.approx(adapted.record.fitted_prevalence)  # the EM prevalence the calibration holds at
    assert all(not values for values in ref.categories.values())
    # unlabelled site images have no patient ids: counted as independent images
    assert ref.patients is None and ref.effective == {k: float(ref.counts[k]) for k in monitor.CONTINUOUS}


# --- serve: the drift gauges on /metrics -----------------------------------------------------------------------------

def test_serve_exports_drift_gauges_computed_off_the_request_path(adapted, tmp_path, monkeypatch):
    """After a window of screened requests /metrics has the drift gauges; the request path only put each result's
    facts (the audit line's) on the monitor's queue without blocking, and every judgement ran in the monitor's
    thread."""
    from pneumoscan.serve import create_app, serve_in_thread

    class Recording(queue.Queue):
        def __init__(self):
            super().__init__(maxsize=10000)
            self.puts: list[tuple[str, bool]] = []

        def put(self, item, block=True, timeout=None):
            if item is not None:  # None: stop's sentinel
                self.puts.append((threading.current_thread().name, block))
            super().put(item, block, timeout)

    judged: list[str] = []
    judge = monitor.judge

    def recording_judge(*args, **kwargs):
        judged.append(threading.current_thread().name)
        return judge(*args, **kwargs)

    for cls in (monitor.SlidingMonitor, monitor.NullModel):  # where the windows and the threshold are judged
        monkeypatch.setattr(sys.modules[cls.__module__], "judge", recording_judge)
    app = create_app(adapted, audit_log=tmp_path / "audit.log", drift_window=WINDOW)
    drift = app.state.service.drift
    assert drift is not None and drift.window == WINDOW
    monkeypatch.setattr(drift, "_queue", Recording())
    with serve_in_thread(app) as url, httpx.Client(base_url=url, timeout=60) as client:
        before = gauges(client.get("/metrics").text)
        assert math.isnan(before["pneumoscan_drift_score"]) and before["pneumoscan_drift_window_results"] == 0
        for seed in range(WINDOW):
            answer = client.post("/v1/predict", files={"file": (f"{seed}.png", png_bytes(700 + seed), "image/png")})
            assert answer.status_code == 200, answer.text
        figures = drift.wait_for(WINDOW)
        assert figures is not None and figures.n == WINDOW
        after = gauges(client.get("/metrics").text)
    assert after["pneumoscan_drift_window_results"] == WINDOW
    assert math.isfinite(after["pneumoscan_drift_score"]) and math.isfinite(after["pneumoscan_drift_threshold"])
    assert after["pneumoscan_drift_alarm"] in (0.0, 1.0) and after["pneumoscan_drift_dropped"] == 0
    puts = drift._queue.puts
    assert len(puts) == WINDOW and all(not block for _, block in puts)  # put_nowait: never waits
    assert all(name != "pneumoscan-drift" for name, _ in puts)
    assert judged and set(judged) == {"pneumoscan-drift"}  # the threshold and every window: the monitor's thread
    lines = [json.loads(line) for line in (tmp_path / "audit.log").read_text().splitlines()]
    screened = [line for line in lines if line["route"] == "/v1/predict"]
    assert len(screened) == WINDOW and all(line["facts"]["status"] == line["prediction"] for line in screened)
    assert all("prevalence" in line and line["prevalence"] is None for line in screened)  # none given
    records, _ = monitor.read_records([tmp_path / "audit.log"])
    assert len(records) == WINDOW and all(r["guard_score"] is not None for r in records)


def test_serve_has_no_drift_gauges_without_a_reference_or_with_window_0(adapted, tiny_model):
    for app in (create(tiny_model), create(adapted, drift_window=0)):
        assert app.state.service.drift is None
        assert b"pneumoscan_drift" not in app.state.metrics.render()


def create(model, **kw):
    from pneumoscan.serve import create_app

    return create_app(model, **kw)


def test_serve_drift_window_option_is_checked(capsys):
    from pneumoscan.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--drift-window", "5"])
    assert exit_info.value.code == 2
    assert "--drift-window: must be 0 or a whole number from 20 to 100000, got '5'" in capsys.readouterr().err


# --- the DICOM node: results log and /metrics -------------------------------------------------------------------------

def test_node_logs_results_for_the_monitor_and_serves_drift_gauges(adapted, adapted_path, tmp_path):
    """Real C-STOREs (pynetdicom) to the node: one results-log line per instance (no patient attribute, the umask's
    mode) that the monitor reads, and /metrics on the node's host with the drift gauges and the status counts."""
    from test_dicom_node import send

    from pneumoscan.dicom import samples
    from pneumoscan.dicom.node import Node

    files = []
    for i in range(WINDOW):
        ds = samples.xray_dicom(synthetic_xray(128, 800 + i) * 255, side=None, patient_name=f"Secret^Name{i}",
                                patient_id=f"SECRET-ID-{i}")
        files.append(tmp_path / f"{i}.dcm")
        ds.save_as(files[-1], enforce_file_format=True)
    node = Node(adapted, spool=tmp_path / "spool", out=tmp_path / "out", host="127.0.0.1", port=0,
                heatmaps="none", metrics_port=0, drift_window=WINDOW).start()
    try:
        assert node.drift is not None and node.metrics_port
        for path in files:
            assert send(node.port, path) == 0x0000
        figures = node.drift.wait_for(WINDOW, timeout=120)
        assert figures is not None and figures.n == WINDOW
        text = httpx.get(f"http://127.0.0.1:{node.metrics_port}/metrics", timeout=30).text
    finally:
        node.stop()
    found = gauges(text)
    assert found["pneumoscan_drift_window_results"] == WINDOW and math.isfinite(found["pneumoscan_drift_score"])
    assert sum(v for k, v in found.items() if k.startswith("pneumoscan_dicom_screened_total")) == WINDOW
    log = tmp_path / "spool" / "results.jsonl"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(log.stat().st_mode) == 0o666 & ~umask  # durable's policy: the umask decides
    content = log.read_text()
    assert "Secret" not in content and "SECRET" not in content
    lines = [json.loads(line) for line in content.splitlines()]
    assert len(lines) == WINDOW
    assert all(set(line) == {"time", "sop_instance_uid", "model_sha256", "prevalence", "facts"} for line in lines)
    assert {line["model_sha256"] for line in lines} == {adapted.sha256}
    sent = {str(__import__("pydicom").dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files}
    assert {line["sop_instance_uid"] for line in lines} == sent
    assert all(line["facts"]["format"] == "dicom" and line["facts"]["modality"] == "DX" for line in lines)
    records, other = monitor.read_records([log])
    assert len(records) == WINDOW and other == 0
    report = monitor.monitor(records, monitor.reference_of_model(adapted_path), size=WINDOW,
                             null=monitor.NullModel(monitor.reference_of_model(adapted_path), simulations=200))
    assert [w.n for w in report.windows] == [WINDOW] and report.windows[0].score is not None


def test_node_metrics_port_in_use_is_one_clear_error(adapted, tmp_path):
    import socket

    from pneumoscan.dicom.node import Node
    from pneumoscan.errors import PneumoscanError

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        node = Node(adapted, spool=tmp_path / "spool", out=tmp_path / "out", port=0, heatmaps="none",
                    metrics_port=taken.getsockname()[1])
        with pytest.raises(PneumoscanError, match=r"--metrics-port \d+: cannot listen on 127.0.0.1"):
            node.start()
        node.stop()
    assert node.alive() == {}  # refused before any worker started


# --- the archive: guard_score in both outputs -----------------------------------------------------------------------

def test_archive_outputs_carry_the_guard_distance_the_monitor_reads(tiny_model, tmp_path):
    from pneumoscan.archive import predict_local
    from pneumoscan.archive.outputs import write_csv, write_parquet

    paths = [str(save_gray(tmp_path / "in" / f"{i}.png", synthetic_xray(64, 900 + i))) for i in range(5)]
    rows = [row for _, row in predict_local(tiny_model, paths, batch_size=4)]
    write_csv(rows, tmp_path / "out.csv")
    write_parquet(rows, tmp_path / "out.parquet")
    expected = [row["guard_score"] for row in rows]
    assert all(g is not None for g in expected)
    for source in ("out.csv", "out.parquet"):
        records, _ = monitor.read_records([tmp_path / source])
        assert [r["guard_score"] for r in records] == pytest.approx(expected, rel=1e-12), source
