"""User journey: kedro-viz shows the four pipelines and MLflow shows the zero-shot metrics,
in headless Chromium (``scripts/journey.py``; see its docstring).

Slow (minutes): it starts ``kedro viz run`` and ``mlflow ui``, and installs Debian's chromium
and the playwright package when missing. Skipped only when Chromium cannot be had (the
script's exit status 3); any other failure fails the test with the script's summary.

The MLflow check browses the project's store (conf/base/mlflow.yml: ``<project>/mlflow.db``)
when a run there has zero-shot metrics. A fresh clone (CI) has no store, so the test then
browses a temporary one holding one run with the metric names the evaluation pipeline logs
(``zero_shot.<experiment>/<backbone>/<aug>.<metric>``), made with MLflow's client.
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
    """A temporary SQLite MLflow store with one finished ``evaluation`` run of zero-shot metrics."""
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{(tmp_path / 'mlflow.db').as_posix()}"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("fu_kedro", artifact_location=(tmp_path / "mlartifacts").as_uri())
    run = client.create_run(exp, run_name="evaluation")
    values = {"accuracy": 0.61, "f1_macro": 0.58, "roc_auc_macro": 0.83, "auc_hard_label": 0.74}
    for experiment in ("baseline", "hybrid"):
        for metric, value in values.items():
            client.log_metric(run.info.run_id, f"zero_shot.{experiment}/resnet18/aug.{metric}", value, step=0)
    client.set_terminated(run.info.run_id)
    return uri


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
    run, _ = journey.find_zero_shot_run(project_uri)
    uri = project_uri if run else _demo_store(tmp_path)
    out = tmp_path / "journey"  # never overwrite the committed docs/journey/ screenshots
    cmd = ["nice", "-n", "19", sys.executable, str(SCRIPT), "--out", str(out), "--tracking-uri", uri,
           "--timeout", "300"]
    returncode, output = _run_script(cmd, timeout=1700)
    if returncode == journey.EXIT_NO_BROWSER:
        reason = next((line for line in output.splitlines() if line.startswith("JOURNEY-NO-BROWSER")), output[-500:])
        pytest.skip(f"headless Chromium not available: {reason}")
    assert returncode == 0, f"user journey failed (exit {returncode}):\n{output[-6000:]}"
    assert "checks passed -> PASS" in output
    for name in ["kedro_viz.png", "mlflow_run.png", *(f"kedro_viz_{p}.png" for p in journey.PIPELINES)]:
        shot = out / name
        assert shot.is_file() and shot.read_bytes()[:8] == PNG_MAGIC, f"{shot} missing or not a PNG"
        assert shot.stat().st_size > 10_000, f"{shot} is suspiciously small (blank page?)"
