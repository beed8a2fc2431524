"""The drift reference's clustering by patient: its effective sizes, what it keeps (a count, never an id), the
version-1 references that still load as independent images, and the alarm threshold simulated at those sizes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from pneumoscan import monitor
from pneumoscan.monitor.reference import design_effect

ROOT = Path(__file__).resolve().parents[1]


def facts(rng: np.random.Generator, means: np.ndarray) -> list[dict]:
    """Screened.facts()-shaped results whose input mean is the given values, other figures independent."""
    return [{"status": "ok", "probability": float(rng.uniform()), "guard_score": float(rng.uniform()),
             "input_mean": float(m), "input_std": float(rng.uniform()), "format": "jpeg"} for m in means]


def test_design_effect_is_one_for_independent_images_and_the_cluster_size_for_identical_patients():
    rng = np.random.default_rng(0)
    alone = rng.normal(size=400)
    assert design_effect(alone, [str(i) for i in range(400)]) == 1.0  # every image its own patient
    per_patient = np.repeat(rng.normal(size=100), 4)  # four identical images per patient
    assert design_effect(per_patient, np.repeat(np.arange(100), 4).astype(str)) == pytest.approx(4.0)
    unrelated = rng.normal(size=400)  # grouped, but the group says nothing about the value
    assert design_effect(unrelated, np.repeat(np.arange(100), 4).astype(str)) < 1.3
    assert design_effect(per_patient, ["one"] * 400) == 1.0  # a single patient: no between-patient spread to see


def test_reference_keeps_the_patient_count_and_effective_sizes_but_no_patient_id():
    rng = np.random.default_rng(1)
    patients = [f"person{i}" for i in np.repeat(np.arange(50), 4)]
    means = np.repeat(rng.uniform(0.3, 0.6, 50), 4)  # the input mean is the patient's
    ref = monitor.build_reference(facts(rng, means), prior=0.5, patients=patients)
    assert ref.patients == 50
    assert ref.effective["input_mean"] == pytest.approx(50, abs=0.5)  # 200 images, 50 patients' worth
    assert ref.effective["probability"] > 150  # independent of the patient: close to its 200 images
    text = json.dumps(ref.to_dict())
    assert "person" not in text
    assert monitor.Reference.from_dict(json.loads(text)) == ref


def test_without_patient_ids_the_images_count_as_independent():
    rng = np.random.default_rng(2)
    results = facts(rng, rng.uniform(size=60))
    for ids in (None, [""] * 60):  # none given, or a source whose samples have none (MedMNIST)
        ref = monitor.build_reference(results, prior=0.5, patients=ids)
        assert ref.patients is None
        assert ref.effective == {k: float(ref.counts[k]) for k in monitor.CONTINUOUS}


def test_a_patient_list_of_another_length_is_refused():
    rng = np.random.default_rng(3)
    with pytest.raises(monitor.MonitorError, match="one patient id per result: 59 ids for 60 results"):
        monitor.build_reference(facts(rng, rng.uniform(size=60)), prior=0.5, patients=["p"] * 59)


def test_a_version_1_reference_still_loads_with_its_images_independent_and_the_same_threshold():
    data = json.loads(monitor.BUNDLED_REFERENCE.read_text())
    old = {k: v for k, v in data.items() if k not in ("patients", "effective")} | {"version": 1}
    ref = monitor.Reference.from_dict(old, "old.json")
    assert ref.patients is None and ref.effective == {k: float(ref.counts[k]) for k in monitor.CONTINUOUS}
    independent = replace(monitor.Reference.from_dict(data), patients=None, effective=None)
    assert monitor.NullModel(ref, simulations=300).threshold(100) == \
        monitor.NullModel(independent, simulations=300).threshold(100)


@pytest.mark.parametrize("change, message", [
    ({"effective": {"input_mean": 5000.0}}, "effective sizes of input_mean are not between 1 and the figure's count"),
    ({"effective": {"probability": 0.2}}, "effective sizes of probability"),
    ({"patients": 0}, "0 patients for 1043 results"),
    ({"patients": "many"}, "malformed drift reference"),
    ({"version": 3}, "version 3 is not one this pneumoscan reads (1, 2)"),
])
def test_a_reference_with_impossible_patient_figures_is_refused_naming_the_file(change, message, tmp_path):
    data = json.loads(monitor.BUNDLED_REFERENCE.read_text())
    if "effective" in change:
        change = {"effective": data["effective"] | change["effective"]}
    path = tmp_path / "ref.json"
    path.write_text(json.dumps(data | change))
    with pytest.raises(monitor.MonitorError) as caught:
        monitor.Reference.load(path)
    assert str(path) in str(caught.value) and message in str(caught.value)


def test_a_clustered_figure_raises_the_alarm_threshold():
    """The replicate reference drawn at fewer effective images varies more, so in-distribution windows score
    higher against it: the same reference with its probability known from 150 patients' worth instead of 1037
    images alarms later."""
    ref = monitor.bundled_reference()
    independent = replace(ref, patients=None, effective=None)
    clustered = replace(ref, effective=ref.effective | {"probability": 150.0})
    low = monitor.NullModel(independent, simulations=500).threshold(100)
    high = monitor.NullModel(clustered, simulations=500).threshold(100)
    assert high > low + 0.2


def test_bundled_reference_records_its_validation_patients():
    """Regenerated from docs/results/default_run/split.csv: 1043 images of 568 patients; the probability, shared by
    a patient's images, is worth far fewer independent images than the input mean, which is not."""
    ref = monitor.bundled_reference()
    assert ref.version == monitor.REFERENCE_VERSION == 2
    assert ref.n == 1043 and ref.patients == 568
    assert 250 < ref.effective["probability"] < 330
    assert ref.effective["input_mean"] > 1000
