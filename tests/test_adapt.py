"""pneumoscan adapt: AdaBN, EM prevalence, guard refit, labelled refit, the model file it writes, bad input.

Unit tests run the tiny generated model (tests/conftest.py) on generated X-rays; one integration test adapts the
bundled model on real Kermany *train* images (never test images)."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import make_model_file, save_gray, synthetic_xray
from scipy import stats

from pneumoscan import load_model, pipeline
from pneumoscan.adapt import (
    MIN_IMAGES,
    Adapted,
    AdaptError,
    adabn,
    adapt_unlabelled,
    balanced_order,
    bn_layers,
    em_prevalence,
    em_thresholds,
    image_files,
    load_site,
    min_positives,
    recalibrate,
)
from pneumoscan.cli import main
from pneumoscan.modelfile import read_model_file, save_model_file, sha256_file


def site_folder(root, n: int = 30, *, opacity_every: int = 0, start: int = 0):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        opacity = 0.5 if opacity_every and i % opacity_every == 0 else 0.0
        save_gray(root / f"site{start + i:03d}.png", synthetic_xray(64, 500 + start + i, opacity=opacity))
    return root


def labelled_folder(root, normal: int, pneumonia: int):
    for name, n, opacity in (("NORMAL", normal, 0.0), ("PNEUMONIA", pneumonia, 0.5)):
        for i in range(n):
            save_gray(root / name / f"{name.lower()}{i:03d}.png", synthetic_xray(64, 900 + i + int(100 * opacity),
                                                                                 opacity=opacity))
    return root


# --- the statistics ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("true_prior", [0.2, 0.5, 0.625, 0.9])
def test_em_recovers_the_prior_of_calibrated_posteriors(true_prior):
    """Scores from two known class densities, calibrated at prior 0.743: EM finds the sample's own prior."""
    rng = np.random.default_rng(0)
    n = 20000
    y = rng.random(n) < true_prior
    s = rng.normal(np.where(y, 1.5, -1.5), 1.0)
    fitted = 0.743
    log_lr = 3.0 * s  # log N(s; 1.5, 1) / N(s; -1.5, 1)
    p = 1 / (1 + np.exp(-(log_lr + math.log(fitted / (1 - fitted)))))
    assert em_prevalence(p, fitted) == pytest.approx(y.mean(), abs=0.01)


def test_em_thresholds_with_true_posteriors_give_the_target_sensitivity():
    rng = np.random.default_rng(1)
    q = rng.beta(0.6, 0.4, 50000)  # posteriors; labels drawn from them are exactly calibrated
    y = rng.random(len(q)) < q
    t = em_thresholds(q, 0.98)
    assert np.mean(q[y] >= t["screening"]) == pytest.approx(0.98, abs=0.005)
    assert t["balanced"] > t["screening"]


def test_min_positives_is_where_the_clopper_pearson_bound_reaches_the_target():
    for target, expected in ((0.98, 149), (0.95, 59), (0.99, 299)):
        n = min_positives(target)
        assert n == expected
        assert stats.beta.ppf(0.05, n, 1) >= target > stats.beta.ppf(0.05, n - 1, 1)


def test_balanced_order_draws_the_training_class_mix():
    rng = np.random.default_rng(2)
    q = (rng.random(4000) < 0.8).astype(float) * 0.98 + 0.01  # 80% confident pneumonia
    order = balanced_order(q, 0.8, 0.5, seed=0)
    assert len(order) == len(q)
    assert np.mean(q[order] > 0.5) == pytest.approx(0.5, abs=0.03)


# --- AdaBN and the adapted model ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = make_model_file(tmp_path_factory.mktemp("adapt") / "tiny.safetensors")
    return load_model(path, precision="float32")


@pytest.fixture(scope="module")
def site(tiny, tmp_path_factory):
    folder = site_folder(tmp_path_factory.mktemp("site") / "images", 30, opacity_every=3)
    return load_site(tiny, image_files(folder))


