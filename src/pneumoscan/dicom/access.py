"""Who may talk to the DICOM node: the allow-list of senders (``--allow-ae``, ``--allow-ae-file``), DICOM TLS
(``--tls-cert/--tls-key/--tls-ca``) and the record of one association for its one log line.

Apart from ``node`` so the access rules can be read, parsed and tested without the SCP, its threads or a model.
"""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import PneumoscanError

if TYPE_CHECKING:
    import ssl

# A-ASSOCIATE-RJ: rejected permanent, by the service user, calling AE title not recognised (PS3.8 9.3.4)
REJECT_CALLING_AE = (0x01, 0x01, 0x03)


@dataclass(frozen=True)
class Sender:
    """One allow-list entry: a calling AE title, from any address or only from ``addresses``."""

    ae_title: str
    host: str | None = None
    addresses: frozenset = frozenset()

    def permits(self, ae_title: str, address) -> bool:
        return ae_title == self.ae_title and (self.host is None or address in self.addresses)

    def __str__(self) -> str:
        return self.ae_title if self.host is None else f"{self.ae_title}@{self.host}"


def _address(text: str):
    """An IP address, IPv4-mapped IPv6 addresses as their IPv4 one; None for anything else."""
    try:
        ip = ipaddress.ip_address(text.strip("[]").split("%")[0])
    except ValueError:
        return None
    return ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped else ip


def parse_sender(text: str, where: str = "--allow-ae") -> Sender:
    """``AE`` or ``AE@HOST`` (an IP address or a name, resolved now to its addresses)."""
    title, _, host = text.strip().partition("@")
    title = title.strip()
    if not 1 <= len(title) <= 16 or not title.isascii() or "\\" in title:
        raise PneumoscanError(f"{where}: an allowed sender is AE or AE@HOST with an AE title of 1 to 16 ASCII "
                              f"characters, got {text.strip()!r}")
    if not _:
        return Sender(title)
    host = host.strip()
    if not host:
        raise PneumoscanError(f"{where}: {text.strip()!r} names no host after '@'")
    ip = _address(host)
    if ip is not None:
        return Sender(title, host, frozenset({ip}))
    try:
        found = {_address(info[4][0]) for info in socket.getaddrinfo(host, None)}
    except OSError as exc:
        raise PneumoscanError(f"{where}: cannot resolve host {host!r} of {text.strip()!r} "
                              f"({exc.strerror or exc})") from None
    return Sender(title, host, frozenset(a for a in found if a is not None))


class AllowList:
    """The senders the node takes associations from; empty: anyone (an open node)."""

    def __init__(self, senders=()):
        self.senders = list(senders)

    @classmethod
    def load(cls, entries=(), files=()) -> AllowList:
        """``--allow-ae`` values and ``--allow-ae-file`` files (one entry a line; '#' starts a comment)."""
        senders = [parse_sender(text) for text in entries]
        for path in files:
            try:
                lines = Path(path).read_text(encoding="utf-8").splitlines()
            except (OSError, UnicodeDecodeError) as exc:
                raise PneumoscanError(f"{path}: cannot read the allow-list ({getattr(exc, 'strerror', None) or exc})"
                                      ) from None
            found = [parse_sender(line.split("#", 1)[0], f"{path}:{number}")
                     for number, line in enumerate(lines, 1) if line.split("#", 1)[0].strip()]
            if not found:
                raise PneumoscanError(f"{path}: the allow-list file names no sender (one AE or AE@HOST a line)")
            senders.extend(found)
        return cls(senders)

    def permits(self, ae_title: str, host: str) -> bool:
        address = _address(host)
        return not self.senders or any(s.permits(ae_title, address) for s in self.senders)

    def __bool__(self) -> bool:
        return bool(self.senders)

    def __str__(self) -> str:
        return ", ".join(map(str, self.senders)) if self.senders else "anyone"


def tls_context(cert: str | None, key: str | None, ca: str | None = None) -> ssl.SSLContext | None:
    """The server side of DICOM TLS: this node's certificate and key; with ``ca``, senders must present a
    certificate it signed (mutual TLS). None without a certificate."""
    if not (cert or key or ca):
        return None
    if not (cert and key):
        raise PneumoscanError("DICOM TLS needs both --tls-cert and --tls-key (--tls-ca to require client "
                              "certificates)")
    import ssl

    for path in (cert, key, ca):
        if path and not Path(path).is_file():
            raise PneumoscanError(f"{path}: TLS file not found")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    try:
        context.load_cert_chain(cert, key)
        if ca:
            context.load_verify_locations(cafile=ca)
            context.verify_mode = ssl.CERT_REQUIRED
    except (ssl.SSLError, OSError) as exc:
        raise PneumoscanError(f"{cert}, {key}{', ' + ca if ca else ''}: not a usable TLS certificate, key and CA "
                              f"({getattr(exc, 'reason', None) or exc})") from None
    return context


@dataclass
class _Association:
    """What one association did, for its one log line."""

    peer: str
    uids: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)

    def add(self, uid: str, kind: str) -> None:
        self.uids.append(uid or "(no UID)")
        self.kinds[kind] = self.kinds.get(kind, 0) + 1

