"""The Ray Data engine (issue 18) on a real local Ray instance: the same rows as the local engine within 1e-5
(error, not_xray and DICOM rows included), from a list of paths or a Dataset of paths, through the Python API and
`pneumoscan predict --engine ray`, and a complete output after an actor process is SIGKILLed mid-run."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from test_archive import build_archive, csv_rows, parquet_rows

from pneumoscan.cli import Inputs, main

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pytest.importorskip("pyarrow")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> list[Path]:
    return Inputs([str(build_archive(tmp_path_factory.mktemp("ray_archive")))]).files


@pytest.fixture(scope="module")
def local_rows(tiny_model, files) -> dict[str, dict]:
    from pneumoscan.archive import predict_local

    return {row["path"]: row for _, row in predict_local(tiny_model, files, batch_size=4)}


def _same(ray_row: dict, local: dict) -> None:
    for key in ("path", "status", "message", "decision", "operating_point", "size", "mtime_ns",
                "study_instance_uid", "series_instance_uid", "sop_instance_uid"):
        assert ray_row[key] == local[key], (key, ray_row, local)
    assert ray_row["threshold"] == pytest.approx(local["threshold"], abs=1e-12)
    if local["probability"] is None:
        assert ray_row["probability"] is None
    else:
        assert ray_row["probability"] == pytest.approx(local["probability"], abs=1e-5)
    if local["guard_score"] is None:
        assert ray_row["guard_score"] is None
    else:
        assert ray_row["guard_score"] == pytest.approx(local["guard_score"], rel=1e-5)


def _rows(ds) -> list[dict]:
    from pneumoscan.archive import ray_row

    return [{**ray_row(item), "model_sha256": item["model_sha256"]} for item in ds.iter_rows()]


def test_dataset_from_a_list_of_paths_equals_the_local_engine(ray_instance, tiny_model, tiny_model_path, files,
                                                              local_rows):
    from pneumoscan.archive import predictions_dataset

    ds = predictions_dataset(files, tiny_model_path, precision="float32", batch_size=4)
    rows = _rows(ds)
    assert sorted(r["path"] for r in rows) == sorted(local_rows)  # every file once
    statuses = {r["status"] for r in rows}
    assert {"ok", "not_xray", "error"} <= statuses
    assert sum(r["sop_instance_uid"] is not None for r in rows) == 2  # the two DICOM files
    for row in rows:
        assert row["model_sha256"] == tiny_model.sha256
        _same(row, local_rows[row["path"]])


def test_dataset_of_paths_in_and_a_loaded_model(ray_instance, tiny_model, files, local_rows):
    from pneumoscan.archive import predictions_dataset

    some = [str(f) for f in files[::3]]
    ds = predictions_dataset(ray.data.from_items([{"path": p, "other": 1} for p in some]), tiny_model,
                             batch_size=3)
    rows = _rows(ds)
    assert sorted(r["path"] for r in rows) == sorted(some)
    for row in rows:
        _same(row, local_rows[row["path"]])


def test_cli_engine_ray_writes_the_local_engines_rows(ray_instance, tiny_model_path, files, tmp_path, capsys):
    folder = str(Path(os.path.commonpath([str(f) for f in files])))
    common = ["predict", folder, "--model", str(tiny_model_path), "--precision", "float32", "--quiet",
              "--batch-size", "4"]
    assert main([*common, "--out", str(tmp_path / "local.parquet"), "--csv", str(tmp_path / "local.csv")]) == 1
    assert main([*common, "--engine", "ray", "--concurrency", "1", "--num-cpus", "1",
                 "--out", str(tmp_path / "ray.parquet"), "--csv", str(tmp_path / "ray.csv")]) == 1
    err = capsys.readouterr().err.splitlines()
    assert err == ["pneumoscan: 2 file(s) could not be read"] * 2
    local, remote = parquet_rows(tmp_path / "local.parquet"), parquet_rows(tmp_path / "ray.parquet")
    assert [r["path"] for r in remote] == [r["path"] for r in local]  # input order, as the local engine
    for r, lo in zip(remote, local, strict=True):
        assert {k: v for k, v in r.items() if k != "probability"} == {k: v for k, v in lo.items()
                                                                       if k != "probability"}
        assert (r["probability"] is None) == (lo["probability"] is None)
        if lo["probability"] is not None:
            assert r["probability"] == pytest.approx(lo["probability"], abs=1e-5)
    for r, lo in zip(csv_rows(tmp_path / "ray.csv"), csv_rows(tmp_path / "local.csv"), strict=True):
        assert r["path"] == lo["path"] and r["status"] == lo["status"] and r["message"] == lo["message"]
        if lo["probability"]:
            assert float(r["probability"]) == pytest.approx(float(lo["probability"]), abs=2e-6)
    assert sorted(os.listdir(tmp_path)) == ["local.csv", "local.parquet", "ray.csv", "ray.parquet"]


def test_a_killed_actor_is_restarted_and_the_output_is_complete(ray_instance, tiny_model_path, files, local_rows,
                                                                tmp_path):
    from pneumoscan.archive import predictions_dataset

    pids = tmp_path / "pids"
    pids.mkdir()
    many = [str(f) for f in files] * 3  # each file three times: more batches than the first one
    ds = predictions_dataset(many, tiny_model_path, precision="float32", batch_size=2, _pid_dir=str(pids))
    killed: list[int] = []
    received = [0]
    at_kill: list[int] = []

    def kill_the_actor_once_rows_flow():
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            found = sorted(pids.glob("*.pid"))
            if found and received[0] >= 1:
                at_kill.append(received[0])
                pid = int(found[0].stem)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.005)

    killer = threading.Thread(target=kill_the_actor_once_rows_flow, daemon=True)
    killer.start()
    from pneumoscan.archive import ray_row

    rows = []
    for item in ds.iter_rows():
        rows.append(ray_row(item))
        received[0] += 1
    killer.join(5)
    assert killed, "the actor was never killed"
    assert at_kill[0] < len(many), "the run finished before the kill"
    restarted = {int(p.stem) for p in pids.glob("*.pid")} - set(killed)
    assert restarted, "no actor replaced the killed one"
    assert sorted(r["path"] for r in rows) == sorted(many)  # complete: every file three times, none lost
    for row in rows:
        _same(row, local_rows[row["path"]])


def test_engine_ray_resumes_a_journal_and_keeps_its_rows(ray_instance, tiny_model_path, files, tmp_path, capsys):
    """A run interrupted on the local engine, continued with --engine ray: the kept rows stay as they were, the
    rest come from Ray, and the output has every file once."""
    from pneumoscan.archive import ArchiveWriter, journal_path, predict_local, read_journal, run_settings
    from pneumoscan.predict import load_model

    model = load_model(tiny_model_path, precision="float32")
    out = tmp_path / "r.parquet"
    writer = ArchiveWriter([(out, "parquet")], model, run_settings(model, "screening", False), files).open()
    for _, row in predict_local(model, files[:7], batch_size=4):
        writer.add(row)
    writer.journal.close()
    kept = {r["path"]: r for r in read_journal(journal_path(out))[1]}
    folder = os.path.commonpath([str(f) for f in files])
    assert main(["predict", folder, "--model", str(tiny_model_path), "--precision", "float32", "--engine", "ray",
                 "--out", str(out), "--resume", "--batch-size", "4"]) == 1
    err = capsys.readouterr().err
    assert f"resuming: 7 row(s) kept from {journal_path(out)}, {len(files) - 7} file(s) to screen" in err
    rows = parquet_rows(out)
    assert [r["path"] for r in rows] == [str(f) for f in files] and not journal_path(out).exists()
    for row in rows:
        if row["path"] in kept:
            assert row["probability"] == kept[row["path"]]["probability"]  # kept as written, not rescored


def test_a_dataset_of_only_unreadable_files_gives_error_rows(ray_instance, tiny_model_path, tmp_path):
    from pneumoscan.archive import predictions_dataset

    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "empty.jpeg").write_bytes(b"")
    paths = [str(tmp_path / "broken.png"), str(tmp_path / "empty.jpeg"), str(tmp_path / "gone.png")]
    rows = {Path(r["path"]).name: r for r in _rows(predictions_dataset(paths, tiny_model_path, batch_size=8))}
    assert {name: r["status"] for name, r in rows.items()} == dict.fromkeys(
        ("broken.png", "empty.jpeg", "gone.png"), "error")
    assert rows["gone.png"]["message"] == f"{tmp_path / 'gone.png'}: file not found"
    assert rows["gone.png"]["size"] is None and rows["empty.jpeg"]["size"] == 0
    assert all(r["probability"] is None and r["decision"] is None for r in rows.values())
