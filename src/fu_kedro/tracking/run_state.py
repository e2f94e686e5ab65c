"""What the tracking hooks share within one ``kedro run``: one :class:`RunState`.

``settings.py`` makes one and hands it to every hook that reads or writes it
(:class:`~fu_kedro.tracking.LineageHooks` and its :class:`~fu_kedro.tracking.MlflowRunExtras`,
:class:`~fu_kedro.tracking.RunInterrupts`, :class:`~fu_kedro.hooks.PrerequisiteChecks`,
:class:`~fu_kedro.hooks.MainProcessWrites`): no module-level state.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


class RunState:
    """The run being tracked: its catalog, parameters of the run, node records, outputs.

    ``reset()`` starts a new run (``LineageHooks.before_pipeline_run``). ``mixes`` is set
    before that, by ``PrerequisiteChecks`` (inputs that do not belong together, which the run
    was let go on with: ``prerequisites.on_lineage_mismatch: warn``), so ``reset()`` keeps it.
    """

    def __init__(self):
        self.mixes: list = []  # fu_kedro.prerequisites.Mix of the run being started
        self.reset()

    def reset(self) -> None:
        self.catalog = None
        self.project: Path | None = None
        self.run: dict[str, Any] = {}
        self.node_records: dict[str, dict] = {}  # node name -> record (inputs, params)
        self.produced: dict[str, dict] = {}  # dataset -> record of the node that made it in this run
        self.sidecars: dict[str, dict] = {}  # path -> sidecar, cache
        self.logged_inputs: set[str] = set()
        self.upstream_runs: dict[str, tuple[str, str | None]] = {}  # dataset -> (run id, version)
        self.outputs: dict[str, str] = {}
        self.software: dict[str, Any] = {}  # fu_kedro.software.software_record(), once per run

    @property
    def mlflow_run_id(self) -> str | None:
        """The MLflow run kedro-mlflow opened for this run (``None``: none, or not recorded)."""
        return self.run.get("mlflow_run_id")


def plain_path(dataset) -> Path | None:
    """A catalog dataset's file or folder (unversioned), if it has one."""
    for attr in ("_filepath", "_root"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return Path(str(value))
    return None


def mlflow_client():
    """A client that addresses runs by id (the fluent API's thread-local "active run" would open
    a new run when none is active)."""
    from mlflow.tracking import MlflowClient

    return MlflowClient()