def test_adabn_reestimates_only_the_fine_tuned_stages_batchnorm(tiny, site):
    adapted = Adapted.of(tiny)
    before = {k: v.clone() for k, v in adapted.network.state_dict().items()}
    trained = {id(m) for m in bn_layers(adapted.network, tiny.record, "trained")}
    names = {n for n, m in adapted.network.named_modules() if id(m) in trained}
    assert names and all(n.startswith(("blocks.3", "blocks.4", "blocks.5", "blocks.6", "bn2")) for n in names)
    count = adabn(adapted.network, tiny.record, site, "trained")
    assert count == len(names)
    after = adapted.network.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed, "AdaBN changed nothing"
    assert all(k.rsplit(".", 1)[0] in names and k.endswith(("running_mean", "running_var", "num_batches_tracked"))
               for k in changed)
    # the base model's network is untouched (the adapted one is a copy)
    assert all(torch.equal(v, tiny.backend.network.state_dict()[k]) for k, v in before.items())


def test_adapted_file_scores_what_the_adaptation_computed(tiny, site, tmp_path):
    """adapt scores through the stage, so the saved file's predictions are the adaptation's numbers to 1e-6."""
    adapted = adapt_unlabelled(tiny, site, which="trained", thresholds="keep")
    logits, feats = adapted.scores(site)
    path = tmp_path / "site.safetensors"
    adapted.save(path)
    model = load_model(path, precision="float32")
    predicted = list(model.predict_files(site.files, threshold=0.5))
    screened = pipeline.decide(model, [pipeline.from_array(f, im) for f, im in zip(site.files, site.images.numpy(),
                                                                                     strict=True)], ("custom", 0.5))
    assert torch.allclose(torch.stack([s.logits for s in screened]), logits, rtol=0, atol=1e-6)
    expected = adapted.probability(logits)
    assert all(p.status in ("ok", "out_of_distribution") for p in predicted)
    ok = [i for i, p in enumerate(predicted) if p.status == "ok"]
    assert ok and np.allclose([predicted[i].probability for i in ok], expected[ok], rtol=0, atol=1e-6)
    scores = model.score(site.images)
    assert torch.allclose(scores.features, feats, rtol=0, atol=1e-6)
    record = model.record
    assert record.name.startswith("tiny-test-model-site-")
    step = record.adaptation["unlabelled"]
    assert record.adaptation["base_sha256"] == tiny.sha256
    assert step["images"] == len(site) == 30 and step["sha256_digest"] == site.digest()
    # EM re-based the calibration: bias and thresholds moved by the same log-odds, the prevalence is recorded
    shift = step["prevalence"]["log_odds_shift"]
    assert record.bias == pytest.approx(tiny.record.bias + shift)
    for name, t in tiny.record.thresholds.items():
        assert math.log(record.thresholds[name] / (1 - record.thresholds[name])) == pytest.approx(
            math.log(t / (1 - t)) + shift)
    # the site's prevalence is the record's typed field; the training summary is the base model's, untouched
    assert record.prevalence == pytest.approx(step["prevalence"]["site"])
    assert model.fitted_prevalence == record.prevalence
    assert record.training == tiny.record.training
    # the guard was refit on the site's features: about every site image is accepted
    assert record.guard.threshold == pytest.approx(step["guard"]["threshold"])
    assert (scores.guard <= model.guard.threshold).float().mean() >= 0.5


def test_a_version_2_adapted_file_with_fractional_val_counts_still_loads(tiny, tmp_path):
    """Adapted files written before the prevalence field held it as expected counts; they keep their meaning."""
    tensors, meta = read_model_file(tiny.path)
    meta = {**meta, "record_version": 2, "training": {**meta["training"], "val_counts": [7.5, 22.5]},
            "adaptation": {"base_name": "tiny-test-model"}}
    save_model_file(tmp_path / "old.safetensors", tensors, meta)
    model = load_model(tmp_path / "old.safetensors")
    assert model.record.prevalence is None and model.fitted_prevalence == pytest.approx(0.75)
    model.set_prevalence(0.5)
    assert model.prevalence == 0.5


