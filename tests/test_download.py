"""`pneumoscan data download` against a local stand-in for Kaggle, never the internet.

kagglehub talks to Kaggle through kagglesdk, whose endpoint is chosen by KAGGLE_API_ENVIRONMENT from a fixed
table (TEST = http://localhost:7777). We set TEST and point that table entry at a `http.server` thread on
127.0.0.1 with a free port, which serves the two calls kagglehub makes: GetDataset (current version) and
DownloadDataset (a redirect to the archive, as Kaggle redirects to cloud storage). The real kagglehub code
does the authentication, transfer and unzip; only the remote is fake.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from conftest import synthetic_xray
from PIL import Image

from pneumoscan.cli import main

pytest.importorskip("kagglehub")

USER, KEY = "tester", "secret-key"


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray((synthetic_xray(32, seed) * 255).astype("uint8"), "L").save(buf, "JPEG")
    return buf.getvalue()


def kaggle_zip(splits=("train", "val", "test"), classes=("NORMAL", "PNEUMONIA"), nested: bool = True) -> bytes:
    """An archive shaped like the published one: chest_xray/{split}/{class}, a duplicate copy nested under
    chest_xray/chest_xray, and __MACOSX debris."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        prefixes = ["chest_xray/", "chest_xray/chest_xray/"] if nested else ["chest_xray/"]
        for prefix in prefixes:
            for split in splits:
                for c, name in enumerate(classes):
                    for i in range(2):
                        fname = f"person{i}_bacteria_{i}.jpeg" if c else f"IM-{i:04d}-0001.jpeg"
                        z.writestr(f"{prefix}{split}/{name}/{fname}", _jpeg(c * 10 + i))
        z.writestr("chest_xray/__MACOSX/._junk", b"\0\0")
    return buf.getvalue()


class FakeKaggle(BaseHTTPRequestHandler):
    archive = b""
    calls: list[str] = []

    def log_message(self, *args):  # keep pytest output clean
        pass

    def _send(self, status: int, body: bytes, ctype: str, extra: dict | None = None):
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (extra or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        expected = "Basic " + base64.b64encode(f"{USER}:{KEY}".encode()).decode()
        return self.headers.get("Authorization") == expected

    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).calls.append(self.path)
        if not self._authorized():
            self._send(401, json.dumps({"code": 401, "message": "Unauthenticated"}).encode(), "application/json")
        elif self.path.endswith("/datasets.DatasetApiService/GetDataset"):
            self._send(200, json.dumps({"currentVersionNumber": 2}).encode(), "application/json")
        elif self.path.endswith("/datasets.DatasetApiService/DownloadDataset"):
            self._send(302, b"", "text/plain", {"Location": "/storage/archive.zip"})
        else:
            self._send(404, b"{}", "application/json")

    def do_GET(self):
        type(self).calls.append(self.path)
        self._send(200, type(self).archive, "application/zip")


@pytest.fixture
def fake_kaggle(monkeypatch, tmp_path):
    """Start the stand-in server; point kagglehub at it with credentials in the environment."""
    from kagglesdk import kaggle_env

    handler = type("Handler", (FakeKaggle,), {"archive": kaggle_zip(), "calls": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("KAGGLE_API_ENVIRONMENT", "TEST")
    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.TEST,
                        f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no-kaggle-dir"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.kaggle/access_token of the developer
    for var in ("KAGGLE_API_TOKEN", "KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    yield handler
    server.shutdown()
    server.server_close()


def _error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err, "expected an error message on stderr"
    line = err[-1]
    assert line.startswith("pneumoscan: error:") and "Traceback" not in "\n".join(err)
    return line


def test_download_fetches_through_kagglehub_and_leaves_kaggle_layout(fake_kaggle, tmp_path, capsys):
    from pneumoscan.data.layout import find_splits, list_split

    dest = tmp_path / "data" / "chest_xray"
    assert main(["data", "download", str(dest)]) == 0
    assert find_splits(dest) == ["train", "val", "test"]
    assert len(list_split(dest, "train")) == 4
    assert sorted(p.name for p in dest.iterdir()) == ["test", "train", "val"]  # no nested copy, no __MACOSX
    assert [p.name for p in dest.parent.iterdir()] == ["chest_xray"]  # staging folder removed
    out = capsys.readouterr().out
    assert "train 4 images" in out and "test 4 images" in out
    assert any(c.endswith("GetDataset") for c in fake_kaggle.calls)
    assert "/storage/archive.zip" in fake_kaggle.calls


def test_download_without_credentials_says_how_to_get_them(fake_kaggle, monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("KAGGLE_USERNAME")
    monkeypatch.delenv("KAGGLE_KEY")
    dest = tmp_path / "chest_xray"
    assert main(["data", "download", str(dest)]) == 2
    line = _error_line(capsys)
    assert "no Kaggle credentials" in line and "kaggle.json" in line
    assert not dest.exists() and fake_kaggle.calls == []


def test_download_with_rejected_credentials_says_so(fake_kaggle, monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("KAGGLE_KEY", "wrong")
    assert main(["data", "download", str(tmp_path / "chest_xray")]) == 2
    line = _error_line(capsys)
    assert "HTTP 401" in line and "credentials" in line


def test_download_offline_says_cannot_reach_kaggle(fake_kaggle, monkeypatch, tmp_path, capsys):
    from kagglesdk import kaggle_env

    with socket.socket() as s:  # a port with nobody listening: connection refused, like being offline
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setitem(kaggle_env._env_to_endpoint, kaggle_env.KaggleEnv.TEST, f"http://127.0.0.1:{port}")
    dest = tmp_path / "chest_xray"
    assert main(["data", "download", str(dest)]) == 2
    line = _error_line(capsys)
    assert "cannot reach Kaggle" in line and "offline" in line
    assert not dest.exists() and list(tmp_path.glob(".chest_xray.download-*")) == []


@pytest.mark.parametrize(("archive", "missing"), [
    (dict(splits=("train", "test")), "lacks split folder(s) val"),
    (dict(classes=("NORMAL", "VIRUS")), "missing class folder(s) PNEUMONIA"),
    (dict(splits=("images",)), "no train/val/test folders"),
])
def test_download_with_bad_archive_layout_names_what_is_missing(fake_kaggle, tmp_path, capsys, archive, missing):
    fake_kaggle.archive = kaggle_zip(nested=False, **archive)
    dest = tmp_path / "chest_xray"
    assert main(["data", "download", str(dest)]) == 2
    assert missing in _error_line(capsys)
    assert not dest.exists()


def test_download_refuses_a_non_empty_destination(tmp_path, capsys):
    (tmp_path / "chest_xray").mkdir()
    (tmp_path / "chest_xray" / "notes.txt").write_text("mine")
    assert main(["data", "download", str(tmp_path / "chest_xray")]) == 2
    assert "not an empty folder" in _error_line(capsys)


def test_download_fetch_is_injectable_for_mirrors(tmp_path):
    from pneumoscan.data.download import download

    def fetch(staging):
        staging.mkdir(parents=True)
        with zipfile.ZipFile(io.BytesIO(kaggle_zip())) as z:
            z.extractall(staging)
        return staging

    assert download(tmp_path / "d", fetch=fetch) == {"train": 4, "val": 4, "test": 4}
