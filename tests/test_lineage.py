"""Lineage across pipelines run one by one, MLflow links between their runs, ``kedro lineage``,
and interrupted runs (SIGINT/SIGTERM) ending KILLED in MLflow.

The chain test runs the four pipelines one at a time in a project copy (in-process sessions,
tiny parameters, real data: the FETAL_PLANES_DB sample as source, the African dev set as
target), makes a second synthetic batch, then evaluates the *first* one, pinned with
``load_versions`` (``kedro run --load-versions synthetic_batch:<version>``), and checks
that the metrics name that batch, its adapter, base model, the ingestion outputs and the
raw files with their hashes — in the files, in MLflow and in ``kedro lineage``.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from conftest import TINY_RUN_PARAMS, copy_project, run_kedro_session

from fu_kedro import lineage as L
from fu_kedro.config import nested_params as _nested  # --params of the tiny run as a session's nested dict

TINY = [p for p in TINY_RUN_PARAMS if not p.startswith("evaluation.")] + [
    "evaluation.n_seeds=1",
    "evaluation.train.steps=4",
    "evaluation.train.eval_every=2",
    "evaluation.metrics.n_bootstrap=10",
]


def _versions(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _runs(project: Path):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")
    exp = client.get_experiment_by_name("fu_kedro")
    return client, client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


@pytest.fixture(scope="module")
def chain(tmp_path_factory, fetal_planes_db_sample, african_planes_dev):
    project = copy_project(Path(__file__).resolve().parents[1], tmp_path_factory.mktemp("lineage"))
    params = _nested(TINY + ["source_format=fetal_planes_db", f"source_path={fetal_planes_db_sample}",
                             "target_format=african", f"target_path={african_planes_dev}"])
    cwd = os.getcwd()
    os.chdir(project)  # relative paths (chain_html, kedro lineage) resolve in the copy, as under `kedro run`
    try:
        for pipeline in ("ingestion", "lora_training", "synthesis", "synthesis"):
            run_kedro_session(project, pipeline, params)
        batches = _versions(project / "data/07_model_output/synthetic_batch")
        assert len(batches) == 2
        pinned = batches[0]  # the older batch, not the latest
        run_kedro_session(project, "evaluation", params, load_versions={"synthetic_batch": pinned},
                          to_outputs=["zero_shot_metrics"])
    finally:
        os.chdir(cwd)
    return project, pinned, batches


def _record(project: Path, dataset_folder: str) -> dict:
    folder = project / dataset_folder
    return json.loads((folder / _versions(folder)[-1] / L.SIDECAR).read_text())


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_metrics_name_the_pinned_batch_and_the_chain_back_to_raw_files(chain):
    project, pinned, batches = chain
    metrics_dir = project / "data/08_reporting/zero_shot_metrics.json"
    version = _versions(metrics_dir)[-1]
    metrics = json.loads((metrics_dir / version / "zero_shot_metrics.json").read_text())
    made_from = metrics[L.EMBED_KEY]
    assert made_from["dataset"] == "zero_shot_metrics" and made_from["version"] == version
    upstream = {(u["dataset"], u.get("version")) for u in made_from["upstream"]}
    assert ("synthetic_batch", pinned) in upstream and ("synthetic_batch", batches[1]) not in upstream
    names = {u["dataset"] for u in made_from["upstream"]}
    assert {"zero_shot_predictions", "synthetic_batch", "lora_adapter", "base_model", "source_images",
            "target_images", "lora_subset", "raw source data", "raw target data"} <= names

    # the raw files: every file of the sample, with its sha256
    source_images = _record(project, "data/03_primary/source_images")
    raw = next(u for u in source_images["upstream"] if u["dataset"] == "raw source data")
    assert raw["format"] == "fetal_planes_db"
    csv = Path(raw["path"]) / "FETAL_PLANES_DB_data.csv"
    assert raw["n_files"] >= 100 and raw["digest"]

    def find_raw(entries):
        for e in entries:
            if e.get("kind") == "raw" and e["domain"] == "source":
                return e
            found = find_raw(e.get("inputs", []))
            if found:
                return found
        return None

    files = {f["path"]: f["sha256"] for f in find_raw(source_images["inputs"])["files"]}
    assert files["FETAL_PLANES_DB_data.csv"] == L.sha256_file(csv)

    # the outputs carry their record inside too: the synthetic batch (beside the manifest), the adapter
    batch_info = json.loads((project / "data/07_model_output/synthetic_batch" / pinned / "synthetic_batch"
                             / "info.json").read_text())
    assert {u["dataset"] for u in batch_info[L.EMBED_KEY]["upstream"]} >= {"lora_adapter", "base_model"}
    from safetensors import safe_open

    adapter_dir = project / "data/06_models/lora_adapter.safetensors"
    with safe_open(str(adapter_dir / _versions(adapter_dir)[-1] / "lora_adapter.safetensors"), "pt") as fh:
        adapter_made_from = json.loads(fh.metadata()[L.EMBED_KEY])
    assert {u["dataset"] for u in adapter_made_from["upstream"]} >= {"base_model", "lora_subset", "source_images"}

    # MLflow: the evaluation run names the run that made its (pinned) batch, and logged its inputs
    client, runs = _runs(project)
    assert [r.info.run_name.split(" | ")[-1] for r in runs] == [
        "pipeline ingestion", "pipeline lora_training", "pipeline synthesis", "pipeline synthesis",
        "pipeline evaluation"]  # after what differs from conf/base (fu_kedro.mlflow_ui.run_name)
    first_synthesis, evaluation = runs[2], runs[-1]
    assert evaluation.data.tags["input.synthetic_batch.version"] == pinned
    assert evaluation.data.tags["input.synthetic_batch.run_id"] == first_synthesis.info.run_id
    assert first_synthesis.data.tags["output.synthetic_batch.version"] == pinned
    logged = {d.dataset.name: d for d in evaluation.inputs.dataset_inputs}
    assert {"source_images", "target_images", "synthetic_batch"} <= set(logged)
    tags = {t.key: t.value for t in logged["synthetic_batch"].tags}
    assert tags["catalog_version"] == pinned and logged["synthetic_batch"].dataset.digest
    # the Datasets panel's schema (the manifest's columns) and profile (counts) of each image set
    batch_meta = pd.read_csv(project / "data/07_model_output/synthetic_batch" / pinned / "synthetic_batch" / "metadata.csv")
    profile = json.loads(logged["synthetic_batch"].dataset.profile)
    assert profile["num_rows"] == len(batch_meta)
    assert profile["per_label"] == {k: int(v) for k, v in batch_meta["label"].value_counts().sort_index().items()}
    schema = {c["name"] for c in json.loads(logged["synthetic_batch"].dataset.schema)["mlflow_colspec"]}
    assert {"image_id", "label", "seed"} <= schema
    source_profile = json.loads(logged["source_images"].dataset.profile)
    assert sum(source_profile["per_label"].values()) == source_profile["num_rows"] > 0
    # the name leads with what differs from conf/base (cut after four keys); every difference is a tag
    assert "fu_kedro" not in evaluation.info.run_name and evaluation.info.run_name.endswith("| pipeline evaluation")
    assert evaluation.data.tags["fu.differs.source_format"] == "fetal_planes_db"
    # a run is found from any version: search by tag
    found = client.search_runs([evaluation.info.experiment_id],
                               filter_string=f"tags.`output.synthetic_batch.version` = '{pinned}'")
    assert [r.info.run_id for r in found] == [first_synthesis.info.run_id]

    # the same chain as text, through the real CLI (project command entry point)
    proc = subprocess.run([sys.executable, "-m", "kedro", "lineage", "zero_shot_metrics"], cwd=project,
                          capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    for expected in (f"zero_shot_metrics@{version}", f"synthetic_batch@{pinned}", "lora_adapter@", "base_model@",
                     "source_images@", "lora_subset@", "target_images@", "raw source data: fetal_planes_db",
                     "raw target data: african", f"MLflow run {first_synthesis.info.run_id}"):
        assert expected in text, f"{expected!r} not in:\n{text}"
    assert f"synthetic_batch@{batches[1]}" not in text
    # nothing but the tree on stdout (the logs go to stderr: conf/logging.yml), the parameters each node read in it
    assert text.splitlines()[0].startswith(f"zero_shot_metrics@{version}  [compute_zero_shot_metrics_node"), text[:500]
    assert "params: " in text and "lora_training.lora.rank=" in text and "evaluation.n_seeds=1" in text
    # the same chain as HTML, for the report
    html = L.chain_html(metrics, project)
    assert f"synthetic_batch@{pinned}" in html and "raw source data" in html


@pytest.mark.timeout(60)
def test_lineage_command_names_unsaved_versions(project_copy):
    from click.testing import CliRunner

    from fu_kedro.cli import lineage

    cwd = os.getcwd()
    os.chdir(project_copy)
    try:
        result = CliRunner().invoke(lineage, ["zero_shot_metrics", "--no-mlflow"])
        assert result.exit_code != 0 and "has no saved version" in result.output
        result = CliRunner().invoke(lineage, ["no_such_dataset", "--no-mlflow"])
        assert result.exit_code != 0 and "is not a catalog entry" in result.output
    finally:
        os.chdir(cwd)


# --------------------------------------------------------------------------- interrupted runs
def _running_run(db: Path) -> str | None:
    """The id of a RUNNING run already named by the lineage hook (its nodes are about to run).

    Read-only SQL: an MLflow client here could race the run's own creation of the store."""
    import sqlite3

    if not db.is_file():
        return None
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5) as con:
            rows = con.execute("SELECT run_uuid, name FROM runs WHERE status = 'RUNNING'").fetchall()
    except sqlite3.Error:
        return None  # the store is being created
    # kedro-mlflow names it "ingestion"; the lineage hook "... | pipeline ingestion" (mlflow_ui.run_name)
    return next((rid for rid, name in rows if "| pipeline " in (name or "")), None)


