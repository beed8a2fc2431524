"""The Ray Data engine (issue 18) on a real local Ray instance, on a few hundred generated and real X-rays: the
same rows as the local engine within 1e-5 (error, not_xray and DICOM rows included), from a list of paths or a
Dataset of paths, through the Python API and `pneumoscan predict --engine ray --out DIR.parquet` (a Parquet
folder written by Ray, renamed into place when complete), a complete output after an actor process is SIGKILLed
mid-run, --resume from a Ray run's parts or a local run's journal, and every file of a Ray run (parts, the
published folder, the CSV) in the umask's mode."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest
from conftest import KERMANY
from test_archive import build_archive, csv_rows, parquet_rows

from pneumoscan.archive import parts_path
from pneumoscan.cli import Inputs, main

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")
pq = pytest.importorskip("pyarrow.parquet")

pytestmark = pytest.mark.slow

N_REAL = 200  # the smallest test-split originals (symlinked, never copied): real decoding, bounded time


@pytest.fixture(scope="module")
def ray_instance():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return build_archive(tmp_path_factory.mktemp("ray_archive"), n_synthetic=40, n_real=N_REAL)


@pytest.fixture(scope="module")
def files(folder) -> list[Path]:
    found = Inputs([str(folder)]).files
    assert len(found) >= (N_REAL if KERMANY.is_dir() else 0) + 45
    return found


@pytest.fixture(scope="module")
def some(files) -> list[Path]:
    """Every generated, DICOM and odd file, and every eighth real one: the API tests' share."""
    real = [f for f in files if "real" in f.parts]
    return [f for f in files if "real" not in f.parts] + real[::8]


@pytest.fixture(scope="module")
def local_rows(tiny_model, some) -> dict[str, dict]:
    from pneumoscan.archive import predict_local

    return {row["path"]: row for _, row in predict_local(tiny_model, some, batch_size=16)}


def _same(ray_row: dict, local: dict) -> None:
    for key in ("path", "status", "message", "decision", "operating_point", "size", "mtime_ns",
                "study_instance_uid", "series_instance_uid", "sop_instance_uid",
                "model_sha256", "prevalence", "temperature", "bias"):  # how it was made: the same arithmetic
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

    return [ray_row(item) for item in ds.iter_rows()]


