"""What the MLflow UI shows (fu_kedro.mlflow_ui): run names that lead with what differs from
conf/base, summary.png at the artifact root, the experiment's tag, and a copied project that
never writes its artifacts into the folder it was copied from."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import yaml
from conftest import TINY_RUN_PARAMS, copy_project, project_parameters, run_kedro_session

from fu_kedro import mlflow_ui
from fu_kedro.config import nested_params

TINY_INGESTION = nested_params([p for p in TINY_RUN_PARAMS if p.startswith("ingestion.")])


def test_a_plain_run_is_named_default_and_a_changed_one_by_its_changes():
    base = project_parameters("base")
    assert mlflow_ui.run_name(["__default__"], None, mlflow_ui.differences(base, base)) == "default"
    changed = project_parameters("base", {"lora_training": {"lora": {"max_steps": 20}}})
    diffs = mlflow_ui.differences(changed, base)
    assert diffs == {"lora_training.lora.max_steps": 20}
    assert mlflow_ui.run_name(["lora_training"], "local", diffs) == "lora.max_steps=20 | pipeline lora_training"
    assert mlflow_ui.run_name(["ingestion"], None, {}) == "pipeline ingestion"
    assert mlflow_ui.run_name(["__default__"], None, diffs) == "lora.max_steps=20"
    # another pipeline's parameter: after the ones of the pipelines that ran, with its block name
    diffs = {"synthesis.steps": 2, "evaluation.train.steps": 4, "seed": 1}
    assert mlflow_ui.run_name(["evaluation"], None, diffs) == "seed=1, train.steps=4, synthesis.steps=2 | pipeline evaluation"
    # the --params keys first, as typed: what is varied from run to run leads
    typed = ["evaluation.train.steps", "seed"]
    assert mlflow_ui.run_name(["evaluation"], None, diffs, typed) == "train.steps=4, seed=1, synthesis.steps=2 | pipeline evaluation"
    many = {f"evaluation.k{i}": i for i in range(6)}
    assert mlflow_ui.run_name(["__default__"], "paper", many) == "env paper | k0=0, k1=1, k2=2, k3=3 +2 more"


def test_summary_figure_draws_headline_metrics_or_lists_the_others(tmp_path):
    fig = mlflow_ui.summary_figure("default", {"fidelity": 0.9, "hybrid_minus_baseline_accuracy": 0.04,
                                               "hybrid_minus_baseline_accuracy_ci_low": -0.01,
                                               "hybrid_minus_baseline_accuracy_ci_high": 0.09,
                                               "zero_shot.hybrid.accuracy": 0.6}, {"zero_shot_metrics": "v"}, {})
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["fidelity", "hybrid_minus_baseline_accuracy"]
    fig = mlflow_ui.summary_figure("pipeline ingestion", {"ingestion.source.read": 60.0}, {}, {})
    assert "ingestion.source.read = 60" in fig.axes[0].texts[0].get_text()


def test_a_one_seed_run_logs_its_headline_differences_without_an_interval():
    from fu_kedro.tracking.mlflow_run import _headline_metrics

    def experiment(name, acc):
        return {"experiment": name, "backbone": "resnet18", "augmentation": True,
                "all_classes": {"mean": {"accuracy": acc, "f1_macro": acc}}}

    metrics = {"experiments": {"ES/r": experiment("ES", 0.4), "HB/r": experiment("HB", 0.7)},
               "differences": {"HB/r - ES/r": {"experiment": "HB/r", "baseline": "ES/r", "all_classes": {
                   "accuracy": {"mean": 0.3, "ci": [None, None]}}}}}  # one seed: no interval
    out = _headline_metrics(metrics)
    assert out == {"accuracy_ES": 0.4, "f1_macro_ES": 0.4, "accuracy_HB": 0.7, "f1_macro_HB": 0.7,
                   "HB_minus_ES_accuracy": 0.3}
    metrics["differences"]["HB/r - ES/r"]["all_classes"]["accuracy"]["ci"] = [0.1, 0.5]
    assert _headline_metrics(metrics)["HB_minus_ES_accuracy_ci_high"] == 0.5


def _use_own_store(project: Path) -> None:
    """conf/local/mlflow.yml of a test copy: the store in the copy (conf/base's ${fu_project_root:}
    is where this package is imported from, not the copy)."""
    (project / "conf/local/mlflow.yml").write_text(
        yaml.safe_dump({"server": {"mlflow_tracking_uri": f"sqlite:///{project}/mlflow.db"}}))


def _run_ids(artifacts: Path) -> set[str]:
    return {p.name for p in artifacts.iterdir() if p.is_dir()} if artifacts.is_dir() else set()


def test_a_copied_project_stops_before_writing_into_the_old_folder_then_writes_into_its_own(tmp_path):
    from mlflow.tracking import MlflowClient

    first = copy_project(Path(__file__).resolve().parents[1], tmp_path / "first")
    cwd = os.getcwd()
    try:
        os.chdir(first)
        run_kedro_session(first, "ingestion", TINY_INGESTION)
        before = _run_ids(first / "mlartifacts")
        assert len(before) == 1
        client = MlflowClient(f"sqlite:///{first}/mlflow.db")
        exp = client.get_experiment_by_name("fu_kedro")
        assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
        run = client.search_runs([exp.experiment_id])[0]
        key, value = next(iter(TINY_INGESTION["ingestion"]["phantom"]["source"].items()))  # the first key typed leads
        assert run.info.run_name.startswith(f"phantom.source.{key}={value}, "), run.info.run_name
        assert run.info.run_name.endswith(" more | pipeline ingestion"), run.info.run_name
        assert run.data.tags["fu.differs.ingestion.lora_per_class"] == "4"
        root = [a.path for a in client.list_artifacts(run.info.run_id)]
        assert "summary.png" in root and "ingestion" in root

        # the project copied elsewhere with its MLflow store (mlflow.db + mlartifacts/)
        second = copy_project(Path(__file__).resolve().parents[1], tmp_path / "second")
        shutil.copy(first / "mlflow.db", second / "mlflow.db")
        shutil.copytree(first / "mlartifacts", second / "mlartifacts")
        _use_own_store(second)
        os.chdir(second)
        with pytest.raises(mlflow_ui.ArtifactsOutsideProject) as refused:
            run_kedro_session(second, "ingestion", TINY_INGESTION)
        message = str(refused.value)
        assert str(first / "mlartifacts") in message and "mlflow.db.old" in message and "experiment.name" in message
        assert _run_ids(first / "mlartifacts") == before  # nothing written into the old folder
        assert not (second / "data/03_primary/source_images").exists()  # nothing run

        # the second fix the message names (the first, moving mlflow.db away, is for a new process:
        # this one keeps the moved file open through MLflow's cached store): a new experiment
        tracking = yaml.safe_load((second / "conf/base/mlflow.yml").read_text())["tracking"]
        tracking["experiment"]["name"] = "fu_kedro_second"
        local = yaml.safe_load((second / "conf/local/mlflow.yml").read_text())
        (second / "conf/local/mlflow.yml").write_text(yaml.safe_dump(local | {"tracking": tracking}))
        run_kedro_session(second, "ingestion", TINY_INGESTION)
        assert _run_ids(first / "mlartifacts") == before
        new = _run_ids(second / "mlartifacts") - before
        assert len(new) == 1
        files = {p.name for p in (second / "mlartifacts" / new.pop() / "artifacts").rglob("*") if p.is_file()}
        assert {"summary.png", "quarantine_report.csv"} <= files
    finally:
        os.chdir(cwd)


def test_the_headline_view_keeps_every_headline_metric_as_a_column(tmp_path):
    import json

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.create_experiment("fu_kedro", artifact_location=(tmp_path / "mlartifacts").as_uri())
    mlflow_ui.share_headline_view(client, exp, ["fidelity", "accuracy_baseline"])
    mlflow_ui.share_headline_view(client, exp, ["fidelity", "accuracy_hybrid"])
    mlflow_ui.share_headline_view(client, exp, [])  # a run without headline metrics changes nothing
    state = json.loads(client.get_experiment(exp).tags["mlflow.sharedViewState.headline"])
    assert [c for c in state["selectedColumns"] if c.startswith("metrics.")] == [
        "metrics.`fidelity`", "metrics.`accuracy_baseline`", "metrics.`accuracy_hybrid`"]
    assert mlflow_ui.headline_view_url(exp) == (f"/#/experiments/{exp}/runs?viewStateShareKey=headline"
                                                "&workflowType=machine_learning")


def test_the_store_is_in_the_project_whose_conf_is_read_not_where_the_package_is_imported_from(tmp_path):
    """``${fu_project_root:}`` (conf/base/mlflow.yml) follows the loader's conf folder: a copy run
    with ``--env paper`` (which skips a copy's conf/local) still keeps its store inside itself."""
    from fu_kedro.settings import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS

    project = tmp_path / "copy"
    shutil.copytree(Path(__file__).resolve().parents[1] / "conf", project / "conf")
    loader = CONFIG_LOADER_CLASS(str(project / "conf"), env="paper", config_patterns={"mlflow": ["mlflow*"]},
                                 **CONFIG_LOADER_ARGS)
    assert loader["mlflow"]["server"]["mlflow_tracking_uri"] == f"sqlite:///{project.resolve().as_posix()}/mlflow.db"
