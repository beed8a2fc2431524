"""Only the right senders reach the node: the allow-list (A-ASSOCIATE-RJ "calling AE title not recognised" for
anyone else, by AE title and by address), DICOM TLS with a throwaway CA and dcmtk's ``storescu +tls``, and the
command line's refusals before any model loads (an open non-loopback node, a bad allow-list, half a TLS setup)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from test_dicom_node import _tool, header, logs, make, model, results_in, scu, storescu  # noqa: F401 - fixtures

from pneumoscan.dicom.access import AllowList, tls_context
from pneumoscan.dicom.node import Node
from pneumoscan.errors import PneumoscanError

DX = "1.2.840.10008.5.1.4.1.1.1.1"


@pytest.mark.integration
@pytest.mark.slow
def test_only_allowed_senders_are_taken(model, tmp_path, logs):  # noqa: F811
    allow = AllowList.load(["MODALITY@127.0.0.1", "ELSEWHERE@192.0.2.7"])
    node = Node(model, spool=tmp_path / "spool", out=tmp_path / "out", host="127.0.0.1", port=0, heatmaps="none",
                allow=allow).start()
    try:
        allowed, intruding = make(tmp_path, "a.dcm", modality="DX"), make(tmp_path, "b.dcm", modality="DX")
        sent = storescu(node.port, allowed, calling="MODALITY")
        assert sent.returncode == 0, sent.stderr + sent.stdout
        refused = storescu(node.port, intruding, calling="INTRUDER")
        assert refused.returncode != 0
        assert "calling ae title not recognized" in (refused.stderr + refused.stdout).lower()
        # an allowed AE title from an address the list does not give it: the same standard rejection
        assoc = scu(node.port, [DX], calling="ELSEWHERE")
        assert assoc.is_rejected and not assoc.is_established
        rejection = assoc.acceptor.primitive
        assert (rejection.result, rejection.result_source, rejection.diagnostic) == (0x01, 0x01, 0x03)
        logs.wait(r"association from AE 'INTRUDER' at 127\.0\.0\.1:\d+: rejected \(calling AE title not recognised")
        logs.wait(r"association from AE 'ELSEWHERE' at 127\.0\.0\.1:\d+: rejected")
        assert len(results_in(node.out, header(allowed).StudyInstanceUID, 1)) == 1
        assert not (node.out / header(intruding).StudyInstanceUID).exists()
        assert not list(node.spool.incoming.glob("*.dcm")) or \
            str(header(intruding).SOPInstanceUID) not in {p.stem for p in node.spool.incoming.glob("*.dcm")}
    finally:
        node.stop()


def test_allow_list_file_entries_and_errors(tmp_path):
    listed = tmp_path / "senders.txt"
    listed.write_text("# modalities of ward 3\nCR_WARD3@127.0.0.1   # the CR\n\nPACS\n  DX2@::1\n")
    allow = AllowList.load(["EXTRA"], [listed])
    assert [str(s) for s in allow.senders] == ["EXTRA", "CR_WARD3@127.0.0.1", "PACS", "DX2@::1"]
    assert allow.permits("CR_WARD3", "127.0.0.1") and not allow.permits("CR_WARD3", "10.0.0.1")
    assert allow.permits("PACS", "10.1.2.3") and allow.permits("DX2", "::1") and not allow.permits("DX3", "::1")
    assert allow.permits("CR_WARD3", "::ffff:127.0.0.1")  # an IPv4 peer seen through an IPv6 socket
    assert AllowList().permits("ANYONE", "10.0.0.1") and not AllowList()  # empty: an open node
    bad = tmp_path / "bad.txt"
    bad.write_text("GOOD\nTHIS_TITLE_IS_TOO_LONG\n")
    with pytest.raises(PneumoscanError, match=rf"{bad}:2: an allowed sender is AE or AE@HOST"):
        AllowList.load([], [bad])
    empty = tmp_path / "empty.txt"
    empty.write_text("# nobody yet\n")
    with pytest.raises(PneumoscanError, match="names no sender"):
        AllowList.load([], [empty])
    with pytest.raises(PneumoscanError, match="names no host"):
        AllowList.load(["AE@"])
    with pytest.raises(PneumoscanError, match=r"cannot resolve host 'no-such-host\.invalid'"):
        AllowList.load(["AE@no-such-host.invalid"])


@pytest.mark.parametrize("extra, message", [
    (["--host", "0.0.0.0"], "refusing to listen on 0.0.0.0 without an allow-list"),
    (["--host", "10.1.2.3", "--allow-ae-file", "/nonexistent/senders.txt"],
     "/nonexistent/senders.txt: cannot read the allow-list"),
    (["--tls-cert", "/nonexistent/cert.pem"], "DICOM TLS needs both --tls-cert and --tls-key"),
    (["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"],
     "/nonexistent/cert.pem: TLS file not found"),
    (["--umask", "999"], "--umask: expected an octal umask"),
])
def test_listen_refuses_an_open_or_half_configured_node_before_loading_anything(extra, message, tmp_path, capsys):
    from pneumoscan.cli import main

    assert main(["dicom", "listen", "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


# ---- DICOM TLS ---------------------------------------------------------------------------------------------------


def _openssl(*args: str, cwd: Path) -> None:
    run = subprocess.run([_tool("openssl"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr


@pytest.fixture(scope="module")
def certificates(tmp_path_factory) -> Path:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    folder = tmp_path_factory.mktemp("tls")
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt", "-days", "1",
             "-subj", "/CN=pneumoscan test CA", cwd=folder)
    (folder / "server.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    for name, subject in (("server", "/CN=127.0.0.1"), ("client", "/CN=MODALITY")):
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                 "-subj", subject, cwd=folder)
        _openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
                 "-out", f"{name}.crt", "-days", "1", *(["-extfile", "server.ext"] if name == "server" else []),
                 cwd=folder)
    return folder


@pytest.mark.integration
@pytest.mark.slow
def test_dicom_tls_with_storescu(model, certificates, tmp_path, logs):  # noqa: F811
    """storescu +tls with a client certificate the CA signed is screened; plain TCP and a TLS client without a
    certificate are not."""
    c = certificates
    tls = tls_context(str(c / "server.crt"), str(c / "server.key"), str(c / "ca.crt"))
    node = Node(model, spool=tmp_path / "spool", out=tmp_path / "out", host="127.0.0.1", port=0, heatmaps="none",
                allow=AllowList.load(["MODALITY"]), tls=tls).start()
    try:
        secure, plain, anonymous = (make(tmp_path, f"{n}.dcm", modality="DX") for n in ("s", "p", "a"))
        sent = storescu(node.port, secure, options=("+tls", str(c / "client.key"), str(c / "client.crt"),
                                                    "+cf", str(c / "ca.crt")))
        assert sent.returncode == 0, sent.stderr + sent.stdout
        assert len(results_in(node.out, header(secure).StudyInstanceUID, 1)) == 1
        logs.wait(r"association from AE 'MODALITY' at 127\.0\.0\.1:\d+ \(TLS\) released; 1 instance")
        assert storescu(node.port, plain).returncode != 0
        assert storescu(node.port, anonymous, options=("+tla", "+cf", str(c / "ca.crt"))).returncode != 0
        for path in (plain, anonymous):
            assert not (node.out / header(path).StudyInstanceUID).exists()
    finally:
        node.stop()


def test_tls_context_refuses_a_key_that_is_not_the_certificates(certificates):
    c = certificates
    with pytest.raises(PneumoscanError, match="not a usable TLS certificate"):
        tls_context(str(c / "server.crt"), str(c / "client.key"))