def _main(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(args)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def cli_runs(ray_instance, tiny_model_path, folder, tmp_path_factory) -> dict:
    """The same folder through `pneumoscan predict` on both engines: local (one Parquet file) and Ray (a Parquet
    folder), each with a CSV too."""
    out = tmp_path_factory.mktemp("cli")
    common = ["predict", str(folder), "--model", str(tiny_model_path), "--precision", "float32", "--quiet",
              "--batch-size", "16"]
    local = _main([*common, "--out", str(out / "local.parquet"), "--csv", str(out / "local.csv")])
    remote = _main([*common, "--engine", "ray", "--concurrency", "1", "--num-cpus", "1",
                    "--out", str(out / "ray.parquet"), "--csv", str(out / "ray.csv")])
    return {"dir": out, "local": local, "ray": remote}


def test_dataset_from_a_list_of_paths_equals_the_local_engine(ray_instance, tiny_model, tiny_model_path, some,
                                                              local_rows):
    from pneumoscan.archive import predictions_dataset

    ds = predictions_dataset(some, tiny_model_path, precision="float32", batch_size=16)
    rows = _rows(ds)
    assert sorted(r["path"] for r in rows) == sorted(local_rows)  # every file once
    statuses = [r["status"] for r in rows]
    assert {"ok", "not_xray", "error"} <= set(statuses) and statuses.count("error") == 2
    assert sum(r["sop_instance_uid"] is not None for r in rows) == 2  # the two DICOM files
    for row in rows:
        assert row["model_sha256"] == tiny_model.sha256
        _same(row, local_rows[row["path"]])


def test_dataset_of_paths_in_and_a_loaded_model(ray_instance, tiny_model, some, local_rows):
    from pneumoscan.archive import predictions_dataset

    few = [str(f) for f in some[::3]]
    ds = predictions_dataset(ray.data.from_items([{"path": p, "other": 1} for p in few]), tiny_model,
                             batch_size=3)
    rows = _rows(ds)
    assert sorted(r["path"] for r in rows) == sorted(few)
    for row in rows:
        _same(row, local_rows[row["path"]])


def test_refused_ages_and_facts_are_the_same_on_both_engines(ray_instance, tiny_model_path, tmp_path):
    """A model for ages 1 to 5: a 40-year-old's DICOM is answered outside_population without a network call on
    both engines (the decoding task hands the refusal to the actor), a 3-year-old's is scored; every row's facts
    (header categories, age band, input statistics) equal the local engine's."""
    from conftest import synthetic_xray
    from test_archive import write_dicom

    from pneumoscan.archive import FACT_COLUMNS, predict_local, predictions_dataset
    from pneumoscan.modelfile import read_model_file, save_model_file
    from pneumoscan.predict import load_model

    tensors, meta = read_model_file(tiny_model_path)
    children = tmp_path / "children.safetensors"
    save_model_file(children, tensors, {**meta, "population": {"min_age_years": 1, "max_age_years": 6,
                                                              "description": "ages 1 to 5"}})
    pixels = (synthetic_xray(64, seed=7) * 255).round().astype("uint8")
    paths = [str(write_dicom(tmp_path / f"{age}.dcm", pixels, PatientAge=age, Manufacturer="ACME"))
             for age in ("040Y", "003Y")]
    local = {row["path"]: row for _, row in predict_local(load_model(children, precision="float32"), paths,
                                                          batch_size=2)}
    remote = {row["path"]: row for row in _rows(predictions_dataset(paths, children, precision="float32",
                                                                    batch_size=2))}
    assert [local[p]["status"] for p in paths] == ["outside_population", "ok"]
    for path in paths:
        _same(remote[path], local[path])
        for key in FACT_COLUMNS:
            if isinstance(local[path][key], float):
                assert remote[path][key] == pytest.approx(local[path][key], abs=1e-6), key
            else:
                assert remote[path][key] == local[path][key], key
    assert remote[paths[0]]["age_band"] == "18+" and remote[paths[1]]["manufacturer"] == "ACME"


def test_cli_engine_ray_writes_a_parquet_folder_with_the_local_engines_rows(cli_runs, files):
    out = cli_runs["dir"]
    for engine in ("local", "ray"):
        code, stdout, stderr = cli_runs[engine]
        assert code == 1 and stderr.splitlines() == ["pneumoscan: 2 file(s) could not be read"]
        assert len(stdout.splitlines()) == len(files)  # one line per file on both engines
    assert (out / "local.parquet").is_file() and (out / "ray.parquet").is_dir()
    parts = os.listdir(out / "ray.parquet")
    assert parts and all(p.endswith(".parquet") for p in parts)  # Ray's files only, no settings, no temp file
    assert sorted(os.listdir(out)) == ["local.csv", "local.parquet", "ray.csv", "ray.parquet"]
    local_table, ray_table = pq.read_table(out / "local.parquet"), pq.read_table(out / "ray.parquet")
    assert ray_table.schema.equals(local_table.schema)  # the same columns and types
    local = {r["path"]: r for r in local_table.to_pylist()}
    remote = ray_table.to_pylist()
    assert sorted(r["path"] for r in remote) == sorted(local) == sorted(str(f) for f in files)
    statuses = [r["status"] for r in remote]
    assert statuses.count("error") == 2 and "not_xray" in statuses and statuses.count("ok") > N_REAL / 2
    for r in remote:
        lo = local[r["path"]]
        figures = ("probability", "guard_score")  # computed on each engine: equal within float noise
        assert {k: v for k, v in r.items() if k not in figures} == {k: v for k, v in lo.items()
                                                                     if k not in figures}
        assert (r["probability"] is None) == (lo["probability"] is None)
        if lo["probability"] is not None:
            assert r["probability"] == pytest.approx(lo["probability"], abs=1e-5)
        assert (r["guard_score"] is None) == (lo["guard_score"] is None)
        if lo["guard_score"] is not None:
            assert r["guard_score"] == pytest.approx(lo["guard_score"], rel=1e-5)
    assert sum(r["sop_instance_uid"] is not None for r in remote) == 2
    import pandas as pd

    assert len(pd.read_parquet(out / "ray.parquet")) == len(files)  # the documented ways to read it
    ray_csv, local_csv = csv_rows(out / "ray.csv"), csv_rows(out / "local.csv")
    assert [r["path"] for r in ray_csv] == [r["path"] for r in local_csv]  # input order, as the local engine
    for r, lo in zip(ray_csv, local_csv, strict=True):
        assert r["status"] == lo["status"] and r["message"] == lo["message"] and r["decision"] == lo["decision"]
        if lo["probability"]:
            assert float(r["probability"]) == pytest.approx(float(lo["probability"]), abs=2e-6)
        assert bool(r["guard_score"]) == bool(lo["guard_score"])  # the drift monitor's guard test reads it
        if lo["guard_score"]:
            assert float(r["guard_score"]) == pytest.approx(float(lo["guard_score"]), rel=1e-5)


def _scorer_pids() -> set[int]:
    """The processes of this machine's scoring actors, by the title Ray gives an actor's process
    (``ray::MapWorker(MapBatches(_Scorer))``): no hook in the engine needed."""
    found = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                title = (entry / "cmdline").read_bytes()
            except OSError:  # ended meanwhile
                continue
            if title.startswith(b"ray::") and b"_Scorer" in title:
                found.add(int(entry.name))
    return found


def test_a_killed_actor_is_restarted_and_the_written_folder_is_complete(ray_instance, tiny_model, tiny_model_path,
                                                                        some, local_rows, tmp_path):
    """SIGKILL of the scoring actor as soon as it is ready (titled after its class: its constructor has run)
    while nearly every batch is still to come: the actor is replaced, its batches are retried, and the published
    folder holds every row once. (Part files are no sign of progress: the writing tasks lag behind the actor.)"""
    from pneumoscan.archive import RayParquetFolder, predictions_dataset, run_settings

    many = [str(f) for f in some] * 2  # batches of 1: far more than the actor scores before the kill
    dest = tmp_path / "out.parquet"
    writer = RayParquetFolder(dest, run_settings(tiny_model, "screening", False), many).open()
    ds = predictions_dataset(many, tiny_model_path, precision="float32", batch_size=1)
    before = _scorer_pids()  # another test's actors still shutting down are not this run's
    killed: list[int] = []
    replaced: set[int] = set()
    done = threading.Event()

    def kill_the_actor_once_files_are_written():
        deadline = time.monotonic() + 300
        while not done.wait(0.005) and time.monotonic() < deadline:  # polls until the run is done
            actors = _scorer_pids() - before - set(killed)
            if killed:
                replaced.update(actors)
            elif actors:
                pid = min(actors)
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)

    killer = threading.Thread(target=kill_the_actor_once_files_are_written, daemon=True)
    killer.start()
    writer.write(ds)
    done.set()
    killer.join(5)
    assert killed, "the actor was never killed"
    assert replaced, "no actor replaced the killed one (the run finished before the kill)"
    writer.finish()
    rows = pq.read_table(dest).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(many)  # complete: every listing once, none lost or doubled
    for row in rows:
        lo = local_rows[row["path"]]
        assert row["status"] == lo["status"] and row["message"] == lo["message"]
        if lo["probability"] is not None:
            assert row["probability"] == pytest.approx(lo["probability"], abs=1e-5)
    assert not writer.parts.exists()


