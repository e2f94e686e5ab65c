"""Runs that end badly, as MLflow sees them (issue #27, ``fu_kedro.run_status``).

- two first ``kedro run``s in a fresh project copy at once both finish (the MLflow store's
  creation is serialised by a file lock; it used to die with ``duplicate column name: step``);
- a run SIGKILLed during LoRA training stays RUNNING until the next Kedro session, which ends it
  as KILLED with the reason, and it names no output version (nothing of it was published);
- the stale-run rule on a real store: a RUNNING run whose process is gone is ended, one whose
  process lives (or of another host, or without the tag) is not.

SIGINT / SIGTERM exit codes (130 / 143) and their KILLED status: tests/test_lineage.py.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY_RUN_PARAMS, copy_project, run_kedro_session

from fu_kedro import run_status

INGESTION_CLI = ",".join(p for p in TINY_RUN_PARAMS if p.startswith("ingestion."))
LORA_CLI = ",".join(p for p in TINY_RUN_PARAMS if p.startswith(("ingestion.", "lora_training.")))

KILL_HOOK = '''

# --- added by tests/test_run_status.py in this throwaway copy: SIGKILL when a named node starts
import os as _os
import signal as _signal

from kedro.framework.hooks import hook_impl as _hook_impl


class _KillAtNode:
    @_hook_impl
    def before_node_run(self, node):
        if node.name == _os.environ.get("FU_TEST_KILL_AT_NODE"):
            _os.kill(_os.getpid(), _signal.SIGKILL)


HOOKS = (*HOOKS, _KillAtNode())
'''


def _client(project: Path):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")


def _runs(project: Path):
    client = _client(project)
    exp = client.get_experiment_by_name("fu_kedro")
    return client.search_runs([exp.experiment_id], order_by=["attributes.start_time ASC"])


def copy_env(project: Path, **extra: str) -> dict:
    """The environment of a ``kedro run`` in a project copy: the copy's ``src`` first on the path
    (conf/logging.yml imports ``fu_kedro`` before Kedro adds the project's ``src``, so an installed
    or PYTHONPATH package would otherwise be the one imported, without the test's hook)."""
    path = os.pathsep.join(p for p in (str(project / "src"), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, **extra}


def _kedro(project: Path, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kedro", "run", *args], cwd=project, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=copy_env(project, **(env or {})))


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_two_first_runs_at_once_in_a_fresh_copy_both_finish(tmp_path):
    project = copy_project(Path(__file__).resolve().parents[1], tmp_path)
    assert not (project / "mlflow.db").exists()  # a fresh clone: no store yet
    procs = [_kedro(project, "--pipeline", "ingestion", "--params", INGESTION_CLI) for _ in range(2)]
    outputs = [p.communicate(timeout=840)[0] for p in procs]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-4000:]
        assert "duplicate column" not in out and "OperationalError" not in out, out[-4000:]
    runs = _runs(project)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}, [(r.info.run_id, r.info.status) for r in runs]
    assert (project / "mlflow.db.lock").exists()  # the lock they took turns (beside the store)
    published = sorted(p.name for p in (project / "data/03_primary/source_images").iterdir())
    assert len(published) == 2, published  # each run published its own version


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_run_sigkilled_during_lora_training_is_marked_killed_by_the_next_run(tmp_path):
    project = copy_project(Path(__file__).resolve().parents[1], tmp_path)
    ingest = _kedro(project, "--pipeline", "ingestion", "--params", INGESTION_CLI)
    out = ingest.communicate(timeout=600)[0]
    assert ingest.returncode == 0, out[-3000:]

    settings = project / "src" / "fu_kedro" / "settings.py"
    settings.write_text(settings.read_text() + KILL_HOOK)
    lora = _kedro(project, "--pipeline", "lora_training", "--params", LORA_CLI,
                  env={"FU_TEST_KILL_AT_NODE": "fit_lora_adapter_node"})
    out = lora.communicate(timeout=900)[0]
    assert lora.returncode == -signal.SIGKILL, out[-3000:]
    killed = _runs(project)[-1]
    assert killed.info.status == "RUNNING"  # nothing in a SIGKILLed process can end its run
    assert killed.data.tags[run_status.PROCESS_TAG].startswith(f"{socket.gethostname()} {lora.pid} ")
    # it had saved base_model (staged) before it died, but published nothing: no output version named
    assert not [t for t in killed.data.tags if t.startswith("output.")], killed.data.tags
    assert "base_model" in {p.name for p in (project / "data").rglob("*") if ".staging" in p.parts}

    # the next run, any pipeline (here ingestion again, in-process)
    settings.write_text(settings.read_text().replace(KILL_HOOK, ""))
    from fu_kedro.config import nested_params

    run_kedro_session(project, "ingestion", nested_params(INGESTION_CLI.split(",")))
    after = _client(project).get_run(killed.info.run_id)
    assert after.info.status == "KILLED" and after.info.end_time >= after.info.start_time
    reason = after.data.tags[run_status.REASON_TAG]
    assert f"its process (pid {lora.pid} on {socket.gethostname()}) ended without ending the run" in reason
    first, _, last = _runs(project)
    assert first.info.status == last.info.status == "FINISHED"
    assert last.data.tags.get("output.source_images.version")  # a run that ends well names its outputs


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_only_runs_whose_process_is_gone_are_marked_killed(tmp_path):
    """The rule on a real SQLite store, with real processes: a finished child's pid (gone), this
    process (alive), a pid whose start time differs (a reused pid), another host, and no tag."""
    client = _client(tmp_path)
    exp = client.create_experiment("fu_kedro")
    me = run_status.process_id()
    host, pid, token = me.split(" ")
    cases = {
        "gone": f"{host} {_dead_pid()} {token}",
        "alive": me,
        "reused_pid": f"{host} {pid} {token.split(':')[0]}:1",
        "other_host": f"not-{host} {_dead_pid()} {token}",
        "untagged": None,
    }
    ids = {}
    for name, tag in cases.items():
        run = client.create_run(exp, tags={run_status.PROCESS_TAG: tag} if tag else {}, run_name=name)
        ids[name] = run.info.run_id
    marked = run_status.mark_stale_runs(client)
    assert sorted(marked) == sorted([ids["gone"], ids["reused_pid"]])
    status = {name: client.get_run(rid).info.status for name, rid in ids.items()}
    assert status == {"gone": "KILLED", "alive": "RUNNING", "reused_pid": "KILLED", "other_host": "RUNNING",
                      "untagged": "RUNNING"}
    assert "ended without ending the run" in client.get_run(ids["gone"]).data.tags[run_status.REASON_TAG]
    assert run_status.mark_stale_runs(client) == []  # once
