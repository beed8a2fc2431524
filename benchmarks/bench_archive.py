"""Screening an archive: the same files through the local engine and the Ray Data engine on this machine.

Builds a folder of N symlinks under /tmp cycling over the Kermany test originals (624 files; nothing is copied),
then scores it
  1. local: ``Model.predict_files`` through ``archive.predict_local`` (threaded decode overlapping the network),
     the path of ``pneumoscan predict --csv``, journal included (rows appended to a .partial file, fsynced);
  2. ray: ``archive.predictions_dataset`` on a local Ray instance (``ray.init(num_cpus=--ray-cpus)``): decoding
     in Ray tasks, scoring in ``--concurrency`` actors of ``--num-cpus`` CPUs each, rows streamed to the driver
     into the same journal.
Prints images/s for both, the Ray overhead as local/ray throughput, the start-up times (model load; Ray
``init`` and the first row), and the largest |probability difference| between the engines' rows.

Usage: nice -n 19 python benchmarks/bench_archive.py [--files 2000] [--model MODEL] [--data ../shared/data/chest_xray]
       python benchmarks/bench_archive.py --quick     (48 files: a smoke run)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

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


def journal_run(rows_iter, out: Path, model, files) -> int:
    """Rows into a journal as the CLI does (then the final Parquet-free CSV): the I/O cost both engines pay."""
    from pneumoscan.archive import ArchiveWriter, run_settings

    writer = ArchiveWriter([(out, "csv")], model, run_settings(model, "screening", False), files).open()
    n = 0
    for _, row in rows_iter:
        writer.add(row)
        n += 1
    writer.finish()
    return n


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--files", type=int, default=2000)
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--model", default=None, help="model file (default: the bundled model)")
    parser.add_argument("--batch-size", type=int, default=32)
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
    from pneumoscan.archive import predict_local
    from pneumoscan.predict import load_model

    folder, files = archive_folder(Path(args.data), n)
    out_dir = Path(tempfile.mkdtemp(prefix="pneumoscan-archive-out-"))
    print(f"{n} files (symlinks in {folder} over the {args.data} test split), batch {args.batch_size}, "
          f"{os.cpu_count()} CPUs ({platform.processor() or platform.machine()}), torch threads "
          f"{torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}", flush=True)
    try:
        start = time.perf_counter()
        model = load_model(args.model, precision="float32")
        load_s = time.perf_counter() - start
        local, remote, timing = {}, {}, {}

        def run_local():
            def keep(rows):
                for pred, row in rows:
                    local[row["path"]] = row
                    yield pred, row

            start = time.perf_counter()
            journal_run(keep(predict_local(model, files, batch_size=args.batch_size)), out_dir / "local.csv",
                        model, files)
            timing["local"] = time.perf_counter() - start

        def run_ray():
            import ray

            from pneumoscan.archive import predictions_dataset, ray_row

            start = time.perf_counter()
            ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
            ray.data.DataContext.get_current().enable_progress_bars = False
            timing["init"] = time.perf_counter() - start
            first = []

            def ray_rows():
                ds = predictions_dataset(files, model, batch_size=args.batch_size, concurrency=args.concurrency,
                                         num_cpus=args.num_cpus)
                for item in ds.iter_rows():
                    if not first:
                        first.append(time.perf_counter())
                    row = ray_row(item)
                    remote[row["path"]] = row
                    yield None, row

            start = time.perf_counter()
            journal_run(ray_rows(), out_dir / "ray.csv", model, files)
            timing["ray"] = time.perf_counter() - start
            timing["first"] = first[0] - start if first else float("nan")
            ray.shutdown()

        for run in (run_ray, run_local) if args.ray_first else (run_local, run_ray):
            run()
            print(f"  ({run.__name__} done, load average {os.getloadavg()[0]:.1f})", flush=True)
        local_s, ray_s, init_s = timing["local"], timing["ray"], timing["init"]
        print(f"local: model load {load_s:.1f} s; {n} images in {local_s:.1f} s = {n / local_s:.1f} images/s")
        print(f"ray: init {init_s:.1f} s, first row after {timing['first']:.1f} s; {n} images in {ray_s:.1f} s = "
              f"{n / ray_s:.1f} images/s ({args.concurrency} actor(s) x {args.num_cpus:g} CPU, decoding in tasks, "
              f"{args.ray_cpus} CPUs in the instance); with init {n / (ray_s + init_s):.1f} images/s")
        print(f"ray overhead: local/ray throughput {ray_s / local_s:.2f}x (with init "
              f"{(ray_s + init_s) / local_s:.2f}x)")
        assert set(remote) == set(local), "the engines scored different files"
        diffs = [abs(remote[p]["probability"] - local[p]["probability"]) for p in local
                 if local[p]["probability"] is not None]
        same_status = sum(remote[p]["status"] == local[p]["status"] for p in local)
        print(f"rows: {len(local)} each, same status {same_status}/{len(local)}, max |probability difference| "
              f"{max(diffs, default=0.0):.2e}")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
        shutil.rmtree(out_dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
