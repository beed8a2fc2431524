"""ONNX export and the onnxruntime backend, on the tiny fixture model and generated images."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_model_file, save_gray, synthetic_xray

from pneumoscan import load_model
from pneumoscan.cli import main
from pneumoscan.errors import PneumoscanError
from pneumoscan.export import (
    ExportError,
    export_onnx,
    int8_inputs,
    load_onnx_model,
    quantize_int8,
    validation_samples,
)


def _images(model, n: int = 12, offset: int = 0) -> np.ndarray:
    prep = model.preprocessing
    return np.stack([prep.to_uint8(synthetic_xray(96, offset + s, opacity=0.5 * (s % 2))) for s in range(n)])


@pytest.fixture(scope="module")
def exported(tiny_model, tmp_path_factory):
    out = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    return export_onnx(tiny_model, out, images=_images(tiny_model), checked_on="generated")


@pytest.fixture(scope="module")
def onnx_model(exported):
    return load_model(exported.path, backend="onnx")


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    """DATA_DIR/{train,val,test}/{NORMAL,PNEUMONIA} of generated X-rays, four per class and split."""
    root = tmp_path_factory.mktemp("data")
    for split, offset in (("train", 0), ("val", 500), ("test", 900)):
        for label, name in enumerate(("NORMAL", "PNEUMONIA")):
            for i in range(4):
                save_gray(
                    root / split / name / f"person{offset + i}_x_{label}.jpeg",
                    synthetic_xray(80, offset + 10 * label + i, opacity=0.5 * label),
                )
    return root


def test_the_export_check_images_are_the_stages_network_inputs_with_unreadable_files_named(tiny_model, tiny_data,
                                                                                           tmp_path):
    """check_images prepares the check images through the screening stage (pipeline.prepare), and an unreadable
    file is left out with the stage's own message in the description, never silently."""
    from pneumoscan import pipeline
    from pneumoscan.export import check_images

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    broken = data / "val" / "NORMAL" / "person999_x_0.jpeg"
    broken.write_bytes(b"\xff\xd8 truncated")
    images, described = check_images(tiny_model, data)
    files = sorted((data / "val").rglob("*.jpeg"))
    expected = [pipeline.prepare(tiny_model, str(f)) for f in files]
    assert np.array_equal(images, np.stack([e.image for e in expected if e.image is not None]))
    assert len(images) == 8 and "1 left out" in described
    assert next(e.error for e in expected if e.error) in described


@pytest.mark.slow
def test_export_check_reports_runtimes_agree_within_1e4(exported):
    assert exported.path.is_file()
    assert exported.max_logit_diff < 1e-4
    assert exported.max_feature_diff < 1e-3


def test_onnx_backend_matches_torch_at_any_batch_size(tiny_model, onnx_model):
    for n in (1, 5):
        images = torch.from_numpy(_images(tiny_model, n, offset=100))
        logits_t, _, _, scores_t = tiny_model.score(images)
        logits_o, _, _, scores_o = onnx_model.score(images)
        assert logits_o.shape == (n, 2)
        assert (logits_o - logits_t).abs().max() < 1e-4
        torch.testing.assert_close(scores_o, scores_t, rtol=1e-4, atol=1e-4)


def test_onnx_backend_tta_matches_torch(tiny_model, onnx_model):
    images = torch.from_numpy(_images(tiny_model, 4, offset=200))
    assert (onnx_model.score(images, tta=True).logits - tiny_model.score(images, tta=True).logits).abs().max() < 1e-4


def test_onnx_file_carries_model_metadata_and_guard(tiny_model, onnx_model):
    assert onnx_model.record == tiny_model.record.with_(source_sha256=tiny_model.sha256)
    assert onnx_model.thresholds == tiny_model.thresholds
    assert onnx_model.temperature == tiny_model.temperature
    assert onnx_model.preprocessing == tiny_model.preprocessing
    assert onnx_model.guard.threshold == tiny_model.guard.threshold
    for key, value in tiny_model.guard.to_tensors().items():
        torch.testing.assert_close(onnx_model.guard.to_tensors()[key], value, rtol=0, atol=0)


def test_predict_files_gives_same_decisions_on_both_backends(tiny_model, onnx_model, tmp_path):
    paths = [
        save_gray(tmp_path / f"x{i}.png", synthetic_xray(120, 300 + i, opacity=0.6 * (i % 2)))
        for i in range(5)
    ]
    paths.append(tmp_path / "missing.png")
    for threshold in ("screening", 0.5):
        torch_rows = list(tiny_model.predict_files(paths, threshold=threshold, batch_size=4))
        onnx_rows = list(onnx_model.predict_files(paths, threshold=threshold, batch_size=4))
        assert [r.status for r in onnx_rows] == [r.status for r in torch_rows] == ["ok"] * 5 + ["error"]
        assert [r.decision for r in onnx_rows] == [r.decision for r in torch_rows]
        for a, b in zip(onnx_rows[:5], torch_rows[:5], strict=True):
            assert a.probability == pytest.approx(b.probability, abs=1e-5)


def test_onnx_backend_has_no_torch_network_for_gradcam(onnx_model):
    assert not onnx_model.backend.gradcam
    with pytest.raises(PneumoscanError, match="Grad-CAM"):
        _ = onnx_model.network


