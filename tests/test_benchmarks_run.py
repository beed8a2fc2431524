"""Every benchmark script on the inference path still runs: each one's ``main`` on a handful of real test X-rays
with the bundled model, so an API change that breaks a script fails here instead of at the next measurement.

These prove the scripts run, not their figures (a few images, a shared CPU). bench_inference's ONNX part exports
and quantises the model (tens of seconds), so it is a separate test marked slow.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.integration


def _load(relative: str):
    path = ROOT / relative
    spec = importlib.util.spec_from_file_location(f"pneumoscan_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


def _status_row(out: str, backend: str) -> list[str]:
    """The cells of bench_inference's status table row for ``backend`` (guard limit, ok, ..., rejected vs)."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| backend | guard limit |"))
    for line in lines[start + 2:]:
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if cells[0] == backend:
            return cells[1:]
    raise AssertionError(f"no status row for {backend}:\n{out}")


def test_bench_predict_runs(kermany, capsys):
    bench = _load("benchmarks/bench_predict.py")
    code = bench.main(["--data", str(kermany), "--limit", "4", "--latency-images", "1", "--batch-size", "4",
                       "--rss-files", "0"])
    out = capsys.readouterr().out
    assert code == 0
    assert "4 test images" in out and "per image, sequential stages: decode" in out
    assert "precision float32" in out and "precision bfloat16" in out
    assert "draft" not in out.lower()


def test_bench_inference_torch_runs(kermany, capsys):
    bench = _load("benchmarks/bench_inference.py")
    code = bench.main(["--images", str(kermany / "test"), "-n", "4", "--batch", "4", "--batches", "1",
                       "--single", "1", "--backends", "torch", "--threads", "2"])
    out = capsys.readouterr().out
    assert code == 0
    assert "| end to end, PyTorch float32 | 4 |" in out
    cells = _status_row(out, "PyTorch float32")
    assert sum(int(c) for c in cells[1:5]) == 4  # every file has one status


@pytest.mark.slow
def test_bench_inference_onnx_runs(kermany, capsys):
    bench = _load("benchmarks/bench_inference.py")
    code = bench.main(["--images", str(kermany / "test"), "--data", str(kermany), "--quick", "-n", "4",
                       "--calibration-images", "8", "--threads", "2"])
    out = capsys.readouterr().out
    assert code == 0
    fp32, int8 = _status_row(out, "onnxruntime fp32"), _status_row(out, "onnxruntime int8")
    assert "int8 file: static int8" in out or "int8 file: dynamic int8" in out
    # the int8 guard limit is refitted on int8 features and never stricter: real X-rays the float model accepts
    # are accepted by the int8 backend too
    assert float(int8[0]) >= float(fp32[0])
    assert int8[-1] == "0" and fp32[-1] == "0"


def test_guard_eval_runs(kermany, tmp_path, capsys):
    bench = _load("benchmarks/guard_eval.py")
    figures = tmp_path / "guard.json"
    code = bench.main(["--data", str(kermany), "--limit", "2", "--two-level", "--json", str(figures)])
    out = capsys.readouterr().out
    assert code == 0
    assert "not_xray" in out and "out_of_dist" in out and "two most frequent gray levels" in out
    summary = json.loads(figures.read_text())["summary"]
    assert summary["xray-report"]["n"] == 2 and summary["non-xray"]["n"] > 0
    for group in summary.values():
        assert group["rejected"] == group["not_xray"] + group["out_of_distribution"]


def test_bundle_default_runs(tmp_path, capsys):
    from pneumoscan.modelfile import read_model_file, sha256_file
    from pneumoscan.predict import DEFAULT_MODEL, DEFAULT_NAME

    script = _load("scripts/bundle_default.py")
    assert script.main([str(DEFAULT_MODEL), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    written = tmp_path / "default.safetensors"
    sha = sha256_file(written)
    assert f"sha256 {sha}" in out and "BUNDLED_SHA256" in out
    assert (tmp_path / "default.sha256").read_text() == f"{sha}  default.safetensors\n"
    _, meta = read_model_file(written)
    assert meta["name"] == DEFAULT_NAME and meta["storage"] == "float16"


def test_speed_fidelity_runs(kermany, capsys):
    bench = _load("benchmarks/speed_fidelity.py")
    bench.main(["--data", str(kermany), "--limit", "3"])
    out = capsys.readouterr().out
    # validation images are 224 px copies: no resize happens, and folding BatchNorm changes nothing at 2 digits
    assert "| validation (224 px, thresholds fitted here) | 3 | 8-bit resize | 0 | 0 | balanced 0, screening 0 |" in out
    assert out.count("both (now)") == 3


@pytest.mark.slow
def test_bench_train_runs_each_arm_in_its_own_process(kermany, tmp_path, capsys):
    bench = _load("benchmarks/bench_train.py")
    figures = tmp_path / "train.json"
    code = bench.main(["--data", str(kermany), "--train-images", "32", "--val-images", "16", "--max-minutes", "0.05",
                       "--eval-every", "1", "--json", str(figures)])
    out = capsys.readouterr().out
    assert code == 0
    assert "throughput ratio (pneumoscan / baseline)" in out
    arms = {arm["name"]: arm for arm in json.loads(figures.read_text())["arms"]}
    assert set(arms) == {"pneumoscan", "baseline"} and all(arm["steps"] >= 1 for arm in arms.values())
    # ours with the command line's allocator settings, the notebook baseline with glibc's and PyTorch's defaults
    assert arms["pneumoscan"]["allocator"]["heap_reuse"] is (sys.platform == "linux")
    assert arms["baseline"]["allocator"] == {"huge_pages": False, "heap_reuse": False}


def test_dicom_pictures_draw_a_positive_and_a_negative_study(kermany, tmp_path, capsys):
    pytest.importorskip("highdicom")
    script = _load("benchmarks/dicom_pictures.py")
    assert script.main(["--data", str(kermany), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "positive: ok PNEUMONIA" in out and "negative: ok NORMAL" in out
    from PIL import Image

    for name in ("positive", "negative"):
        with Image.open(tmp_path / f"{name}.png") as picture:
            assert picture.width > 1000 and picture.height > 400
