"""User journey: kedro-viz shows the four pipelines and MLflow shows the zero-shot metrics,
in headless Chromium (``scripts/journey.py``; see its docstring).

Slow (minutes): it starts ``kedro viz run`` and ``mlflow ui``, and installs Debian's chromium
and the playwright package when missing. Skipped only when Chromium cannot be had (the
script's exit status 3); any other failure fails the test with the script's summary.

The MLflow checks browse the project's store (conf/base/mlflow.yml: ``<project>/mlflow.db``)
when it has a run with zero-shot metrics, one with input datasets and two with different LoRA
ranks. A fresh clone (CI) has none, so the test then browses a temporary store made with
MLflow's client: an evaluation run with the metric names the evaluation pipeline logs
(``zero_shot.<experiment>/<backbone>/<aug>.<metric>`` and the top-level headline metrics) and
its input datasets, and two such runs with rank 4 and 8.

kedro-viz runs on a copy of the project (conf, src) holding one saved
``synthetic_preview_grid`` figure, so the preview check has a picture to show.
"""
from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = PROJECT_ROOT / "scripts" / "journey.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _journey_module():
    spec = importlib.util.spec_from_file_location("fu_journey", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _demo_store(tmp_path: Path) -> str:
    """A temporary SQLite MLflow store: finished runs with zero-shot and headline metrics, input
    datasets, and LoRA rank 4 / 8 (what ``kedro run`` logs, made with MLflow's client)."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.entities import DatasetInput, InputTag
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    client = MlflowClient(tracking_uri=uri)
    from fu_kedro import mlflow_ui

    exp = client.create_experiment("fu_kedro", artifact_location=(tmp_path / "mlartifacts").as_uri(),
                                   tags={"mlflow.experimentKind": "custom_model_development"})
    synthesis = client.create_run(exp, run_name="images_per_class=100 | pipeline synthesis")
    client.set_terminated(synthesis.info.run_id)
    for rank, shift in (("4", 0.0), ("8", 0.02)):
        name = mlflow_ui.run_name(["__default__"], None, {"lora_training.lora.rank": int(rank)})
        run = client.create_run(exp, run_name=name)
        rid = run.info.run_id
        client.log_param(rid, "lora_training.lora.rank", rank)
        values = {"accuracy": 0.61, "f1_macro": 0.58, "roc_auc_macro": 0.83, "auc_hard_label": 0.74}
        for experiment in ("ES", "HB"):
            for metric, value in values.items():
                client.log_metric(rid, f"zero_shot.{experiment}/resnet18/aug.{metric}", value + shift, step=0)
        headline = {"fidelity": 0.95 + shift, "cas_accuracy": 0.9, "accuracy_ES": 0.61,
                    "accuracy_HB": 0.66 + shift, "HB_minus_ES_accuracy": 0.05 + shift,
                    "HB_minus_ES_accuracy_ci_low": 0.01, "HB_minus_ES_accuracy_ci_high": 0.09}
        for key, value in headline.items():
            client.log_metric(rid, key, value, step=0)
        datasets = []
        for name in ("source_images", "target_images", "synthetic_batch"):
            ds = MetaDataset(source=CodeDatasetSource(tags={"demo": name}), name=name, digest=f"{name[:6]}0000")
            datasets.append(DatasetInput(dataset=ds._to_mlflow_entity(), tags=[
                InputTag("mlflow.data.context", "input"), InputTag("catalog_version", "2026-11-28T00.00.00.000Z")]))
        client.log_inputs(rid, datasets=datasets)
        client.set_tag(rid, "input.synthetic_batch.run_id", synthesis.info.run_id)
        mlflow_ui.log_summary(client, rid, name, {"zero_shot_metrics": "2026-11-28T00.00.00.000Z"}, {})
        client.set_terminated(rid)
    return uri


def _viz_project(tmp_path: Path) -> Path:
    """A project copy with one saved ``synthetic_preview_grid`` (for the kedro-viz preview)."""
    from conftest import copy_project
    from matplotlib.figure import Figure

    project = copy_project(PROJECT_ROOT, tmp_path / "project")
    version = "2026-11-28T00.00.00.000Z"
    folder = project / "data" / "08_reporting" / "synthetic_preview_grid.png" / version
    folder.mkdir(parents=True)
    fig = Figure(figsize=(6, 4), dpi=100)
    for i, ax in enumerate(fig.subplots(2, 3).ravel()):
        ax.imshow([[i, 5 - i], [2, 3]], cmap="gray")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.savefig(folder / "synthetic_preview_grid.png")
    _saved_models_and_report(project, version)
    return project


def _saved_models_and_report(project: Path, version: str) -> None:
    """A saved synthetic batch and (untrained) tiny base model, for their previews, and an
    evaluation report with a wide per-class table and a lineage section, for the width check."""
    import pandas as pd
    from kedro.io.core import Version

    from fu_kedro.data_sources import generate_phantoms
    from fu_kedro.datasets import DiffusionModelDataset, ImageSetDataset
    from fu_kedro.lineage import chain_html
    from fu_kedro.models.base_model import BaseModel
    from fu_kedro.models.diffusion import TINY_CONFIG, build_pipeline_from_config
    from fu_kedro.pipelines.evaluation import report

    batch = generate_phantoms("source", 3, 64, seed=5)
    ImageSetDataset(str(project / "data/07_model_output/synthetic_batch"), Version(None, version)).save(batch)
    info = {"kind": "tiny", "name": "untrained tiny base", "resolution": 32,
            "trained_on": {"corpus": "none", "images": 0, "per_class": {"brain": 1, "femur": 1, "thorax": 1}}}
    DiffusionModelDataset(str(project / "data/06_models/base_model"), Version(None, version)).save(
        BaseModel(build_pipeline_from_config(TINY_CONFIG, 32, 0), info))
    per_class = pd.DataFrame([{"class": c, **{f"measure_with_a_long_name_{i}": 0.5 for i in range(14)}}
                              for c in ("abdomen", "brain", "femur", "thorax", "other")])
    made_from = {"dataset": "zero_shot_metrics", "version": version, "node": "compute_zero_shot_metrics_node",
                 "run": {}, "inputs": []}
    page = report.render_html([("Per class", report._table(report._classes_as_columns(per_class))),
                               ("Lineage", chain_html(made_from, project, heading=False))], "report")
    folder = project / "data/08_reporting/evaluation_report.html" / version
    folder.mkdir(parents=True)
    (folder / "evaluation_report.html").write_text(page)


def _run_script(cmd: list[str], timeout: float) -> tuple[int, str]:
    """Run the script; on a time-out (or pytest-timeout) stop it with SIGTERM first, so that
    it stops the servers it started (SIGKILL, as ``subprocess.run`` does, would orphan them)."""
    proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        output, _ = proc.communicate(timeout=timeout)
        return proc.returncode, output
    except subprocess.TimeoutExpired:
        proc.terminate()
        output, _ = proc.communicate(timeout=60)
        pytest.fail(f"scripts/journey.py took more than {timeout:.0f} s:\n{output[-6000:]}")
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.mark.slow
@pytest.mark.timeout(1800)  # installs Chromium when missing (about 2 min here); about 1 min once installed
def test_user_journey(tmp_path):
    journey = _journey_module()
    project_uri = f"sqlite:///{(PROJECT_ROOT / 'mlflow.db').as_posix()}"
    found = (journey.find_zero_shot_run(project_uri)[0] and journey.find_dataset_run(project_uri)[0]
             and journey.find_rank_pair(project_uri)[0])
    uri = project_uri if found else _demo_store(tmp_path)
    out = tmp_path / "journey"  # never overwrite the committed docs/journey/ screenshots
    project = _viz_project(tmp_path)
    cmd = ["nice", "-n", "19", sys.executable, str(SCRIPT), "--out", str(out), "--tracking-uri", uri,
           "--project", str(project), "--timeout", "300"]
    returncode, output = _run_script(cmd, timeout=1700)
    if returncode == journey.EXIT_NO_BROWSER:
        reason = next((line for line in output.splitlines() if line.startswith("JOURNEY-NO-BROWSER")), output[-500:])
        pytest.skip(f"headless Chromium not available: {reason}")
    assert returncode == 0, f"user journey failed (exit {returncode}):\n{output[-6000:]}"
    assert "checks passed -> PASS" in output
    for name in ["kedro_viz.png", "kedro_viz_preview.png", "kedro_viz_preview_synthetic_batch.png",
                 "kedro_viz_preview_base_model.png", "mlflow_run.png", "mlflow_run_datasets.png",
                 "mlflow_compare.png", "mlflow_compare_summary.png", "mlflow_runs.png", "report_top.png",
                 *(f"kedro_viz_{p}.png" for p in journey.PIPELINES)]:
        shot = out / name
        assert shot.is_file() and shot.read_bytes()[:8] == PNG_MAGIC, f"{shot} missing or not a PNG"
        assert shot.stat().st_size > 10_000, f"{shot} is suspiciously small (blank page?)"
