"""``RunInterrupts``: SIGINT and SIGTERM during a run end its MLflow run as KILLED, with an end time.

kedro-mlflow ends a run only on exceptions: a SIGTERM used to leave it RUNNING forever and a
Ctrl-C left it FINISHED. ``kedro run`` exits with 130 / 143 (``fu_kedro.run_status``). A
SIGKILLed run is ended KILLED by the next Kedro session (``fu_kedro.run_status.RunProcess``).
"""
from __future__ import annotations

import atexit
import logging
import signal
import threading
from typing import Any

from kedro.framework.hooks import hook_impl

from fu_kedro.launch import is_main_process
from fu_kedro.run_status import note_interrupt
from fu_kedro.tracking.run_state import RunState, mlflow_client

log = logging.getLogger(__name__)


class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived during a run."""

    def __init__(self, signum: int):
        super().__init__(f"run interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class RunInterrupts:
    """SIGINT/SIGTERM during a run: the run stops (``RunInterrupted``, a ``KeyboardInterrupt``)
    and its MLflow run (the one ``state`` names) ends KILLED with an end time.

    The MLflow run is ended after the stack has unwound (at interpreter exit for ``kedro run``,
    or when the next session in the same process starts), never inside the signal handler:
    there the interrupted code may hold the tracking store's write lock.
    """

    def __init__(self, state: RunState):
        self.state = state
        self._previous: dict[int, Any] = {}
        self.signum: int | None = None
        self.run_id: str | None = None

    @hook_impl(tryfirst=True)
    def after_context_created(self, context) -> None:
        self.end_interrupted_run()  # an interrupted in-process run must not collect the next run's logs

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self.signum, self.run_id = None, None
        if not is_main_process() or threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signum = signum
        self.run_id = self.state.mlflow_run_id
        self._restore()  # a second signal acts as usual
        note_interrupt(signum)  # `kedro run` exits with 128 + signum (130 / 143), not 1
        # after mlflow's own exit handler (registered at import): ours runs first, LIFO
        atexit.unregister(self.end_interrupted_run)
        atexit.register(self.end_interrupted_run)
        raise RunInterrupted(signum)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            try:
                signal.signal(sig, handler)
            except (ValueError, TypeError):
                pass
        self._previous.clear()

    @hook_impl
    def after_pipeline_run(self) -> None:
        self._restore()

    @hook_impl
    def on_pipeline_error(self) -> None:
        self._restore()

    def end_interrupted_run(self) -> None:
        if self.signum is None:
            return
        signum, run_id = self.signum, self.run_id
        self.signum = None
        try:
            import mlflow

            while mlflow.active_run() is not None:
                active = mlflow.active_run().info.run_id
                mlflow.set_tag("fu.interrupted_by", signal.Signals(signum).name)
                mlflow.end_run(status="KILLED")
                if active == run_id:
                    run_id = None
            if run_id:
                client = mlflow_client()
                if client.get_run(run_id).info.status == "RUNNING":
                    client.set_tag(run_id, "fu.interrupted_by", signal.Signals(signum).name)
                    client.set_terminated(run_id, "KILLED")
            log.warning("MLflow run ended as KILLED (%s)", signal.Signals(signum).name)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not end the interrupted MLflow run: %s", exc)
