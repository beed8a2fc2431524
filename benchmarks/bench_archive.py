"""Screening an archive: the same files through the local engine and the Ray Data engine on this machine.

Builds a folder of N symlinks under /tmp cycling over the Kermany test originals (624 files; nothing is copied),
then scores it as ``pneumoscan predict --out results.parquet`` does on each engine:
  1. local: ``Model.predict_files`` (the pipeline stage) through ``archive.predict_local`` (threaded decode
     overlapping the network), rows appended to the fsynced journal, then one Parquet file written and renamed
     into place;
  2. ray: ``archive.predictions_dataset`` on a local Ray instance (``ray.init(num_cpus=--ray-cpus)``): the stage's
     ``prepare`` in Ray tasks, its ``decide`` in ``--concurrency`` actors of ``--num-cpus`` CPUs each, the rows
     written by Ray Data (``write_parquet``) into the run's parts folder, then published as the Parquet folder
     (``RayParquetFolder``).
The defaults are the command line's (``pneumoscan predict --engine ray``: one actor of one CPU, batch 32) and a Ray
instance with every CPU of this machine; ``uptime``'s load average is printed before, between and after the runs.
Prints images/s for both, the Ray overhead as local/ray throughput, the start-up times (model load; Ray
``init`` and the first part file on disk), and the largest |probability difference| between the two outputs.

Usage: nice -n 10 python benchmarks/bench_archive.py [--files 2000] [--model MODEL] [--data ../shared/data/chest_xray]
       python benchmarks/bench_archive.py --quick     (48 files: a smoke run)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

from pneumoscan.constants import BATCH_SIZE

REPO = Path(__file__).resolve().parents[1]


def archive_folder(data: Path, n: int) -> tuple[Path, list[Path]]:
    from pneumoscan.data.layout import list_split

    originals = [s.path for s in list_split(data, "test")]
    folder = Path(tempfile.mkdtemp(prefix="pneumoscan-archive-"))
    files = []
    for i in range(n):
        src = Path(originals[i % len(originals)]).resolve()
        link = folder / f"{i:06d}_{src.name}"
        link.symlink_to(src)
        files.append(link)
    return folder, files


def local_run(model, files, out: Path, batch_size: int) -> None:
    """The local engine as the CLI runs it with --out x.parquet: journal rows, then the Parquet file."""
    from pneumoscan.archive import ArchiveWriter, predict_local, run_settings

    writer = ArchiveWriter([(out, "parquet")], model, run_settings(model, "screening", False), files).open()
    for _, row in predict_local(model, files, batch_size=batch_size):
        writer.add(row)
    writer.finish()


def first_file(folder: Path, found: list, stop: threading.Event) -> None:
    """When the first part file appears in ``folder`` (Ray writes it once its first block is scored)."""
    while not stop.is_set():
        if folder.is_dir() and any(p.suffix == ".parquet" for p in folder.iterdir()):
            found.append(time.perf_counter())
            return
        time.sleep(0.05)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--model", default=None, help="model file (default: the bundled model)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="default: the command line's")
    parser.add_argument("--ray-cpus", type=int, default=os.cpu_count() or 1, help="CPUs of the local Ray instance")
    parser.add_argument("--concurrency", type=int, default=1, help="scoring actors")
    parser.add_argument("--num-cpus", type=float, default=1, help="CPUs per scoring actor")
    parser.add_argument("--ray-first", action="store_true",
                        help="run the Ray engine before the local one (on a shared machine, to see the drift)")
    parser.add_argument("--local-threads", type=int, default=None,
                        help="torch threads of the local engine (default: torch's, 2 here)")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    n = 48 if args.quick else args.files

    import torch

    if args.local_threads:
        torch.set_num_threads(args.local_threads)
    from pneumoscan.predict import load_model

    folder, files = archive_folder(Path(args.data), n)
    out_dir = Path(tempfile.mkdtemp(prefix="pneumoscan-archive-out-"))
    print(f"{n} files (symlinks in {folder} over the {args.data} test split), batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    try:
        start = time.perf_counter()
        model = load_model(args.model)  # the command line's defaults (precision "auto": the record's arithmetic)
        load_s = time.perf_counter() - start
        timing = {}

        def run_local():
            start = time.perf_counter()
            local_run(model, files, out_dir / "local.parquet", args.batch_size)
            timing["local"] = time.perf_counter() - start

        def run_ray():
            import ray

            from pneumoscan.archive import RayParquetFolder, predictions_dataset, run_settings

            start = time.perf_counter()
            ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            timing["init"] = time.perf_counter() - start
            first, stop = [], threading.Event()
            start = time.perf_counter()
            folder = RayParquetFolder(out_dir / "ray.parquet", run_settings(model, "screening", False), files).open()
            watcher = threading.Thread(target=first_file, args=(folder.parts, first, stop), daemon=True)
            watcher.start()
            folder.write(predictions_dataset(files, model, batch_size=args.batch_size, concurrency=args.concurrency,
                                             num_cpus=args.num_cpus))
            stop.set()
            folder.finish()
            timing["ray"] = time.perf_counter() - start
            timing["first"] = first[0] - start if first else float("nan")
            ray.shutdown()

        for run in (run_ray, run_local) if args.ray_first else (run_local, run_ray):
            run()
            print(f"  ({run.__name__} done, load average {os.getloadavg()[0]:.1f})", flush=True)
        local_s, ray_s, init_s = timing["local"], timing["ray"], timing["init"]
        print(f"local: model load {load_s:.1f} s; {n} images in {local_s:.1f} s = {n / local_s:.1f} images/s")
        print(f"ray: init {init_s:.1f} s, first part file after {timing['first']:.1f} s; {n} images in {ray_s:.1f} s = "
              f"{n / ray_s:.1f} images/s ({args.concurrency} actor(s) x {args.num_cpus:g} CPU, decoding in tasks, "
              f"{args.ray_cpus} CPUs in the instance); with init {n / (ray_s + init_s):.1f} images/s")
        print(f"ray overhead: local/ray throughput {ray_s / local_s:.2f}x (with init "
              f"{(ray_s + init_s) / local_s:.2f}x)")
        import pyarrow.parquet as pq

        local = pq.read_table(out_dir / "local.parquet").to_pylist()
        remote = {r["path"]: r for r in pq.read_table(out_dir / "ray.parquet").to_pylist()}
        assert len(remote) == len(local) == n and set(remote) == {r["path"] for r in local}, "different files"
        diffs = [abs(remote[r["path"]]["probability"] - r["probability"]) for r in local
                 if r["probability"] is not None]
        same_status = sum(remote[r["path"]]["status"] == r["status"] for r in local)
        made = ("model_sha256", "operating_point", "threshold", "prevalence", "temperature", "bias")
        same_made = sum(all(remote[r["path"]][k] == r[k] for k in made) for r in local)
        print(f"rows: {len(local)} each, same status {same_status}/{len(local)}, same model and calibration columns "
              f"{same_made}/{len(local)}, max |probability difference| {max(diffs, default=0.0):.2e}; load average "
              f"at the end {os.getloadavg()[0]:.1f}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
