"""A short, bounded run of the load test in benchmarks/bench_http.py (``--mode load``) against a real server in
this process: 6 clients for 3 s, every fifth request bad (no key, wrong key, truncated JPEG, text as PNG, oversize,
malformed multipart, a client that hangs up mid-upload, one that sends its body too slowly).

The full run (16 clients, 60 s, the bundled model, a server process of its own) is
``python benchmarks/bench_http.py --mode load``; its figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path

import pytest
from test_serve_service import distinct_xrays

from pneumoscan.serve import auth, create_app, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("pneumoscan_bench_http", ROOT / "benchmarks" / "bench_http.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


def current_rss_mib() -> float:
    return bench.rss_mib(int(Path("/proc/self/stat").read_text().split()[0])) if Path("/proc/self").exists() \
        else float("nan")


@pytest.fixture(scope="module")
def load_run(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("load")
    key = auth.add_key(folder / "keys.json", "load-test")
    audit = folder / "audit.jsonl"
    max_upload = 64 * 1024
    app = create_app(tiny_model, api_keys=folder / "keys.json", audit_log=audit, max_upload_bytes=max_upload,
                     upload_timeout=0.5)
    images = distinct_xrays(4)
    good = [(data, tiny_model.predict(data).probability) for data in images]
    with serve_in_thread(app) as url:
        rss_before = current_rss_mib()
        result = bench.mixed_load(url, key, good, clients=6, duration=3.0, bad_every=5, max_upload=max_upload,
                                  slow_seconds=5.0, max_requests=2000)
        rss_after = current_rss_mib()
        deadline = time.monotonic() + 5
        while len(audit.read_text().splitlines()) < result.attempts and time.monotonic() < deadline:
            time.sleep(0.05)
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    return result, records, key, rss_before, rss_after


def test_mixed_load_gets_no_5xx_and_every_bad_request_its_status(load_run):
    result, records, *_ = load_run
    assert result.server_errors == 0
    assert all((r["status"] or 0) < 500 for r in records)
    assert set(result.bad) == set(bench.BAD_KINDS), "the run was too short to send every kind of bad request"
    assert result.bad_mismatches == {}


def test_mixed_load_answers_every_good_request_correctly(load_run):
    result, *_ = load_run
    assert result.errors == {}
    assert len(result.latencies) > 10
    assert result.wrong == 0


def test_mixed_load_writes_one_audit_line_per_request_and_no_key(load_run):
    result, records, key, *_ = load_run
    assert len(records) == result.attempts
    assert len({r["request_id"] for r in records}) == len(records)
    assert not any(key in json.dumps(r) for r in records)
    bad_requests = sum(result.bad["malformed_multipart"].values()) + sum(result.bad["disconnect_mid_upload"].values())
    assert sum(r["status"] == 400 for r in records) == bad_requests  # the hung-up clients' lines say 400 too


def test_mixed_load_keeps_memory_bounded(load_run):
    *_, before, after = load_run
    assert after - before < 200, f"RSS grew from {before:.0f} to {after:.0f} MiB"
