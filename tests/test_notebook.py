"""notebooks/explore_run.ipynb runs top to bottom on a real (tiny) run of the four pipelines.

A copy of the project (``project_copy``: conf, src, MLflow in the copy) runs
``kedro run`` with tiny parameters (phantom data, a few training steps, 2 images per
class; about 30 s), then the notebook is executed in a Jupyter kernel from the copy's
``notebooks/`` folder, as a reader would open it. It must find the copy (not this
checkout), load every entry it shows and draw the image grid and the tables.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from conftest import TINY_EVAL_PARAMS, TINY_RUN_PARAMS
from nbclient import NotebookClient

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "explore_run.ipynb"

# ~30 s on 2 CPU cores: every node of the four pipelines runs, on tiny data
TINY_RUN = ",".join(TINY_RUN_PARAMS + TINY_EVAL_PARAMS)


def _outputs(cell) -> tuple[str, set[str]]:
    """All text a cell printed or displayed, and the MIME types it displayed."""
    text, mimes = [], set()
    for out in cell.get("outputs", []):
        if out.output_type == "stream":
            text.append(out.text)
        elif out.output_type in ("display_data", "execute_result"):
            mimes |= set(out.data)
            text.append(out.data.get("text/html", "") + out.data.get("text/plain", ""))
    return "\n".join(text), mimes


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_notebook_runs_on_a_tiny_run_of_all_pipelines(project_copy):
    run = subprocess.run([sys.executable, "-m", "kedro", "run", "--params", TINY_RUN], cwd=project_copy,
                         capture_output=True, text=True, timeout=500,
                         env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"})
    assert run.returncode == 0, f"tiny kedro run failed:\n{(run.stdout + run.stderr)[-4000:]}"

    (project_copy / "notebooks").mkdir()
    shutil.copy(NOTEBOOK, project_copy / "notebooks" / NOTEBOOK.name)
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    # the pin cell, as a reader uses it: the one saved synthetic batch, named by its version
    pinned = sorted(p.name for p in (project_copy / "data/07_model_output/synthetic_batch").iterdir())[-1]
    pin_cell = next(c for c in notebook.cells if c.cell_type == "code" and c.source.count("PIN = {}") == 1)
    pin_cell.source = pin_cell.source.replace("PIN = {}", f"PIN = {{'synthetic_batch': '{pinned}'}}")
    # raises CellExecutionError, with the cell and its traceback, if any cell fails
    NotebookClient(notebook, timeout=300, kernel_name="python3",
                   resources={"metadata": {"path": str(project_copy / "notebooks")}}).execute()

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    printed = "\n".join(_outputs(cell)[0] for cell in code)
    assert f"at {project_copy}" in printed  # the copy's catalog, not this checkout's
    assert "never saved" not in printed and "nothing saved yet" not in printed
    assert any("image/png" in _outputs(cell)[1] for cell in code)  # the grid of synthetic images
    assert "abdomen_00000" in printed  # the manifest
    assert f"synthetic_batch: pinned version {pinned}" in printed
    assert "generated with this adapter: True; with this base model: True" in printed  # the lineage
    assert "ES/resnet18/aug" in printed and "HB/resnet18/aug" in printed  # zero-shot metrics, the paper's two arms
    assert "HB/resnet18/aug - ES/resnet18/aug" in printed  # and their comparison
    assert "cas_accuracy" in printed  # synthetic quality
