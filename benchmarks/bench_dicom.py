"""The DICOM node end to end: a modality sends N X-rays by C-STORE, the node screens them and forwards the SR and
the Grad-CAM Secondary Capture to a real Orthanc.

    python benchmarks/bench_dicom.py --n 500 [--data ../shared/data/chest_xray] [--model M] [--side 1024]
                                     [--no-heatmaps] [--json out.json]

What it does: writes N DICOM versions of test-split images (DX, MONOCHROME2, 8 bit, uncompressed, longest side
``--side`` px; each in its own study), starts Debian's Orthanc on free 127.0.0.1 ports with its own storage,
starts ``pneumoscan dicom listen --forward ORTHANC@127.0.0.1:PORT`` as a separate process (model loaded before
the clock starts), sends every instance over one pynetdicom association, and watches Orthanc's /changes feed
until both results of every instance are stored. Reports instances per second from the first C-STORE to the last
result stored in Orthanc, and the latency of each instance from the start of its C-STORE to its last result
stored in Orthanc (p50, p95), plus how long the sender was busy (the C-STOREs are answered once spooled).
Latencies include the queue: all N arrive at once, so the last one waits for the others.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dicomweb_plugin() -> str | None:
    try:
        listing = subprocess.run(["dpkg", "-L", "orthanc-dicomweb"], capture_output=True, text=True).stdout
    except OSError:
        return None
    return next((line for line in listing.splitlines() if line.endswith(".so") and "DicomWeb" in line), None)


def start_orthanc(folder: Path) -> tuple[subprocess.Popen, int, int]:
    http_port, dicom_port = free_port(), free_port()
    config = {"Name": "bench", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
              "StorageCompression": False}
    plugin = dicomweb_plugin()
    if plugin:
        config["Plugins"] = [plugin]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "orthanc.json").write_text(json.dumps(config))
    binary = "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else "Orthanc"
    with open(folder / "orthanc.log", "ab") as log:
        proc = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    for _ in range(150):
        try:
            get(http_port, "/system")
            return proc, http_port, dicom_port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("Orthanc did not start (apt-get install orthanc orthanc-dicomweb)")


def get(port: int, path: str):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as response:
        return json.loads(response.read())


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the node exited with {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.2)
    raise SystemExit("the node did not listen in time")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=500)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--model", help="model file (default: the bundled model)")
    parser.add_argument("--side", type=int, default=1024, help="longest side of the DICOMs (default 1024)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--no-heatmaps", action="store_true", help="SR only (no Grad-CAM Secondary Capture)")
    parser.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    import pydicom
    from pynetdicom import AE

    from pneumoscan.dicom.samples import xray_dicom

    test = Path(args.data) / "test"
    images = sorted(test.glob("*/*.jpeg"))
    if not images:
        raise SystemExit(f"no test-split images under {test}")
    work = Path(tempfile.mkdtemp(prefix="bench-dicom-"))
    print(f"writing {args.n} DICOMs ({args.side} px, DX MONOCHROME2 8 bit) in {work}", file=sys.stderr)
    files = []
    for i in range(args.n):
        ds = xray_dicom(images[i % len(images)], modality="DX", side=args.side, instance_number=i + 1)
        path = work / "in" / f"{i:04d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    orthanc, http_port, dicom_port = start_orthanc(work / "orthanc")
    node_port = free_port()
    command = [sys.executable, "-m", "pneumoscan.cli", "dicom", "listen", "--host", "127.0.0.1", "--port",
               str(node_port), "--spool", str(work / "spool"), "--forward", f"ORTHANC@127.0.0.1:{dicom_port}",
               "--batch-size", str(args.batch_size), "--retry-max", "2"]
    if args.model:
        command += ["--model", args.model]
    if args.no_heatmaps:
        command.append("--no-heatmaps")
    with open(work / "node.log", "ab") as log:
        node = subprocess.Popen(command, stderr=log)
    try:
        wait_listening(node_port, node)
        per_instance = 1 if args.no_heatmaps else 2
        studies = {}
        sent_at = {}
        ae = AE(ae_title="BENCHSCU")
        ae.add_requested_context(pydicom.dcmread(files[0], stop_before_pixels=True).SOPClassUID,
                                 ["1.2.840.10008.1.2.1"])
        changes_since = get(http_port, "/changes?last")["Last"]
        start = time.monotonic()
        assoc = ae.associate("127.0.0.1", node_port, ae_title="PNEUMOSCAN")
        if not assoc.is_established:
            raise SystemExit("the node refused the association")
        for path in files:
            ds = pydicom.dcmread(path)
            studies[str(ds.StudyInstanceUID)] = path.name
            sent_at[str(ds.StudyInstanceUID)] = time.monotonic()
            status = assoc.send_c_store(ds)
            if getattr(status, "Status", None) != 0:
                raise SystemExit(f"C-STORE of {path.name} failed: {status}")
        assoc.release()
        sending = time.monotonic() - start
        print(f"sent {len(files)} instances in {sending:.1f} s", file=sys.stderr)
        arrived: dict[str, list[float]] = {}
        study_of: dict[str, str] = {}
        done = 0
        while done < len(files):
            if time.monotonic() - start > args.timeout:
                raise SystemExit(f"timed out with {done} of {len(files)} instances' results in Orthanc")
            page = get(http_port, f"/changes?since={changes_since}&limit=1000")
            now = time.monotonic()
            for change in page["Changes"]:
                if change["ChangeType"] != "NewInstance":
                    continue
                parent = get(http_port, f"/instances/{change['ID']}")["ParentSeries"]
                if parent not in study_of:
                    study_of[parent] = get(http_port, f"/series/{parent}/study")["MainDicomTags"]["StudyInstanceUID"]
                times = arrived.setdefault(study_of[parent], [])
                times.append(now)
                if len(times) == per_instance:
                    done += 1
                    if done % 50 == 0:
                        print(f"{done} instances' results in Orthanc after {now - start:.0f} s", file=sys.stderr)
            changes_since = page["Last"]
            if not page["Changes"]:
                time.sleep(0.2)
        total = max(max(t) for t in arrived.values()) - start
        latencies = np.array([max(arrived[uid]) - sent_at[uid] for uid in sent_at])
        figures = {
            "instances": len(files), "side_px": args.side, "heatmaps": not args.no_heatmaps,
            "batch_size": args.batch_size, "cpus": os.cpu_count(),
            "seconds_first_cstore_to_last_result": round(total, 1),
            "instances_per_second": round(len(files) / total, 3),
            "sender_busy_seconds": round(sending, 1),
            "latency_p50_s": round(float(np.percentile(latencies, 50)), 1),
            "latency_p95_s": round(float(np.percentile(latencies, 95)), 1),
        }
        print(json.dumps(figures, indent=2))
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    finally:
        node.terminate()
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            node.kill()
        orthanc.terminate()
        orthanc.wait(30)
        for bulky in (work / "in", work / "orthanc" / "db", work / "spool"):  # ~1.6 GB for 500 with heatmaps
            shutil.rmtree(bulky, ignore_errors=True)
    print(f"node log: {work / 'node.log'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