@pytest.mark.slow
def test_uint8_input_graph_matches_torch(tiny_model, tmp_path):
    result = export_onnx(tiny_model, tmp_path / "u8.onnx", images=_images(tiny_model), input_dtype="uint8")
    model = load_onnx_model(result.path)
    assert model.backend.uint8_input
    images = torch.from_numpy(_images(tiny_model, 3, offset=400))
    assert (model.score(images).logits - tiny_model.score(images).logits).abs().max() < 1e-4


@pytest.mark.parametrize("input_dtype", ["float32", "uint8"])
@pytest.mark.slow
def test_per_image_standardization_is_traced_into_the_onnx_graph(input_dtype, tmp_path):
    path = make_model_file(tmp_path / "std.safetensors", standardize=(0.5, 0.25))
    model = load_model(path, precision="float32")
    result = export_onnx(model, tmp_path / "std.onnx", images=_images(model, 4), input_dtype=input_dtype)
    onnx_model = load_model(result.path, backend="onnx")
    assert onnx_model.preprocessing == model.preprocessing
    images = torch.from_numpy(_images(model, 3, offset=500))
    darker = (images.float() * 0.6 + 20).round().to(torch.uint8)  # a linear exposure change
    for batch in (images, darker):
        assert (onnx_model.score(batch).logits - model.score(batch).logits).abs().max() < 1e-4
    assert (model.score(darker).logits - model.score(images).logits).abs().max() < 0.05


@pytest.mark.slow
def test_export_refuses_to_publish_when_runtimes_disagree(tiny_model, tmp_path):
    with pytest.raises(ExportError, match="not written"):
        export_onnx(tiny_model, tmp_path / "bad.onnx", images=_images(tiny_model, 2), tolerance=-1.0)
    assert list(tmp_path.iterdir()) == []


def test_int8_export_writes_a_loadable_quantised_model(tiny_model, exported, tiny_data):
    calibration, images, labels, source = int8_inputs(tiny_model, tiny_data)
    assert "val" in source and len(images) == 8 and set(labels.tolist()) == {0, 1}
    result = quantize_int8(exported.path, calibration=calibration, val_images=images, val_labels=labels)
    assert result.path == exported.path.with_name("tiny.int8.onnx") and result.path.is_file()
    assert result.method in ("static", "dynamic") and result.n_val == 8
    assert 0.0 <= result.auc_int8 <= 1.0
    int8 = load_onnx_model(result.path)
    assert int8.record.quantization["method"] == result.method
    assert int8.runtime == "onnxruntime int8"
    assert int8.thresholds == tiny_model.thresholds
    # the guard's limit is refitted on the int8 features, never stricter than the float model's
    assert int8.guard.threshold >= tiny_model.guard.threshold
    assert int8.record.guard.threshold == int8.guard.threshold


def test_int8_uses_the_run_split_validation_images(tiny_model_path, tiny_data, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_model_path, run / "model.safetensors")
    rows = ["path,label,patient,subset"]
    for split, subset in (("train", "train"), ("val", "val")):
        for label in ("NORMAL", "PNEUMONIA"):
            for path in sorted((tiny_data / split / label).iterdir()):
                rows.append(f"{path},{label},{path.stem},{subset}")
    (run / "split.csv").write_text("\n".join(rows) + "\n")
    train, val, source = validation_samples(load_model(run), data_dir=None)
    assert "split.csv" in source
    assert len(val) == 8 and all("/val/" in str(s.path) for s in val)
    assert len(train) == 8


@pytest.mark.slow
def test_cli_export_then_predict_with_onnx_backend(tiny_model_path, tiny_data, tmp_path, capsys):
    out = tmp_path / "cli.onnx"
    code = main(
        ["export", "--model", str(tiny_model_path), "--onnx", str(out), "--int8", "--data", str(tiny_data)]
    )
    text = capsys.readouterr().out
    assert code == 0, text
    assert out.is_file() and (tmp_path / "cli.int8.onnx").is_file()
    assert "max |logit difference|" in text and "AUC" in text
    image = tiny_data / "test" / "PNEUMONIA" / "person900_x_1.jpeg"
    code = main(["predict", str(image), "--model", str(out), "--backend", "onnx", "--quiet"])
    line = capsys.readouterr().out.strip()
    assert code == 0
    assert line.startswith(str(image)) and ("PNEUMONIA" in line or "NORMAL" in line)


@pytest.mark.parametrize(
    "argv",
    [
        ["export", "--model", "no/such/model.safetensors", "--onnx", "{tmp}/x.onnx"],
        ["export", "--model", "{model}", "--onnx", "{tmp}/x.txt"],
        ["export", "--model", "{model}", "--onnx", "{tmp}/x.onnx", "--int8"],
        ["predict", "{tmp}", "--model", "{model}", "--backend", "onnx"],
        ["predict", "{tmp}", "--model", "{tmp}/missing.onnx", "--backend", "onnx"],
    ],
    ids=[
        "missing-model",
        "not-onnx-output",
        "int8-without-validation-data",
        "backend-onnx-on-safetensors",
        "missing-onnx-file",
    ],
)
def test_cli_bad_input_exits_2_with_one_line(argv, tiny_model_path, tmp_path, capsys):
    argv = [a.format(tmp=tmp_path, model=tiny_model_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("pneumoscan: error:") and "\n" not in err
    assert not (tmp_path / "x.onnx").exists()
