"""Lineage and MLflow bookkeeping of every ``kedro run`` (hooks registered in ``settings.py``).

One module per hook, and one object they share:

* :mod:`~fu_kedro.tracking.lineage_hooks` — ``LineageHooks``: ``lineage.json`` beside every
  saved version, the same record inside JSON, image sets and the adapter (``made_from``);
* :mod:`~fu_kedro.tracking.mlflow_run` — ``MlflowRunExtras``: inputs, version tags, run name,
  artifacts, headline metrics and software on the MLflow run (``LineageHooks`` calls it after
  its own step of each hook: it needs the records);
* :mod:`~fu_kedro.tracking.interrupts` — ``RunInterrupts``: SIGINT/SIGTERM end the MLflow run
  as KILLED, ``kedro run`` exits with 130 / 143;
* :mod:`~fu_kedro.tracking.run_state` — ``RunState``: what they share within one run, made once
  in ``settings.py`` and handed to each.

MLflow is addressed through ``MlflowClient`` with the run id (never the fluent API's
thread-local "active run", which would open a new run when none is active), except where an
interrupted run's active runs are ended. Only the main process does anything (``accelerate
launch``: the others write nothing).
"""
from fu_kedro.tracking.interrupts import RunInterrupted, RunInterrupts
from fu_kedro.tracking.lineage_hooks import LineageHooks
from fu_kedro.tracking.mlflow_run import MISMATCH_TAG, MlflowRunExtras, run_name
from fu_kedro.tracking.run_state import RunState

__all__ = ["MISMATCH_TAG", "LineageHooks", "MlflowRunExtras", "RunInterrupted", "RunInterrupts", "RunState",
           "run_name"]
