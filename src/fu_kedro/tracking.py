"""Lineage and MLflow bookkeeping of every ``kedro run`` (hooks registered in ``settings.py``).

``LineageHooks`` — for every node, the catalog version (and content hash) of each input as
resolved at load time, the node's parameters and, for ingestion's readers, the raw files
(paths + sha256). Each saved version of a versioned catalog entry gets ``lineage.json``
beside it; JSON dicts, image sets and the LoRA adapter also carry the same
record inside, under ``made_from`` (format: :mod:`fu_kedro.lineage`).

``MlflowRunExtras`` — on the MLflow run kedro-mlflow opened for this ``kedro run``:

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
  ``_ci_low`` / ``_ci_high``, so two runs compare key by key in the MLflow UI.

``RunInterrupts`` — SIGINT and SIGTERM during a run end its MLflow run as KILLED, with an end
time (kedro-mlflow ends a run only on exceptions; a SIGTERM used to leave it RUNNING forever
and a Ctrl-C left it FINISHED), and ``kedro run`` exits with 130 / 143. A SIGKILLed run is
ended KILLED by the next Kedro session (``fu_kedro.run_status``).

Everything MLflow-side goes through ``MlflowClient`` with the run id (never the fluent API's
thread-local "active run", which would open a new run when none is active). Only the main
process does anything (``accelerate launch``: the others write nothing).
"""
from __future__ import annotations

import atexit
import json
import logging
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from kedro.framework.hooks import hook_impl

from fu_kedro import lineage as L
from fu_kedro.datasets.versions import load_version, save_version, versioned_path
from fu_kedro.launch import is_main_process
from fu_kedro.run_status import note_interrupt
from fu_kedro.software import log_to_mlflow, software_record

log = logging.getLogger(__name__)

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


def _pipelines_with_nodes(pipeline) -> list[str]:
    """The registered pipelines (in data-flow order) that have a node in the run's pipeline."""
    from kedro.framework.project import pipelines as registered

    from fu_kedro.pipeline_registry import PIPELINE_ORDER

    running = {n.name for n in pipeline.nodes}
    return [name for name in PIPELINE_ORDER
            if name in registered and running & {n.name for n in registered[name].nodes}]


# --------------------------------------------------------------------------- helpers on datasets
def _published(path: Path | None) -> Path | None:
    """Where a path of this run's staging folder will be once the run ends well
    (``fu_kedro.datasets.staging``; the sidecar moves with its version folder)."""
    if path is None:
        return None
    from fu_kedro.datasets.staging import published_path

    return published_path(path)


def _plain_path(dataset) -> Path | None:
    for attr in ("_filepath", "_root"):
        value = getattr(dataset, attr, None)
        if value is not None:
            return Path(str(value))
    return None


def _metadata(dataset) -> dict:
    return getattr(dataset, "metadata", None) or {}


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


class _State:
    """What the hooks share within one run."""

    def __init__(self):
        self.reset()

    def reset(self):
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


STATE = _State()


def _mlflow_client():
    from mlflow.tracking import MlflowClient

    return MlflowClient()


