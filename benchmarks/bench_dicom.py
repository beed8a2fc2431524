"""The DICOM node end to end, side by side in one run: a modality sends N X-rays by C-STORE, the node screens them
and forwards its results to a real Orthanc; once with each heatmap rule, and ``pneumoscan predict``'s API on the
same DICOM files for comparison.

    python benchmarks/bench_dicom.py --n 200 [--arms all,positive,none] [--data ../shared/data/chest_xray]
                                     [--model M] [--side 1024] [--batch-size 8] [--json out.json]

What it does: writes N+2 DICOM versions of test-split images (DX, MONOCHROME2, 8 bit, uncompressed, longest side
``--side`` px; each in its own study). For each arm (``--heatmaps`` all | positive | none) it starts Debian's
Orthanc on free 127.0.0.1 ports with its own storage and a fresh ``pneumoscan dicom listen --forward
ORTHANC@127.0.0.1:PORT`` process (which warms its model up before it listens), then measures, watching Orthanc's
/changes feed:

- first study after a restart: one instance sent as soon as the node listens; seconds from the start of its
  association to its SR stored in Orthanc;
- single study on the warm, idle node: the same for a second instance;
- throughput: N instances over one association; instances per second from the first C-STORE until every
  instance's SR is in Orthanc and the node's spool is empty (its Secondary Captures delivered too), with the
  latency of each instance (start of its C-STORE to its SR in Orthanc; p50, p95: all N arrive at once, so the
  last one waits for the others).

Then ``Model.predict_files`` (what ``pneumoscan predict`` runs) on the same N files in this process: images/s
with the model already loaded. The ratios the issue sets (heatmaps all or positive against none, none against
predict) come from one run on one machine; the machine's load average is printed with them.
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
POLL = 0.02  # seconds between two looks at Orthanc's /changes (it pushes nothing)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_orthanc(folder: Path) -> tuple[subprocess.Popen, int, int]:
    http_port, dicom_port = free_port(), free_port()
    config = {"Name": "bench", "StorageDirectory": str(folder / "db"), "IndexDirectory": str(folder / "db"),
              "HttpPort": http_port, "DicomPort": dicom_port, "DicomAet": "ORTHANC", "RemoteAccessAllowed": False,
              "AuthenticationEnabled": False, "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False,
              "StorageCompression": False}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "orthanc.json").write_text(json.dumps(config))
    binary = "/usr/sbin/Orthanc" if Path("/usr/sbin/Orthanc").exists() else "Orthanc"
    with open(folder / "orthanc.log", "ab") as log:
        proc = subprocess.Popen([binary, str(folder / "orthanc.json")], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            get(http_port, "/system")
            return proc, http_port, dicom_port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("Orthanc did not start (apt-get install orthanc)")


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
            time.sleep(0.05)
    raise SystemExit("the node did not listen in time")


class Feed:
    """Orthanc's /changes: when each study's SR (and any other result) was stored."""

    def __init__(self, port: int):
        self.port = port
        self.since = get(port, "/changes?last")["Last"]
        self.sr_at: dict[str, float] = {}  # Study Instance UID -> when its SR was seen
        self.results = 0

    def poll(self) -> None:
        page = get(self.port, f"/changes?since={self.since}&limit=1000")
        now = time.monotonic()
        for change in page["Changes"]:
            if change["ChangeType"] != "NewInstance":
                continue
            tags = get(self.port, f"/instances/{change['ID']}/simplified-tags")
            self.results += 1
            if tags.get("Modality") == "SR":
                self.sr_at.setdefault(tags["StudyInstanceUID"], now)
        self.since = page["Last"]

    def wait_sr(self, studies: set[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not studies <= self.sr_at.keys():
            if time.monotonic() > deadline:
                raise SystemExit(f"timed out with {len(studies & self.sr_at.keys())} of {len(studies)} SRs")
            self.poll()
            time.sleep(POLL)


def send(ae, port: int, files: list[Path], sent_at: dict[str, float]) -> float:
    """C-STORE ``files`` over one association; returns when the association started."""
    import pydicom

    datasets = [pydicom.dcmread(path) for path in files]  # read before the clock starts
    start = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="PNEUMOSCAN")
    if not assoc.is_established:
        raise SystemExit("the node refused the association")
    for ds in datasets:
        sent_at.setdefault(str(ds.StudyInstanceUID), time.monotonic() if len(datasets) > 1 else start)
        status = assoc.send_c_store(ds)
        if getattr(status, "Status", None) != 0:
            raise SystemExit(f"C-STORE failed: {status}")
    assoc.release()
    return start


def spool_empty(spool: Path) -> bool:
    return not any(any((spool / sub).glob("*.dcm")) for sub in ("incoming", "outbox"))


def run_arm(rule: str, files: list[Path], work: Path, args) -> dict:
    from pynetdicom import AE

    orthanc, http_port, dicom_port = start_orthanc(work / f"orthanc-{rule}")
    node_port = free_port()
    spool = work / f"spool-{rule}"
    command = [sys.executable, "-m", "pneumoscan.cli", "dicom", "listen", "--host", "127.0.0.1", "--port",
               str(node_port), "--spool", str(spool), "--forward", f"ORTHANC@127.0.0.1:{dicom_port}",
               "--batch-size", str(args.batch_size), "--retry-max", "2", "--heatmaps", rule, "--device", "cpu"]
    if args.model:
        command += ["--model", args.model]
    log_path = work / f"node-{rule}.log"
    with open(log_path, "ab") as log:
        node = subprocess.Popen(command, stderr=log)
    try:
        started = time.monotonic()
        wait_listening(node_port, node)
        listening_after = time.monotonic() - started
        ae = AE(ae_title="BENCHSCU")
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.1.1", ["1.2.840.10008.1.2.1"])
        feed = Feed(http_port)
        latency = {}
        for label, path in (("first_study_after_restart_s", files[0]), ("single_study_idle_s", files[1])):
            sent_at: dict[str, float] = {}
            send(ae, node_port, [path], sent_at)
            feed.wait_sr(set(sent_at), args.timeout)
            while not spool_empty(spool):  # idle again before the next measurement
                time.sleep(POLL)
            [(study, at)] = sent_at.items()
            latency[label] = round(feed.sr_at[study] - at, 2)
        bulk = files[2:]
        sent_at = {}
        start = send(ae, node_port, bulk, sent_at)
        sending = time.monotonic() - start
        feed.wait_sr(set(sent_at), args.timeout)
        while not spool_empty(spool):
            time.sleep(POLL)
        feed.poll()
        total = time.monotonic() - start
        latencies = np.array([feed.sr_at[uid] - at for uid, at in sent_at.items()])
        return {"heatmaps": rule, "node_listening_after_start_s": round(listening_after, 1), **latency,
                "instances": len(bulk), "results_stored": feed.results,
                "seconds_first_cstore_to_spool_empty": round(total, 1),
                "instances_per_second": round(len(bulk) / total, 2), "sender_busy_seconds": round(sending, 1),
                "latency_p50_s": round(float(np.percentile(latencies, 50)), 1),
                "latency_p95_s": round(float(np.percentile(latencies, 95)), 1), "node_log": str(log_path)}
    finally:
        node.terminate()
        try:
            node.wait(60)
        except subprocess.TimeoutExpired:
            node.kill()
        orthanc.terminate()
        orthanc.wait(30)
        for bulky in (work / f"orthanc-{rule}" / "db", spool):
            shutil.rmtree(bulky, ignore_errors=True)


def predict_arm(files: list[Path], args) -> dict:
    from pneumoscan import load_model

    model = load_model(args.model)
    list(model.predict_files(files[:2], batch_size=args.batch_size))  # warm, as the node is
    start = time.monotonic()
    rows = list(model.predict_files(files, batch_size=args.batch_size))
    took = time.monotonic() - start
    return {"predict_files_images_per_second": round(len(rows) / took, 2), "instances": len(rows),
            "positive": sum(r.decision == "PNEUMONIA" for r in rows)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200, help="instances of the throughput run (default 200)")
    parser.add_argument("--arms", default="all,positive,none", help="heatmap rules to run, in order")
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "chest_xray"))
    parser.add_argument("--model", help="model file (default: the bundled model)")
    parser.add_argument("--side", type=int, default=1024, help="longest side of the DICOMs (default 1024)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--timeout", type=float, default=3600, help="give up after this many seconds")
    parser.add_argument("--json", help="write the figures here")
    args = parser.parse_args()

    from pneumoscan.dicom.samples import xray_dicom

    test = Path(args.data) / "test"
    images = sorted(test.glob("*/*.jpeg"))
    if not images:
        raise SystemExit(f"no test-split images under {test}")
    work = Path(tempfile.mkdtemp(prefix="bench-dicom-"))
    print(f"writing {args.n + 2} DICOMs ({args.side} px, DX MONOCHROME2 8 bit) in {work}", file=sys.stderr)
    files = []
    for i in range(args.n + 2):
        ds = xray_dicom(images[(i * 7) % len(images)], modality="DX", side=args.side, instance_number=i + 1)
        path = work / "in" / f"{i:04d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    figures = {"cpus": os.cpu_count(), "side_px": args.side, "batch_size": args.batch_size,
               "load_average_at_start": [round(x, 2) for x in os.getloadavg()], "arms": []}
    try:
        for rule in args.arms.split(","):
            arm = run_arm(rule.strip(), files, work, args)
            print(json.dumps(arm), file=sys.stderr)
            figures["arms"].append(arm)
        figures["predict"] = predict_arm(files[2:], args)
    finally:
        shutil.rmtree(work / "in", ignore_errors=True)
    figures["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    rate = {arm["heatmaps"]: arm["instances_per_second"] for arm in figures["arms"]}
    if "none" in rate:
        figures["ratios"] = {f"{rule}_vs_none": round(value / rate["none"], 2) for rule, value in rate.items()
                             if rule != "none"}
        figures["ratios"]["none_vs_predict"] = round(rate["none"] / figures["predict"][
            "predict_files_images_per_second"], 2)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    print(f"node logs: {work}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
