"""``LineageHooks``: what every output of a ``kedro run`` was made from.

For every node, the catalog version (and content hash) of each input as resolved at load
time, the node's parameters and, for ingestion's readers, the raw files (paths + sha256).
Each saved version of a versioned catalog entry gets ``lineage.json`` beside it; JSON dicts,
image sets and the LoRA adapter also carry the same record inside, under ``made_from``
(format: :mod:`fu_kedro.lineage`). After its own step of each hook it hands over to
:class:`~fu_kedro.tracking.MlflowRunExtras` (the MLflow side), with the same
:class:`~fu_kedro.tracking.RunState`. Only the main process records anything
(``accelerate launch``: the others write nothing).
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from fu_kedro import lineage as L
from fu_kedro.datasets.versions import load_version, save_version, versioned_path
from fu_kedro.launch import is_main_process
from fu_kedro.software import software_record
from fu_kedro.tracking.mlflow_run import MlflowRunExtras, pipelines_with_nodes, run_name
from fu_kedro.tracking.run_state import RunState, plain_path

log = logging.getLogger(__name__)


def _published(path: Path | None) -> Path | None:
    """Where a path of this run's staging folder will be once the run ends well
    (``fu_kedro.datasets.staging``; the sidecar moves with its version folder)."""
    if path is None:
        return None
    from fu_kedro.datasets.staging import published_path

    return published_path(path)


def _embed(data: Any, record: dict) -> bool:
    """Put ``record`` into the output itself where the output can hold it."""
    key = L.EMBED_KEY
    if isinstance(data, dict):
        data[key] = record
        return True
    info = getattr(data, "info", None)  # ImageSet -> info.json
    if isinstance(info, dict) and hasattr(data, "images"):
        info[key] = record
        return True
    meta = getattr(data, "metadata", None)  # LoraAdapter -> safetensors metadata (strings only)
    if isinstance(meta, dict) and hasattr(data, "state_dict") and not callable(getattr(data, "state_dict")):
        meta[key] = json.dumps(L.to_jsonable(record))
        return True
    # The base model's record stays in its lineage.json only: its reference travels inside
    # later outputs (adapter metadata, manifests), which carry their own records.
    return False


class LineageHooks:
    """Records what every output was made from, and tells MLflow (see module docstring)."""

    def __init__(self, state: RunState):
        self.state = state
        self.mlflow = MlflowRunExtras(state)

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self.state.reset()
        if not is_main_process():
            return
        try:
            self._start(run_params, pipeline, catalog)
        except Exception as exc:  # noqa: BLE001 - lineage must never stop a run
            log.warning("lineage: not recorded in this run: %s", exc)
            self.state.reset()
            return
        self.mlflow.before_pipeline_run()
        self.mlflow.log_software()

    def _start(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        self.state.catalog = catalog
        self.state.project = Path(run_params.get("project_path") or Path.cwd())
        self.state.software = software_record()
        import mlflow

        active = mlflow.active_run()
        params = {}
        try:
            params = catalog.load("parameters")
        except Exception:  # noqa: BLE001
            pass
        pipelines = run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"]
        ran = pipelines_with_nodes(pipeline) or list(pipelines)  # e.g. --from-nodes: the ones that run
        self.state.run = {
            "session_id": run_params.get("run_id"),
            "env": run_params.get("env"),
            "pipelines": list(pipelines),
            "load_versions": run_params.get("load_versions") or {},
            "runtime_params": run_params.get("runtime_params") or {},
            "mlflow_run_id": active.info.run_id if active else None,
            "mlflow_experiment_id": active.info.experiment_id if active else None,
            "mlflow_run_name": None,
        }
        if active:
            self.state.run["mlflow_run_name"], self.state.run["differs_from_base"] = run_name(
                ran, run_params.get("env"), params, self.state.project, run_params.get("runtime_params"))
        mixes = self.state.mixes  # prerequisites.on_lineage_mismatch: warn, and the inputs do not belong together
        if mixes:
            self.state.run["lineage_mismatch"] = [{"text": str(m), "versions": m.versions} for m in mixes]

    @hook_impl
    def before_node_run(self, node, catalog, inputs: dict[str, Any]) -> None:
        if self.state.catalog is None:
            return
        try:
            self._note_inputs(node, catalog, inputs)
        except Exception as exc:  # noqa: BLE001 - lineage must never stop a run
            log.warning("lineage: could not record the inputs of %s: %s", node.name, exc)
            return
        self.mlflow.before_node_run(node, inputs)

    def _note_inputs(self, node, catalog, inputs: dict[str, Any]) -> None:
        entries, params = [], {}
        for name in node.inputs:
            if name == "parameters" or name.startswith("params:"):
                params[name.removeprefix("params:")] = L.to_jsonable(inputs.get(name))
                continue
            entry = self._input_entry(name, catalog)
            if entry.get("kind") == "file" and not entry.get("path"):
                continue  # a file entry whose parameter is not set (e.g. pretrained_base of a tiny run): nothing read
            entries.append(entry)
        entries += self._raw_entries(params)
        self.state.node_records[node.name] = {"node": node.name, "inputs": entries, "params": params}

    @staticmethod
    def _raw_entries(params: dict) -> list[dict]:
        """A reader node (parameters ``<domain>_format`` + ``<domain>_path``): its raw files."""
        out = []
        for key in sorted(params):
            if not key.endswith("_format"):
                continue
            domain = key.removesuffix("_format")
            if f"{domain}_path" not in params:
                continue
            fmt, path = params[key], params[f"{domain}_path"]
            extra = {"seed": params.get("seed")} if fmt == "phantom" else None
            out.append(L.raw_files_entry(domain, fmt, None if fmt == "phantom" else path, extra))
        return out

    def _input_entry(self, name: str, catalog) -> dict:
        if name in self.state.produced:
            made = self.state.produced[name]
            dataset = catalog.get(name) if name in catalog else None
            version = load_version(dataset) if dataset is not None else None
            if version is not None:  # saved in this run: refer to it by version
                return self._versioned_entry(name, dataset, version)
            path = plain_path(dataset) if dataset is not None else None
            return {"kind": "in_run", "dataset": name, "node": made["node"], "inputs": made["inputs"],
                    "params": made["params"], "path": L.rel_path(path, self.state.project) if path else None}
        try:
            dataset = catalog.get(name)
        except Exception:  # noqa: BLE001
            dataset = None
        version = load_version(dataset) if dataset is not None else None
        if version is not None:
            return self._versioned_entry(name, dataset, version)
        path = plain_path(dataset) if dataset is not None else None
        return {"kind": "file", "dataset": name, "path": L.rel_path(path, self.state.project) if path else None}

    def _versioned_entry(self, name: str, dataset, version: str) -> dict:
        path = versioned_path(dataset, version)  # where it is now (this run's staging folder if saved in it)
        final = _published(path)
        key = str(final.resolve()) if final else ""
        if key not in self.state.sidecars:
            self.state.sidecars[key] = L.read_sidecar(path) or {}
        side = self.state.sidecars[key]
        return {
            "kind": "versioned", "dataset": name, "version": version,
            "path": L.rel_path(final, self.state.project) if final else None,
            "sha256": side.get("sha256"),
            "mlflow_run_id": (side.get("run") or {}).get("mlflow_run_id"),
            "node": side.get("node"),
        }

    @hook_impl
    def after_node_run(self, node, outputs: dict[str, Any]) -> None:
        record = self.state.node_records.get(node.name)
        if record is not None:
            for name in node.outputs:
                self.state.produced[name] = record

    def _record(self, name: str, node, version: str, path: Path | None) -> dict | None:
        made = self.state.node_records.get(node.name)
        if made is None:
            return None
        return {
            "schema": L.SCHEMA, "dataset": name, "version": version,
            "path": L.rel_path(path, self.state.project) if path else None,
            "node": node.name, "run": {k: v for k, v in self.state.run.items() if k not in ("runtime_params", "differs_from_base")},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "params": made["params"], "inputs": made["inputs"],
            "upstream": L.flatten_upstream(made["inputs"], self.state.project, cache=self.state.sidecars),
        }

    @hook_impl
    def before_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if self.state.catalog is None:
            return
        try:
            dataset = self.state.catalog.get(dataset_name)
            version = save_version(dataset)
            if version is None:
                return
            record = self._record(dataset_name, node, version, _published(versioned_path(dataset, version)))
            if record is not None:
                _embed(data, L.to_jsonable(record))
        except Exception as exc:  # noqa: BLE001 - lineage must never stop a run
            log.warning("lineage: could not embed the record in %s: %s", dataset_name, exc)

    @hook_impl
    def after_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if self.state.catalog is None:
            return
        try:
            self._write_sidecar(dataset_name, node)
        except Exception as exc:  # noqa: BLE001 - lineage must never stop a run
            log.warning("lineage: could not record %s: %s", dataset_name, exc)
        self.mlflow.after_dataset_saved(dataset_name, data)

    def _write_sidecar(self, dataset_name: str, node) -> None:
        dataset = self.state.catalog.get(dataset_name)
        version = save_version(dataset)
        if version is None:
            return
        path = versioned_path(dataset, version)
        record = self._record(dataset_name, node, version, _published(path))
        if record is None or path is None or not path.exists():
            return
        record["sha256"] = L.content_hash(path)
        # beside the data: moves with the version folder when published; the software only
        # here, not in the records embedded in outputs and upstream chains
        L.write_sidecar(path, {**record, "software": self.state.software})
        self.state.sidecars[str(_published(path).resolve())] = record
        self.state.outputs[dataset_name] = version

    @hook_impl(tryfirst=True)
    def after_pipeline_run(self) -> None:
        self.mlflow.after_pipeline_run()  # before kedro-mlflow ends the run