@pytest.mark.slow  # a `kedro run` subprocess each: 1-3 min on 2 busy cores
@pytest.mark.timeout(420)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_run_ends_killed_in_mlflow(tmp_path, sig):
    project = copy_project(Path(__file__).resolve().parents[1], tmp_path)
    # big enough that the run is still reading phantoms when the signal comes
    params = "ingestion.phantom.source.n_per_class=2000,ingestion.phantom.target.n_per_class=400"
    proc = subprocess.Popen([sys.executable, "-m", "kedro", "run", "--pipelines", "ingestion", "--params", params],
                            cwd=project, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"})
    try:
        run_id = None
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None and run_id is None:
            time.sleep(1)
            run_id = _running_run(project / "mlflow.db")
        assert run_id is not None, f"no running MLflow run appeared:\n{proc.communicate(timeout=60)[0][-3000:]}"
        time.sleep(2)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode != 0, "the run finished before the signal; make it bigger"
    assert proc.returncode == 128 + sig, (proc.returncode, output[-3000:])  # 130 / 143: an interrupt, not a failure
    client, _ = _runs(project)
    ended = client.get_run(run_id)
    assert ended.info.status == "KILLED", output[-3000:]
    assert ended.info.end_time and ended.info.end_time >= ended.info.start_time
    assert ended.data.tags.get("fu.interrupted_by") == signal.Signals(sig).name