def test_site_images_the_stage_cannot_read_carry_the_stage_message(tiny, tmp_path):
    folder = site_folder(tmp_path / "site", 3)
    bad = folder / "broken.jpeg"
    bad.write_bytes(b"\xff\xd8 truncated")
    site = load_site(tiny, image_files(folder))
    expected = next(tiny.predict_files([bad])).message
    assert site.excluded["unreadable"] == 1 and site.messages == [expected]
    assert len(site) == 3 and site.images.dtype == torch.uint8


def test_adapt_scores_the_base_model_as_predict_does(tiny, site):
    """Without AdaBN, adapt's scores are the stage's: the same logits predict computes, to 1e-6."""
    logits, _ = Adapted.of(tiny).scores(site)
    predicted = list(tiny.predict_files(site.files, threshold=0.5))
    p = Adapted.of(tiny).probability(logits)
    ok = [i for i, r in enumerate(predicted) if r.status == "ok"]
    assert len(ok) == len(site) and np.allclose([predicted[i].probability for i in ok], p, rtol=0, atol=1e-6)


def test_the_digest_names_the_images_not_their_order_or_names(tiny, site):
    assert site.subset(list(range(len(site)))[::-1]).digest() == site.digest()
    assert site.subset(range(len(site) - 1)).digest() != site.digest()


# --- the command ---------------------------------------------------------------------------------------------------

def test_cli_adapt_help_prints_one_percent_sign(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["adapt", "--help"])
    out = capsys.readouterr().out
    text = " ".join(out.split())
    assert exit_.value.code == 0 and "95% confidence" in text and "%%" not in out and "--device" in out


def test_cli_adapt_choices_are_the_domain_modules():
    from pneumoscan import adapt
    from pneumoscan.cli import adapt as cli_adapt

    assert cli_adapt.BN_LAYER_CHOICES == adapt.BN_LAYERS and cli_adapt.THRESHOLD_CHOICES == adapt.THRESHOLDS
    assert adapt.DEFAULT_BN_LAYERS == "none" and adapt.DEFAULT_THRESHOLDS == "keep" and adapt.MIN_IMAGES == 25


def test_cli_adapt_unlabelled_writes_a_normal_model_file(tiny, tmp_path, capsys):
    folder = site_folder(tmp_path / "site", 28)
    out = tmp_path / "site.safetensors"
    assert main(["adapt", "--model", str(tiny.path), "--images", str(folder), "--out", str(out),
                 "--device", "cpu"]) == 0
    assert "wrote" in capsys.readouterr().out
    model = load_model(out)
    assert model.record.adaptation["unlabelled"]["images"] == 28
    assert model.record.adaptation["base_sha256"] == sha256_file(tiny.path)
    assert model.record.storage == "float32"
    # predict and evaluate use it unchanged
    assert main(["predict", "--model", str(out), str(folder / "site000.png")]) == 0


def test_cli_adapt_leaves_out_and_counts_unreadable_and_non_xray_images(tiny, tmp_path, capsys):
    folder = site_folder(tmp_path / "site", 26)
    (folder / "notes.png").write_text("not an image")
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[..., 0] = 255
    from PIL import Image

    Image.fromarray(rgb).save(folder / "photo.png")
    out = tmp_path / "site.safetensors"
    assert main(["adapt", "--model", str(tiny.path), "--images", str(folder), "--out", str(out), "--quiet"]) == 0
    err = capsys.readouterr().err
    assert "left out 1 unreadable, 1 not_xray; adapting on 26" in err
    step = load_model(out).record.adaptation["unlabelled"]
    assert step["excluded"] == {"unreadable": 1, "not_xray": 1, "out_of_distribution": 0}


