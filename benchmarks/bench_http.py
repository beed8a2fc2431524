"""HTTP throughput and latency of ``pneumoscan serve``: N clients posting one real X-ray for T seconds.

The server runs as its own process (``python -m pneumoscan.cli serve``) on 127.0.0.1, so the load generator's
threads do not share its interpreter; it is stopped at the end. The load is bounded in time (``--duration``) and
in count (``--max-requests``), and only the loopback address is ever used.

    nice -n 19 python benchmarks/bench_http.py --model runs/default --clients 16 --duration 20
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "src" / "pneumoscan" / "weights" / "default.safetensors"
TEST_IMAGES = ROOT.parent / "shared" / "data" / "chest_xray" / "test"
HOST = "127.0.0.1"
MAX_CLIENTS = 256
MAX_DURATION = 600.0


def default_image() -> Path | None:
    files = sorted(p for p in TEST_IMAGES.rglob("*.jpeg") if p.is_file()) if TEST_IMAGES.is_dir() else []
    return files[len(files) // 2] if files else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def start_server(args: argparse.Namespace, port: int) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "pneumoscan.cli",
        "serve",
        "--model",
        str(args.model),
        "--host",
        HOST,
        "--port",
        str(port),
        "--backend",
        args.backend,
        "--concurrency",
        str(args.server_concurrency),
    ]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            sys.exit(f"bench_http: the server exited: {server.stderr.read().strip()}")
        try:
            if httpx.get(f"http://{HOST}:{port}/healthz", timeout=2).status_code == 200:
                return server
        except httpx.TransportError:
            time.sleep(0.2)
    server.terminate()
    sys.exit("bench_http: the server did not start within 120 s")


def run_load(url: str, data: bytes, name: str, clients: int, duration: float, max_requests: int) -> dict:
    """Each client posts back to back until the deadline or the shared request budget is used up."""
    lock = threading.Lock()
    latencies: list[float] = []
    errors: dict[str, int] = {}
    issued = 0
    deadline = time.monotonic() + duration

    def client() -> None:
        nonlocal issued
        with httpx.Client(timeout=120) as http:
            while time.monotonic() < deadline:
                with lock:
                    if issued >= max_requests:
                        return
                    issued += 1
                start = time.perf_counter()
                try:
                    response = http.post(url, files={"file": (name, data)})
                    failure = None if response.status_code == 200 else f"HTTP {response.status_code}"
                except httpx.HTTPError as exc:
                    failure = type(exc).__name__
                elapsed = time.perf_counter() - start
                with lock:
                    if failure is None:
                        latencies.append(elapsed)
                    else:
                        errors[failure] = errors.get(failure, 0) + 1

    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return {"wall": time.perf_counter() - start, "latencies": np.array(latencies), "errors": errors}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model",
        type=Path,
        default=DEFAULT_MODEL if DEFAULT_MODEL.is_file() else None,
        help="model file or run directory (default: the bundled model)",
    )
    parser.add_argument(
        "--image", type=Path, default=default_image(), help="X-ray to post (default: a test image)"
    )
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of load")
    parser.add_argument("--max-requests", type=int, default=100_000, help="stop after this many requests")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch")
    parser.add_argument("--server-concurrency", type=int, default=2, help="the server's --concurrency")
    args = parser.parse_args()
    if args.model is None:
        parser.error("no bundled model in this checkout: pass --model")
    if args.image is None or not args.image.is_file():
        parser.error("no test image found: pass --image")
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be in 1..{MAX_CLIENTS}")
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in (0, {MAX_DURATION:g}] seconds")

    port = free_port()
    server = start_server(args, port)
    try:
        url = f"http://{HOST}:{port}/v1/predict"
        data = args.image.read_bytes()
        warm = httpx.post(url, files={"file": (args.image.name, data)}, timeout=120)
        if warm.status_code != 200:
            sys.exit(f"bench_http: warm-up request failed: {warm.status_code} {warm.text}")
        model = warm.json()["model"]
        result = run_load(url, data, args.image.name, args.clients, args.duration, args.max_requests)
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()

    lat = result["latencies"] * 1000.0
    n_err = sum(result["errors"].values())
    print(f"model        {model['name']} (sha256 {model['sha256'][:12]}), {args.backend} backend")
    print(f"image        {args.image.name} ({len(data) / 1024:.0f} KiB)")
    print(
        f"load         {args.clients} clients, {result['wall']:.1f} s, server concurrency "
        f"{args.server_concurrency}, {os.cpu_count()} CPUs, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}"
    )
    print(f"requests     {len(lat)} ok, {n_err} errors" + (f" {result['errors']}" if n_err else ""))
    print(f"throughput   {len(lat) / result['wall']:.2f} requests/s")
    if len(lat):
        p50, p95, p99 = np.percentile(lat, [50, 95, 99])
        print(f"latency ms   p50 {p50:.0f}   p95 {p95:.0f}   p99 {p99:.0f}   max {lat.max():.0f}")
    return 1 if n_err else 0


if __name__ == "__main__":
    sys.exit(main())
