"""HTTP throughput, latency and robustness of ``pneumoscan serve``: N clients posting real X-rays for T seconds.

Two modes, each against a server run as its own process (``python -m pneumoscan.cli serve``) on 127.0.0.1 with
API keys and an audit log on, so the load generator's threads do not share its interpreter:

``compare`` (default): for each backend (torch, onnx), the network alone in this process (``Model.score`` at batch
1, 4 and 16, the best of 1 s trials), then two servers, unbatched (``--max-batch 1``) and batched (the defaults),
loaded in alternating rounds (``--rounds``) so that the ratios hold on a noisy, shared machine. Every answer is
checked against the one the server gave the same image alone (batch 1) before the load, within 1e-5. Beside each
server's figures, the CPU time per answered request of the server process and of the clients (this process): on
shared cores requests/s cannot exceed cores / (server + clients' CPU per request), whatever the batching.

``load``: a fifth of the requests are bad (no key, wrong key, truncated JPEG, text as PNG, oversize, malformed
multipart, a client that disconnects mid-upload, one that sends its body too slowly), in turn. Checks: zero 5xx,
each bad request gets its expected status, every good answer is right, the audit log has exactly one line per
request, and the server's memory (RSS, sampled twice a second) stays bounded.

    python benchmarks/bench_http.py --onnx-model default.onnx --clients 16 --duration 60
    python benchmarks/bench_http.py --mode load --backend onnx --model default.onnx --duration 60

tests/test_serve_load.py runs ``mixed_load`` for a few seconds against an in-process server.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import http.client
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_MODEL = ROOT / "src" / "pneumoscan" / "weights" / "default.safetensors"
TEST_IMAGES = ROOT.parent / "shared" / "data" / "chest_xray" / "test"
HOST = "127.0.0.1"
MAX_CLIENTS = 256
MAX_DURATION = 600.0
TOLERANCE = 1e-5
BAD_KINDS = ("no_key", "wrong_key", "truncated_jpeg", "text_as_png", "oversize", "malformed_multipart",
             "disconnect_mid_upload", "slow_body")
# what each bad request must get; None: the client hangs up, so no answer reaches it (the audit line says 400)
EXPECTED = {"no_key": 401, "wrong_key": 401, "truncated_jpeg": 422, "text_as_png": 415, "oversize": 413,
            "malformed_multipart": 400, "disconnect_mid_upload": None, "slow_body": 408}
TEXT = b"Patient notes: cough for three days, no fever.\n" * 40


def test_xrays(n: int) -> list[Path]:
    """n test X-rays spread over both classes (only speed and agreement are read here; nothing is chosen)."""
    files = sorted(p for p in TEST_IMAGES.rglob("*.jpeg") if p.is_file()) if TEST_IMAGES.is_dir() else []
    if not files:
        return []
    step = max(1, len(files) // n)
    return files[::step][:n]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far, all its threads (NaN when unreadable)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return float("nan")


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


# ---- the requests -------------------------------------------------------------------------------------------


def _multipart(data: bytes, name: str = "xray.jpeg", boundary: str = "bench-boundary") -> tuple[bytes, str]:
    head = (f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


class _Poster:
    """One client's keep-alive connection posting pre-encoded multipart bodies with the standard library.

    The clients share the server's cores, so their own CPU time is taken from it: httpx built each request anew
    (multipart encoding, headers, its transport layers) for ~4-5 ms of CPU per request on 2 loaded cores, about a
    quarter of what the server spends on an int8 request. The bodies here are built once per image; the server
    gets the same bytes as from httpx (``_multipart``: one ``file`` field, filename ``xray.jpeg``).
    """

    def __init__(self, base: str, key: str, timeout: float = 120.0):
        scheme, rest = base.split("://")
        host, port = rest.split(":")
        self._make = partial(http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection,
                             host, int(port), timeout=timeout)
        self._auth = f"Bearer {key}"
        self._conn = None

    def post(self, body: bytes, ctype: str) -> tuple[int, bytes]:
        """(status, response body); a broken connection is dropped and the error raised (reconnect next time)."""
        if self._conn is None:
            self._conn = self._make()
        try:
            self._conn.request("POST", "/v1/predict", body=body,
                               headers={"Authorization": self._auth, "Content-Type": ctype})
            response = self._conn.getresponse()
            data = response.read()
        except Exception:
            self.close()
            raise
        if response.getheader("connection", "").lower() == "close":
            self.close()
        return response.status, data

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None


def _raw_request(base: str, body_head: bytes, length: int, ctype: str, key: str) -> socket.socket:
    host, port = base.split("//")[1].split(":")
    sock = socket.create_connection((host, int(port)), timeout=30)
    head = (f"POST /v1/predict HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: {ctype}\r\nContent-Length: {length}\r\n\r\n").encode()
    sock.sendall(head + body_head)
    return sock


def _read_status(sock: socket.socket) -> int | str:
    data = b""
    while b"\r\n" not in data:
        chunk = sock.recv(4096)
        if not chunk:
            return "closed"
        data += chunk
    return int(data.split(b" ", 2)[1])


def send_bad(http: httpx.Client, base: str, kind: str, key: str, good: bytes, max_upload: int,
             slow_seconds: float) -> int | str | None:
    """One bad request of ``kind``; the status code it got, None when the client hung up on purpose."""
    url = f"{base}/v1/predict"
    auth = {"Authorization": f"Bearer {key}"}
    if kind == "no_key":
        return http.post(url, files={"file": ("x.jpeg", good)}).status_code
    if kind == "wrong_key":
        return http.post(url, files={"file": ("x.jpeg", good)},
                         headers={"Authorization": "Bearer psk_wrong-key"}).status_code
    if kind == "truncated_jpeg":
        return http.post(url, files={"file": ("cut.jpeg", good[: len(good) // 3])}, headers=auth).status_code
    if kind == "text_as_png":
        return http.post(url, files={"file": ("notes.png", TEXT)}, headers=auth).status_code
    if kind == "oversize":
        return http.post(url, files={"file": ("huge.png", b"\0" * (max_upload + 4096))}, headers=auth).status_code
    if kind == "malformed_multipart":
        return http.post(url, content=b"this is not multipart at all",
                         headers={**auth, "Content-Type": "multipart/form-data; boundary=xyz"}).status_code
    if kind == "disconnect_mid_upload":
        body, ctype = _multipart(good)
        sock = _raw_request(base, body[: len(body) // 2], len(body), ctype, key)
        sock.close()  # gone before the rest of the body
        return None
    if kind == "slow_body":
        body, ctype = _multipart(good)
        sock = _raw_request(base, body[:64], len(body), ctype, key)
        try:
            sock.settimeout(0.1)
            deadline = time.monotonic() + slow_seconds
            sent = 64
            while time.monotonic() < deadline and sent < len(body) - 1:
                try:
                    return _read_status(sock)  # the server gave up on the trickle
                except TimeoutError:
                    sock.sendall(body[sent:sent + 1])  # one byte per 0.1 s
                    sent += 1
            sock.settimeout(5)
            return _read_status(sock)
        except (ConnectionError, TimeoutError, OSError) as exc:
            return type(exc).__name__
        finally:
            sock.close()
    raise ValueError(kind)


@dataclass
class LoadResult:
    wall: float = 0.0
    server_cpu: float = 0.0  # CPU seconds the server process used during the load (NaN: not measured)
    client_cpu: float = 0.0  # CPU seconds this process (the clients) used during the load
    attempts: int = 0  # requests that reached the server (each must have one audit line)
    latencies: list = field(default_factory=list)  # seconds, good requests answered 200
    errors: dict = field(default_factory=dict)  # what went wrong with good requests
    wrong: int = 0  # good answers that differ from the reference
    bad: dict = field(default_factory=dict)  # kind -> {outcome: count}
    statuses: dict = field(default_factory=dict)  # every status code seen
    rss: list = field(default_factory=list)

    @property
    def server_errors(self) -> int:
        return sum(n for code, n in self.statuses.items() if isinstance(code, int) and code >= 500)

    @property
    def bad_mismatches(self) -> dict:
        return {kind: outcomes for kind, outcomes in self.bad.items()
                if set(outcomes) != {EXPECTED[kind]}}


def mixed_load(base: str, key: str, good: list[tuple[bytes, float | None]], *, clients: int, duration: float,
               bad_every: int = 0, max_upload: int = 20 * 2**20, slow_seconds: float = 10.0,
               max_requests: int = 1_000_000, rss_pid: int | None = None) -> LoadResult:
    """``clients`` threads posting the ``good`` images (bytes, expected probability) in turn for ``duration`` s;
    with ``bad_every`` = k, every k-th request is a bad one (the kinds in turn). Bounded in time and count."""
    result = LoadResult()
    lock = threading.Lock()
    counter = 0
    deadline = time.monotonic() + duration
    done = threading.Event()

    def count(code) -> None:
        result.statuses[code] = result.statuses.get(code, 0) + 1

    bodies = [_multipart(data) for data, _ in good]

    def client() -> None:
        nonlocal counter
        poster = _Poster(base, key)
        with httpx.Client(timeout=120) as session, contextlib.closing(poster):
            while time.monotonic() < deadline:
                with lock:
                    if counter >= max_requests:
                        return
                    i = counter
                    counter += 1
                    result.attempts += 1
                if bad_every and i % bad_every == bad_every - 1:
                    kind = BAD_KINDS[(i // bad_every) % len(BAD_KINDS)]
                    try:
                        outcome = send_bad(session, base, kind, key, good[i % len(good)][0], max_upload,
                                           slow_seconds)
                    except httpx.HTTPError as exc:
                        outcome = type(exc).__name__
                    with lock:
                        outcomes = result.bad.setdefault(kind, {})
                        outcomes[outcome] = outcomes.get(outcome, 0) + 1
                        if outcome is not None:
                            count(outcome)
                    continue
                expected = good[i % len(good)][1]
                start = time.perf_counter()
                try:
                    code, answer = poster.post(*bodies[i % len(good)])
                    failure = None if code == 200 else f"HTTP {code}"
                except (OSError, http.client.HTTPException) as exc:
                    code, failure = type(exc).__name__, type(exc).__name__
                elapsed = time.perf_counter() - start
                with lock:
                    count(code)
                    if failure is not None:
                        result.errors[failure] = result.errors.get(failure, 0) + 1
                        continue
                    result.latencies.append(elapsed)
                    p = json.loads(answer)["probability"]
                    if expected is not None and (p is None or abs(p - expected) > TOLERANCE):
                        result.wrong += 1

    def sample_rss() -> None:
        while not done.wait(0.5):
            result.rss.append(rss_mib(rss_pid))

    sampler = threading.Thread(target=sample_rss, daemon=True) if rss_pid else None
    if sampler:
        result.rss.append(rss_mib(rss_pid))
        sampler.start()
    threads = [threading.Thread(target=client, daemon=True) for _ in range(clients)]
    cpu0, own0 = cpu_seconds(rss_pid) if rss_pid else float("nan"), time.process_time()
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    result.wall = time.perf_counter() - start
    result.client_cpu = time.process_time() - own0
    result.server_cpu = (cpu_seconds(rss_pid) if rss_pid else float("nan")) - cpu0
    done.set()
    if sampler:
        sampler.join()
        result.rss.append(rss_mib(rss_pid))
    return result


def references(base: str, key: str, images: list[bytes]) -> list[float]:
    """Each image's probability from the server, one request at a time (batches of 1)."""
    out = []
    with httpx.Client(timeout=120) as http:
        for data in images:
            response = http.post(f"{base}/v1/predict", files={"file": ("xray.jpeg", data)},
                                 headers={"Authorization": f"Bearer {key}"})
            if response.status_code != 200:
                sys.exit(f"bench_http: reference request failed: {response.status_code} {response.text}")
            body = response.json()
            if body["batch_size"] != 1:
                sys.exit("bench_http: a reference request was batched with another")
            out.append(body["probability"])
    return out


