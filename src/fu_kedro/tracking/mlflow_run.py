"""``MlflowRunExtras``: what every ``kedro run`` adds to the MLflow run kedro-mlflow opened for it.

* the run's free inputs (and ingestion's raw data) as MLflow datasets (``log_inputs``: source
  path, digest, catalog version), tags ``input.<dataset>.version`` / ``input.<dataset>.run_id``
  (the run that saved that version) and ``output.<dataset>.version`` (set once the outputs are
  published: ``fu_kedro.run_status.tag_published_outputs``); a run description
  linking the upstream runs;
* a run name that leads with what differs from conf/base (``default``, ``lora.max_steps=20 |
  pipeline lora_training``; tags ``fu.differs.<key>``) and ``summary.png`` at the artifact root
  (:mod:`fu_kedro.mlflow_ui`);
* the tag ``fu.lineage_mismatch`` when the run went on with inputs that do not belong
  together (``prerequisites.on_lineage_mismatch: warn``; the records carry them too, under
  ``run.lineage_mismatch``);
* catalog entries with ``metadata: {mlflow: {artifact_path: ...}}`` logged as artifacts right
  after they are saved (the file of the saved version; ``files:`` picks and renames files of
  a folder) — one output per node, no ``*_mlflow`` copies;
* headline metrics at the top level (``metadata: {mlflow: {headline_metrics: true}}``):
  ``fidelity``, ``cas_accuracy``, ``accuracy_<arm>``, ``<arm>_minus_baseline_accuracy`` with
  ``_ci_low`` / ``_ci_high``, so two runs compare key by key in the MLflow UI;
* the run's software (``fu_kedro.software``): tags and ``software.json``.

Not a hook of its own: :class:`~fu_kedro.tracking.LineageHooks` calls it after its own step of
the same hook (it needs the records), with the same :class:`~fu_kedro.tracking.RunState`.
"""
from __future__ import annotations

import json
import logging
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from fu_kedro import lineage as L
from fu_kedro.datasets.versions import save_version, versioned_path
from fu_kedro.software import log_to_mlflow
from fu_kedro.tracking.run_state import RunState, mlflow_client, plain_path

log = logging.getLogger(__name__)

MISMATCH_TAG = "fu.lineage_mismatch"  # on runs that went on with mixed inputs (prerequisites.on_lineage_mismatch: warn)


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def run_name(pipelines: list[str], env: str | None, params: dict, project: Path | None,
             runtime_params: dict | None = None) -> tuple[str, dict]:
    """The MLflow run name, leading with what differs from conf/base (``default``, ``pipeline
    ingestion | lora.max_steps=20``; :func:`fu_kedro.mlflow_ui.run_name`), and those differences."""
    from fu_kedro import mlflow_ui

    try:
        diffs = mlflow_ui.differences(params, mlflow_ui.base_parameters(project or Path.cwd()))
    except Exception as exc:  # noqa: BLE001 - a name must never stop a run
        log.warning("MLflow: could not compare the parameters with conf/base: %s", exc)
        diffs = {}
    return mlflow_ui.run_name(pipelines, env, diffs, list(_flatten(runtime_params or {}))), diffs


def pipelines_with_nodes(pipeline) -> list[str]:
    """The registered pipelines (in data-flow order) that have a node in the run's pipeline."""
    from kedro.framework.project import pipelines as registered

    from fu_kedro.pipeline_registry import PIPELINE_ORDER

    running = {n.name for n in pipeline.nodes}
    return [name for name in PIPELINE_ORDER
            if name in registered and running & {n.name for n in registered[name].nodes}]


def _metadata(dataset) -> dict:
    return getattr(dataset, "metadata", None) or {}


def _headline_metrics(data: dict) -> dict[str, float]:
    """Top-level metrics of the contract files (same keys in every run of the same grid)."""
    out: dict[str, float] = {}
    if not isinstance(data, dict):
        return out
    for key in ("fidelity", "cas_accuracy", "cas_accuracy_target"):
        if isinstance(data.get(key), (int, float)):
            out[key] = float(data[key])
    experiments = data.get("experiments")
    if isinstance(experiments, dict) and experiments:
        first = next(iter(experiments.values()))
        config = (first.get("backbone"), first.get("augmentation"))
        for entry in experiments.values():
            if (entry.get("backbone"), entry.get("augmentation")) != config:
                continue  # one configuration (the first of the grid): keys do not depend on the grid
            mean = (entry.get("all_classes") or {}).get("mean") or {}
            for m in ("accuracy", "f1_macro"):
                if isinstance(mean.get(m), (int, float)):
                    out[f"{m}_{entry['experiment']}"] = float(mean[m])
        for diff in (data.get("differences") or {}).values():
            arm = experiments.get(diff.get("experiment"), {})
            base = experiments.get(diff.get("baseline"), {})
            if (arm.get("backbone"), arm.get("augmentation")) != config:
                continue
            name = f"{arm.get('experiment')}_minus_{base.get('experiment')}"
            block = (diff.get("all_classes") or {}).get("accuracy") or {}
            if isinstance(block.get("mean"), (int, float)):
                out[f"{name}_accuracy"] = float(block["mean"])
            ci = block.get("ci")
            if isinstance(ci, (list, tuple)) and len(ci) == 2 and all(isinstance(c, (int, float)) for c in ci):
                # one classifier seed: no interval ([None, None]); the estimate is still logged
                out[f"{name}_accuracy_ci_low"], out[f"{name}_accuracy_ci_high"] = float(ci[0]), float(ci[1])
    return {k: v for k, v in out.items() if v == v}  # NaN (undefined) left out