@pytest.mark.parametrize("umask, mode", [(0o077, 0o600), (0o022, 0o644)])
def test_every_file_of_a_ray_run_follows_the_umask(ray_instance, tiny_model, some, tmp_path, umask, mode):
    """Ray's workers write the part files with their own umask (here: the one they started with); the settings
    file, the kept rows, the parts, the published folder and the CSV all end in the run's mode."""
    from pneumoscan.archive import (
        ArchiveWriter,
        RayParquetFolder,
        predict_local,
        predictions_dataset,
        run_settings,
    )

    files = [str(f) for f in some[:12]]
    dest, csv_out = tmp_path / "out" / "r.parquet", tmp_path / "out" / "r.csv"
    settings = run_settings(tiny_model, "screening", False)
    previous = os.umask(umask)
    try:
        local = ArchiveWriter([(dest, "parquet")], tiny_model, settings, files).open()  # interrupted locally
        for _, row in predict_local(tiny_model, files[:3], batch_size=4):
            local.add(row)
        local.journal.close()
        writer = RayParquetFolder(dest, settings, files, csv_path=csv_out, resume=True).open()
        writer.write(predictions_dataset(writer.todo, tiny_model, batch_size=4))
        modes = {p.name: oct(p.stat().st_mode & 0o777) for p in writer.parts.iterdir()}
        assert len(modes) >= 3 and writer.kept_file.name in modes  # settings, kept rows, Ray's parts
        assert modes == dict.fromkeys(modes, oct(mode))
        writer.finish()
    finally:
        os.umask(previous)
    published = [dest / name for name in os.listdir(dest)]
    assert sorted(os.listdir(dest.parent)) == ["r.csv", "r.parquet"] and published
    assert {oct(p.stat().st_mode & 0o777) for p in [csv_out, *published]} == {oct(mode)}
    assert len(pq.read_table(dest)) == len(files)


