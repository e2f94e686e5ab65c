"""MLflow run status across processes: store creation, runs whose process died, exit codes.

``MlflowStoreLock`` — the first ``kedro run`` in a fresh clone creates the SQLite store
(``mlflow.db``: MLflow's schema migrations) and the experiment. Two first runs started together
raced there (``sqlite3.OperationalError: duplicate column name: step``). Every Kedro context's
``after_context_created`` hooks — kedro-mlflow's, which creates the store and the experiment,
among them — now run under a file lock beside the store (``mlflow.db.lock``); a second run waits
and says so in the log.

``RunProcess`` — each MLflow run is tagged with the process that runs it
(``fu.process``: host, pid and the process's start time). A run whose process was SIGKILLed
(or died with the machine) stays RUNNING in MLflow: nothing in it can end the run. When a Kedro
context is next created in this project (any ``kedro run``, ``kedro lineage`` ...), every
RUNNING run of the store whose recorded process is gone from this host is ended as KILLED, with
the tag ``fu.killed_reason`` saying so. Runs of other hosts, and runs without the tag, are left
as they are (whether their process lives cannot be told from here).

:func:`tag_published_outputs` — the ``output.<dataset>.version`` tags, set once the run's
outputs are published (``fu_kedro.hooks.MainProcessWrites``): a failed or killed run, which
publishes nothing, names no output version.

:func:`note_interrupt` / :func:`exit_code` — a run stopped by SIGINT exits with 130 and by
SIGTERM with 143 (128 + the signal number, the shell's convention), not 1, so an orchestrator
can tell an interrupt from a failure (``fu_kedro.tracking.RunInterrupts`` calls it).
"""
from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

from kedro.framework.cli.hooks import cli_hook_impl
from kedro.framework.hooks import hook_impl

from fu_kedro.launch import is_main_process

log = logging.getLogger(__name__)

PROCESS_TAG = "fu.process"
REASON_TAG = "fu.killed_reason"
LOCK_WAIT_S = 600


# --------------------------------------------------------------------------- the store lock
def store_lock_path(context) -> Path | None:
    """``<store>.lock`` for a SQLite tracking store (None for a server or another store)."""
    uri = None
    try:
        loader = context.config_loader
        if "mlflow" not in loader.config_patterns:  # kedro-mlflow adds the same pattern
            loader.config_patterns.update({"mlflow": ["mlflow*", "mlflow*/**", "**/mlflow*"]})
        uri = ((loader["mlflow"] or {}).get("server") or {}).get("mlflow_tracking_uri")
    except Exception:  # noqa: BLE001 - no mlflow.yml: kedro-mlflow's default, mlruns/ (a file store)
        return None
    if not isinstance(uri, str) or not uri.startswith("sqlite:///"):
        return None
    db = Path(uri.removeprefix("sqlite:///"))
    return (db if db.is_absolute() else Path(context.project_path) / db).with_name(db.name + ".lock")


class MlflowStoreLock:
    """Hold ``<store>.lock`` from the first to the last ``after_context_created`` hook."""

    def __init__(self):
        self._lock = None

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        if not is_main_process():
            return
        from filelock import FileLock, Timeout

        path = store_lock_path(context)
        if path is None:
            return
        if self._lock is not None:  # a context of this process whose hooks stopped half-way
            self._lock.release(force=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(path))
        try:
            self._lock.acquire(timeout=0)
        except Timeout:
            log.info("another kedro process is creating or opening the MLflow store %s; waiting for it "
                     "(lock %s, up to %d s)", path.with_suffix(""), path, LOCK_WAIT_S)
            started = time.monotonic()
            try:
                self._lock.acquire(timeout=LOCK_WAIT_S)
            except Timeout:
                raise RuntimeError(f"{path}: held for over {LOCK_WAIT_S} s by another process; if no other kedro "
                                   "process of this project is running, delete the file") from None
            log.info("the MLflow store is ready (waited %.1f s)", time.monotonic() - started)

    @hook_impl(trylast=True, specname="after_context_created")
    def release_after_context_created(self, context) -> None:
        if self._lock is not None:
            self._lock.release(force=True)
            self._lock = None


