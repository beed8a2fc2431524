"""Screening through the Python API and ``pneumoscan predict``: typed results, thresholds, folder walking,
the CSV contract, error rows, exit codes, atomic output, and the bundled default model."""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import pytest
from conftest import make_model_file, save_gray, synthetic_xray

from pneumoscan import Model, Prediction, load_model
from pneumoscan.cli import main
from pneumoscan.errors import PneumoscanError
from pneumoscan.guard import NOT_XRAY, OUTSIDE_POPULATION, image_check
from pneumoscan.modelfile import read_model_file, save_model_file
from pneumoscan.predict import DEFAULT_MODEL

CSV_HEADER = ["path", "probability", "decision", "threshold", "status", "message"]  # the first columns
XRAYS = [synthetic_xray(64, seed=s, opacity=0.5 * (s % 2)) for s in range(200, 204)]
BLANK = np.zeros((64, 64), np.float32)


@pytest.fixture(scope="module")
def strict_model_path(tmp_path_factory) -> Path:
    """The tiny model with a guard threshold between its synthetic X-rays and a blank image, so the guard bites."""
    path = make_model_file(tmp_path_factory.mktemp("strict") / "strict.safetensors")
    model = load_model(path)
    xray_scores = [model.predict(x).guard_score for x in XRAYS]
    blank_score = model.predict(BLANK).guard_score
    assert max(xray_scores) < blank_score  # the untrained network's features still separate the two
    tensors, meta = read_model_file(path)
    meta["guard"]["threshold"] = math.sqrt(max(xray_scores) * blank_score)
    save_model_file(path, tensors, meta)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """in/{a.jpeg, b.png, sub/c.png, sub/deeper/d.dcm-less PNG, notes.txt, blank.png, broken.png, empty.jpeg}"""
    root = tmp_path / "in"
    save_gray(root / "a.jpeg", XRAYS[0])
    save_gray(root / "b.png", XRAYS[1], "RGB")
    save_gray(root / "sub" / "c.png", XRAYS[2])
    save_gray(root / "sub" / "deeper" / "d.png", XRAYS[3])
    (root / "notes.txt").write_text("ignored: not an image suffix")
    return root


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader)
        assert header[:len(CSV_HEADER)] == CSV_HEADER  # the first columns as scripts always read them; more may follow
        return [dict(zip(header, row, strict=True)) for row in reader]


# --- Python API -----------------------------------------------------------------------------------------------

def test_predict_accepts_a_path_bytes_or_an_array_and_returns_a_typed_prediction(tiny_model_path, tmp_path):
    model = load_model(tiny_model_path)
    assert isinstance(model, Model)
    path = save_gray(tmp_path / "x.png", XRAYS[0])
    by_path = model.predict(path)
    by_str = model.predict(str(path))
    by_bytes = model.predict(path.read_bytes(), name="upload.png")
    by_array = model.predict(np.round(XRAYS[0] * 255) / 255)
    for result in (by_path, by_str, by_bytes, by_array):
        assert isinstance(result, Prediction)
        assert result.status == "ok" and result.message == ""
        assert isinstance(result.probability, float) and 0.0 <= result.probability <= 1.0
        assert result.decision in ("NORMAL", "PNEUMONIA")
        assert result.operating_point == "screening" and result.threshold == 0.3
        assert isinstance(result.guard_score, float)
        assert result.decision == ("PNEUMONIA" if result.probability >= 0.3 else "NORMAL")
    assert by_path.path == str(path) and by_bytes.path == "upload.png" and by_array.path == "<array>"
    assert by_path.probability == pytest.approx(by_bytes.probability, abs=1e-6)
    assert by_path.probability == pytest.approx(by_array.probability, abs=1e-6)
    assert by_path.to_dict()["status"] == "ok"


def test_probability_uses_the_stored_temperature(tiny_model):
    import torch

    image = XRAYS[1]
    logits = tiny_model.score(tiny_model.preprocessing.to_uint8(image)[None]).logits
    expected = torch.softmax(logits / 1.5, dim=1)[0, 1].item()  # the fixture's temperature is 1.5
    assert tiny_model.predict(image).probability == pytest.approx(expected, abs=1e-6)