def test_an_interrupted_ray_run_resumes_from_its_parts(ray_instance, tiny_model, tiny_model_path, files, tmp_path):
    """Parts of an unfinished Ray run (one of them torn by the crash) are kept on --resume; only the rest is
    scored; the folder equals an uninterrupted run's."""
    from pneumoscan.archive import RayParquetFolder, predictions_dataset, run_settings

    src = tmp_path / "in"
    quick = [f for f in files if f.parent.name in ("dicom", "odd")] + [f for f in files if "gen" in f.parts][:24]
    for f in quick:  # DICOM, odd and generated files: quick to score
        (src / f.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy2(f, src / f.parent.name / f.name)
    listed = Inputs([str(src)]).files
    dest = tmp_path / "r.parquet"
    writer = RayParquetFolder(dest, run_settings(tiny_model, "screening", False), listed).open()
    writer.write(predictions_dataset(listed[:12], tiny_model, batch_size=4))  # then "killed": no finish
    part = sorted(writer.parts.glob("*.parquet"))[0]
    torn = writer.parts / f"zz-torn-{part.name}"
    torn.write_bytes(part.read_bytes()[:-20])  # no footer: what a writer killed mid-file leaves

    args = ["predict", str(src), "--model", str(tiny_model_path), "--precision", "float32", "--engine", "ray",
            "--out", str(dest), "--batch-size", "4"]
    code, _, err = _main(args)
    assert code == 2 and f"{parts_path(dest)}: partial results of an interrupted run are there" in err
    code, stdout, err = _main([*args, "--resume"])
    assert code == 1  # the broken and the empty file
    assert f"resuming: 12 row(s) kept, {len(listed) - 12} file(s) to screen" in err
    assert len(stdout.splitlines()) == len(listed) - 12  # only the newly scored rows are printed
    rows = pq.read_table(dest).to_pylist()
    assert sorted(r["path"] for r in rows) == sorted(str(f) for f in listed)  # once each: the torn copy dropped
    assert not parts_path(dest).exists() and sorted(os.listdir(tmp_path)) == ["in", "r.parquet"]

    code, _, _ = _main([*args, "--csv", str(tmp_path / "again.csv")])  # a finished folder is replaced whole
    assert code == 1 and len(pq.read_table(dest)) == len(listed) == len(csv_rows(tmp_path / "again.csv"))


def test_engine_ray_resumes_a_local_journal_and_keeps_its_rows(ray_instance, tiny_model_path, some, tmp_path):
    """A run interrupted on the local engine, continued with --engine ray: the kept rows stay as they were, the
    rest come from Ray, and the folder has every file once."""
    from pneumoscan.archive import ArchiveWriter, journal_path, predict_local, read_journal, run_settings
    from pneumoscan.predict import load_model

    model = load_model(tiny_model_path, precision="float32")
    out = tmp_path / "r.parquet"
    writer = ArchiveWriter([(out, "parquet")], model, run_settings(model, "screening", False), some).open()
    for _, row in predict_local(model, some[:7], batch_size=4):
        writer.add(row)
    writer.journal.close()
    kept = {r["path"]: r for r in read_journal(journal_path(out))[1]}
    code, _, err = _main(["predict", *map(str, some), "--model", str(tiny_model_path), "--precision", "float32",
                          "--engine", "ray", "--out", str(out), "--resume", "--batch-size", "16"])
    assert code == 1
    assert f"resuming: 7 row(s) kept, {len(some) - 7} file(s) to screen" in err
    rows = parquet_rows(out)
    assert sorted(r["path"] for r in rows) == sorted(str(f) for f in some)
    assert not journal_path(out).exists() and not parts_path(out).exists()
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


def test_a_ray_run_stopped_by_an_exception_keeps_its_parts_and_says_how_to_resume(ray_instance, tiny_model_path,
                                                                                  files, tmp_path, monkeypatch):
    from pneumoscan.archive import RayParquetFolder

    listed = [str(f) for f in files if f.parent.name in ("dicom", "odd")] + [str(f) for f in files
                                                                             if "gen" in f.parts][:8]
    dest = tmp_path / "r.parquet"
    args = ["predict", *listed, "--model", str(tiny_model_path), "--precision", "float32", "--engine", "ray",
            "--out", str(dest), "--quiet", "--batch-size", "4"]

    def interrupted(self):  # Ctrl-C once Ray has written every part, before anything is published
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(RayParquetFolder, "new_rows", interrupted)
    code, _, err = _main(args)
    assert code == 130
    assert (f"pneumoscan: {len(listed)} finished row(s) kept in {parts_path(dest)}: rerun the same command with "
            "--resume to continue") in err
    assert not dest.exists()
    monkeypatch.undo()
    code, stdout, err = _main([*args, "--resume"])
    assert code == 1 and stdout == ""  # nothing left to score, nothing newly printed; the two unreadable files
    assert sorted(r["path"] for r in parquet_rows(dest)) == sorted(listed) and not parts_path(dest).exists()
