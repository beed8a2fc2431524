"""Evaluation on a labelled split (CLI text, JSON, plots) and the model file it reads."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from pneumoscan.cli import main
from pneumoscan.modelfile import ModelFileError, read_model_file, resolve_model_path, save_model_file

OPERATING_POINT_KEYS = {"threshold", "accuracy", "sensitivity", "specificity", "precision", "f1", "tn", "fp", "fn",
                        "tp"}


@pytest.fixture(scope="module")
def evaluated(tiny_model_path, tiny_dataset, tmp_path_factory):
    """One CLI evaluation with --json and --report, shared by the tests that read its outputs."""
    import contextlib
    import io

    out = tmp_path_factory.mktemp("evaluate")
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["evaluate", "--model", str(tiny_model_path), "--data", str(tiny_dataset), "--split", "test",
                     "--json", str(out / "figures.json"), "--report", str(out / "report")])
    return code, stdout.getvalue(), stderr.getvalue(), out


def test_evaluate_prints_classification_report_at_both_operating_points(evaluated):
    code, stdout, _, _ = evaluated
    assert code == 0
    assert "test split: 48 images" in stdout and "ROC AUC" in stdout
    for name in ("screening", "balanced"):
        assert f"== {name} operating point: threshold" in stdout
    assert stdout.count("precision    recall  f1-score   support") == 2
    assert stdout.count("confusion matrix") == 2


def test_evaluate_json_has_n_auc_and_every_figure_per_operating_point(evaluated):
    _, _, _, out = evaluated
    figures = json.loads((out / "figures.json").read_text())
    assert figures["n"] == 48 and 0.0 <= figures["auc"] <= 1.0
    for name, threshold in (("screening", 0.3), ("balanced", 0.5)):
        point = figures[name]
        assert set(point) >= OPERATING_POINT_KEYS
        assert point["threshold"] == pytest.approx(threshold)
        assert point["tn"] + point["fp"] + point["fn"] + point["tp"] == 48
        assert point["tp"] + point["fn"] == 24  # the tiny test split has 24 pneumonia images


def test_evaluate_report_writes_every_plot_as_png(evaluated):
    _, _, stderr, out = evaluated
    names = sorted(p.name for p in (out / "report").iterdir())
    assert names == ["confusion_balanced.png", "confusion_screening.png", "pr.png", "reliability.png", "roc.png"]
    for name in names:
        with Image.open(out / "report" / name) as im:
            assert im.format == "PNG" and im.size[0] > 300
        assert f"wrote {out / 'report' / name}" in stderr


def test_report_adds_training_curves_from_the_run_folder(tiny_model, tiny_dataset, tmp_path):
    from pneumoscan.evaluate import evaluate
    from pneumoscan.report import write_report

    result = evaluate(tiny_model, tiny_dataset, "test")
    assert len(result.probabilities_uncalibrated) == result.n  # reliability before/after temperature
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.csv").write_text("epoch,train_loss,val_loss,val_auc,lr,seconds\n"
                                     "1,0.60,0.55,0.81,1.0e-3,3.0\n2,0.40,0.45,0.88,5.0e-4,3.0\n")
    paths = write_report(result, tiny_model, tmp_path / "plots", run_dir=run / "model.safetensors")
    assert tmp_path / "plots" / "training.png" in paths
    assert all(p.is_file() and p.stat().st_size > 1000 for p in paths)


# ---- the model file ------------------------------------------------------------------------------------------

def test_model_file_round_trip_keeps_tensors_and_metadata(tmp_path):
    tensors = {"w": torch.randn(3, 4), "n": torch.arange(5)}
    meta = {"arch": "x", "thresholds": {"screening": 0.25}, "nested": [1, 2.5, "a"]}
    sha = save_model_file(tmp_path / "m.safetensors", tensors, meta)
    loaded, meta2 = read_model_file(tmp_path / "m.safetensors")
    assert meta2 == meta and len(sha) == 64
    assert torch.equal(loaded["w"], tensors["w"]) and torch.equal(loaded["n"], tensors["n"])


def test_model_file_half_storage_halves_size_and_loads_as_float32(tmp_path):
    tensors = {"w": torch.randn(256, 256), "n": torch.arange(5)}
    save_model_file(tmp_path / "full.safetensors", tensors, {})
    save_model_file(tmp_path / "half.safetensors", tensors, {}, half=True)
    ratio = (tmp_path / "half.safetensors").stat().st_size / (tmp_path / "full.safetensors").stat().st_size
    assert 0.45 < ratio < 0.55
    loaded, _ = read_model_file(tmp_path / "half.safetensors")
    assert loaded["w"].dtype == torch.float32 and loaded["n"].dtype == torch.int64
    assert torch.allclose(loaded["w"], tensors["w"], atol=2e-3, rtol=1e-3)


def test_not_a_model_file_is_a_clear_error(tmp_path):
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ModelFileError, match="not a pneumoscan model file"):
        read_model_file(tmp_path / "plain.safetensors")
    (tmp_path / "photo.jpeg").write_bytes(b"\xff\xd8\xff\xe0JFIF")
    with pytest.raises(ModelFileError, match="not a pneumoscan model file"):
        read_model_file(tmp_path / "photo.jpeg")
    with pytest.raises(ModelFileError, match="model file not found"):
        read_model_file(tmp_path / "missing.safetensors")


def test_corrupt_model_file_is_a_clear_error(tmp_path, tiny_model_path):
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(tiny_model_path.read_bytes()[:5000])
    with pytest.raises(ModelFileError, match="not a pneumoscan model file"):
        read_model_file(truncated)


def test_run_directory_without_model_says_training_has_not_finished(tmp_path):
    with pytest.raises(ModelFileError, match="has training finished"):
        resolve_model_path(tmp_path)


def test_atomic_write_leaves_no_temporary_files_even_when_writing_fails(tmp_path):
    from pneumoscan.modelfile import atomic_write

    save_model_file(tmp_path / "m.safetensors", {"w": torch.zeros(2)}, {"v": 1})

    def half_then_crash(tmp):
        Path(tmp).write_bytes(b"half a file")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(tmp_path / "m.safetensors", half_then_crash)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
    assert read_model_file(tmp_path / "m.safetensors")[1] == {"v": 1}  # the old file is untouched


def test_copied_model_file_keeps_its_identity(tmp_path, tiny_model_path):
    from pneumoscan import load_model

    shutil.copy(tiny_model_path, tmp_path / "copy.safetensors")
    assert load_model(tmp_path / "copy.safetensors").sha256 == load_model(tiny_model_path).sha256


def test_evaluation_json_has_null_not_nan_for_undefined_figures():
    import numpy as np

    from pneumoscan.evaluate import Evaluation
    from pneumoscan.metrics import operating_point

    y, p = np.array([0, 0, 1]), np.array([0.1, 0.2, 0.3])
    point = operating_point(y, p, 0.9)  # nothing called pneumonia: precision undefined
    result = Evaluation("test", 3, 1.0, 1.0, 0.1, 0.2, {"balanced": point}, {"balanced": ""}, False, 0)
    text = json.dumps(result.to_dict(), allow_nan=False)
    assert json.loads(text)["balanced"]["precision"] is None


def test_a_colour_photo_in_a_labelled_folder_is_refused_as_predict_refuses_it_not_counted(tiny_model_path,
                                                                                          tiny_dataset, tmp_path,
                                                                                          capsys):
    """Evaluate applies predict's checks: the photo would otherwise be one more NORMAL image in the figures."""
    import numpy as np

    data = tmp_path / "data"
    shutil.copytree(tiny_dataset / "test", data / "test")
    photo = data / "test" / "NORMAL" / "holiday.png"
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 180
    rgb[:32, :, 2] = 200  # a blue sky over a red field
    Image.fromarray(rgb, "RGB").save(photo)
    out = tmp_path / "figures.json"
    assert main(["evaluate", "--model", str(tiny_model_path), "--data", str(data), "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "test split: 48 images" in printed
    assert "refused as predict would refuse them, not in these figures: 1 not a frontal chest X-ray" in printed
    assert f"refused (not_xray): {photo}: not a frontal chest X-ray: colour image" in printed
    figures = json.loads(out.read_text())
    assert figures["n"] == 48 and figures["refused_counts"] == {"not_xray": 1, "outside_population": 0,
                                                         "out_of_distribution": 0, "error": 0}
    assert figures["refused"]["not_xray"][0]["path"] == str(photo)
    assert figures["screening"]["tn"] + figures["screening"]["fp"] == 24  # the NORMAL images that were judged

    from pneumoscan import load_model
    from pneumoscan.evaluate import evaluate

    model = load_model(tiny_model_path)
    with_photo, without = evaluate(model, data, "test"), evaluate(model, tiny_dataset, "test")
    assert with_photo.n == without.n == 48 and with_photo.auc == without.auc
    assert np.allclose(with_photo.probabilities, without.probabilities, atol=1e-6)  # batches differ: rounding


def test_images_outside_the_training_population_are_refused_apart_from_the_figures(tiny_model_path,
                                                                                    tiny_dataset, tmp_path):
    """A guard threshold at the median distance of the split: half its images are refused, listed, not scored."""
    import numpy as np

    from pneumoscan import load_model, pipeline
    from pneumoscan.evaluate import evaluate

    base = load_model(tiny_model_path)
    files = sorted(str(p) for p in (tiny_dataset / "test").rglob("*.jpeg"))
    scores = {s.prediction.path: s.prediction.guard_score for s in pipeline.screen(base, files)}
    tensors, meta = read_model_file(tiny_model_path)
    meta["guard"]["threshold"] = float(np.median(list(scores.values())))
    strict = tmp_path / "strict.safetensors"
    save_model_file(strict, tensors, meta)

    result = evaluate(load_model(strict), tiny_dataset, "test")
    refused = {item["path"] for item in result.refused["out_of_distribution"]}
    assert refused == {path for path, score in scores.items() if score > meta["guard"]["threshold"]}
    assert result.guard_rejected == len(refused) == 48 - result.n and len(result.probabilities) == result.n


def test_an_npz_split_is_scored_through_the_stage_and_its_images_named_by_index(tiny_model, tmp_path):
    import numpy as np

    from pneumoscan import pipeline
    from pneumoscan.evaluate import evaluate

    arrays = {}
    for split in ("train", "val", "test"):
        labels = np.array([0, 1] * 4)
        arrays[f"{split}_images"] = np.stack([np.full((28, 28), 60 + 10 * i, np.uint8) for i in range(8)])
        arrays[f"{split}_labels"] = labels[:, None]
    np.savez(tmp_path / "m.npz", **arrays)
    result = evaluate(tiny_model, tmp_path / "m.npz", "test")
    cache = tiny_model.preprocessing.to_uint8
    direct = pipeline.decide(tiny_model, [pipeline.from_array(f"test[{i}]", cache(im))
                                          for i, im in enumerate(arrays["test_images"])],
                             tiny_model.resolve_threshold("screening"))
    judged = [s.prediction for s in direct if s.status == "ok"]
    assert result.n == len(judged)
    assert np.allclose(result.probabilities, [p.probability for p in judged], atol=1e-6)