def test_named_and_numeric_thresholds(tiny_model):
    assert tiny_model.resolve_threshold("screening") == ("screening", 0.3)
    assert tiny_model.resolve_threshold("balanced") == ("balanced", 0.5)
    assert tiny_model.resolve_threshold("0.42") == ("custom", 0.42)
    assert tiny_model.resolve_threshold(0.42) == ("custom", 0.42)
    result = tiny_model.predict(XRAYS[0], threshold=0.42)
    assert (result.operating_point, result.threshold) == ("custom", 0.42)


def test_prevalence_rebases_probabilities_and_thresholds_but_keeps_every_decision(tiny_model_path):
    fitted = load_model(tiny_model_path, precision="float32")
    rare = load_model(tiny_model_path, precision="float32", prevalence=0.05)
    assert fitted.fitted_prevalence == rare.fitted_prevalence == 0.75  # the fixture's validation counts
    odds = (0.05 / 0.95) / (0.75 / 0.25)
    for image in XRAYS:
        for threshold in ("screening", "balanced"):
            a, b = fitted.predict(image, threshold=threshold), rare.predict(image, threshold=threshold)
            assert b.decision == a.decision
            assert b.probability / (1 - b.probability) == pytest.approx(odds * a.probability / (1 - a.probability))
            assert b.threshold / (1 - b.threshold) == pytest.approx(odds * a.threshold / (1 - a.threshold))
    same = load_model(tiny_model_path, precision="float32", prevalence=0.75)
    assert same.predict(XRAYS[0]).probability == pytest.approx(fitted.predict(XRAYS[0]).probability, abs=1e-9)
    assert same.thresholds == pytest.approx(fitted.thresholds)


def test_prevalence_needs_a_file_that_records_its_validation_counts(tmp_path):
    path = make_model_file(tmp_path / "old.safetensors")
    tensors, meta = read_model_file(path)
    meta["training"] = {}
    save_model_file(path, tensors, meta)
    assert load_model(path).fitted_prevalence is None
    with pytest.raises(PneumoscanError, match="does not record the prevalence its calibration was fitted at"):
        load_model(path, prevalence=0.1)


@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.2"])
def test_cli_prevalence_outside_zero_one_is_a_one_line_error(tiny_model_path, folder, tmp_path, capsys, value):
    assert main(["predict", str(folder), "--model", str(tiny_model_path), "--prevalence", value,
                 "--csv", str(tmp_path / "out.csv")]) != 0
    err = capsys.readouterr().err
    assert "prevalence must be strictly between 0 and 1" in err and "Traceback" not in err
    assert not (tmp_path / "out.csv").exists()


@pytest.mark.parametrize("bad, message", [
    ("bogus", "threshold must be one of balanced, screening or a number in (0, 1), got 'bogus'"),
    ("1.5", "threshold must be in (0, 1), got 1.5"),
    ("0", "threshold must be in (0, 1), got 0.0"),
    ("nan", "threshold must be in (0, 1), got nan"),
])
def test_bad_threshold_is_a_clear_error(tiny_model, bad, message):
    with pytest.raises(PneumoscanError) as info:
        tiny_model.predict(XRAYS[0], threshold=bad)
    assert str(info.value) == message


def test_unreadable_file_raises_from_predict_but_is_a_row_from_predict_files(tiny_model, tmp_path):
    from pneumoscan.data.images import ImageReadError

    bad = tmp_path / "bad.png"
    bad.write_text("text")
    with pytest.raises(ImageReadError, match="bad.png: not a readable image"):
        tiny_model.predict(bad)
    (row,) = tiny_model.predict_files([bad])
    assert row.status == "error" and row.probability is None and row.decision is None
    assert row.message == f"{bad}: not a readable image (expected JPEG, PNG, TIFF, BMP, GIF, WebP, PNM (PGM/PPM) or DICOM)"


def test_predict_files_keeps_input_order_across_batches(tiny_model, tmp_path):
    paths = []
    for i in range(7):
        paths.append(save_gray(tmp_path / f"{i}.png", XRAYS[i % 4]))
        if i == 3:
            paths.append(tmp_path / "missing.png")
    results = list(tiny_model.predict_files(paths, batch_size=3))
    assert [r.path for r in results] == [str(p) for p in paths]
    assert [r.status for r in results].count("error") == 1
    singles = [tiny_model.predict(p).probability for p in paths if p.exists()]
    batched = [r.probability for r in results if r.status == "ok"]
    assert np.allclose(singles, batched, atol=1e-5)