# --------------------------------------------------------------------------- runs whose process died
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """The process's start (clock ticks after boot, /proc/<pid>/stat field 22); "" where unknown."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def process_id(pid: int | None = None) -> str:
    """``<host> <pid> <boot id>:<start time>``: names one process, even after its pid is reused."""
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()} {pid} {_boot_id()}:{_start_time(pid)}"


def process_gone(tag: str) -> bool:
    """Whether the process a ``fu.process`` tag names is known to be gone (False for another host)."""
    try:
        host, pid_text, token = tag.split(" ", 2)
        pid = int(pid_text)
    except ValueError:
        return False
    if host != socket.gethostname():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass  # alive, another user's
    boot, _, start = token.partition(":")
    if not start:
        return False  # alive, and no start time recorded to tell a reused pid from the same process
    return (boot, start) != (_boot_id(), _start_time(pid))  # the pid now belongs to another process


def mark_stale_runs(client, exclude: set[str] = frozenset()) -> list[str]:
    """End as KILLED every RUNNING run of the store whose process (``fu.process``) is gone from
    this host; returns their ids."""
    experiments = [e.experiment_id for e in client.search_experiments()]
    if not experiments:
        return []
    marked = []
    running = client.search_runs(experiments, filter_string="attributes.status = 'RUNNING'", max_results=1000)
    for run in running:
        tag = run.data.tags.get(PROCESS_TAG)
        if run.info.run_id in exclude or not tag or not process_gone(tag):
            continue
        host, pid = tag.split(" ")[:2]
        when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        client.set_tag(run.info.run_id, REASON_TAG,
                       f"its process (pid {pid} on {host}) ended without ending the run: killed (SIGKILL, out of "
                       f"memory) or the machine went down; marked KILLED at {when} by process {os.getpid()} "
                       "(the end time is that moment, not the death)")
        client.set_terminated(run.info.run_id, "KILLED")
        log.warning("MLflow run %s (%s) was left RUNNING by process %s on %s, which is gone: marked KILLED",
                    run.info.run_id, run.info.run_name, pid, host)
        marked.append(run.info.run_id)
    return marked


class RunProcess:
    """Tag each MLflow run with its process; end runs whose process died as KILLED."""

    @hook_impl(trylast=True)
    def after_context_created(self, context) -> None:  # after kedro-mlflow set up the store
        if not is_main_process():
            return
        try:
            import mlflow
            from mlflow.tracking import MlflowClient

            active = mlflow.active_run()
            mark_stale_runs(MlflowClient(), exclude={active.info.run_id} if active else set())
        except Exception as exc:  # noqa: BLE001 - bookkeeping must never stop a run
            log.warning("MLflow: could not look for runs left RUNNING by killed processes: %s", exc)

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:  # after kedro-mlflow opened the run
        if not is_main_process():
            return
        try:
            import mlflow
            from mlflow.tracking import MlflowClient

            active = mlflow.active_run()
            if active is not None:
                MlflowClient().set_tag(active.info.run_id, PROCESS_TAG, process_id())
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: could not tag the run with its process: %s", exc)


def tag_published_outputs(run_id: str | None, versions: dict[str, str]) -> None:
    """``output.<dataset>.version`` tags on this run's MLflow run ``run_id``, for the published versions only."""
    if not run_id or not versions:
        return
    try:
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for name, version in sorted(versions.items()):
            client.set_tag(run_id, f"output.{name}.version", version)
    except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
        log.warning("MLflow: could not tag the published output versions: %s", exc)


# --------------------------------------------------------------------------- exit codes
class _InterruptExitCode:
    """A Kedro CLI hook (registered when a signal arrives): the command's exit code becomes 128 + signal."""

    signum: int | None = None

    @cli_hook_impl
    def after_command_run(self, project_metadata, command_args, exit_code) -> None:
        if self.signum is not None and exit_code not in (0, None):
            code, self.signum = 128 + self.signum, None
            raise SystemExit(code)


_EXIT = _InterruptExitCode()


def note_interrupt(signum: int) -> None:
    """A run was stopped by ``signum``: ``kedro run`` (and ``python -m fu_kedro``) exit with 128 + it."""
    _EXIT.signum = signum
    try:
        from kedro.framework.cli.hooks import get_cli_hook_manager

        manager = get_cli_hook_manager()
        if not manager.is_registered(_EXIT):
            manager.register(_EXIT)
    except Exception as exc:  # noqa: BLE001 - the exit code is then 1
        log.debug("could not register the exit-code hook: %s", exc)


def exit_code(code):
    """The exit code for ``python -m fu_kedro``: 128 + the signal if a signal stopped the run."""
    if _EXIT.signum is not None and code not in (0, None):
        code, _EXIT.signum = 128 + _EXIT.signum, None
    return code
