"""The model card: one text in docs/ and in the package, served by GET /v1/model/card for the bundled model only."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import httpx
import pytest

from pneumoscan.serve import create_app, serve_in_thread

ROOT = Path(__file__).resolve().parents[1]
PACKAGED = ROOT / "src" / "pneumoscan" / "weights" / "model_card.md"
DOCS = ROOT / "docs" / "model_card.md"
SHA256 = (ROOT / "src" / "pneumoscan" / "weights" / "default.sha256").read_text().split()[0]


def test_docs_copy_is_the_packaged_card():
    assert DOCS.read_bytes() == PACKAGED.read_bytes(), (
        "docs/model_card.md and src/pneumoscan/weights/model_card.md differ: edit the packaged one, then "
        "cp src/pneumoscan/weights/model_card.md docs/model_card.md"
    )


def test_card_names_the_bundled_file_and_has_the_sections():
    card = PACKAGED.read_text(encoding="utf-8")
    assert SHA256 in card
    assert "default.safetensors" in card and "EfficientNet-Lite0" in card
    headings = set(re.findall(r"^## (.+)$", card, flags=re.M))
    for section in ("Model details", "Intended use", "Out-of-scope uses", "Training data",
                    "Evaluation data and protocol", "Quantitative analyses", "Known limitations",
                    "Ethical considerations", "Re-checking at a new site"):
        assert section in headings, section
    assert "pneumoscan evaluate --data site.csv" in card
    assert "bfloat16" in card  # the test figures state their arithmetic


def test_card_is_package_data_and_linked_from_readme():
    if sys.version_info < (3, 11):
        pytest.skip("tomllib needs Python 3.11")
    import tomllib

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "weights/*.md" in pyproject["tool"]["setuptools"]["package-data"]["pneumoscan"]
    assert "(docs/model_card.md)" in (ROOT / "README.md").read_text(encoding="utf-8")


def test_card_output_line_matches_the_model_file():
    """The calibration and thresholds the card quotes are the bundled file's own, read from its record."""
    from pneumoscan.predict import load_model

    record = load_model().record
    card = PACKAGED.read_text(encoding="utf-8")
    output = re.search(r"^- \*\*Output:\*\*(.+?)(?=^- \*\*)", card, flags=re.M | re.S).group(1)
    assert f"temperature {record.temperature:.3f}" in output
    assert f"bias {record.bias:+.3f}" in output
    assert f"**screening** {record.thresholds['screening']:.4f}" in output
    assert f"**balanced** {record.thresholds['balanced']:.4f}" in output
    table = re.search(r"screening threshold ([0-9.]+) \| balanced threshold ([0-9.]+)", card)
    assert table.groups() == (f"{record.thresholds['screening']:.4f}", f"{record.thresholds['balanced']:.4f}")


def test_card_test_specificity_agrees_with_the_reported_result():
    """The limitation's test specificity is the screening specificity in docs/results/default_test.json."""
    import json

    result = json.loads((ROOT / "docs" / "results" / "default_test.json").read_text())
    card = PACKAGED.read_text(encoding="utf-8")
    quoted = re.search(r"specificity fell from [0-9.]+ \(validation\) to ([0-9.]+)", card).group(1)
    assert quoted == f"{result['screening']['specificity']:.3f}"


@pytest.fixture(scope="module")
def default_server():
    from pneumoscan import load_model

    with serve_in_thread(create_app(load_model(precision="float32"))) as url:
        yield url


@pytest.fixture(scope="module")
def tiny_server(tiny_model):
    with serve_in_thread(create_app(tiny_model)) as url:
        yield url


def test_bundled_model_serves_its_card(default_server):
    info = httpx.get(f"{default_server}/v1/model", timeout=30).json()
    assert info["sha256"] == SHA256
    assert info["model_card"] == "/v1/model/card"
    response = httpx.get(f"{default_server}{info['model_card']}", timeout=30)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/markdown; charset=utf-8"
    assert response.content == PACKAGED.read_bytes()
    assert response.headers["x-content-type-options"] == "nosniff"


def test_other_models_have_no_card(tiny_server):
    info = httpx.get(f"{tiny_server}/v1/model", timeout=30).json()
    assert info["model_card"] is None
    response = httpx.get(f"{tiny_server}/v1/model/card", timeout=30)
    assert response.status_code == 404
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {
        "error": "no model card for tiny-test-model: the card describes the bundled default model only"
    }