def test_guard_rejects_a_blank_image_without_a_probability(strict_model_path):
    model = load_model(strict_model_path)
    result = model.predict(BLANK)
    assert result.status == "not_xray"
    assert result.probability is None and result.decision is None
    assert result.message == f"{NOT_XRAY}: image is blank or nearly uniform; no probability reported"
    assert result.guard_score > model.guard.threshold
    assert all(model.predict(x).status == "ok" for x in XRAYS)


def test_guard_alone_says_outside_the_training_population_with_the_measured_distance(strict_model_path):
    from pneumoscan.data.images import DecodedImage

    model = load_model(strict_model_path)
    noise = np.random.default_rng(1).random((64, 64)).astype(np.float32)  # has contrast: passes the cheap checks
    result = model.predict(noise)
    assert image_check(DecodedImage.from_array(noise), model.preprocessing.to_uint8(noise), 16) is None
    assert result.status == "out_of_distribution"
    assert result.message == (f"{OUTSIDE_POPULATION}: features far from the training X-rays: distance "
                              f"{result.guard_score:.2f}, limit {model.guard.threshold:.2f}; no probability reported")
    assert NOT_XRAY not in result.message  # the guard alone cannot say it is not a chest X-ray


@pytest.mark.parametrize("kind, reason", [
    ("colour", "colour image (colourfulness "),
    ("tiny", "image is 12x12 pixels, below the 16 px minimum"),
    ("strip", "image is 256x64 pixels, too elongated for a chest radiograph"),
    ("flat", "image is blank or nearly uniform"),
    ("silhouette", "100% of the image is two gray levels (a drawing, mask or binary scan)"),
])
def test_cheap_image_checks_reject_what_cannot_be_a_radiograph(tiny_model, tmp_path, kind, reason):
    from PIL import Image

    path = tmp_path / f"{kind}.png"
    if kind == "colour":
        rgb = np.zeros((64, 64, 3), np.uint8)
        rgb[..., 0] = np.round(XRAYS[0] * 255)
        rgb[:32, :, 2] = 200  # a blue sky over a red picture
        Image.fromarray(rgb, "RGB").save(path)
    elif kind == "tiny":
        save_gray(path, XRAYS[0][::5, ::5][:12, :12])
    elif kind == "strip":
        save_gray(path, np.tile(XRAYS[0], (1, 4)))
    elif kind == "silhouette":  # a black shape on white, like a mask or line drawing
        shape = np.ones((64, 64), np.float32)
        shape[16:48, 8:40] = 0.0
        save_gray(path, shape)
    else:
        save_gray(path, np.full((64, 64), 0.4, np.float32))
    for result in (tiny_model.predict(path), *tiny_model.predict_files([path])):
        assert result.status == "not_xray", result
        assert result.probability is None and result.decision is None
        assert result.message.startswith(f"{NOT_XRAY}: {reason}")


def test_gray_xray_saved_as_rgb_passes_the_cheap_checks(tiny_model, tmp_path):
    path = save_gray(tmp_path / "rgb.jpeg", XRAYS[0], "RGB")
    assert tiny_model.predict(path).status == "ok"


def test_min_side_comes_from_the_model_file_when_present(tiny_model_path, tmp_path):
    tensors, meta = read_model_file(tiny_model_path)
    meta["guard"]["min_side"] = 100
    path = tmp_path / "m.safetensors"
    save_model_file(path, tensors, meta)
    model = load_model(path)
    assert model.record.min_side == 100
    assert load_model(tiny_model_path).record.min_side == 16  # absent key: a quarter of the 64 px input
    result = model.predict(save_gray(tmp_path / "x.png", XRAYS[0]))
    assert result.status == "not_xray" and "below the 100 px minimum" in result.message


# --- command line ---------------------------------------------------------------------------------------------

def test_cli_walks_folders_recursively_and_writes_the_csv(tiny_model_path, folder, tmp_path, capsys):
    out = tmp_path / "out" / "results.csv"
    code = main(["predict", str(folder), "--model", str(tiny_model_path), "--csv", str(out), "--quiet"])
    assert code == 0
    rows = _rows(out)
    assert [Path(r["path"]).relative_to(folder).as_posix() for r in rows] == [
        "a.jpeg", "b.png", "sub/c.png", "sub/deeper/d.png"]
    for row in rows:
        assert row["status"] == "ok" and row["message"] == ""
        assert 0.0 <= float(row["probability"]) <= 1.0
        assert row["decision"] in ("NORMAL", "PNEUMONIA")
        assert row["threshold"] == "0.300000"
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 4 and all("(screening threshold 0.3000)" in line for line in printed)


