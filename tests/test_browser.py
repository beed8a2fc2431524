"""The web page in a real browser: headless system Chromium driven by Playwright against a live server.

Playwright's own browser download is not available offline, so the Debian ``chromium`` binary is used.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from conftest import KERMANY, synthetic_xray
from PIL import Image

from pneumoscan import load_model
from pneumoscan.data.images import FORMAT_NAMES
from pneumoscan.serve import create_app, serve_in_thread

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is not installed")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(tiny_model_path):
    """The tiny model, its PNEUMONIA logit made to grow with every feature so that Grad-CAM draws something."""
    model = load_model(tiny_model_path)
    head = model.network.get_classifier()
    with torch.no_grad():
        head.weight[1].fill_(0.05)
        head.weight[0].fill_(-0.05)
    with serve_in_thread(create_app(model)) as url:
        yield url


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1360, "height": 900}, device_scale_factor=1)
    page = context.new_page()
    yield page
    context.close()


def xray_file(tmp_path: Path) -> Path:
    """A real test X-ray when the dataset is beside the repository (it makes a truthful screenshot), else a
    synthetic one; the assertions hold for either."""
    real = sorted((KERMANY / "test" / "PNEUMONIA").glob("*.jpeg"))[:1] if KERMANY.is_dir() else []
    if real:
        return real[0]
    path = tmp_path / "synthetic-xray.png"
    Image.fromarray(np.round(synthetic_xray(512, 7, opacity=0.4) * 255).astype(np.uint8), "L").save(path)
    return path


def shown_probability(p: float) -> str:
    """How the page prints a probability: one decimal, never a flat 0% or 100%."""
    return ">99.9%" if p >= 0.9995 else "<0.1%" if p < 0.0005 else f"{100 * p:.1f}%"


def save_screenshot(page, tmp_path: Path, name: str) -> Path:
    shot = tmp_path / name
    page.screenshot(path=str(shot), full_page=True)
    target = os.environ.get("PNEUMOSCAN_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(target) / name)
    return shot


def test_uploading_an_xray_shows_probability_decisions_and_heatmap(page, server, tmp_path):
    image = xray_file(tmp_path)
    expected = httpx.post(
        f"{server}/v1/predict", files={"file": (image.name, image.read_bytes())}, timeout=60
    ).json()
    heatmap = httpx.get(f"{server}/v1/model").json()["heatmap"]

    page.goto(server + "/")
    page.get_by_text("tiny-test-model").wait_for()
    assert page.get_by_text("Screening aid, not a diagnosis.").is_visible()
    page.set_input_files("#file-input", str(image))
    page.locator("#result").wait_for(state="visible", timeout=60_000)

    assert page.locator("#probability").inner_text() == shown_probability(expected["probability"])
    rows = page.locator("#decisions tr")
    assert rows.count() == 2
    for name in ("screening", "balanced"):
        row = page.locator(f'#decisions tr[data-operating-point="{name}"]')
        assert row.inner_text().split()[-1] == expected["decisions"][name]
    assert page.locator("#xray").evaluate("img => img.complete && img.naturalWidth > 0")
    if heatmap:
        overlay = page.locator("#heatmap")
        overlay.wait_for(state="visible")
        assert overlay.get_attribute("src").startswith("data:image/png;base64,")
        assert overlay.evaluate("img => img.complete && img.naturalWidth > 0")
        page.locator("#opacity").fill("30")
        assert overlay.evaluate("img => img.style.opacity") == "0.3"
        assert page.locator("#opacity-value").inner_text() == "30%"
        page.locator("#opacity").fill("70")
        page.locator("#opacity").blur()
    shot = save_screenshot(page, tmp_path, "serve-result.png")
    assert shot.stat().st_size > 10_000


def test_a_file_that_is_not_an_xray_shows_the_servers_reason(page, server, tmp_path):
    notes = tmp_path / "notes.png"
    notes.write_text("not an image\n")
    page.goto(server + "/")
    assert FORMAT_NAMES in page.locator("#dropzone").inner_text()  # the page names the formats the API accepts
    page.set_input_files("#file-input", str(notes))
    error = page.locator("#result-error")
    error.wait_for(state="visible", timeout=30_000)
    assert f"notes.png: not a readable image (expected {FORMAT_NAMES})" in error.inner_text()
    assert page.locator("#dropzone").is_visible()  # nothing to show: back to the drop zone
    save_screenshot(page, tmp_path, "serve-error.png")


@pytest.fixture(scope="module")
def keyed_server(tiny_model, tmp_path_factory):
    """A server that needs an API key; yields (url, key)."""
    from pneumoscan.serve import auth

    keys = tmp_path_factory.mktemp("browser-keys") / "keys.json"
    key = auth.add_key(keys, "reading-room")
    with serve_in_thread(create_app(tiny_model, api_keys=keys)) as url:
        yield url, key


def test_the_page_asks_for_the_key_and_keeps_it_only_in_the_tab(browser, keyed_server, tmp_path):
    url, key = keyed_server
    image = xray_file(tmp_path)
    expected = httpx.post(f"{url}/v1/predict", files={"file": (image.name, image.read_bytes())},
                          headers={"Authorization": f"Bearer {key}"}, timeout=60).json()
    context = browser.new_context(viewport={"width": 1360, "height": 900})
    page = context.new_page()
    page.goto(url + "/")
    form = page.locator("#key-form")
    form.wait_for(state="visible", timeout=30_000)
    assert "only clients with a key" in form.inner_text()
    assert page.locator("#api-key").get_attribute("type") == "password"

    page.fill("#api-key", "psk_not-the-key")
    page.click("#key-submit")
    page.get_by_text("The key was refused (invalid API key)").wait_for(timeout=30_000)
    assert form.is_visible()

    page.fill("#api-key", key)
    page.click("#key-submit")
    page.get_by_text("tiny-test-model").wait_for(timeout=30_000)
    assert form.is_hidden()
    assert page.evaluate("sessionStorage.getItem('pneumoscan-api-key')") == key
    assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""

    page.set_input_files("#file-input", str(image))
    page.locator("#result").wait_for(state="visible", timeout=60_000)
    assert page.locator("#probability").inner_text() == shown_probability(expected["probability"])
    save_screenshot(page, tmp_path, "serve-key.png")

    other = context.new_page()  # another tab: sessionStorage is per tab, so it asks again
    other.goto(url + "/")
    other.locator("#key-form").wait_for(state="visible", timeout=30_000)
    context.close()


@pytest.fixture(scope="module")
def normal_server(tiny_model_path):
    """The tiny model made to decide NORMAL on everything: the page must say why no heatmap is drawn."""
    model = load_model(tiny_model_path)
    head = model.network.get_classifier()
    with torch.no_grad():
        head.weight[1].fill_(-0.05)
        head.weight[0].fill_(0.05)
    with serve_in_thread(create_app(model)) as url:
        yield url


def test_a_normal_decision_shows_why_no_heatmap_is_drawn(page, normal_server, tmp_path):
    image = xray_file(tmp_path)
    page.goto(normal_server + "/")
    page.get_by_text("tiny-test-model").wait_for()
    page.set_input_files("#file-input", str(image))
    page.locator("#result").wait_for(state="visible", timeout=60_000)
    assert page.locator('#decisions tr[data-operating-point="screening"]').inner_text().split()[-1] == "NORMAL"
    note = page.locator("#heatmap-note")
    assert note.is_visible()
    assert note.inner_text().startswith("no heatmap: drawn for PNEUMONIA decisions only, this one is NORMAL")
    assert page.locator("#heatmap").is_hidden()