class LineageHooks:
    """Records what every output was made from, and tells MLflow (see module docstring)."""

    def __init__(self):
        self.mlflow = MlflowRunExtras()

    @hook_impl(trylast=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        STATE.reset()
        if not is_main_process():
            return
        try:
            self._start(run_params, pipeline, catalog)
        except Exception as exc:  # noqa: BLE001 - lineage must never stop a run
            log.warning("lineage: not recorded in this run: %s", exc)
            STATE.reset()
            return
        self.mlflow.before_pipeline_run()
        _log_software()

    def _start(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        STATE.catalog = catalog
        STATE.project = Path(run_params.get("project_path") or Path.cwd())
        STATE.software = software_record()
        import mlflow

        active = mlflow.active_run()
        params = {}
        try:
            params = catalog.load("parameters")
        except Exception:  # noqa: BLE001
            pass
        pipelines = run_params.get("pipeline_names") or [run_params.get("pipeline_name") or "__default__"]
        ran = _pipelines_with_nodes(pipeline) or list(pipelines)  # e.g. --from-nodes: the ones that run
        STATE.run = {
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
            STATE.run["mlflow_run_name"], STATE.run["differs_from_base"] = run_name(
                ran, run_params.get("env"), params, STATE.project, run_params.get("runtime_params"))
        from fu_kedro.hooks import run_mixes

        mixes = run_mixes()  # prerequisites.on_lineage_mismatch: warn, and the inputs do not belong together
        if mixes:
            STATE.run["lineage_mismatch"] = [{"text": str(m), "versions": m.versions} for m in mixes]

    @hook_impl
    def before_node_run(self, node, catalog, inputs: dict[str, Any]) -> None:
        if STATE.catalog is None:
            return
        try:
            self._note_inputs(node, catalog, inputs)
        except Exception as exc:  # noqa: BLE001 - lineage must never stop a run
            log.warning("lineage: could not record the inputs of %s: %s", node.name, exc)
            return
        self.mlflow.before_node_run(node)

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
        STATE.node_records[node.name] = {"node": node.name, "inputs": entries, "params": params}

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
        if name in STATE.produced:
            made = STATE.produced[name]
            dataset = catalog.get(name) if name in catalog else None
            version = load_version(dataset) if dataset is not None else None
            if version is not None:  # saved in this run: refer to it by version
                return self._versioned_entry(name, dataset, version)
            path = _plain_path(dataset) if dataset is not None else None
            return {"kind": "in_run", "dataset": name, "node": made["node"], "inputs": made["inputs"],
                    "params": made["params"], "path": L.rel_path(path, STATE.project) if path else None}
        try:
            dataset = catalog.get(name)
        except Exception:  # noqa: BLE001
            dataset = None
        version = load_version(dataset) if dataset is not None else None
        if version is not None:
            return self._versioned_entry(name, dataset, version)
        path = _plain_path(dataset) if dataset is not None else None
        return {"kind": "file", "dataset": name, "path": L.rel_path(path, STATE.project) if path else None}

    def _versioned_entry(self, name: str, dataset, version: str) -> dict:
        path = versioned_path(dataset, version)  # where it is now (this run's staging folder if saved in it)
        final = _published(path)
        key = str(final.resolve()) if final else ""
        if key not in STATE.sidecars:
            STATE.sidecars[key] = L.read_sidecar(path) or {}
        side = STATE.sidecars[key]
        return {
            "kind": "versioned", "dataset": name, "version": version,
            "path": L.rel_path(final, STATE.project) if final else None,
            "sha256": side.get("sha256"),
            "mlflow_run_id": (side.get("run") or {}).get("mlflow_run_id"),
            "node": side.get("node"),
        }

    @hook_impl
    def after_node_run(self, node, outputs: dict[str, Any]) -> None:
        record = STATE.node_records.get(node.name)
        if record is not None:
            for name in node.outputs:
                STATE.produced[name] = record

    def _record(self, name: str, node, version: str, path: Path | None) -> dict | None:
        made = STATE.node_records.get(node.name)
        if made is None:
            return None
        return {
            "schema": L.SCHEMA, "dataset": name, "version": version,
            "path": L.rel_path(path, STATE.project) if path else None,
            "node": node.name, "run": {k: v for k, v in STATE.run.items() if k not in ("runtime_params", "differs_from_base")},
            "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "params": made["params"], "inputs": made["inputs"],
            "upstream": L.flatten_upstream(made["inputs"], STATE.project, cache=STATE.sidecars),
        }

    @hook_impl
    def before_dataset_saved(self, dataset_name: str, data: Any, node) -> None:
        if STATE.catalog is None:
            return
        try:
            dataset = STATE.catalog.get(dataset_name)
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
        if STATE.catalog is None:
            return
        try:
            self._write_sidecar(dataset_name, node)
        except Exception as exc:  # noqa: BLE001 - lineage must never stop a run
            log.warning("lineage: could not record %s: %s", dataset_name, exc)
        self.mlflow.after_dataset_saved(dataset_name, data)

    def _write_sidecar(self, dataset_name: str, node) -> None:
        dataset = STATE.catalog.get(dataset_name)
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
        L.write_sidecar(path, {**record, "software": STATE.software})
        STATE.sidecars[str(_published(path).resolve())] = record
        STATE.outputs[dataset_name] = version

    @hook_impl(tryfirst=True)
    def after_pipeline_run(self) -> None:
        self.mlflow.after_pipeline_run()  # before kedro-mlflow ends the run


# --------------------------------------------------------------------------- MLflow
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
            if isinstance(ci, (list, tuple)) and len(ci) == 2:
                out[f"{name}_accuracy_ci_low"], out[f"{name}_accuracy_ci_high"] = float(ci[0]), float(ci[1])
    return {k: v for k, v in out.items() if v == v}  # NaN (undefined) left out


MISMATCH_TAG = "fu.lineage_mismatch"  # on runs that went on with mixed inputs (prerequisites.on_lineage_mismatch: warn)


class MlflowRunExtras:
    """Inputs, version tags, run name, artifacts and headline metrics (see module docstring).

    Called by :class:`LineageHooks` after its own step of the same hook (it needs the records)."""

    def before_pipeline_run(self) -> None:
        run_id = STATE.run.get("mlflow_run_id")
        if not run_id:
            return
        try:
            client = _mlflow_client()
            tags = {"mlflow.runName": STATE.run["mlflow_run_name"],
                    "fu.pipelines": ",".join(STATE.run["pipelines"]), "fu.env": str(STATE.run.get("env"))}
            for name, value in _flatten(STATE.run.get("runtime_params") or {}).items():
                tags[f"fu.override.{name}"[:250]] = str(value)[:5000]
            for name, value in (STATE.run.get("differs_from_base") or {}).items():
                tags[f"fu.differs.{name}"[:250]] = str(value)[:5000]
            mixes = STATE.run.get("lineage_mismatch")
            if mixes:  # the run went on with inputs that do not belong together (warn)
                tags[MISMATCH_TAG] = " | ".join(m["text"] for m in mixes)[:5000]
            for name, value in tags.items():
                client.set_tag(run_id, name, value)
        except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
            log.warning("MLflow: could not name the run: %s", exc)

    def before_node_run(self, node) -> None:
        run_id = STATE.run.get("mlflow_run_id")
        record = STATE.node_records.get(node.name)
        if not run_id or record is None:
            return
        try:
            self._log_inputs(run_id, record["inputs"])
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: could not log the inputs of %s: %s", node.name, exc)

    @staticmethod
    def _log_inputs(run_id: str, entries: list[dict]) -> None:
        from mlflow.data.meta_dataset import MetaDataset
        from mlflow.entities import DatasetInput, InputTag

        client = _mlflow_client()
        todo = []
        for e in entries:
            kind, name = e.get("kind"), e.get("dataset")
            if kind == "versioned" and e.get("mlflow_run_id") != run_id and name not in STATE.produced:
                key = f"{name}@{e.get('version')}"
                tags = {f"input.{name}.version": e["version"]}
                if e.get("mlflow_run_id"):
                    tags[f"input.{name}.run_id"] = e["mlflow_run_id"]
                    STATE.upstream_runs[name] = (e["mlflow_run_id"], e["version"])
                digest = (e.get("sha256") or L.hashlib.sha256(key.encode()).hexdigest())[:16]
                source = str(L.abs_path(e.get("path"), STATE.project))
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
            if key in STATE.logged_inputs:
                continue
            STATE.logged_inputs.add(key)
            for tag, value in tags.items():
                client.set_tag(run_id, tag, value)
            ds = MetaDataset(source=_dataset_source(source), name=name, digest=digest)
            todo.append(DatasetInput(dataset=ds._to_mlflow_entity(), tags=[
                InputTag("mlflow.data.context", "input"),
                *(InputTag(k, v) for k, v in input_tags.items()),
            ]))
        if todo:
            client.log_inputs(run_id, datasets=todo)

    def after_dataset_saved(self, dataset_name: str, data: Any) -> None:
        run_id = STATE.run.get("mlflow_run_id")
        if not run_id or STATE.catalog is None:
            return
        try:
            dataset = STATE.catalog.get(dataset_name)
            client = _mlflow_client()
            version = save_version(dataset)  # output.<name>.version: once published (fu_kedro.run_status)
            spec = _metadata(dataset).get("mlflow") or {}
            if spec.get("artifact_path") is not None:
                path = versioned_path(dataset, version) if version else _plain_path(dataset)
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
        run_id = STATE.run.get("mlflow_run_id")
        if not run_id:
            return
        try:
            _describe_run(run_id)
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: could not describe the run: %s", exc)
        try:  # summary.png at the artifact root: the one figure MLflow's compare view puts side by side
            from fu_kedro.mlflow_ui import log_summary

            log_summary(_mlflow_client(), run_id, STATE.run.get("mlflow_run_name") or "", STATE.outputs,
                        STATE.run.get("differs_from_base") or {})
        except Exception as exc:  # noqa: BLE001
            log.warning("MLflow: could not log summary.png: %s", exc)


def _log_software() -> None:
    """The run's software (``fu_kedro.software``) on its MLflow run: tags and ``software.json``."""
    run_id = STATE.run.get("mlflow_run_id")
    if not run_id or not STATE.software:
        return
    try:
        log_to_mlflow(_mlflow_client(), run_id, STATE.software)
    except Exception as exc:  # noqa: BLE001 - tracking must never stop a run
        log.warning("MLflow: could not record the software: %s", exc)


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


def _describe_run(run_id: str) -> None:
    client = _mlflow_client()
    lines = [f"**{STATE.run.get('mlflow_run_name')}**", ""]
    if STATE.upstream_runs:
        lines.append("Made from (catalog version, and the MLflow run that saved it):")
        for name, (rid, version) in sorted(STATE.upstream_runs.items()):
            exp = STATE.run.get("mlflow_experiment_id")
            try:
                up = client.get_run(rid)
                exp, label = up.info.experiment_id, up.info.run_name
            except Exception:  # noqa: BLE001
                label = rid
            lines.append(f"- `{name}@{version}`: [{label}](#/experiments/{exp}/runs/{rid})")
        lines.append("")
    if STATE.outputs:
        lines.append("Saved: " + ", ".join(f"`{n}@{v}`" for n, v in sorted(STATE.outputs.items())))
    lines.append("")
    lines.append("Full chain of any output: `kedro lineage <dataset>@<version>`.")
    client.set_tag(run_id, "mlflow.note.content", "\n".join(lines))


# --------------------------------------------------------------------------- interrupts
class RunInterrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived during a run."""

    def __init__(self, signum: int):
        super().__init__(f"run interrupted by {signal.Signals(signum).name}")
        self.signum = signum


class RunInterrupts:
    """SIGINT/SIGTERM during a run: the run stops (``RunInterrupted``, a ``KeyboardInterrupt``)
    and its MLflow run ends KILLED with an end time.

    The MLflow run is ended after the stack has unwound (at interpreter exit for ``kedro run``,
    or when the next session in the same process starts), never inside the signal handler:
    there the interrupted code may hold the tracking store's write lock.
    """

    def __init__(self):
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
        self.run_id = STATE.run.get("mlflow_run_id")
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
                client = _mlflow_client()
                if client.get_run(run_id).info.status == "RUNNING":
                    client.set_tag(run_id, "fu.interrupted_by", signal.Signals(signum).name)
                    client.set_terminated(run_id, "KILLED")
            log.warning("MLflow run ended as KILLED (%s)", signal.Signals(signum).name)
        except Exception as exc:  # noqa: BLE001
            log.warning("could not end the interrupted MLflow run: %s", exc)