@pytest.mark.parametrize("threshold, shown", [("screening", "0.300000"), ("balanced", "0.500000"),
                                               ("0.42", "0.420000")])
def test_cli_threshold_choices(tiny_model_path, folder, tmp_path, threshold, shown):
    out = tmp_path / "t.csv"
    assert main(["predict", str(folder / "a.jpeg"), "--model", str(tiny_model_path), "--threshold", threshold,
                 "--csv", str(out), "--quiet"]) == 0
    (row,) = _rows(out)
    assert row["threshold"] == shown
    assert row["decision"] == ("PNEUMONIA" if float(row["probability"]) >= float(shown) else "NORMAL")


def test_cli_bogus_threshold_fails_before_reading_anything(tiny_model_path, folder, tmp_path, capsys):
    out = tmp_path / "t.csv"
    code = main(["predict", str(folder), "--model", str(tiny_model_path), "--threshold", "bogus", "--csv", str(out)])
    assert code == 2
    assert capsys.readouterr().err == ("pneumoscan: error: threshold must be one of balanced, screening or a "
                                       "number in (0, 1), got 'bogus'\n")
    assert not out.exists()


def test_cli_csv_has_ok_not_xray_and_error_rows_and_exit_code_1(strict_model_path, folder, tmp_path, capsys):
    save_gray(folder / "blank.png", BLANK)
    (folder / "broken.png").write_text("not an image")
    (folder / "empty.jpeg").write_bytes(b"")
    missing = tmp_path / "gone.jpeg"
    out = tmp_path / "results.csv"
    code = main(["predict", str(folder), str(missing), "--model", str(strict_model_path), "--csv", str(out),
                 "--quiet"])
    assert code == 1
    rows = {Path(r["path"]).name: r for r in _rows(out)}
    assert set(rows) == {"a.jpeg", "b.png", "c.png", "d.png", "blank.png", "broken.png", "empty.jpeg", "gone.jpeg"}
    assert {k: rows["blank.png"][k] for k in CSV_HEADER} == {
        "path": str(folder / "blank.png"), "probability": "", "decision": "", "threshold": "0.300000",
        "status": "not_xray", "message": f"{NOT_XRAY}: image is blank or nearly uniform; no probability reported"}
    assert rows["broken.png"]["status"] == "error"
    assert rows["broken.png"]["message"] == f"{folder / 'broken.png'}: not a readable image (expected JPEG, PNG, TIFF, BMP, GIF, WebP, PNM (PGM/PPM) or DICOM)"
    assert rows["empty.jpeg"]["message"] == f"{folder / 'empty.jpeg'}: empty file"
    assert rows["gone.jpeg"]["message"] == f"{missing}: file not found"
    for name in ("broken.png", "empty.jpeg", "gone.jpeg"):
        assert rows[name]["probability"] == rows[name]["decision"] == ""
    assert all(rows[n]["status"] == "ok" for n in ("a.jpeg", "b.png", "c.png", "d.png"))
    captured = capsys.readouterr()
    assert "pneumoscan: 3 file(s) could not be read\n" in captured.err
    assert "Traceback" not in captured.out + captured.err
    assert (f"{folder / 'blank.png'}\t-\tNOT_XRAY\t{NOT_XRAY}: image is blank or nearly uniform; "
            "no probability reported") in captured.out.splitlines()


def test_cli_not_xray_alone_is_not_a_failure(strict_model_path, tmp_path):
    blank = save_gray(tmp_path / "blank.png", BLANK)
    assert main(["predict", str(blank), "--model", str(strict_model_path), "--quiet"]) == 0