def test_cli_adapt_leaves_out_what_the_base_guard_rejects(tiny, tmp_path, capsys):
    tensors, meta = read_model_file(tiny.path)
    strict = tmp_path / "strict.safetensors"
    folder = site_folder(tmp_path / "site", 40)
    scores = tiny.score(load_site(tiny, image_files(folder)).images).guard
    meta = {**meta, "guard": {**meta["guard"], "threshold": float(torch.quantile(scores, 0.7))}}
    save_model_file(strict, tensors, meta)
    out = tmp_path / "site.safetensors"
    assert main(["adapt", "--model", str(strict), "--images", str(folder), "--out", str(out), "--quiet"]) == 0
    step = load_model(out).record.adaptation["unlabelled"]
    assert step["excluded"]["out_of_distribution"] == 40 - step["images"] >= 10
    assert "out_of_distribution" in capsys.readouterr().err


@pytest.mark.parametrize("case", ["empty", "too_few", "unreadable_only", "missing"])
def test_cli_adapt_bad_site_folder_is_one_line_and_writes_nothing(tiny, tmp_path, capsys, case):
    folder = tmp_path / "site"
    folder.mkdir()
    if case == "too_few":
        site_folder(folder, MIN_IMAGES - 1)
    elif case == "unreadable_only":
        for i in range(3):
            (folder / f"x{i}.jpeg").write_bytes(b"\xff\xd8 truncated")
    elif case == "missing":
        folder = tmp_path / "nowhere"
    out = tmp_path / "site.safetensors"
    assert main(["adapt", "--model", str(tiny.path), "--images", str(folder), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len([line for line in err if "error" in line]) == 1 and err[-1].startswith("pneumoscan: error:")
    assert not out.exists() and list(tmp_path.glob(".site.safetensors*")) == []
    if case == "too_few":
        assert f"at least {MIN_IMAGES} needed" in err[-1]


def test_cli_adapt_labelled_refits_calibration_and_thresholds(tiny, tmp_path):
    data = labelled_folder(tmp_path / "labelled", normal=12, pneumonia=30)
    out = tmp_path / "site.safetensors"
    assert main(["adapt", "--model", str(tiny.path), "--data", str(data), "--out", str(out),
                 "--sensitivity", "0.9"]) == 0
    record = load_model(out).record
    step = record.adaptation["labelled"]
    assert step["counts"] == [12, 30] and step["target_sensitivity"] == 0.9
    # the sample's prevalence is a typed field; the training summary stays the base model's
    assert record.prevalence == pytest.approx(30 / 42) and load_model(out).fitted_prevalence == pytest.approx(30 / 42)
    assert record.training["val_counts"] == tiny.record.training["val_counts"]
    assert record.thresholds != tiny.record.thresholds


@pytest.mark.parametrize("case", ["one_class", "too_few_positives", "no_class_folders"])
def test_cli_adapt_labelled_refuses_what_cannot_be_trusted(tiny, tmp_path, capsys, case):
    if case == "one_class":
        data = tmp_path / "labelled"
        (data / "NORMAL").mkdir(parents=True)
        labelled_folder(data, normal=0, pneumonia=30)
    elif case == "too_few_positives":
        data = labelled_folder(tmp_path / "labelled", normal=10, pneumonia=30)
    else:
        data = site_folder(tmp_path / "flat", 30)
    out = tmp_path / "site.safetensors"
    assert main(["adapt", "--model", str(tiny.path), "--data", str(data), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("pneumoscan: error:")
    assert not out.exists()
    if case == "too_few_positives":  # the tiny model's target is 0.98: 149 positives needed
        assert "30 PNEUMONIA images cannot support sensitivity 0.98" in err and "at least 149" in err
    if case == "one_class":
        assert "all PNEUMONIA" in err


def test_recalibrate_needs_labels(tiny, site):
    with pytest.raises(AdaptError, match="labelled"):
        recalibrate(tiny, site)


def test_cli_adapt_refuses_to_overwrite_its_base_model(tiny, tmp_path):
    folder = site_folder(tmp_path / "site", 26)
    copy = tmp_path / "base.safetensors"
    copy.write_bytes(tiny.path.read_bytes())
    assert main(["adapt", "--model", str(copy), "--images", str(folder), "--out", str(copy)]) == 2
    assert sha256_file(copy) == sha256_file(tiny.path)


def test_evaluate_json_carries_confidence_intervals(tiny, tiny_dataset, tmp_path):
    out = tmp_path / "eval.json"
    assert main(["evaluate", "--model", str(tiny.path), "--data", str(tiny_dataset), "--split", "test",
                 "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    ci = doc["intervals"]
    assert ci["groups"] == 24  # 12 patients per class, two images each: resampled by patient
    assert set(ci) >= {"auc", "pr_auc", "ece", "screening", "balanced"}
    low, high = ci["screening"]["sensitivity"]
    assert low <= doc["screening"]["sensitivity"] <= high


# --- integration: the bundled model on real train images ------------------------------------------------------

@pytest.mark.integration
def test_adapt_bundled_model_on_real_train_xrays(kermany, tmp_path):
    folder = tmp_path / "site"
    folder.mkdir()
    for name in ("NORMAL", "PNEUMONIA"):
        for path in sorted((kermany / "train" / name).iterdir())[:15]:
            (folder / path.name).symlink_to(path)
    out = tmp_path / "site.safetensors"
    assert main(["adapt", "--images", str(folder), "--out", str(out), "--quiet", "--bn-layers", "trained",
                 "--bn-balance"]) == 0
    model = load_model(out)
    base = load_model()
    assert model.name.startswith("pneumoscan-default-site-") and model.name != base.name
    step = model.record.adaptation["unlabelled"]
    assert step["images"] + sum(step["excluded"].values()) == 30
    assert step["bn_layers_reestimated"] > 0 and step["bn_class_balanced"] and 0 < step["prevalence"]["site"] < 1
    assert model.record.adaptation["base_sha256"] == base.sha256
    prediction = model.predict(next(folder.iterdir()))
    assert prediction.status in ("ok", "out_of_distribution")


@pytest.mark.slow
def test_an_adapted_file_runs_unchanged_through_the_server_the_onnx_export_and_dicom_out(tiny, tmp_path, capsys):
    import httpx
    from pydicom import dcmread
    from test_one_path import dicom

    from pneumoscan.export import export_onnx
    from pneumoscan.serve import create_app, serve_in_thread

    folder = site_folder(tmp_path / "site", 28)
    out = tmp_path / "site.safetensors"
    assert main(["adapt", "--model", str(tiny.path), "--images", str(folder), "--out", str(out)]) == 0
    model = load_model(out, precision="float32")
    image = folder / "site000.png"
    expected = model.predict(image)
    with serve_in_thread(create_app(model)) as url:
        body = httpx.post(f"{url}/v1/predict", files={"file": (image.name, image.read_bytes())}, timeout=60).json()
    assert body["status"] == expected.status and body["model"]["sha256"] == model.sha256
    if expected.probability is not None:
        assert body["probability"] == pytest.approx(expected.probability, abs=1e-5)
    small = np.stack([model.prepare(model.decode(image))[0]])
    exported = export_onnx(model, tmp_path / "site.onnx", images=small)
    onnx_model = load_model(exported.path, backend="onnx")
    assert onnx_model.record.adaptation == model.record.adaptation
    assert onnx_model.predict(image).status == expected.status
    dcm = tmp_path / "x.dcm"
    from pydicom.uid import generate_uid

    dcm.write_bytes(dicom(np.round(synthetic_xray(96, 7) * 255).astype(np.uint8), BodyPartExamined="CHEST",
                          StudyInstanceUID=generate_uid(), SeriesInstanceUID=generate_uid()))
    assert main(["predict", str(dcm), "--model", str(out), "--dicom-out", str(tmp_path / "dicom"), "--quiet"]) == 0
    written = sorted((tmp_path / "dicom").rglob("*.dcm"))
    assert written and any(dcmread(p).Modality == "SR" for p in written)
