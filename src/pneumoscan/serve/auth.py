"""API keys: a JSON file of named key hashes, ``Authorization: Bearer KEY`` checked in constant time.

A key is 32 random bytes from ``secrets`` (256 bits, URL-safe base64 with a ``psk_`` prefix), shown once when it is
made. The file keeps only ``sha256(key)`` under the key's name: for a random 256-bit key a plain hash is as strong
as a slow salted one (there is no dictionary to try), and it keeps checking a request cheap. Every stored hash is
compared with ``hmac.compare_digest``, all of them on every request, so neither the timing of one comparison nor
the position of a match says anything about a key.

The server re-reads the file when it changes (checked at most once a second), so ``pneumoscan keys remove NAME``
revokes a key without a restart. A file that becomes unreadable keeps the last good keys and logs why.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from ..errors import PneumoscanError

logger = logging.getLogger("pneumoscan.serve")

FORMAT = "pneumoscan-api-keys/1"
PREFIX = "psk_"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
RELOAD_EVERY = 1.0  # seconds between checks of the key file for changes


class KeyFileError(PneumoscanError):
    """The key file cannot be read, written or does not hold what it should; the message says why."""


@dataclass(frozen=True)
class StoredKey:
    name: str
    sha256: str  # hex digest of the key
    created: str


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def check_name(name: str) -> str:
    if not NAME_PATTERN.fullmatch(name):
        raise KeyFileError(f"key name must be 1-64 letters, digits, '.', '_' or '-' (starting with a letter or "
                           f"digit), got {name!r}")
    return name


def read_keys(path: str | Path) -> dict[str, StoredKey]:
    """name -> StoredKey from a key file; a missing file is an empty set only for ``keys add``'s caller to decide."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise KeyFileError(f"{path}: key file not found; make one with `pneumoscan keys add NAME --file "
                           f"{path}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{path}: cannot read the key file ({exc.__class__.__name__}: {exc})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeyFileError(f"{path}: not a pneumoscan key file (invalid JSON at line {exc.lineno})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or not isinstance(doc.get("keys"), dict):
        raise KeyFileError(f"{path}: not a pneumoscan key file (expected format {FORMAT!r})")
    keys = {}
    for name, entry in doc["keys"].items():
        digest = entry.get("sha256") if isinstance(entry, dict) else None
        if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name) or not isinstance(digest, str) \
                or not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise KeyFileError(f"{path}: entry {name!r} is not a key name with a sha256 hex digest")
        keys[name] = StoredKey(name, digest, str(entry.get("created", "")))
    return keys


def write_keys(path: str | Path, keys: dict[str, StoredKey]) -> None:
    """Atomically (temporary file + rename), readable by the owner only."""
    path = Path(path)
    doc = {"format": FORMAT, "keys": {k.name: {"sha256": k.sha256, "created": k.created}
                                      for k in sorted(keys.values(), key=lambda k: k.name)}}
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent if str(path.parent) else ".")
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot write the key file ({exc.strerror or exc})") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            json.dump(doc, out, indent=2)
            out.write("\n")
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise KeyFileError(f"{path}: cannot write the key file ({exc.strerror or exc})") from None


def add_key(path: str | Path, name: str) -> str:
    """Make a key named ``name`` in the file (created if missing); returns the key, which is stored nowhere."""
    check_name(name)
    path = Path(path)
    keys = read_keys(path) if path.exists() else {}
    if name in keys:
        raise KeyFileError(f"{path}: a key named {name!r} exists; remove it first (`pneumoscan keys remove "
                           f"{name} --file {path}`)")
    key = new_key()
    created = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    keys[name] = StoredKey(name, key_hash(key), created)
    write_keys(path, keys)
    return key


def remove_key(path: str | Path, name: str) -> None:
    keys = read_keys(path)
    if name not in keys:
        raise KeyFileError(f"{path}: no key named {name!r} (keys: {', '.join(sorted(keys)) or 'none'})")
    del keys[name]
    write_keys(path, keys)


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer TOKEN`` header value, None for anything else."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


class KeyStore:
    """The keys a server accepts, re-read from their file when it changes."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._keys = read_keys(self.path)
        if not self._keys:
            raise KeyFileError(f"{self.path}: the key file holds no keys; add one with `pneumoscan keys add NAME "
                               f"--file {self.path}`")
        self._stamp = self._file_stamp()
        self._checked = time.monotonic()

    def _file_stamp(self):
        try:
            st = self.path.stat()
            return st.st_mtime_ns, st.st_size, st.st_ino
        except OSError:
            return None

    def _maybe_reload(self) -> None:
        now = time.monotonic()
        if now - self._checked < RELOAD_EVERY:
            return
        with self._lock:
            if now - self._checked < RELOAD_EVERY:
                return
            self._checked = now
            stamp = self._file_stamp()
            if stamp == self._stamp:
                return
            try:
                self._keys = read_keys(self.path)
                logger.warning("pneumoscan: reloaded %d API key(s) from %s", len(self._keys), self.path)
            except KeyFileError as exc:
                logger.error("pneumoscan: keeping the previous API keys: %s", exc)
            self._stamp = stamp

    @property
    def names(self) -> list[str]:
        return sorted(self._keys)

    def identify(self, authorization: str | None) -> str | None:
        """The name of the key in an Authorization header value, or None when it is missing or matches none."""
        self._maybe_reload()
        token = bearer_token(authorization)
        digest = key_hash(token if token is not None else "").encode("ascii")
        found = None
        for stored in list(self._keys.values()):  # every entry compared: no early exit
            if hmac.compare_digest(digest, stored.sha256.encode("ascii")) and token is not None:
                found = stored.name
        return found