def test_interrupted_run_leaves_no_complete_looking_csv_and_keeps_an_older_one(tiny_model_path, folder, tmp_path,
                                                                               monkeypatch):
    """The finished rows survive in RESULTS.partial (for --resume); the final name appears only when complete."""
    from pneumoscan import pipeline

    out = tmp_path / "results.csv"
    calls = {"n": 0}
    original = pipeline.screen  # what every local route screens through

    def failing(*args, **kwargs):
        for prediction in original(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("disk on fire")
            yield prediction

    monkeypatch.setattr(pipeline, "screen", failing)
    with pytest.raises(RuntimeError, match="disk on fire"):
        main(["predict", str(folder), "--model", str(tiny_model_path), "--csv", str(out), "--quiet"])
    assert not out.exists()
    assert sorted(os.listdir(tmp_path)) == ["in", "results.csv.partial"]

    (tmp_path / "results.csv.partial").unlink()  # (a journal left in place is refused without --resume)
    out.write_text("previous complete results\n")
    calls["n"] = 0

    def interrupted(*args, **kwargs):
        for prediction in original(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == 2:
                raise KeyboardInterrupt
            yield prediction

    monkeypatch.setattr(pipeline, "screen", interrupted)
    assert main(["predict", str(folder), "--model", str(tiny_model_path), "--csv", str(out), "--quiet"]) == 130
    assert out.read_text() == "previous complete results\n"
    assert sorted(os.listdir(tmp_path)) == ["in", "results.csv", "results.csv.partial"]


def test_csv_appears_only_complete(tiny_model_path, folder, tmp_path, monkeypatch):
    from pneumoscan import pipeline

    out = tmp_path / "results.csv"
    seen = []
    original = pipeline.screen

    def watching(*args, **kwargs):
        for screened in original(*args, **kwargs):
            seen.append(out.exists())  # while rows are being written, the final name does not exist yet
            yield screened

    monkeypatch.setattr(pipeline, "screen", watching)
    assert main(["predict", str(folder), "--model", str(tiny_model_path), "--csv", str(out), "--quiet"]) == 0
    assert seen == [False] * 4
    assert len(_rows(out)) == 4


def test_cli_missing_model_file_is_one_line(tmp_path, folder, capsys):
    missing = tmp_path / "nope.safetensors"
    assert main(["predict", str(folder), "--model", str(missing)]) == 2
    assert capsys.readouterr().err == f"pneumoscan: error: {missing}: model file not found\n"


# --- the bundled default model ------------------------------------------------------------------------------

def _default_model_or_skip() -> None:
    if not DEFAULT_MODEL.is_file():
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{DEFAULT_MODEL} is missing: the package must ship its default model")
        pytest.skip(f"{DEFAULT_MODEL} not built yet")


@pytest.mark.integration
def test_bundled_default_model_screens_a_real_test_image(kermany):
    _default_model_or_skip()
    model = load_model()
    assert model.path == DEFAULT_MODEL
    assert set(model.thresholds) >= {"screening", "balanced"}
    normal = sorted((kermany / "test" / "NORMAL").glob("*.jpeg"))[0]
    pneumonia = sorted((kermany / "test" / "PNEUMONIA").glob("*.jpeg"))[0]
    results = [model.predict(normal), model.predict(pneumonia)]
    for result in results:
        assert result.status == "ok", result.message
        assert 0.0 <= result.probability <= 1.0
    assert results[1].probability > results[0].probability
    assert results[1].decision == "PNEUMONIA"


def test_precision_auto_is_the_precision_the_thresholds_were_fitted_in(tiny_model_path, tmp_path):
    model = load_model(tiny_model_path)  # a file before record version 2: fitted in float32
    assert model.record.precision == "float32" and model.runtime == "PyTorch float32"
    tensors, meta = read_model_file(tiny_model_path)
    path = tmp_path / "bf16.safetensors"
    save_model_file(path, tensors, {**meta, "precision": "bfloat16", "record_version": 2})
    assert load_model(path).runtime == "PyTorch bfloat16"
    assert load_model(path, precision="float32").runtime == "PyTorch float32"


def test_bf16_network_gives_nearly_the_float32_probability_and_the_same_guard_verdicts(strict_model_path):
    fp32 = load_model(strict_model_path, precision="float32")
    bf16 = load_model(strict_model_path, precision="bfloat16")
    noise = np.random.default_rng(1).random((64, 64)).astype(np.float32)
    for image in XRAYS:
        a, b = fp32.predict(image), bf16.predict(image)
        assert a.status == b.status == "ok"
        assert b.probability == pytest.approx(a.probability, abs=0.02)
    assert fp32.predict(noise).status == bf16.predict(noise).status == "out_of_distribution"


def test_unknown_precision_is_a_clear_error(tiny_model_path, capsys):
    with pytest.raises(PneumoscanError, match="precision must be one of auto, float32, bfloat16, got 'fp8'"):
        load_model(tiny_model_path, precision="fp8")
    with pytest.raises(SystemExit):  # argparse: usage line and exit code 2
        main(["predict", "x.png", "--precision", "fp8"])
    assert "invalid choice: 'fp8'" in capsys.readouterr().err


# --- one bad file never costs the batch; an edited bundled model is refused --------------------------------

def test_a_malformed_dicom_is_its_own_error_row_and_the_batch_goes_on(tiny_model, folder, tmp_path):
    from pydicom.data import get_testdata_file

    bad = get_testdata_file("badVR.dcm")  # pydicom's own test file: NumberOfFrames '1A'
    good = sorted(folder.rglob("*.png"))
    rows = list(tiny_model.predict_files([good[0], bad, *good[1:]], batch_size=2))
    assert [r.path for r in rows] == [str(good[0]), bad, *map(str, good[1:])]
    assert rows[1].status == "error" and rows[1].message.startswith(f"{bad}: ") and "\n" not in rows[1].message
    assert all(r.status == "ok" for i, r in enumerate(rows) if i != 1)


def test_an_exception_from_any_decoder_becomes_that_files_row(tiny_model, folder, monkeypatch):
    import pneumoscan.predict as predict_mod

    original = predict_mod.decode

    def flaky(source, **kwargs):
        if str(source).endswith("b.png"):
            raise RuntimeError("a decoder bug")
        return original(source, **kwargs)

    monkeypatch.setattr(predict_mod, "decode", flaky)
    rows = {Path(r.path).name: r for r in tiny_model.predict_files(sorted(folder.rglob("*.*")))}
    assert rows["b.png"].status == "error" and "RuntimeError: a decoder bug" in rows["b.png"].message
    assert rows["a.jpeg"].status == "ok"


def test_a_bundled_model_file_whose_header_was_edited_is_refused(tmp_path):
    _default_model_or_skip()
    import json

    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(DEFAULT_MODEL), framework="pt") as f:
        header, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    meta = json.loads(header["pneumoscan"])
    meta["thresholds"]["screening"] += 0.5  # still a valid file, now a different operating point
    edited = tmp_path / "default.safetensors"
    save_file(tensors, str(edited), metadata={**header, "pneumoscan": json.dumps(meta)})
    with pytest.raises(PneumoscanError, match="claims to be the bundled model pneumoscan-default but its sha256"):
        load_model(edited)


def test_the_bundled_sha256_known_to_the_code_is_the_shipped_files():
    _default_model_or_skip()
    from pneumoscan.modelfile import sha256_file
    from pneumoscan.predict import BUNDLED_SHA256

    assert sha256_file(DEFAULT_MODEL) == BUNDLED_SHA256
    assert (DEFAULT_MODEL.parent / "default.sha256").read_text().split()[0] == BUNDLED_SHA256


def test_the_pixel_limit_is_an_option_of_predict(tiny_model_path, folder, tmp_path, capsys):
    out = tmp_path / "r.csv"
    assert main(["predict", str(folder / "a.jpeg"), "--model", str(tiny_model_path), "--max-megapixels", "0.001",
                 "--csv", str(out), "--quiet"]) == 1
    (row,) = _rows(out)
    assert row["status"] == "error"
    assert row["message"] == (f"{folder / 'a.jpeg'}: image is 64x64 pixels, above the 0.001 MP limit (refused as a "
                              "possible decompression bomb; see --max-megapixels)")
    with pytest.raises(SystemExit) as exit_info:  # argparse: usage line and exit code 2
        main(["predict", str(folder / "a.jpeg"), "--model", str(tiny_model_path), "--max-megapixels", "0"])
    assert exit_info.value.code == 2


def test_the_cli_reports_a_malformed_dicom_in_its_row_without_library_warnings(tiny_model_path, tmp_path):
    import subprocess
    import sys

    from pydicom.data import get_testdata_file

    out = tmp_path / "r.csv"
    proc = subprocess.run([sys.executable, "-m", "pneumoscan.cli", "predict", get_testdata_file("badVR.dcm"),
                           "--model", str(tiny_model_path), "--csv", str(out)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "Warning" not in proc.stderr and "Traceback" not in proc.stderr
    (row,) = _rows(out)
    assert row["status"] == "error" and "NumberOfFrames" in row["message"]
