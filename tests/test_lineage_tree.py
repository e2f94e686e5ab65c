"""``kedro lineage``: only the tree on stdout, each node's parameters in it; and a report made in
the run that saved its inputs reads their lineage from the run's staging folder."""
from __future__ import annotations

import json
import os
import subprocess
import sys

from fu_kedro import lineage as L

V1, V2 = "2026-12-01T10.00.00.000Z", "2026-12-01T11.00.00.000Z"


def _save(project, folder: str, name: str, version: str, record: dict):
    path = project / folder / name / version / name
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"ok": True}))
    L.write_sidecar(path, {"schema": L.SCHEMA, "dataset": name.split(".")[0], "version": version, **record})
    return path


def _records(project):
    plan = _save(project, "data/07_model_output", "evaluation_plan.json", V1,
                 {"node": "plan_node", "run": {}, "params": {"evaluation": {"n_seeds": 3, "backbones": ["resnet18"]}},
                  "inputs": []})
    _save(project, "data/08_reporting", "zero_shot_metrics.json", V2,
          {"node": "metrics_node", "run": {}, "params": {"seed": 42, "evaluation": {"n_seeds": 3}},
           "inputs": [{"kind": "versioned", "dataset": "evaluation_plan", "version": V1,
                       "path": str(plan.relative_to(project))}]})


def test_tree_prints_each_nodes_parameters_once(tmp_path):
    _records(tmp_path)
    path = tmp_path / "data/08_reporting/zero_shot_metrics.json" / V2 / "zero_shot_metrics.json"
    lines = L.render_text(L.version_step("zero_shot_metrics", V2, path, tmp_path))
    assert lines[0].startswith(f"zero_shot_metrics@{V2}  [metrics_node")
    assert lines[1] == "│ params: seed=42, evaluation.n_seeds=3"
    assert lines[2].startswith(f"└── evaluation_plan@{V1}  [plan_node")
    assert lines[3] == '      params: evaluation.backbones=["resnet18"] (+1 as above)'


def test_a_version_still_in_its_runs_staging_folder_has_its_lineage_read_there(tmp_path):
    """The report node runs before its run is published: its inputs' lineage.json are staged."""
    staged = _save(tmp_path, f"data/07_model_output/.staging/{V1}-host-123", "evaluation_plan.json", V1,
                   {"node": "plan_node", "run": {}, "params": {}, "inputs": []})
    published = tmp_path / "data/07_model_output/evaluation_plan.json" / V1 / "evaluation_plan.json"
    assert not published.exists() and staged.exists()
    step = L.version_step("evaluation_plan", V1, published, tmp_path)
    assert step.detail.startswith("plan_node") and "no lineage record" not in step.detail


def test_kedro_lineage_prints_nothing_but_the_tree_on_stdout(project_copy):
    _records(project_copy)
    proc = subprocess.run([sys.executable, "-m", "kedro", "lineage", "zero_shot_metrics", "--no-mlflow"],
                          cwd=project_copy, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith(f"zero_shot_metrics@{V2}  [metrics_node"), proc.stdout[:2000]
    assert lines == L.render_text(L.version_step(
        "zero_shot_metrics", V2, project_copy / "data/08_reporting/zero_shot_metrics.json" / V2 / "zero_shot_metrics.json",
        project_copy))
    assert "INFO" in proc.stderr  # Kedro's log lines, on stderr