def dataset_profile(data: Any) -> tuple[Any, dict | None]:
    """The schema and profile of a loaded input, for MLflow's Datasets panel.

    An image set (``ImageSet``: images + a manifest): the manifest's columns as the schema
    (``mlflow.types`` inferred from the table), and as profile the image count, the image
    shape and the count per class (and per domain / split where the manifest has them). A
    base model: its name, kind, resolution and content hash. Anything else: none.
    """
    import pandas as pd
    from mlflow.types.utils import _infer_schema

    meta = getattr(data, "meta", None)
    if isinstance(meta, pd.DataFrame) and hasattr(data, "images"):
        profile = {"num_rows": int(len(meta)), "image_shape": list(np.shape(data.images)[1:])}
        for column in ("label", "domain", "split", "center"):
            if column in meta.columns:
                profile[f"per_{column}"] = {str(k): int(v) for k, v in meta[column].value_counts().sort_index().items()}
        return _infer_schema(meta.astype({c: str for c in meta.columns if meta[c].dtype == object})), profile
    info = getattr(data, "info", None)
    if isinstance(info, dict) and type(data).__name__ == "BaseModel":
        keys = ("name", "kind", "resolution", "source", "content_hash")
        return None, {k: (str(info[k]) if not isinstance(info[k], (int, float)) else info[k]) for k in keys if k in info}
    return None, None


