"""The Ray Data engine: the pipeline stage spread over a cluster, the same row per file as the local engine.

Ray tasks run the stage's first half, ``pipeline.prepare``, on the model without its network (only the record
travels); an actor pool, each actor loading the model once, runs its second half, ``pipeline.decide``, on
``Prepared`` items rebuilt from the tasks' columns. Nothing here decodes, scores, decides or words a failure
itself. Also here: joining a cluster (``check_reachable``, ``ray_session``), a workaround for fsspec without
aiohttp, and ``predict_ray_folder`` (the CLI's ``--engine ray --out DEST``, see ``parts.RayParquetFolder``).

Only what needs Ray imports this module (``pneumoscan.archive`` exports its names lazily).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from .. import pipeline
from ..errors import PneumoscanError
from .journal import file_key, run_settings
from .parts import RAY_COLUMNS, RayParquetFolder, ray_row, typed
from .rows import how_made, screened_row

CLUSTER_HINT = "pip install 'pneumoscan[cluster]' (Ray Data and pyarrow)"
# seconds a TCP connection to an explicit --address may take: ray.init itself retries an absent GCS forever
CONNECT_TIMEOUT_S = 5.0
# bytes reserved per Ray decoding task: a worker with numpy, PIL and torch peaked at 444 MiB on Kermany originals
DECODE_MEMORY = 768 * 2**20


def require_ray() -> None:
    try:
        import pyarrow  # noqa: F401
        import ray  # noqa: F401
        import ray.data  # noqa: F401
    except ImportError as exc:
        missing = (exc.name or "ray").split(".")[0]
        raise PneumoscanError(f"--engine ray needs Ray Data and pyarrow ({missing} is not installed): "
                              f"{CLUSTER_HINT}") from None


# --- the stage, in Ray tasks and actors ------------------------------------------------------------------------

def _prepare_row(row: dict, shim, size: int) -> dict:
    """Ray task body: ``pipeline.prepare`` for one file on ``shim`` (the model without its network), as columns
    of one type each: the ``Prepared`` item's fields, its decoded image's header without the pixels, and the
    network input (blank for a file that is not to be scored: unreadable or refused)."""
    path = str(row["path"])
    st_size, mtime = file_key(path)  # before the file is read, as the local engine
    item = pipeline.prepare(shim, path)
    image = np.zeros((size, size), np.uint8) if item.image is None else item.image
    return {"path": path, "size": -1 if st_size is None else st_size, "mtime_ns": -1 if mtime is None else mtime,
            "reason": item.reason or "", "has_reason": item.reason is not None, "error": item.error or "",
            "refused": item.refused or "", "decoded": _described(item.decoded),
            "pixels": np.ascontiguousarray(image, dtype=np.uint8)}


def _described(decoded) -> str:
    """What the file said (``DecodedImage`` but its pixels: size, format, colour, DICOM header) as JSON; "" for
    none. Generic over the fields, so whatever the stage learns from a file reaches the actor."""
    if decoded is None:
        return ""
    meta = {f.name: getattr(decoded, f.name) for f in fields(decoded) if f.name != "data"}
    meta["dicom"] = asdict(decoded.dicom) if decoded.dicom is not None else None
    return json.dumps(meta, default=_scalar)


def _scalar(value):
    """numpy scalars as Python numbers; anything else is not JSON and fails loudly."""
    if hasattr(value, "item"):
        return value.item()
    raise TypeError(f"{type(value).__name__} in a decoded image's header")


def _decoded(text: str):
    """The ``DecodedImage`` a decoding task described (``_described``), its pixels left behind in the task."""
    from ..data.images import DecodedImage, DicomHeader

    if not text:
        return None
    meta = json.loads(text)
    header = meta.pop("dicom")
    return DecodedImage(np.zeros((0, 0), np.uint8), **meta,
                        dicom=None if header is None else DicomHeader(**header))


def _prepared(batch: dict, i: int) -> pipeline.Prepared:
    """The ``Prepared`` item a decoding task described in row ``i`` of ``batch``."""
    name = str(batch["path"][i])
    if batch["error"][i]:
        return pipeline.Prepared(name, error=str(batch["error"][i]))
    decoded = _decoded(str(batch["decoded"][i]))
    if batch["refused"][i]:
        return pipeline.Prepared(name, decoded, refused=str(batch["refused"][i]))
    reason = str(batch["reason"][i]) if batch["has_reason"][i] else None
    return pipeline.Prepared(name, decoded, np.asarray(batch["pixels"][i], dtype=np.uint8), reason)


class _Scorer:
    """Ray actor: loads the model once, then ``pipeline.decide`` on each batch of prepared files."""

    def __init__(self, model_path, backend, precision, prevalence, max_pixels, threshold, tta, threads, device):
        from .. import allocator

        allocator.tune()  # a worker process of its own: the command line's settings (huge pages if torch is not loaded yet)
        import torch

        from ..predict import load_model

        if threads:
            torch.set_num_threads(int(threads))
        self.model = load_model(model_path, backend=backend, precision=precision, prevalence=prevalence,
                                max_pixels=max_pixels, device=device)
        self.op = self.model.resolve_threshold(threshold)
        self.tta = tta
        self.made = how_made(self.model)

    def __call__(self, batch: dict) -> dict:
        n = len(batch["path"])
        screened = pipeline.decide(self.model, [_prepared(batch, i) for i in range(n)], self.op, tta=self.tta)
        out: dict[str, list] = {k: [] for k in RAY_COLUMNS}
        for i, result in enumerate(screened):
            row = screened_row(result, int(batch["size"][i]), int(batch["mtime_ns"][i]), self.made)
            for k in RAY_COLUMNS:
                out[k].append(row[k])
        return typed(out)


def predictions_dataset(paths, model=None, *, backend: str = "torch", precision: str = "auto",
                        prevalence: float | None = None, max_pixels: int | None = None,
                        threshold: str | float = "screening", tta: bool = False, batch_size: int | None = None,
                        num_cpus: float = 1, num_gpus: float = 0, concurrency: int = 1):
    """A Ray Dataset of predictions for ``paths``: a list of paths or a Ray Dataset with a ``path`` column (paths
    every node can read: a shared file system). Columns: ``parts.RAY_COLUMNS`` (the journal row: the decision,
    the file's identity, the DICOM UIDs, and how the row was made), each of one type: NaN, -1 or "" where a figure
    does not apply (``ray_row`` gives the row with None there).

    Files are prepared in Ray tasks and decided in a pool of ``concurrency`` actors, each loading the model once
    with ``num_cpus``/``num_gpus`` of resources. Lazy: nothing runs before it is consumed (``iter_rows``,
    ``write_parquet``, ...). A killed actor is restarted and its batches retried.

    ``model``: a model file / run folder path, None for the bundled model, or a loaded Model (its file is
    reloaded in each actor with the same settings: prevalence and pixel limit included)."""
    require_ray()
    import ray

    _settle_fsspec_http()
    from ..constants import BATCH_SIZE
    from ..data.images import MAX_PIXELS
    from ..predict import Model, load_model

    if isinstance(model, Model):
        loaded = model
        model_path = str(model.path)
    else:
        model_path = None if model is None else str(model)
        loaded = load_model(model_path, backend=backend, precision=precision, prevalence=prevalence,
                            max_pixels=max_pixels or MAX_PIXELS)
    loaded.resolve_threshold(threshold)  # a bad threshold fails here, not in every actor
    if isinstance(paths, ray.data.Dataset):
        ds = paths
        if "path" not in ds.columns():
            raise PneumoscanError(f"the Dataset needs a 'path' column, it has {ds.columns()}")
        ds = ds.select_columns(["path"])
    else:
        ds = ray.data.from_items([{"path": str(p)} for p in paths])
    shim = Model(loaded.record, None, None, loaded.path, loaded.sha256, max_pixels=loaded.max_pixels)
    # Decoding in tasks, each reserving about what a worker decoding a large radiograph holds (DECODE_MEMORY;
    # a 50 MP image is 200 MB of float32 pixels, larger ones are reduced while decoding). Resources that
    # differ from the actors' also keep Ray Data from fusing this stage into the actor pool, where decoding
    # would run inside the scoring actors (on GPU nodes: CPU work on the GPU actors).
    prepared = ds.map(_prepare_row, fn_kwargs={"shim": shim, "size": loaded.preprocessing.size}, num_cpus=1,
                      memory=DECODE_MEMORY)
    backend_used = getattr(loaded.backend, "name", backend)
    precision_used = getattr(loaded.backend, "precision", None) or precision
    device = "cuda" if num_gpus and num_gpus > 0 else "cpu"
    # Ray Data restarts a dead actor and retries its batches (max_restarts=-1, max_task_retries=-1 are its
    # defaults for map_batches actors), and retries failed tasks: a killed worker costs time, not rows.
    return prepared.map_batches(
        _Scorer, batch_size=batch_size or BATCH_SIZE, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=concurrency), num_cpus=num_cpus, num_gpus=num_gpus or None,
        fn_constructor_args=(model_path, backend_used, precision_used, loaded.prevalence, loaded.max_pixels,
                             threshold, tta, max(1, int(num_cpus)), device))


def predict_ray(model, paths: list, *, threshold="screening", batch_size: int, tta: bool = False,
                num_cpus: float = 1, num_gpus: float = 0, concurrency: int = 1, backend: str = "torch",
                precision: str = "auto") -> Iterator[tuple[object, dict]]:
    """(Prediction, journal row) per file through the Ray engine, in completion order."""
    if not paths:
        return
    ds = predictions_dataset(paths, model, backend=backend, precision=precision, threshold=threshold, tta=tta,
                             batch_size=batch_size, num_cpus=num_cpus, num_gpus=num_gpus,
                             concurrency=concurrency)
    for item in ds.iter_rows():
        row = ray_row(item)
        yield _prediction(row), row


def _prediction(row: dict) -> pipeline.Prediction:
    return pipeline.Prediction(row["path"], row["probability"], row["decision"], row["operating_point"],
                               row["threshold"], row["status"], row["message"], row["guard_score"])


# --- joining a cluster ---------------------------------------------------------------------------------------

def check_reachable(address: str | None, timeout: float = CONNECT_TIMEOUT_S) -> None:
    """Fail in one line, within ``timeout`` seconds, when nothing accepts a TCP connection at the cluster address:
    ``ray.init`` would wait for that GCS forever. (Something that accepts the connection but is not a GCS, e.g. a
    proxy, is left to ``ray.init``, which gives up after its ``py_gcs_connect_timeout_s``, 20 s, logging a
    warning per retry.) ``None``/"local" start a local instance (nothing to check);
    "auto" is checked at the address of the instance ``ray start`` recorded on this machine, when there is one."""
    given = address
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address in (None, "local"):
        return
    default_port = 6379
    hostport = address
    if address.startswith("ray://"):
        hostport, default_port = address[len("ray://"):], 10001
    elif address == "auto":
        try:
            from ray._private.services import find_bootstrap_address

            hostport = find_bootstrap_address(None)
        except Exception:  # noqa: BLE001 - Ray's own lookup then says what it found
            return
        if not hostport:
            return  # nothing recorded: ray.init says "no running instance" at once
    host, sep, port = hostport.rstrip("/").rpartition(":")
    if not sep:
        host, port = hostport.rstrip("/"), str(default_port)
    option = f"--address {given}" if given else f"RAY_ADDRESS {address}"
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except (OSError, ValueError) as exc:
        why = "no answer" if isinstance(exc, TimeoutError) else (getattr(exc, "strerror", None) or str(exc))
        raise PneumoscanError(f"cannot reach the Ray cluster at {option}: {host}:{port} did not accept a "
                              f"connection within {timeout:g} s ({why}); start one there (`ray start --head`) "
                              "or fix the address") from None


def _settle_fsspec_http() -> None:
    """Ray Data resolves every path through ``from fsspec.implementations.http import HTTPFileSystem`` and
    tolerates only ModuleNotFoundError. Where fsspec is installed without aiohttp, that import fails, and one
    racing another import of it (Ray's executor threads) raises a plain ImportError that fails the read or write.
    Import it once here; if it cannot be imported, mark it absent so every later import fails the tolerated way."""
    try:
        import fsspec.implementations.http  # noqa: F401
    except ImportError:
        sys.modules["fsspec.implementations.http"] = None  # type: ignore[assignment]


@contextmanager
def ray_session(address: str | None = None, quiet: bool = False):
    """Ray for one CLI run: the cluster at ``address`` (checked first, see ``check_reachable``) or a local
    instance, shut down afterwards; an instance already running in this process is used as it is."""
    require_ray()
    import ray

    started = not ray.is_initialized()
    if started:
        check_reachable(address)
        try:
            ray.init(address=address, log_to_driver=not quiet, include_dashboard=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:  # no cluster there, a bad address
            where = f"the Ray cluster at --address {address}" if address else "a local Ray instance"
            raise PneumoscanError(f"cannot start or join {where} ({str(exc).splitlines()[0][:200]})") from None
    try:
        import logging

        import ray.data

        context = ray.data.DataContext.get_current()
        context.enable_progress_bars = not quiet and sys.stderr.isatty()
        if quiet:  # only errors on stderr: no execution plans, progress logs or memory advice
            logging.getLogger("ray.data").setLevel(logging.ERROR)
            context.issue_detectors_config.detectors = []
        yield ray
    finally:
        if started:
            ray.shutdown()


# --- the CLI's --engine ray --out DEST ---------------------------------------------------------------------------

def predict_ray_folder(model, files: list, destination: str | Path, *, emit: Callable[[object], None],
                       csv_path=None, resume: bool = False, threshold="screening", tta: bool = False,
                       batch_size: int, num_cpus: float = 1, num_gpus: float = 0, concurrency: int = 1,
                       backend: str = "torch", precision: str = "auto", address: str | None = None,
                       quiet: bool = False, on_open: Callable[[RayParquetFolder], None] | None = None
                       ) -> list[dict]:
    """``pneumoscan predict --engine ray --out DEST``: the Parquet folder written by Ray (``RayParquetFolder``);
    ``emit(prediction)`` for each newly scored row once they are all written. Returns the kept rows (resume).
    Interrupted, it says where the finished rows are and how to continue."""
    folder = RayParquetFolder(destination, run_settings(model, threshold, tta), files, csv_path=csv_path,
                              resume=resume)
    created = not folder.parts.exists()
    folder.open()
    if on_open is not None:
        on_open(folder)
    try:
        with ray_session(address, quiet):
            if folder.todo:
                folder.write(predictions_dataset(
                    folder.todo, model, backend=backend, precision=precision, threshold=threshold, tta=tta,
                    batch_size=batch_size, num_cpus=num_cpus, num_gpus=num_gpus, concurrency=concurrency))
            for row in folder.new_rows():
                emit(_prediction(row))
            folder.finish()
    except BaseException:
        with suppress(Exception):
            n = folder.rows_kept()
            if n == 0 and created:  # e.g. no cluster there: nothing to keep, leave nothing behind
                shutil.rmtree(folder.parts, ignore_errors=True)
            elif n:
                print(f"pneumoscan: {n} finished row(s) kept in {folder.parts}: rerun the same command with "
                      "--resume to continue", file=sys.stderr)
        raise
    return folder.kept
