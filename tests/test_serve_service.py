"""What makes the HTTP service one a hospital can run, over real sockets: API keys, TLS, the audit trail, the
Prometheus metrics, dynamic batching and the bounded queue, and the ``serve`` / ``keys`` command lines."""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import io
import json
import os
import shutil
import ssl
import stat
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import synthetic_xray
from PIL import Image
from test_serve import JPEG, TEXT, dicom_bytes, post

from pneumoscan.cli import main
from pneumoscan.serve import app as serve_app
from pneumoscan.serve import auth, create_app, serve_in_thread

MiB = 2**20


def xray_jpeg(seed: int, opacity: float = 0.0, size: int = 96) -> bytes:
    buffer = io.BytesIO()
    pixels = np.round(synthetic_xray(size, seed, opacity=opacity) * 255).astype(np.uint8)
    Image.fromarray(pixels, "L").save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def audit_lines(path: Path, expected: int, timeout: float = 10.0) -> list[dict]:
    """The audit file's lines once ``expected`` are there: each is written when its response has gone out, so
    the client can be a moment ahead of it."""
    deadline = time.monotonic() + timeout
    while True:
        lines = path.read_text().splitlines() if path.exists() else []
        if len(lines) >= expected or time.monotonic() > deadline:
            return [json.loads(line) for line in lines]
        time.sleep(0.02)


def metric_samples(text: str) -> dict[tuple[str, tuple], float]:
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