class MlflowRunExtras:
    """Inputs, version tags, run name, artifacts, headline metrics and software (see module docstring).

    Called by :class:`~fu_kedro.tracking.LineageHooks` after its own step of the same hook (it
    needs the records)."""

    def __init__(self, state: RunState):
        self.state = state

    def before_pipeline_run(self) -> None:
        state = self.state
        run_id = state.mlflow_run_id
        if not run_id:
            return
        try:
            client = mlflow_client()
            tags = {"mlflow.runName": state.run["mlflow_run_name"],
                    "fu.pipelines": ",".join(state.run["pipelines"]), "fu.env": str(state.run.get("env"))}
            for name, value in _flatten(state.run.get("runtime_params") or {}).items():
                tags[f"fu.override.{name}"[:250]] = str(value)[:5000]
            for name, value in (state.run.get("differs_from_base") or {}).items():
                tags[f"fu.differs.{name}"[:250]] = str(value)[:5000]
            mixes = state.run.get("lineage_mismatch")
            if mixes:  # the run went on with inputs that do not belong together (warn)
                tags[MISMATCH_TAG] = " | ".join(m["text"] for m in mixes)[:5000]
            for name, value in tags.items():
                client.set_tag(run_id, name, value)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
            log.warning("MLflow: could not name the run: %s", exc)

    def log_software(self) -> None:
        """The run's software (``fu_kedro.software``) on its MLflow run: tags and ``software.json``."""
        run_id = self.state.mlflow_run_id
        if not run_id or not self.state.software:
            return
        try:
            log_to_mlflow(mlflow_client(), run_id, self.state.software)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
            log.warning("MLflow: could not record the software: %s", exc)

    def before_node_run(self, node, inputs: dict[str, Any] | None = None) -> None:
        run_id = self.state.mlflow_run_id
        node_record = self.state.node_records.get(node.name)
        if not run_id or node_record is None:
            return
        try:
            self._log_inputs(run_id, node_record["inputs"], inputs or {})
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: could not log the inputs of %s: %s", node.name, exc)

    def _log_inputs(self, run_id: str, entries: list[dict], loaded: dict[str, Any]) -> None:
        """Each versioned input made by another run (and the raw data) as an MLflow dataset, with
        the schema and profile MLflow's Datasets panel shows (:func:`dataset_profile`)."""
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import Dataset, DatasetInput, InputTag

        state = self.state
        client = mlflow_client()
        todo = []
        for e in entries:
            kind, name = e.get("kind"), e.get("dataset")
            if kind == "versioned" and e.get("mlflow_run_id") != run_id and name not in state.produced:
                key = f"{name}@{e.get('version')}"
                tags = {f"input.{name}.version": e["version"]}
                if e.get("mlflow_run_id"):
                    tags[f"input.{name}.run_id"] = e["mlflow_run_id"]
                    state.upstream_runs[name] = (e["mlflow_run_id"], e["version"])
                digest = (e.get("sha256") or L.hashlib.sha256(key.encode()).hexdigest())[:16]
                source = str(L.abs_path(e.get("path"), state.project))
                input_tags = {"catalog_version": e["version"], "producer_run_id": e.get("mlflow_run_id") or ""}
            elif kind == "raw":
                key = f"{name}:{e.get('digest') or e.get('format')}"
                tags = {f"input.raw.{e['domain']}.digest": e.get("digest") or f"generated ({e.get('format')})"}
                digest = (e.get("digest") or L.hashlib.sha256(json.dumps(e, default=str).encode()).hexdigest())[:16]
                source = e.get("path") or {"generated": str(e.get("format")), "seed": str(e.get("seed"))}
                name = f"raw {e['domain']} ({e.get('format')})"
                input_tags = {"n_files": str(e.get("n_files")), "format": str(e.get("format"))}
            else:
                continue
            if key in state.logged_inputs:
                continue
            state.logged_inputs.add(key)
            for tag, value in tags.items():
                client.set_tag(run_id, tag, value)
            schema, profile = dataset_profile(loaded.get(e.get("dataset")))
            ds = MetaDataset(source=_dataset_source(source), name=name, digest=digest, schema=schema)._to_mlflow_entity()
            if profile:
                ds = Dataset(name=ds.name, digest=ds.digest, source_type=ds.source_type, source=ds.source,
                             schema=ds.schema, profile=json.dumps(profile))
            todo.append(DatasetInput(dataset=ds, tags=[
                InputTag("mlflow.data.context", "input"),
                *(InputTag(k, v) for k, v in input_tags.items()),
            ]))
        if todo:
            client.log_inputs(run_id, datasets=todo)

    def after_dataset_saved(self, dataset_name: str, data: Any) -> None:
        run_id = self.state.mlflow_run_id
        if not run_id or self.state.catalog is None:
            return
        try:
            dataset = self.state.catalog.get(dataset_name)
            client = mlflow_client()
            version = save_version(dataset)  # output.<name>.version: once published (fu_kedro.run_status)
            spec = _metadata(dataset).get("mlflow") or {}
            if spec.get("artifact_path") is not None:
                path = versioned_path(dataset, version) if version else plain_path(dataset)
                self._log_artifact(client, run_id, path, spec)
            if spec.get("headline_metrics"):
                raw = data
                if isinstance(data, dict) and L.EMBED_KEY in data:
                    raw = {k: v for k, v in data.items() if k != L.EMBED_KEY}
                for key, value in _headline_metrics(raw).items():
                    client.log_metric(run_id, key, value, step=0)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
            log.warning("MLflow: could not log %s: %s", dataset_name, exc)

    @staticmethod
    def _log_artifact(client, run_id: str, path: Path | None, spec: dict) -> None:
        if path is None or not path.exists():
            log.warning("MLflow: %s not found, not logged", path)
            return
        files = spec.get("files")
        if not files:
            client.log_artifact(run_id, str(path), spec["artifact_path"] or None)
            return
        with tempfile.TemporaryDirectory() as tmp:  # files of a folder, under their artifact names
            for inside, name in files.items():
                source = path / inside
                if source.is_file():
                    shutil.copyfile(source, Path(tmp) / name)
                    client.log_artifact(run_id, str(Path(tmp) / name), spec["artifact_path"] or None)

    def after_pipeline_run(self) -> None:
        """Before kedro-mlflow ends the run: a description naming the upstream runs."""
        state = self.state
        run_id = state.mlflow_run_id
        if not run_id:
            return
        try:
            self._describe_run(run_id)
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: could not describe the run: %s", exc)
        try:  # summary.png at the artifact root: the one figure MLflow's compare view puts side by side
            from fu_kedro.mlflow_ui import log_summary

            log_summary(mlflow_client(), run_id, state.run.get("mlflow_run_name") or "", state.outputs,
                        state.run.get("differs_from_base") or {})
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: could not log summary.png: %s", exc)

    def _describe_run(self, run_id: str) -> None:
        state = self.state
        client = mlflow_client()
        lines = [f"**{state.run.get('mlflow_run_name')}**", ""]
        if state.upstream_runs:
            lines.append("Made from (catalog version, and the MLflow run that saved it):")
            for name, (rid, version) in sorted(state.upstream_runs.items()):
                exp = state.run.get("mlflow_experiment_id")
                try:
                    up = client.get_run(rid)
                    exp, label = up.info.experiment_id, up.info.run_name
                except Exception:  # noqa: BLE001
                    label = rid
                lines.append(f"- `{name}@{version}`: [{label}](#/experiments/{exp}/runs/{rid})")
            lines.append("")
        if state.outputs:
            lines.append("Saved: " + ", ".join(f"`{n}@{v}`" for n, v in sorted(state.outputs.items())))
        lines.append("")
        lines.append("Full chain of any output: `kedro lineage <dataset>@<version>`.")
        client.set_tag(run_id, "mlflow.note.content", "\n".join(lines))


def _dataset_source(source: str | dict):
    """An MLflow dataset source: a local path, or (generated data) a code source with tags."""
    import warnings

    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    if isinstance(source, dict):
        return CodeDatasetSource(tags=source)
    with warnings.catch_warnings():  # "can be interpreted in multiple ways": both are local-file sources
        warnings.simplefilter("ignore")
        return resolve_dataset_source(source)
