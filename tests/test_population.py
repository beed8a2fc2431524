"""The intended population: a DICOM header's age puts an image inside or outside what the model is for."""

from __future__ import annotations

import pytest
from pydicom.dataset import Dataset

from pneumoscan.data.images import patient_age_years
from pneumoscan.pipeline import age_band
from pneumoscan.record import ModelRecord, Population


def _header(**elements) -> Dataset:
    ds = Dataset()
    for key, value in elements.items():
        setattr(ds, key, value)
    return ds


@pytest.mark.parametrize(("elements", "years"), [
    ({"PatientAge": "074Y"}, 74.0),
    ({"PatientAge": "018M"}, 1.5),
    ({"PatientAge": "052W"}, 52 * 7 / 365.25),
    ({"PatientAge": "010D"}, 10 / 365.25),
    ({"PatientBirthDate": "20200101", "StudyDate": "20230101"}, 1096 / 365.25),
    ({"PatientBirthDate": "20200101", "AcquisitionDate": "20210101"}, 366 / 365.25),
    ({"PatientAge": "74"}, None),  # malformed: unknown, not a reason to refuse
    ({"PatientBirthDate": "20230101", "StudyDate": "20200101"}, None),  # study before birth
    ({}, None),
])
def test_the_age_comes_from_patient_age_or_the_birth_and_study_dates(elements, years):
    got = patient_age_years(_header(**elements))
    assert got == (None if years is None else pytest.approx(years))


def test_ages_1_to_5_are_inside_and_the_bounds_say_why_others_are_not():
    children = Population(1.0, 6.0, "the ages 1 to 5 years the model was trained and tested on")
    assert children.check(None) is None  # no age: not judged
    assert children.check(1.0) is None and children.check(5.99) is None
    assert children.check(74.0) == ("patient age 74 years is outside the ages 1 to 5 years the model was trained "
                                    "and tested on")
    assert children.check(0.5) == ("patient age 6 months is outside the ages 1 to 5 years the model was trained "
                                   "and tested on")
    assert Population(max_age_years=18).check(30) == "patient age 30 years is outside ages 0 to under 18 years"


def test_the_population_round_trips_through_the_model_record(tiny_model):
    record = tiny_model.record.with_(population=Population(1.0, 6.0, "children"))
    assert ModelRecord.from_json(record.to_json()).population == Population(1.0, 6.0, "children")


def test_the_bundled_model_is_for_children_aged_1_to_5():
    from pneumoscan import load_model

    population = load_model().record.population
    assert (population.min_age_years, population.max_age_years) == (1.0, 6.0)


def test_monitoring_sees_an_age_band_never_the_age():
    assert [age_band(a) for a in (None, 0.5, 3.0, 12.0, 74.0)] == [None, "under 1", "1-5", "6-17", "18+"]