@pytest.fixture(scope="module")
def keyfile(tmp_path_factory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    return path, auth.add_key(path, "ward-3")


@pytest.fixture(scope="module")
def secured(tiny_model, keyfile, tmp_path_factory):
    """Keys and an audit log on; yields (url, key, audit file)."""
    audit = tmp_path_factory.mktemp("audit") / "audit.jsonl"
    app = create_app(tiny_model, api_keys=keyfile[0], audit_log=audit)
    with serve_in_thread(app) as url:
        yield url, keyfile[1], audit


# ---- keys: the command line -----------------------------------------------------------------------------------


def test_keys_add_prints_the_key_once_and_the_file_keeps_only_its_hash(tmp_path, capsys):
    path = tmp_path / "keys.json"
    assert main(["keys", "add", "radiology", "--file", str(path)]) == 0
    out, err = capsys.readouterr()
    key = out.strip()
    assert key.startswith("psk_") and len(key) >= 40 and "\n" not in key
    assert "shown only this once" in err
    text = path.read_text()
    assert key not in text
    assert hashlib.sha256(key.encode()).hexdigest() in text
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert main(["keys", "add", "ward-3", "--file", str(path)]) == 0
    second = capsys.readouterr().out.strip()
    assert second != key

    assert main(["keys", "list", "--file", str(path)]) == 0
    listed = capsys.readouterr().out
    assert [line.split("\t")[0] for line in listed.splitlines()] == ["radiology", "ward-3"]
    assert key not in listed and second not in listed

    assert main(["keys", "remove", "radiology", "--file", str(path)]) == 0
    capsys.readouterr()
    assert list(auth.read_keys(path)) == ["ward-3"]


@pytest.mark.parametrize(("argv", "message"), [
    (["keys", "add", "ward-3"], "a key named 'ward-3' exists"),
    (["keys", "add", "bad name"], "key name must be"),
    (["keys", "remove", "nobody"], "no key named 'nobody' (keys: ward-3)"),
])
def test_keys_command_refusals_are_one_line(tmp_path, capsys, argv, message):
    path = tmp_path / "keys.json"
    auth.add_key(path, "ward-3")
    assert main([*argv, "--file", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pneumoscan: error: ") and message in err and "\n" not in err


def test_keys_list_of_a_missing_or_foreign_file_is_one_line(tmp_path, capsys):
    assert main(["keys", "list", "--file", str(tmp_path / "none.json")]) == 2
    assert "key file not found" in capsys.readouterr().err
    (tmp_path / "other.json").write_text('{"hello": 1}')
    assert main(["keys", "list", "--file", str(tmp_path / "other.json")]) == 2
    assert "not a pneumoscan key file" in capsys.readouterr().err


# ---- keys: the server -----------------------------------------------------------------------------------------


def test_v1_routes_and_metrics_need_a_bearer_key(secured):
    url, key, _ = secured
    for method, path in [("GET", "/v1/model"), ("POST", "/v1/predict"), ("GET", "/metrics"),
                         ("GET", "/v1/model/card"), ("GET", "/v1/nothing")]:
        missing = httpx.request(method, url + path)
        assert missing.status_code == 401, path
        assert missing.json() == {"error": serve_app.KEY_MISSING}
        assert missing.headers["www-authenticate"] == 'Bearer realm="pneumoscan"'
        assert missing.headers["x-content-type-options"] == "nosniff"  # the security headers too
        wrong = httpx.request(method, url + path, headers=bearer(key + "x"))
        assert wrong.status_code == 401
        assert wrong.json() == {"error": serve_app.KEY_INVALID}
        assert 'error="invalid_token"' in wrong.headers["www-authenticate"]
        for header in ({"Authorization": key}, {"Authorization": f"Basic {key}"}, {"Authorization": "Bearer"}):
            assert httpx.request(method, url + path, headers=header).status_code == 401
    assert httpx.get(f"{url}/v1/model", headers=bearer(key)).status_code == 200
    assert httpx.get(f"{url}/metrics", headers=bearer(key)).status_code == 200
    assert post(url, JPEG, headers=bearer(key)).status_code == 200


def test_healthz_the_page_and_its_files_stay_open(secured):
    url, _, _ = secured
    for path in ("/healthz", "/", "/static/app.js"):
        assert httpx.get(url + path).status_code == 200, path


def test_the_api_schema_needs_a_key_unless_public_docs(secured, tiny_model, keyfile):
    url, key, _ = secured
    assert httpx.get(f"{url}/openapi.json").status_code == 401
    assert httpx.get(f"{url}/openapi.json", headers=bearer(key)).json()["info"]["title"] == "pneumoscan"
    with serve_in_thread(create_app(tiny_model, api_keys=keyfile[0], public_docs=True)) as public:
        assert httpx.get(f"{public}/openapi.json").status_code == 200
        assert httpx.get(f"{public}/v1/model").status_code == 401  # only the schema is public


def test_an_unauthenticated_upload_is_refused_before_it_is_read(secured):
    url, key, _ = secured
    response = post(url, b"\0" * (8 * MiB), "big.png")
    assert response.status_code == 401
    assert post(url, JPEG, headers=bearer(key)).status_code == 200


def test_a_removed_key_is_refused_without_a_restart(tiny_model, tmp_path):
    path = tmp_path / "keys.json"
    keep, drop = auth.add_key(path, "keep"), auth.add_key(path, "drop")
    with serve_in_thread(create_app(tiny_model, api_keys=path)) as url:
        assert httpx.get(f"{url}/v1/model", headers=bearer(drop)).status_code == 200
        auth.remove_key(path, "drop")
        deadline = time.monotonic() + 10
        while httpx.get(f"{url}/v1/model", headers=bearer(drop)).status_code == 200:
            assert time.monotonic() < deadline, "the removed key still works"
            time.sleep(0.2)
        assert httpx.get(f"{url}/v1/model", headers=bearer(keep)).status_code == 200


def test_key_check_compares_every_key_in_constant_time(monkeypatch, tmp_path):
    path = tmp_path / "keys.json"
    keys = [auth.add_key(path, f"k{i}") for i in range(3)]
    store = auth.KeyStore(path)
    calls = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: calls.append(1) or real(a, b))
    assert store.identify(f"Bearer {keys[0]}") == "k0"
    assert store.identify("Bearer wrong") is None
    assert store.identify(None) is None
    assert len(calls) == 9  # all three entries, whether the first matched, none did, or no key came


@pytest.mark.parametrize("host", ["0.0.0.0", "10.1.2.3", "::", "pacs.hospital.example"])
def test_serve_refuses_an_open_non_loopback_address_in_one_line(host, capsys):
    assert main(["serve", "--host", host]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"pneumoscan: error: refusing to serve {host} without API keys") and "\n" not in err
    assert "--allow-open" in err


def test_loopback_addresses_are_recognised():
    from pneumoscan.cli.serve import is_loopback

    assert all(map(is_loopback, ["127.0.0.1", "127.5.0.1", "::1", "[::1]", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "192.168.1.4", "::", "example.org"]))


@pytest.mark.parametrize(("argv", "message"), [
    (["--ssl-certfile", "cert.pem"], "TLS needs both --ssl-certfile and --ssl-keyfile"),
    (["--ssl-certfile", "nope.pem", "--ssl-keyfile", "nope.key"], "nope.pem: TLS file not found"),
    (["--api-keys", "nokeys.json"], "key file not found"),
])
def test_serve_refuses_bad_tls_or_key_files_in_one_line(argv, message, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cert.pem").write_text("not a certificate")
    assert main(["serve", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pneumoscan: error: ") and message in err and "\n" not in err


# ---- TLS ------------------------------------------------------------------------------------------------------


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A throwaway certificate for 127.0.0.1, valid for a day."""
    cert, key = folder / "cert.pem", folder / "key.pem"
    if importlib.util.find_spec("cryptography") is not None:
        import datetime
        import ipaddress

        from cryptography import x509
        from cryptography.hazmat.primitives import hashes, serialization
        from cryptography.hazmat.primitives.asymmetric import ec
        from cryptography.x509.oid import NameOID

        private = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
        now = datetime.datetime.now(datetime.timezone.utc)
        certificate = (
            x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(private.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(private, hashes.SHA256())
        )
        cert.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
        key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    elif shutil.which("openssl"):
        subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                        "-nodes", "-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
                        "-keyout", str(key), "-out", str(cert)], check=True, capture_output=True)
    else:
        pytest.skip("neither the cryptography package nor the openssl command is available")
    return cert, key


def test_https_with_a_self_signed_certificate(tiny_model, keyfile, tmp_path):
    cert, key = self_signed(tmp_path)
    app = create_app(tiny_model, api_keys=keyfile[0])
    with serve_in_thread(app, ssl_certfile=cert, ssl_keyfile=key) as url:
        assert url.startswith("https://127.0.0.1:")
        trusted = ssl.create_default_context(cafile=str(cert))
        with httpx.Client(verify=trusted, timeout=60) as client:
            health = client.get(f"{url}/healthz")
            assert health.json()["status"] == "ok"
            assert health.headers["strict-transport-security"] == "max-age=31536000"  # HSTS over TLS
            response = client.post(f"{url}/v1/predict", files={"file": ("x.jpeg", JPEG)}, headers=bearer(keyfile[1]))
            assert response.status_code == 200 and response.json()["status"] == "ok"
            assert client.post(f"{url}/v1/predict", files={"file": ("x.jpeg", JPEG)}).status_code == 401
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(f"{url}/healthz")  # the system's trust store does not know the throwaway certificate
        plain = httpx.get(url.replace("https://", "http://") + "/healthz")  # plain HTTP: told, never served
        assert plain.status_code == 400 and f"use {url}/" in plain.text


# ---- audit trail ----------------------------------------------------------------------------------------------


def test_audit_log_has_one_line_per_request_and_no_patient_data(secured):
    url, key, audit = secured
    before = len(audit_lines(audit, 0, timeout=0))
    dicom = dicom_bytes(16)
    assert b"Test^Phantom" in dicom
    sent = [
        post(url, JPEG, "Doe_John_chest.jpeg", headers=bearer(key)),
        post(url, dicom, "Doe_John.dcm", headers=bearer(key)),
        post(url, TEXT, "Doe_John_notes.png", headers=bearer(key)),
        post(url, JPEG, "Doe_John_nokey.jpeg"),
        post(url, JPEG, "Doe_John_wrongkey.jpeg", headers=bearer("psk_wrong")),
        httpx.get(f"{url}/healthz"),
    ]
    lines = audit_lines(audit, before + len(sent))[before:]
    assert len(lines) == len(sent)
    by_id = {line["request_id"]: line for line in lines}
    assert set(by_id) == {r.headers["x-request-id"] for r in sent}
    text = audit.read_text()
    for secret in ("Doe_John", "Phantom", key):
        assert secret not in text

    good, dcm, notes, nokey, wrongkey, health = (by_id[r.headers["x-request-id"]] for r in sent)
    body = sent[0].json()
    assert good["status"] == 200 and good["route"] == "/v1/predict" and good["method"] == "POST"
    assert good["key"] == "ward-3" and good["client"] == "127.0.0.1"
    assert good["upload_sha256"] == hashlib.sha256(JPEG).hexdigest() and good["upload_bytes"] == len(JPEG)
    assert good["model_sha256"] == body["model"]["sha256"]
    assert (good["prediction"], good["probability"], good["decision"]) == ("ok", body["probability"], body["decision"])
    assert (good["operating_point"], good["threshold"]) == ("screening", 0.3)
    assert good["latency_ms"] > 0
    assert good["time"].endswith("Z")
    assert body["request_id"] == sent[0].headers["x-request-id"]
    assert dcm["upload_sha256"] == hashlib.sha256(dicom).hexdigest() and dcm["prediction"] == "ok"
    # the stage's facts for drift monitoring, the same as every route records them: no identifier in them
    assert (good["facts"]["format"], dcm["facts"]["format"], dcm["facts"]["modality"]) == ("jpeg", "dicom", "DX")
    assert good["facts"]["probability"] == body["probability"] and good["facts"]["guard_score"] is not None
    assert notes["facts"] is None and nokey["facts"] is None
    assert (notes["status"], notes["prediction"], notes["upload_bytes"]) == (415, None, len(TEXT))
    assert (nokey["status"], nokey["key"], nokey["upload_sha256"]) == (401, None, None)
    assert (wrongkey["status"], wrongkey["key"]) == (401, None)
    assert (health["status"], health["route"]) == (200, "/healthz")


def test_a_failing_audit_log_never_fails_the_request(tiny_model):
    app = create_app(tiny_model, audit_log="/dev/full")  # every write: ENOSPC
    failed = threading.Semaphore(0)
    counted = app.state.audit.on_failure
    app.state.audit.on_failure = lambda: (counted(), failed.release())
    with serve_in_thread(app) as url:
        for _ in range(3):
            response = post(url, JPEG)
            assert response.status_code == 200 and response.json()["status"] == "ok"
        assert all(failed.acquire(timeout=10) for _ in range(3))  # each line is written after its response
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert app.state.audit.failures >= 3
    assert samples[("pneumoscan_audit_failures_total", ())] >= 3


def test_audit_log_rotates_at_its_size_limit(tiny_model, tmp_path):
    from pneumoscan.serve.audit import AuditLog

    path = tmp_path / "audit.jsonl"
    app = create_app(tiny_model, audit_log=AuditLog(path, max_bytes=2000, backups=2))
    with serve_in_thread(app) as url:
        for _ in range(20):
            httpx.get(f"{url}/healthz")
    # the server has stopped: every line is written
    assert sorted(p.name for p in tmp_path.iterdir()) == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2"]
    assert all(p.stat().st_size <= 2000 for p in tmp_path.iterdir())


# ---- metrics --------------------------------------------------------------------------------------------------


def test_metrics_in_the_prometheus_text_format(tiny_model, tmp_path):
    app = create_app(tiny_model)
    other = create_app(tiny_model)  # a second app in the same process: its own registry, no clash
    with serve_in_thread(app) as url:
        for _ in range(3):
            assert post(url, JPEG).status_code == 200
        assert post(url, TEXT, "notes.png").status_code == 415
        httpx.get(f"{url}/nope")
        response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    samples = metric_samples(response.text)
    assert samples[("pneumoscan_http_requests_total", (("route", "/v1/predict"), ("status", "200")))] == 3
    assert samples[("pneumoscan_http_requests_total", (("route", "/v1/predict"), ("status", "415")))] == 1
    assert samples[("pneumoscan_http_requests_total", (("route", "other"), ("status", "404")))] == 1
    assert samples[("pneumoscan_http_request_duration_seconds_count", (("route", "/v1/predict"),))] == 4
    assert samples[("pneumoscan_batch_size_count", ())] == 3
    assert samples[("pneumoscan_batch_size_sum", ())] == 3
    assert samples[("pneumoscan_predictions_total", (("status", "ok"),))] == 3
    assert samples[("pneumoscan_queue_depth", ())] == 0
    assert samples[("pneumoscan_requests_in_progress", ())] == 0
    info = next(labels for (name, labels) in samples if name == "pneumoscan_model_info")
    assert ("sha256", tiny_model.sha256) in info and ("name", "tiny-test-model") in info
    assert metric_samples(other.state.metrics.render().decode())[("pneumoscan_batch_size_count", ())] == 0


# ---- dynamic batching -----------------------------------------------------------------------------------------


def distinct_xrays(n: int) -> list[bytes]:
    return [xray_jpeg(100 + i, opacity=0.1 * (i % 5), size=80 + 8 * i) for i in range(n)]


def _send_together(url: str, images: list[bytes]) -> list[dict]:
    barrier = threading.Barrier(len(images))

    def send(i: int) -> dict:
        barrier.wait()
        response = post(url, images[i], f"{i}.jpeg")
        assert response.status_code == 200, response.text
        return response.json()

    with ThreadPoolExecutor(len(images)) as pool:
        return list(pool.map(send, range(len(images))))


def _check_batched_answers(model, app, url):
    images = distinct_xrays(8)
    expected = [model.predict(data).probability for data in images]
    assert len({round(p, 6) for p in expected}) == 8  # distinct answers: a swapped row would show
    for _ in range(3):  # a noisy CPU may split a round; each round must be right, one must batch
        bodies = _send_together(url, images)
        for i, body in enumerate(bodies):
            assert body["filename"] == f"{i}.jpeg"
            assert body["probability"] == pytest.approx(expected[i], abs=1e-5)
        if max(b["batch_size"] for b in bodies) > 1:
            break
    assert max(b["batch_size"] for b in bodies) > 1
    assert app.state.service.batcher.batches < app.state.service.batcher.images


def test_concurrent_distinct_images_share_a_network_call_and_each_gets_its_own_answer(tiny_model):
    app = create_app(tiny_model, batch_window_ms=100, max_batch=8, max_concurrency=4)
    with serve_in_thread(app) as url:
        _check_batched_answers(tiny_model, app, url)


@pytest.mark.slow
def test_onnx_backend_batches_the_same_way(tiny_model, tmp_path):
    from pneumoscan import load_model
    from pneumoscan.export import export_onnx

    prep = tiny_model.preprocessing
    calibration = np.stack([prep.to_uint8(synthetic_xray(96, s)) for s in range(4)])
    exported = export_onnx(tiny_model, tmp_path / "tiny.onnx", images=calibration, checked_on="generated")
    model = load_model(exported.path, backend="onnx")
    app = create_app(model, batch_window_ms=100, max_batch=8, max_concurrency=4)
    with serve_in_thread(app) as url:
        _check_batched_answers(model, app, url)


def test_max_batch_caps_the_images_per_network_call(tiny_model):
    app = create_app(tiny_model, batch_window_ms=100, max_batch=2, max_concurrency=4)
    with serve_in_thread(app) as url:
        bodies = _send_together(url, distinct_xrays(6))
    assert max(b["batch_size"] for b in bodies) <= 2
    assert app.state.service.batcher.images == 6


def test_a_lone_request_does_not_wait_for_the_window(tiny_model):
    app = create_app(tiny_model, batch_window_ms=1000)  # the longest window the command line allows
    with serve_in_thread(app) as url:
        post(url, JPEG)
        start = time.perf_counter()
        body = post(url, JPEG).json()
        elapsed = time.perf_counter() - start
    assert body["batch_size"] == 1
    assert body["timing_ms"]["inference"] < 900, body["timing_ms"]
    assert elapsed < 5.0  # anything slower would be the machine, not the window


class _HeldModel:
    """The model, with a network call that waits until the test releases it, and a count of decoded uploads:
    the tests wait on these events, never on time."""

    def __init__(self, model):
        self._model = model
        self.entered = threading.Event()  # a network call has started
        self.release = threading.Event()  # let network calls finish
        self.decoded = threading.Semaphore(0)  # one release per upload decoded
        self.broken = False

    def score(self, images, **kwargs):
        if self.broken:
            raise RuntimeError("simulated network failure")
        self.entered.set()
        assert self.release.wait(60), "the test never released the network"
        return self._model.score(images, **kwargs)

    def decode(self, *args, **kwargs):
        try:
            return self._model.decode(*args, **kwargs)
        finally:
            self.decoded.release()

    def __getattr__(self, name):
        return getattr(self._model, name)


def test_the_event_loop_answers_while_the_network_runs(tiny_model):
    model = _HeldModel(tiny_model)
    with serve_in_thread(create_app(model)) as url, ThreadPoolExecutor(1) as pool:
        slow = pool.submit(post, url, JPEG)
        assert model.entered.wait(30)
        start = time.perf_counter()
        assert httpx.get(f"{url}/healthz").status_code == 200
        assert httpx.get(f"{url}/metrics").status_code == 200
        assert time.perf_counter() - start < 1.0
        assert not slow.done()
        model.release.set()
        assert slow.result().status_code == 200


def test_beyond_max_pending_the_answer_is_503_with_retry_after(tiny_model):
    model = _HeldModel(tiny_model)
    with serve_in_thread(create_app(model, max_pending=2)) as url, ThreadPoolExecutor(2) as pool:
        held = [pool.submit(post, url, JPEG) for _ in range(2)]
        assert model.decoded.acquire(timeout=30) and model.decoded.acquire(timeout=30)  # both admitted
        busy = post(url, JPEG)
        assert busy.status_code == 503
        assert busy.json() == {"error": serve_app.BUSY}
        assert busy.headers["retry-after"] == "1"
        model.release.set()
        assert [f.result().status_code for f in held] == [200, 200]
        assert post(url, JPEG).status_code == 200
        samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert samples[("pneumoscan_busy_rejections_total", ())] == 1


def test_a_failing_network_call_is_a_500_for_its_requests_and_the_batcher_lives_on(tiny_model):
    model = _HeldModel(tiny_model)
    model.broken = True
    model.release.set()
    with serve_in_thread(create_app(model)) as url:
        failed = post(url, JPEG)
        assert (failed.status_code, failed.json()) == (500, {"error": serve_app.INTERNAL})
        model.broken = False
        assert post(url, JPEG).status_code == 200


@pytest.mark.slow
def test_serve_command_with_keys_tls_audit_and_batching_options(tiny_model_path, tmp_path):
    """The command line end to end: `pneumoscan serve` over HTTPS with a key file, an audit log and batching
    options, in a process of its own."""
    import socket
    import sys

    cert, tls_key = self_signed(tmp_path)
    keys = tmp_path / "keys.json"
    key = auth.add_key(keys, "cli")
    audit = tmp_path / "audit.jsonl"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "pneumoscan.cli", "serve", "--model", str(tiny_model_path), "--port", str(port),
               "--api-keys", str(keys), "--audit-log", str(audit), "--ssl-certfile", str(cert), "--ssl-keyfile",
               str(tls_key), "--batch-window-ms", "2", "--max-batch", "4", "--max-pending", "8", "--verbose"]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"https://127.0.0.1:{port}"
    secret = "psk_" + "in-the-url" * 4
    try:
        with httpx.Client(verify=ssl.create_default_context(cafile=str(cert)), timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                assert server.poll() is None, server.stderr.read()
                try:
                    client.get(f"{url}/healthz", timeout=2)
                    break
                except httpx.TransportError:
                    assert time.monotonic() < deadline, "server did not start"
                    time.sleep(0.2)
            assert client.get(f"{url}/v1/model").status_code == 401
            info = client.get(f"{url}/v1/model", headers=bearer(key)).json()
            assert info["batching"] == {"batch_window_ms": 2.0, "max_batch": 4, "max_pending": 8}
            response = client.post(f"{url}/v1/predict", files={"file": ("x.jpeg", JPEG)}, headers=bearer(key))
            assert response.status_code == 200
            assert client.get(f"{url}/v1/model", params={"api_key": secret}).status_code == 401
        lines = audit_lines(audit, 5)
        assert [(line["route"], line["status"]) for line in lines][-4:] == [
            ("/v1/model", 401), ("/v1/model", 200), ("/v1/predict", 200), ("/v1/model", 401)]
        assert lines[-2]["key"] == "cli" and lines[-2]["request_id"] == response.headers["x-request-id"]
        assert stat.S_IMODE(audit.stat().st_mode) == 0o600  # the service's umask: owner-only
    finally:
        server.terminate()
        out, err = server.communicate(timeout=30)
    assert "/v1/model?api_key=[redacted]" in out  # --verbose logs every request line, the key's value redacted
    assert secret not in out + err + audit.read_text()


def test_the_serving_process_threads_sleep_when_idle_and_serve_threads_sets_the_network_threads():
    """Spinning OpenMP threads took the CPU from the decoding threads under load: `pneumoscan serve` runs with
    OMP_WAIT_POLICY=PASSIVE (unless the operator set it), set before torch loads, and --threads network threads."""
    import torch

    from pneumoscan.cli.serve import network_threads

    code = ("import os, sys; import pneumoscan.cli.serve as c; from pneumoscan.cli import main\n"
            "def stop(threads):\n"
            "    print(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules, flush=True); os._exit(0)\n"
            "c.network_threads = stop; main(['serve', '--port', '1'])")
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.stdout.split() == ["PASSIVE", "False"], out.stderr
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env={**env, "OMP_WAIT_POLICY": "ACTIVE"})
    assert out.stdout.split() == ["ACTIVE", "False"], out.stderr
    before = torch.get_num_threads()
    try:
        assert network_threads(1) == 1 and torch.get_num_threads() == 1
        assert network_threads(None) == len(os.sched_getaffinity(0))
    finally:
        torch.set_num_threads(before)


# ---- the app's lifetime ---------------------------------------------------------------------------------------


def test_creating_and_closing_many_apps_leaves_no_thread_behind(tiny_model):
    """Other tests' servers may be running (module fixtures): this counts the threads this test's apps add."""
    from fastapi.testclient import TestClient

    before = set(threading.enumerate())

    def added() -> list[str]:
        return sorted(t.name for t in set(threading.enumerate()) - before)

    for _ in range(8):
        app = create_app(tiny_model, max_concurrency=3)
        assert added() == []  # nothing starts before the server runs the app
        with TestClient(app) as client:
            assert client.post("/v1/predict", files={"file": ("x.jpeg", JPEG)}).status_code == 200
            assert {"pneumoscan-batcher", "pneumoscan-decode_0"} <= set(added())
        assert added() == []
    with serve_in_thread(create_app(tiny_model)) as url:
        assert post(url, JPEG).status_code == 200
    assert added() == []


# ---- formats and heatmaps -------------------------------------------------------------------------------------


def _xray_pixels() -> np.ndarray:
    """A real X-ray from the val split when the data is beside the repository (reduced to keep the test quick),
    else a synthetic one."""
    from conftest import KERMANY

    real = sorted((KERMANY / "val" / "PNEUMONIA").glob("*.jpeg"))[:1] if KERMANY.is_dir() else []
    if real:
        image = Image.open(real[0]).convert("L")
        image.thumbnail((512, 512))
        return np.asarray(image)
    return np.round(synthetic_xray(384, 11) * 255).astype(np.uint8)


@pytest.mark.parametrize(("fmt", "mode", "suffix"), [("GIF", "L", ".gif"), ("WEBP", "L", ".webp"),
                                                     ("PPM", "RGB", ".ppm"), ("PPM", "L", ".pgm")])
def test_gif_webp_and_pnm_xrays_are_screened_like_the_python_api_screens_the_file(server_url, tiny_model,
                                                                                    tmp_path, fmt, mode, suffix):
    path = tmp_path / f"xray{suffix}"
    options = {"lossless": True} if fmt == "WEBP" else {}
    Image.fromarray(_xray_pixels(), "L").convert(mode).save(path, format=fmt, **options)
    response = post(server_url, path.read_bytes(), path.name)
    assert response.status_code == 200, response.text
    expected = tiny_model.predict(str(path))
    body = response.json()
    assert (body["status"], body["message"]) == (expected.status, expected.message)
    assert body["probability"] == pytest.approx(expected.probability, abs=1e-6)


def test_the_upload_error_for_an_unreadable_image_is_the_stages_message(server_url, tiny_model):
    from pneumoscan import pipeline

    cut = JPEG[: len(JPEG) // 2]
    response = post(server_url, cut, "cut.jpeg")
    assert response.status_code == 422
    expected = pipeline.prepare(tiny_model, cut, name="cut.jpeg").error
    assert expected.startswith("cut.jpeg: ")
    assert response.json() == {"error": expected}


def test_heatmaps_follow_the_one_rule_positive_by_default_all_on_request(server_url):
    positive = post(server_url, JPEG, params={"heatmap": "true", "threshold": "0.01"}).json()
    assert positive["decision"] == "PNEUMONIA" and positive["heatmap_png_base64"]
    assert positive["heatmap_reason"] is None
    normal = post(server_url, JPEG, params={"heatmap": "true", "threshold": "0.99"}).json()
    assert normal["decision"] == "NORMAL"
    assert normal["heatmap_png_base64"] is None
    assert normal["heatmap_reason"].startswith("no heatmap: drawn for PNEUMONIA decisions only, this one is NORMAL")
    every = post(server_url, JPEG, params={"heatmap": "true", "threshold": "0.99", "heatmaps": "all"}).json()
    assert every["decision"] == "NORMAL" and every["heatmap_png_base64"]
    plain = post(server_url, JPEG).json()
    assert "heatmap_png_base64" not in plain and "heatmap_reason" not in plain
    wrong = post(server_url, JPEG, params={"heatmap": "true", "heatmaps": "some"})
    assert wrong.status_code == 422 and wrong.json()["error"].startswith("invalid request: heatmaps: ")


def test_the_schema_documents_every_answer_and_the_accepted_formats(server_url):
    from pneumoscan.data.images import FORMAT_NAMES

    schema = httpx.get(f"{server_url}/openapi.json").json()
    predict = schema["paths"]["/v1/predict"]["post"]
    assert predict["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/Screening"}
    for code in ("400", "401", "408", "413", "415", "422", "500", "503"):
        assert predict["responses"][code]["content"]["application/json"]["schema"] == {
            "$ref": "#/components/schemas/ErrorBody"}, code
    assert FORMAT_NAMES in predict["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"][
        "file"]["description"]
    assert FORMAT_NAMES in predict["responses"]["415"]["description"]
    for path, model in (("/v1/model", "ModelInfo"), ("/healthz", "Health")):
        assert schema["paths"][path]["get"]["responses"]["200"]["content"]["application/json"]["schema"] == {
            "$ref": f"#/components/schemas/{model}"}
    page = httpx.get(f"{server_url}/").text
    assert FORMAT_NAMES in page


# ---- connections: timeouts, limits, rejections ----------------------------------------------------------------


@pytest.fixture(scope="module")
def server_url(tiny_model):
    with serve_in_thread(create_app(tiny_model)) as url:
        yield url


@pytest.fixture
def guarded(tiny_model, tmp_path):
    """A server with short connection deadlines and an audit log; yields (url, app, audit file)."""
    audit = tmp_path / "audit.jsonl"
    app = create_app(tiny_model, audit_log=audit)
    with serve_in_thread(app, header_timeout=1.0, keep_alive=0.5) as url:
        yield url, app, audit


def _connect(url: str):
    import socket

    host, port = url.split("//")[1].split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def _read_until_closed(sock, timeout: float = 10.0) -> bytes:
    """Everything the server sends until it closes the connection (recv waits on the socket, bounded)."""
    sock.settimeout(timeout)
    data = b""
    while True:
        try:
            chunk = sock.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


@pytest.mark.slow
def test_a_client_trickling_its_headers_is_disconnected_while_others_are_answered(guarded):
    url, app, audit = guarded
    head = b"Host: 127.0.0.1\r\n" + b"X-Padding: " + b"a" * 400 + b"\r\n\r\n"
    sock = _connect(url)
    start = time.monotonic()
    sock.sendall(b"GET /healthz HTTP/1.1\r\n")  # the request line at once, then the headers byte by byte
    sock.settimeout(0.1)  # the slow client: one byte, then up to 0.1 s waiting for the server, then the next
    received, sent = b"", 0
    try:
        for sent in range(len(head)):
            sock.sendall(head[sent:sent + 1])
            if sent == 10:  # a normal client meanwhile gets its answer at once
                assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                continue
            received += chunk
            break  # the server answered, or closed (b"")
    except (BrokenPipeError, ConnectionResetError):
        pass
    received += _read_until_closed(sock)
    sock.close()
    elapsed = time.monotonic() - start
    assert sent < len(head) - 1, "the whole head went through: the deadline never fired"
    assert elapsed < 8, elapsed
    assert received.startswith(b"HTTP/1.1 408 ")
    assert json.loads(received.split(b"\r\n\r\n", 1)[1]) == {"error": "request headers not received within 1 s"}
    samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert samples[("pneumoscan_protocol_rejections_total", (("reason", "header_timeout"),))] == 1
    line = next(r for r in audit_lines(audit, 3) if r.get("rejected"))
    assert (line["rejected"], line["status"], line["method"], line["route"]) == ("header_timeout", 408, "GET",
                                                                                  "/healthz")


def test_idle_connections_are_closed_after_the_keep_alive_timeout(guarded):
    url, *_ = guarded
    silent = _connect(url)  # connects and sends nothing
    start = time.monotonic()
    assert _read_until_closed(silent) == b""  # closed without a word: there was no request to answer
    assert time.monotonic() - start < 5
    silent.close()
    reused = _connect(url)  # one answered request, then idle
    reused.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    answer = _read_until_closed(reused)
    assert answer.startswith(b"HTTP/1.1 200 ") and b'"status":"ok"' in answer
    reused.close()


def test_the_body_of_a_refused_upload_is_not_taken_for_the_next_request_head(guarded):
    """A 413 goes out before the body is read; the rest of that body still arrives on the connection, and must
    not count against the next request's head limit (benchmarks/bench_http.py --mode load found 431s here)."""
    url, *_ = guarded
    with httpx.Client(timeout=60) as client:
        for _ in range(2):
            huge = client.post(f"{url}/v1/predict", files={"file": ("huge.png", b"\0" * (21 * MiB))})
            assert huge.status_code == 413
            cut = client.post(f"{url}/v1/predict", files={"file": ("cut.jpeg", JPEG[:300])})
            assert cut.status_code == 422, cut.text
        samples = metric_samples(client.get(f"{url}/metrics").text)
    assert not [k for k in samples if k[0] == "pneumoscan_protocol_rejections_total"]


@pytest.mark.parametrize(("request_bytes", "status", "reason", "route"), [
    (b"GET /healthz HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * (40 * 1024) + b"\r\n\r\n", 431, "header_too_large",
     "/healthz"),
    (b"GET /v1/model HTTP/1.1\r\nHost: a\r\nthis is no header\r\n\r\n", 400, "malformed", "/v1/model"),
    (b"\x16\x03\x01 not http at all\r\n\r\n", 400, "malformed", None),
], ids=["oversize-head", "malformed-header", "no-request-line"])
def test_requests_the_server_refuses_itself_are_counted_and_audited_with_their_request_line(
        guarded, request_bytes, status, reason, route):
    url, app, audit = guarded
    sock = _connect(url)
    with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # refused before it was all sent
        sock.sendall(request_bytes)
    answer = _read_until_closed(sock)
    sock.close()
    assert answer.startswith(f"HTTP/1.1 {status} ".encode())
    assert "error" in json.loads(answer.split(b"\r\n\r\n", 1)[1])
    assert httpx.get(f"{url}/healthz").status_code == 200  # and the server serves on
    samples = metric_samples(httpx.get(f"{url}/metrics").text)
    assert samples[("pneumoscan_protocol_rejections_total", (("reason", reason),))] == 1
    lines = audit_lines(audit, 2 if route is None else 3)
    rejected = [r for r in lines if r.get("rejected")]
    if route is None:  # no request line: nothing to audit, the metric counts it
        assert rejected == []
    else:
        assert [(r["rejected"], r["status"], r["route"]) for r in rejected] == [(reason, status, route)]


def test_a_key_in_the_query_string_never_reaches_the_logs(tiny_model, keyfile, tmp_path):
    """With the access log on (``serve --verbose``), a client that puts a key in the URL (refused) or a key-like
    parameter beside the API's own ones: the logged request lines show neither."""
    import logging

    key = keyfile[1]
    audit = tmp_path / "audit.jsonl"
    secret = "psk_" + "s3cret" * 6
    lines: list[str] = []

    class Capture(logging.Handler):
        def emit(self, record):
            lines.append(record.getMessage())

    app = create_app(tiny_model, api_keys=keyfile[0], audit_log=audit)
    with serve_in_thread(app, log_level="info") as verbose:
        access = logging.getLogger("uvicorn.access")
        handler = Capture()
        access.addHandler(handler)
        try:
            assert httpx.get(f"{verbose}/v1/model", params={"api_key": secret}).status_code == 401
            assert post(verbose, JPEG, params={"api_key": secret, "threshold": "balanced"},
                        headers=bearer(key)).status_code == 200
        finally:
            access.removeHandler(handler)
    assert len(lines) == 2, lines
    assert all(secret not in line for line in lines)
    assert "/v1/model?api_key=[redacted]" in lines[0]
    assert "/v1/predict?api_key=[redacted]&threshold=balanced" in lines[1]
    assert secret not in audit.read_text()


# ---- smaller hardening ----------------------------------------------------------------------------------------


def test_head_is_answered_wherever_get_is(secured):
    url, key, _ = secured
    for path, headers in [("/", {}), ("/healthz", {}), ("/static/app.js", {}), ("/v1/model", bearer(key)),
                          ("/v1/model/card", bearer(key)), ("/metrics", bearer(key)), ("/openapi.json", bearer(key))]:
        get = httpx.get(url + path, headers=headers)
        head = httpx.head(url + path, headers=headers)
        assert head.status_code == get.status_code, path
        assert head.content == b"", path
        assert head.headers["content-type"] == get.headers["content-type"], path
    assert httpx.head(f"{url}/v1/model").status_code == 401  # and HEAD needs the key where GET does


def test_no_redirect_is_built_from_the_host_header(server_url):
    for path in ("/static", "/v1/model/", "/healthz/"):
        response = httpx.get(server_url + path, headers={"Host": "evil.example"}, follow_redirects=False)
        assert response.status_code == 404, path
        assert "location" not in response.headers
        assert response.json() == {"error": f"not found: {path}"}


def test_plain_http_has_no_hsts_header(server_url):
    assert "strict-transport-security" not in httpx.get(f"{server_url}/healthz").headers


@pytest.fixture
def restore_umask():
    mask = os.umask(0o022)
    os.umask(mask)
    yield
    os.umask(mask)


def _serve_without_serving(monkeypatch, argv: list[str]) -> dict:
    """Run ``pneumoscan serve`` in this process up to the point where uvicorn would serve; returns what it saw."""
    import uvicorn

    import pneumoscan.cli.serve as serve_cli
    import pneumoscan.predict

    seen: dict = {}
    real_load = pneumoscan.predict.load_model

    def load_model(*args, **kwargs):
        seen["device"] = kwargs.get("device")
        return real_load(*args, **{**kwargs, "device": "cpu"})

    def run(server):
        seen["umask"] = os.umask(0o077)
        os.umask(seen["umask"])
        seen["config"] = server.config

    monkeypatch.setattr(pneumoscan.predict, "load_model", load_model)
    monkeypatch.setattr(serve_cli, "network_threads", lambda threads: 1)
    monkeypatch.setattr(uvicorn.Server, "run", run)
    assert main(["serve", *argv]) == 0
    return seen


def test_serve_sets_an_owner_only_umask_and_its_audit_log_is_0600(monkeypatch, tmp_path, tiny_model_path,
                                                                     restore_umask):
    audit = tmp_path / "audit.jsonl"
    seen = _serve_without_serving(monkeypatch, ["--model", str(tiny_model_path), "--audit-log", str(audit),
                                                "--device", "cpu"])
    assert seen["umask"] == 0o077
    assert stat.S_IMODE(audit.stat().st_mode) == 0o600
    assert seen["device"] == "cpu"
    config = seen["config"]
    assert (config.timeout_keep_alive, config.limit_concurrency, config.h11_max_incomplete_event_size) == (
        5, 128, 16 * 1024)
    assert config.http.header_timeout == 30


def test_serve_umask_option_and_connection_options_are_passed_on(monkeypatch, tmp_path, tiny_model_path,
                                                                  restore_umask):
    audit = tmp_path / "audit.jsonl"
    seen = _serve_without_serving(monkeypatch, [
        "--model", str(tiny_model_path), "--audit-log", str(audit), "--umask", "027", "--header-timeout", "7",
        "--keep-alive", "2", "--max-connections", "9", "--max-header-kb", "8"])
    assert seen["umask"] == 0o027
    assert stat.S_IMODE(audit.stat().st_mode) == 0o640
    assert seen["device"] == "auto"  # the default; load_model resolves it (CUDA when PyTorch sees a GPU)
    config = seen["config"]
    assert (config.timeout_keep_alive, config.limit_concurrency, config.h11_max_incomplete_event_size) == (
        2, 9, 8 * 1024)
    assert config.http.header_timeout == 7


def test_rotated_audit_logs_keep_the_owner_only_mode_of_the_service_umask(tmp_path, restore_umask):
    from pneumoscan.durable import SERVICE_UMASK
    from pneumoscan.serve.audit import AuditLog

    os.umask(SERVICE_UMASK)
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=500, backups=3)
    for i in range(40):
        log.write({"request_id": f"{i:032x}", "route": "/healthz", "status": 200})
    log.close()
    files = sorted(tmp_path.iterdir())
    assert [p.name for p in files] == ["audit.jsonl", "audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    assert {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o600}


def test_serve_help_shows_every_limit_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = " ".join(capsys.readouterr().out.split()).split(" options: ", 1)[1]
    for option, default in [("--max-upload-mb", "default 20"), ("--upload-timeout", "default 60"),
                            ("--header-timeout", "default 30"), ("--keep-alive", "default 5"),
                            ("--max-connections", "default 128"), ("--max-header-kb", "default 16"),
                            ("--max-pending", "default 32"), ("--umask", "default 077"), ("--device", "auto")]:
        assert default in text.split(f" {option} ", 1)[1][:300], option
