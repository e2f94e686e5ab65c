"""Inputs that do not belong together stop ``kedro run`` (``prerequisites.on_lineage_mismatch``).

Real ``kedro run`` commands in a project copy, as a user types them: a default run (tiny
parameters, phantoms), then ``ingestion`` on the FETAL_PLANES_DB sample, then ``evaluation``,
which would load the sample's ``source_images`` beside the phantom run's synthetic batch.
By default (``fail``) it stops before any node, naming both versions and printing a
``--load-versions`` command, which the test runs; under ``warn`` it goes on, and the report's
first block is a red banner naming the mix, the MLflow run has the tag and ``kedro lineage``
marks the mixed inputs.
"""
from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import TINY_EVAL_PARAMS, TINY_RUN_PARAMS, copy_project

from fu_kedro import lineage as L
from fu_kedro.tracking import MISMATCH_TAG

EVAL = ",".join(TINY_EVAL_PARAMS)
INGESTION = ",".join(p for p in TINY_RUN_PARAMS if p.startswith("ingestion."))
REPORT = "data/08_reporting/evaluation_report.html"
METRICS = "data/08_reporting/zero_shot_metrics.json"


def _kedro(project: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    # wide console: rich would otherwise wrap the printed commands
    env = {**os.environ, "COLUMNS": "5000", "PYTHONPATH": str(project / "src")}
    return subprocess.run([sys.executable, "-m", "kedro", *args], cwd=project, env=env, capture_output=True,
                          text=True, timeout=timeout)


def _versions(project: Path, rel: str) -> list[str]:
    root = project / rel
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []


@pytest.fixture(scope="module")
def mixed(tmp_path_factory, fetal_planes_db_sample):
    """A default run (phantoms, V1), then ingestion on the FETAL_PLANES_DB sample (V2)."""
    project = copy_project(Path(__file__).resolve().parents[1], tmp_path_factory.mktemp("mismatch"))
    run = _kedro(project, "run", "--params", ",".join(TINY_RUN_PARAMS + TINY_EVAL_PARAMS))
    assert run.returncode == 0, run.stderr[-3000:]
    [v1] = _versions(project, "data/03_primary/source_images")
    run = _kedro(project, "run", "--pipeline", "ingestion", "--params",
                 f"{INGESTION},source_format=fetal_planes_db,source_path={fetal_planes_db_sample}")
    assert run.returncode == 0, run.stderr[-3000:]
    [v2] = [v for v in _versions(project, "data/03_primary/source_images") if v != v1]
    return project, v1, v2


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_mixed_inputs_stop_the_run_and_the_printed_load_versions_command_works(mixed):
    project, v1, v2 = mixed
    before = _versions(project, METRICS)
    run = _kedro(project, "run", "--pipeline", "evaluation", "--params", EVAL)
    out = run.stdout + run.stderr
    assert run.returncode != 0, out[-3000:]
    assert "MissingPrerequisitesError" in out and "Nothing was run" in out
    assert "Running node" not in out and _versions(project, METRICS) == before  # stopped before any node
    assert f"`source_images` version {v2}" in out and f"`synthetic_batch` version {v1}" in out
    assert "kedro run --pipelines ingestion,lora_training,synthesis" in out  # fix 1: re-run upstream
    [command] = [line.strip() for line in out.splitlines()
                 if line.strip().startswith("kedro run") and "--load-versions" in line]  # fix 2
    assert f"source_images:{v1}" in command and f"target_images:{v1}" in command

    args = shlex.split(command)
    assert args[:2] == ["kedro", "run"]
    run = _kedro(project, *args[1:])
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    [new] = [v for v in _versions(project, METRICS) if v not in before]
    record = json.loads((project / METRICS / new / L.SIDECAR).read_text())
    loaded = {(u["dataset"], u.get("version")) for u in record["upstream"] if u.get("kind") == "versioned"}
    assert ("source_images", v1) in loaded and ("source_images", v2) not in loaded
    assert "lineage_mismatch" not in record["run"]


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_warn_runs_on_and_says_so_in_the_report_mlflow_and_kedro_lineage(mixed):
    project, v1, v2 = mixed
    reports = _versions(project, REPORT)
    run = _kedro(project, "run", "--pipeline", "evaluation", "--params",
                 f"{EVAL},prerequisites.on_lineage_mismatch=warn")
    assert run.returncode == 0, (run.stdout + run.stderr)[-3000:]
    [new] = [v for v in _versions(project, REPORT) if v not in reports]
    page = (project / REPORT / new / "evaluation_report.html").read_text()
    first = page.split("<body>", 1)[1]
    assert first.startswith("<div class='banner' id='lineage-mismatch'>"), first[:300]
    banner = first[:first.index("</div>")]
    assert v1 in banner and v2 in banner

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("fu_kedro")
    [latest] = client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"], max_results=1)
    tag = latest.data.tags.get(MISMATCH_TAG, "")
    assert v1 in tag and v2 in tag and "synthetic_batch" in tag
    earlier = client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"], max_results=1)
    assert MISMATCH_TAG not in earlier[0].data.tags  # the default run had no mix

    run = _kedro(project, "lineage", "zero_shot_metrics", "--no-mlflow")
    assert run.returncode == 0, run.stderr[-3000:]
    assert f"source_images@{v2}  <- {L.MIXED}" in run.stdout
    assert f"synthetic_batch@{v1}  <- {L.MIXED}" in run.stdout
    assert f"{L.MIXED}S: made from inputs that do not belong together" in run.stdout


# --------------------------------------------------------------------------- the marks, on records
MIX = {"text": "`source_images` version V2 does not come from this run's data",
       "versions": {"source_images": "V2", "synthetic_batch": "V1"}}


def _metrics_record(mixes: list[dict] | None) -> dict:
    run = {"mlflow_run_id": "r1", **({"lineage_mismatch": mixes} if mixes else {})}
    inputs = [{"kind": "in_run", "dataset": "classifier_data", "node": "prepare_classifier_data_node", "inputs": [
        {"kind": "versioned", "dataset": "source_images", "version": "V2", "path": None},
        {"kind": "versioned", "dataset": "target_images", "version": "V2", "path": None},
        {"kind": "versioned", "dataset": "synthetic_batch", "version": "V1", "path": None}]}]
    return {"dataset": "zero_shot_metrics", "version": "V3", "node": "compute_zero_shot_metrics_node", "run": run,
            "inputs": inputs}


def test_the_report_opens_with_the_mix_banner_only_when_the_run_had_a_mix():
    from fu_kedro.pipelines.evaluation.report import lineage_mix_banner, render_html

    banner = lineage_mix_banner({L.EMBED_KEY: _metrics_record([MIX])})
    assert banner.startswith("<div class='banner' id='lineage-mismatch'>") and "version V2" in banner
    page = render_html([("x", "y")], "t", banner + "<div class='banner' id='low-fidelity'>gate</div>")
    assert page.split("<body>", 1)[1].startswith("<div class='banner' id='lineage-mismatch'>")
    assert lineage_mix_banner({L.EMBED_KEY: _metrics_record(None)}) == ""
    assert lineage_mix_banner({}) == ""


def test_kedro_lineage_marks_the_mixed_inputs_once():
    text = "\n".join(L.render_text(L.mark_mixed(L.record_step(_metrics_record([MIX])))))
    assert f"source_images@V2  <- {L.MIXED}" in text and f"synthetic_batch@V1  <- {L.MIXED}" in text
    assert f"target_images@V2  <- {L.MIXED}" not in text
    assert text.count(f"{L.MIXED}S:") == 1
    clean = "\n".join(L.render_text(L.mark_mixed(L.record_step(_metrics_record(None)))))
    assert L.MIXED not in clean
    assert L.MIXED in L.chain_html({L.EMBED_KEY: _metrics_record([MIX])})
