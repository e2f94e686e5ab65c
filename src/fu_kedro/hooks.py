"""Project hooks (registered in ``settings.py``).

``PrerequisiteChecks`` — before any node runs (and before kedro-mlflow opens a run), the
files and saved inputs the run needs are checked (:mod:`fu_kedro.prerequisites`);
everything missing is named in one error, with what to download and where to put it, and
so are inputs that do not belong together (different runs, splits or data), with the fixes.
Mixed inputs a run is let go on with (``on_lineage_mismatch: warn``) go to the run's
:class:`~fu_kedro.tracking.RunState`, for the lineage records.

``MainProcessWrites`` — under several processes (``accelerate launch``,
``python -m fu_kedro.launch``) every process runs the same Kedro session; only the main
one may write catalog outputs. On the others every output of the run becomes an
in-memory dataset, so the nodes still pass data to each other but nothing is written.
On the main process every versioned output is staged and published when the run ends well
(``fu_kedro.datasets.staging``): a failed or killed run leaves no version a later run would
load as the latest; the published versions are tagged on the run's MLflow run (the one its
:class:`~fu_kedro.tracking.RunState` names).
(kedro-mlflow and kedro-viz hooks are not even registered there: ``settings.py``.)

Heavy libraries are imported inside functions: ``settings.py`` imports this module for
every ``kedro`` command.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from kedro.framework.hooks import hook_impl

from fu_kedro.datasets.versions import versioned_root
from fu_kedro.launch import is_main_process, process_rank
from fu_kedro.prerequisites import Mix, MissingPrerequisitesError, find_missing_prerequisites, format_problems
from fu_kedro.run_status import tag_published_outputs

if TYPE_CHECKING:
    from fu_kedro.tracking import RunState

log = logging.getLogger(__name__)


class PrerequisiteChecks:
    """Fail before the first node (and before kedro-mlflow opens a run) if files are missing
    or the inputs do not belong together.

    ``state``: where the mixed inputs the run goes on with (``prerequisites.Mix``,
    ``prerequisites.on_lineage_mismatch: warn``) are left for the lineage hooks
    (``None``: nowhere)."""

    def __init__(self, state: RunState | None = None):
        self.state = state

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if self.state is not None:
            self.state.mixes = []
        params = catalog.load("parameters")
        problems, warnings = find_missing_prerequisites(pipeline, catalog, params, run_params.get("env"), run_params)
        for text in warnings:
            log.warning(text)
        if problems:
            raise MissingPrerequisitesError(format_problems(problems, run_params.get("env")))
        if self.state is not None:
            self.state.mixes = [w for w in warnings if isinstance(w, Mix)]


class MainProcessWrites:
    """Who writes a run's outputs, and when they become visible.

    On every process but the main one, the run's outputs go to memory instead of the
    catalog's files. On the main process every versioned output is staged and published
    when the run ends well, deleted when it fails (``fu_kedro.datasets.staging``): a failed or
    killed run leaves no version that a later run would load as the latest.

    ``state``: names the MLflow run the published versions are tagged on (``None``: no tags).
    """

    def __init__(self, state: RunState | None = None):
        self.state = state
        self._staged: list = []
        self._datasets: dict = {}

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        if is_main_process():
            self._stage_outputs(pipeline, catalog)
            return
        from kedro.io import MemoryDataset

        outputs = sorted(pipeline.all_outputs())
        catalog_log = logging.getLogger(type(catalog).__module__)
        level = catalog_log.level
        catalog_log.setLevel(logging.ERROR)  # one line here instead of a "Replacing dataset" warning each
        try:
            for name in outputs:
                catalog[name] = MemoryDataset(copy_mode="assign")
        finally:
            catalog_log.setLevel(level)
        log.info("process %d (not the main process): %d outputs kept in memory, none written", process_rank(), len(outputs))

    def _stage_outputs(self, pipeline, catalog) -> None:
        from fu_kedro.datasets import staging

        self._staged, self._datasets = [], {}
        for name in sorted(pipeline.all_outputs()):
            try:
                dataset = catalog.get(name)
            except Exception:  # noqa: BLE001 - a broken entry fails the run on its own
                dataset = None
            record = staging.stage(name, dataset) if dataset is not None else None
            if record is not None:
                self._staged.append(record)
                self._datasets[name] = dataset
        # staging folders of killed runs, beside any versioned dataset of the catalog
        parents = {r.final.parent for r in self._staged}
        for name in catalog.keys():
            try:
                dataset = catalog.get(name)
            except Exception:  # noqa: BLE001
                continue
            root = versioned_root(dataset) if name not in self._datasets else None
            if root is not None:
                parents.add(root.parent)
        removed = staging.remove_abandoned(parents)
        for path in removed:
            log.info("removed %s: staged outputs of a run that was killed before it ended", path)

    @hook_impl(trylast=True)
    def after_pipeline_run(self) -> None:
        from fu_kedro.datasets import staging

        if not self._staged:
            return
        published = staging.publish(self._staged)
        for r in self._staged:
            staging.unstage(r, self._datasets[r.name])
        tag_published_outputs(self.state.mlflow_run_id if self.state is not None else None,
                              {r.name: r.version for r in self._staged if r.name in published})
        log.info("published %d output(s) of this run, version %s: %s", len(published), self._staged[0].version,
                 ", ".join(published))
        self._staged, self._datasets = [], {}

    @hook_impl
    def on_pipeline_error(self) -> None:
        from fu_kedro.datasets import staging

        if not self._staged:
            return
        staging.discard(self._staged)
        for r in self._staged:
            staging.unstage(r, self._datasets[r.name])
        log.warning("the run failed: none of its %d staged output(s) was published (version %s)",
                    len(self._staged), self._staged[0].version)
        self._staged, self._datasets = [], {}
