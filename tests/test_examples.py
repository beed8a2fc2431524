"""The example notebook runs as written, in quick mode on the shared data, so it cannot rot."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "quickstart.ipynb"
KERMANY = ROOT.parent / "shared" / "data" / "chest_xray"


@pytest.mark.integration
@pytest.mark.slow
def test_quickstart_notebook_trains_evaluates_and_screens(tmp_path, monkeypatch):
    if not KERMANY.is_dir():
        if os.environ.get("CI"):
            pytest.fail(f"{KERMANY} is missing: the notebook test needs ../shared/data in CI")
        pytest.skip(f"{KERMANY} not present")
    import nbformat
    from nbclient import NotebookClient

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    monkeypatch.setenv("PNEUMOSCAN_DATA", str(KERMANY))
    NotebookClient(notebook, timeout=1200, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()

    assert (tmp_path / "runs" / "quick" / "model.safetensors").is_file()
    assert sorted(p.name for p in (tmp_path / "report").glob("*.png")), "evaluate --report wrote no plots"
    outputs = "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                      for out in cell.get("outputs", []))
    assert "bundled model" in outputs and "PNEUMONIA" in outputs
    images = [out for cell in notebook.cells if cell.cell_type == "code" for out in cell.get("outputs", [])
              if "image/png" in out.get("data", {})]
    assert len(images) >= 3, "expected the report's plots and two heatmaps in the notebook's outputs"


def test_notebook_is_valid_and_says_how_to_get_a_gpu():
    import nbformat

    notebook = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(notebook)
    text = "\n".join(cell.source for cell in notebook.cells)
    assert "GPU runtime" in text
    assert "configs' / 'quick.yaml'" in text or "quick.yaml" in text
    assert all(not cell.get("outputs") for cell in notebook.cells if cell.cell_type == "code"), \
        "commit the notebook without outputs"