def batch_sizes(base: str, key: str) -> tuple[float, float]:
    """(network calls, images) so far, from /metrics."""
    text = httpx.get(f"{base}/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30).text
    values = {}
    for line in text.splitlines():
        for name in ("pneumoscan_batch_size_count", "pneumoscan_batch_size_sum"):
            if line.startswith(name + " "):
                values[name] = float(line.split()[1])
    return values.get("pneumoscan_batch_size_count", 0.0), values.get("pneumoscan_batch_size_sum", 0.0)


# ---- the server ---------------------------------------------------------------------------------------------


class Server:
    """``pneumoscan serve`` in its own process, with a fresh key and audit log in a temporary folder."""

    def __init__(self, model: Path, backend: str, extra: list[str], folder: Path, label: str):
        from pneumoscan.serve.auth import add_key

        self.folder = folder / label
        self.folder.mkdir()
        self.key = add_key(self.folder / "keys.json", "bench")
        self.audit = self.folder / "audit.jsonl"
        self.port = free_port()
        self.base = f"http://{HOST}:{self.port}"
        command = [sys.executable, "-m", "pneumoscan.cli", "serve", "--model", str(model), "--backend", backend,
                   "--host", HOST, "--port", str(self.port), "--api-keys", str(self.folder / "keys.json"),
                   "--audit-log", str(self.audit), *extra]
        self.proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                sys.exit(f"bench_http: the server exited: {self.proc.stderr.read().strip()}")
            try:
                if httpx.get(f"{self.base}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                time.sleep(0.2)
        self.stop()
        sys.exit("bench_http: the server did not start within 180 s")

    def audit_lines(self) -> int:
        return len(self.audit.read_text().splitlines()) if self.audit.exists() else 0

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# ---- the network alone --------------------------------------------------------------------------------------


def network_only(model_path: Path, backend: str, images: list[bytes], seconds: float,
                 batches: tuple[int, ...] = (1, 4, 16), trial: float = 1.0,
                 precision: str = "auto") -> dict[int, float]:
    """images/s of ``Model.score`` alone (decoding done beforehand) per batch size: the best of ~1 s trials, the
    batch sizes taking turns, ``seconds`` per size; the best trial is the least disturbed by other load."""
    from pneumoscan import load_model

    model = load_model(model_path, backend=backend, precision=precision)
    inputs = [model.prepare(model.decode(data, "x.jpeg"))[0] for data in images]
    stacks = {b: np.stack([inputs[i % len(inputs)] for i in range(b)]) for b in batches}
    best = {b: 0.0 for b in batches}
    for b in batches:
        model.score(stacks[b])  # warm-up
    for _ in range(max(1, round(seconds / trial))):
        for b in batches:
            n, start = 0, time.perf_counter()
            while time.perf_counter() - start < trial:
                model.score(stacks[b])
                n += b
            best[b] = max(best[b], n / (time.perf_counter() - start))
    return best


def merge(results: list[LoadResult]) -> LoadResult:
    out = LoadResult()
    for r in results:
        out.wall += r.wall
        out.server_cpu += r.server_cpu
        out.client_cpu += r.client_cpu
        out.attempts += r.attempts
        out.latencies += r.latencies
        out.wrong += r.wrong
        out.rss += r.rss
        for name in ("errors", "statuses"):
            for k, v in getattr(r, name).items():
                getattr(out, name)[k] = getattr(out, name).get(k, 0) + v
    return out


# ---- reports ------------------------------------------------------------------------------------------------


def percentiles(latencies: list[float]) -> tuple[float, float, float]:
    if not latencies:
        return float("nan"), float("nan"), float("nan")
    p50, p95, p99 = np.percentile(np.array(latencies) * 1000.0, [50, 95, 99])
    return p50, p95, p99


def run_compare(args, images: list[bytes], folder: Path) -> int:
    """Per backend: the network alone, then an unbatched and a batched server, both started first and loaded in
    alternating rounds, so that a change in the machine's other load hits both alike."""
    models = {"torch": args.model, "onnx": args.onnx_model}
    configs = (("unbatched", ["--max-batch", "1"]), ("batched", []))
    rows = []
    failed = False
    for backend in args.backends:
        if models[backend] is None:
            print(f"bench_http: skipping {backend}: pass --onnx-model FILE.onnx", file=sys.stderr)
            continue
        precision = args.precision if backend == "torch" else "auto"
        net = network_only(models[backend], backend, images, args.network_seconds, precision=precision)
        best = max(net.values())
        print(f"{backend}: network only, best of 1 s trials: "
              + ", ".join(f"batch {b} {v:.1f} images/s" for b, v in net.items()), flush=True)
        servers = {}
        try:
            for label, extra in configs:
                servers[label] = Server(models[backend], backend,
                                        [*extra, "--precision", precision, *args.server_args], folder,
                                        f"{backend}-{label}")
            expected = {label: references(s.base, s.key, images) for label, s in servers.items()}
            for label in servers:
                if not np.allclose(expected[label], expected["unbatched"], rtol=0, atol=TOLERANCE):
                    sys.exit(f"bench_http: the {label} server's batch-1 answers differ from the unbatched one's")
            start_calls = {label: batch_sizes(s.base, s.key) for label, s in servers.items()}
            parts: dict[str, list[LoadResult]] = {label: [] for label in servers}
            for _ in range(args.rounds):
                for label, server in servers.items():
                    parts[label].append(mixed_load(
                        server.base, server.key, list(zip(images, expected["unbatched"], strict=True)),
                        clients=args.clients, duration=args.duration / args.rounds, rss_pid=server.proc.pid))
            end_calls = {label: batch_sizes(s.base, s.key) for label, s in servers.items()}
        finally:
            for server in servers.values():
                server.stop()
        for label in servers:
            result = merge(parts[label])
            ok = len(result.latencies)
            rps = ok / result.wall
            p50, p95, p99 = percentiles(result.latencies)
            n_err = sum(result.errors.values())
            calls = end_calls[label][0] - start_calls[label][0]
            mean_batch = (end_calls[label][1] - start_calls[label][1]) / max(1.0, calls)
            failed |= bool(n_err or result.wrong)
            server_ms = 1000.0 * result.server_cpu / max(1, ok)
            client_ms = 1000.0 * result.client_cpu / max(1, ok)
            rows.append((backend, label, rps, p50, p95, p99, n_err, ok, result.wrong, mean_batch, rps / best,
                         server_ms, client_ms))
            print(f"{backend:5} {label:9} {rps:7.1f} requests/s  p50 {p50:4.0f}  p95 {p95:4.0f}  p99 {p99:4.0f} ms  "
                  f"errors {n_err} of {ok + n_err}  wrong {result.wrong}  mean batch {mean_batch:.1f}  "
                  f"{100 * rps / best:.0f}% of network-only  peak RSS {max(result.rss):.0f} MiB  "
                  f"CPU per request: server {server_ms:.1f} ms, clients {client_ms:.1f} ms  "
                  f"(server {result.server_cpu / result.wall:.2f} cores)"
                  + (f"  {result.errors}" if n_err else ""), flush=True)
    print()
    print("| backend | server | requests/s | p50 ms | p95 ms | p99 ms | errors | wrong answers | mean batch | "
          "of best network-only images/s | server CPU ms/request | clients' CPU ms/request |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for backend, label, rps, p50, p95, p99, n_err, ok, wrong, mean_batch, share, server_ms, client_ms in rows:
        print(f"| {backend} | {label} | {rps:.1f} | {p50:.0f} | {p95:.0f} | {p99:.0f} | {n_err} of {ok + n_err} | "
              f"{wrong} | {mean_batch:.1f} | {100 * share:.0f}% | {server_ms:.1f} | {client_ms:.1f} |")
    return 1 if failed else 0


def run_load(args, images: list[bytes], folder: Path) -> int:
    model = args.model if args.backend == "torch" else args.onnx_model
    if model is None:
        sys.exit("bench_http: --mode load --backend onnx needs --onnx-model FILE.onnx")
    max_upload_mb = 2
    extra = ["--max-upload-mb", str(max_upload_mb), "--upload-timeout", str(args.upload_timeout),
             *args.server_args]
    server = Server(model, args.backend, extra, folder, f"{args.backend}-load")
    try:
        expected = references(server.base, server.key, images)
        baseline = server.audit_lines()
        result = mixed_load(server.base, server.key, list(zip(images, expected, strict=True)),
                            clients=args.clients, duration=args.duration, bad_every=5,
                            max_upload=max_upload_mb * 2**20, slow_seconds=args.upload_timeout + 10,
                            rss_pid=server.proc.pid)
        time.sleep(1.0)  # each audit line is written as its response completes
        lines = server.audit_lines() - baseline
        records = [json.loads(line) for line in server.audit.read_text().splitlines()[baseline:]]
    finally:
        server.stop()
    ok = len(result.latencies)
    p50, p95, p99 = percentiles(result.latencies)
    n_err = sum(result.errors.values())
    bad = sum(sum(v.values()) for v in result.bad.values())
    audit_5xx = sum(1 for r in records if (r.get("status") or 0) >= 500)
    leaks = [r for r in records if any(k in json.dumps(r) for k in (server.key, "xray.jpeg", "notes.png"))]
    rss0, peak = result.rss[0], max(result.rss)
    print(f"load         {args.clients} clients, {result.wall:.1f} s, {args.backend} backend, every 5th request bad")
    print(f"requests     {result.attempts} ({ok} good answered, {n_err} good failed, {bad} bad)")
    print(f"throughput   {result.attempts / result.wall:.1f} requests/s, {ok / result.wall:.1f} good/s; good p50 "
          f"{p50:.0f} ms, p95 {p95:.0f} ms, p99 {p99:.0f} ms")
    print(f"statuses     {dict(sorted(result.statuses.items(), key=str))}")
    for kind in BAD_KINDS:
        print(f"  {kind:22} expected {EXPECTED[kind]}, got {result.bad.get(kind, {})}")
    print(f"5xx          {result.server_errors} answered, {audit_5xx} in the audit log")
    print(f"wrong        {result.wrong} good answers differ from the reference by more than {TOLERANCE:g}")
    print(f"audit        {lines} lines for {result.attempts} requests; {len(leaks)} lines with a key or file name")
    quarters = [max(result.rss[: max(1, len(result.rss) * q // 4)]) for q in (1, 2, 3, 4)]
    print(f"memory       server RSS {rss0:.0f} MiB at the start, peak {peak:.0f} MiB, end {result.rss[-1]:.0f} MiB; "
          f"peak by the end of each quarter of the run: {', '.join(f'{v:.0f}' for v in quarters)} MiB")
    good = (result.server_errors == 0 and audit_5xx == 0 and n_err == 0 and result.wrong == 0
            and not result.bad_mismatches and lines == result.attempts and not leaks)
    print("verdict      " + ("all checks passed" if good else f"FAILED (bad mismatches: {result.bad_mismatches})"))
    return 0 if good else 1


def main() -> int:
    # The network-only trials run in this process with the OpenMP wait policy of the servers (`pneumoscan serve`
    # sets PASSIVE; torch is not loaded yet): spinning threads measured the network at a fraction of its speed
    # whenever anything else ran on the cores. OMP_WAIT_POLICY=ACTIVE on the command line measures spinning.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mode", choices=["compare", "load"], default="compare")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL if DEFAULT_MODEL.is_file() else None,
                        help="torch model file or run directory (default: the bundled model)")
    parser.add_argument("--onnx-model", type=Path, help="the .onnx export (pneumoscan export --onnx FILE)")
    parser.add_argument("--backends", nargs="+", choices=["torch", "onnx"], default=["torch", "onnx"],
                        help="compare mode: the backends to run")
    parser.add_argument("--backend", choices=["torch", "onnx"], default="torch", help="load mode: the backend")
    parser.add_argument("--precision", choices=["auto", "float32", "bfloat16"], default="auto",
                        help="compare mode, torch backend: the network's arithmetic, for the network-only trials "
                             "and both servers alike (default: the model's own, float32 for the bundled one)")
    parser.add_argument("--images", type=int, default=8, help="distinct test X-rays posted in turn")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load per server")
    parser.add_argument("--network-seconds", type=float, default=10.0,
                        help="compare mode: seconds of network-only trials per batch size")
    parser.add_argument("--rounds", type=int, default=4,
                        help="compare mode: the --duration of each server split into this many alternating rounds")
    parser.add_argument("--upload-timeout", type=float, default=2.0, help="load mode: the server's --upload-timeout")
    parser.add_argument("--server-args", nargs=argparse.REMAINDER, default=[],
                        help="more `pneumoscan serve` options for every server (last on the line)")
    args = parser.parse_args()
    if args.model is None:
        parser.error("no bundled model in this checkout: pass --model")
    if not 1 <= args.clients <= MAX_CLIENTS:
        parser.error(f"--clients must be in 1..{MAX_CLIENTS}")
    if not 0 < args.duration <= MAX_DURATION:
        parser.error(f"--duration must be in (0, {MAX_DURATION:g}] seconds")
    paths = test_xrays(args.images)
    if not paths:
        parser.error(f"no test X-rays in {TEST_IMAGES}")
    images = [p.read_bytes() for p in paths]
    print(f"images       {len(images)} test X-rays, {min(map(len, images)) / 1024:.0f} to "
          f"{max(map(len, images)) / 1024:.0f} KiB ({', '.join(hashlib.sha256(d).hexdigest()[:8] for d in images)})")
    print(f"machine      {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at the start, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')}, "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', '-')}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench_http-") as tmp:
        code = run_compare(args, images, Path(tmp)) if args.mode == "compare" else run_load(args, images, Path(tmp))
    print(f"machine      load average {os.getloadavg()[0]:.1f} at the end")
    return code


if __name__ == "__main__":
    sys.exit(main())
