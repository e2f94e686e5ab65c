"""What a researcher sees of the runs in the MLflow UI (used by :mod:`fu_kedro.tracking`).

- **Run names** that lead with what differs from ``conf/base``: ``default`` for a plain
  ``kedro run``; ``lora.max_steps=20 | pipeline lora_training`` for ``kedro run --pipeline
  lora_training --params lora_training.lora.max_steps=20`` (the block name of a pipeline that ran
  is left out; the full keys are the run's ``fu.differs.<key>`` tags). An env's changes count too
  (``env paper | lora.rank=128, ...``).
- **summary.png** at the root of every run's artifacts: the run's headline metrics (and the
  pipelines, outputs and differences in its title), so MLflow's compare view, which shows only
  the artifacts the runs have in common at one level, always has one figure to put side by side.
- **The experiment**: tagged ``mlflow.experimentKind = custom_model_development``, also when it was
  made before the tag was configured (MLflow reads it where the UI's GenAI / Model training switch
  does not decide; 3.17's UI opens a fresh browser in GenAI whatever the tag says: the README says
  what to click); a shared view ``headline`` (the runs table with the headline metrics as columns,
  :func:`headline_view_url`); and its artifact location must be inside this project. A SQLite store keeps the
  *absolute* location of an experiment, so a project folder copied elsewhere would keep writing
  into the old folder's ``mlartifacts/``: the run stops first, naming the two fixes
  (:class:`ArtifactsOutsideProject`).
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from kedro.framework.hooks import hook_impl

log = logging.getLogger(__name__)

EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
PIPELINE_BLOCKS = ("ingestion", "lora_training", "synthesis", "evaluation")
NAME_DIFFS = 4  # differences spelled out in a run name; the rest are counted (all are tags)


# --------------------------------------------------------------------------- run names
def base_parameters(project: Path) -> dict:
    """The parameters of ``conf/base`` alone (no env, no ``--params``), as the project's loader reads them."""
    from kedro.framework.project import settings

    loader = settings.CONFIG_LOADER_CLASS(conf_source=str(Path(project) / settings.CONF_SOURCE), env="base",
                                          **settings.CONFIG_LOADER_ARGS)
    return dict(loader["parameters"])


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(d, dict):
        return {prefix.rstrip("."): d}
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) and v else {f"{prefix}{k}": v})
    return out


def differences(params: dict, base: dict) -> dict[str, Any]:
    """Dotted key -> value, for every parameter whose value is not conf/base's (added ones too)."""
    now, before = _flatten(params or {}), _flatten(base or {})
    return {k: v for k, v in now.items() if k not in before or before[k] != v}


def _short_key(key: str, ran: list[str]) -> str:
    head, _, rest = key.partition(".")
    return rest if head in ran and rest else key


def _ordered(diffs: dict[str, Any], ran: list[str]) -> list[tuple[str, Any]]:
    """The changes that concern the pipelines that ran first (top-level keys, then their blocks),
    the other pipelines' blocks after them."""
    def rank(key: str) -> int:
        head = key.partition(".")[0]
        return 0 if head not in PIPELINE_BLOCKS else 1 if head in ran else 2

    return sorted(diffs.items(), key=lambda kv: rank(kv[0]))


def _value(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return str(value)


def run_name(pipelines: list[str], env: str | None, diffs: dict[str, Any], typed: list[str] = ()) -> str:
    """``default``, or what differs, joined by `` | ``: ``env <env>``, the changed parameters
    (``key=value``, up to ``NAME_DIFFS``, then ``+N more``), then ``pipeline <names>`` when not all
    ran. The ``--params`` keys come first, in the order typed (``typed``: what a researcher varies
    from run to run, so MLflow's runs table, which cuts names to about 25 characters, tells the
    runs apart), then the other changes of the pipelines that ran, then those of other pipelines.
    A pipeline that ran drops its block name (``lora.max_steps=20`` in a ``lora_training`` run,
    ``lora_training.lora.max_steps=20`` in an ``ingestion`` run)."""
    from fu_kedro.pipeline_registry import PIPELINE_ORDER

    names = [p for p in pipelines if p != "__default__"] or list(PIPELINE_ORDER)
    parts = [f"env {env}"] if env and env not in ("local", "base") else []
    if diffs:
        first = [(k, diffs[k]) for k in typed if k in diffs]
        ordered = first + [kv for kv in _ordered(diffs, names) if kv[0] not in dict(first)]
        shown = [f"{_short_key(k, names)}={_value(v)}" for k, v in ordered[:NAME_DIFFS]]
        more = len(diffs) - len(shown)
        parts.append(", ".join(shown) + (f" +{more} more" if more else ""))
    if not set(PIPELINE_ORDER) <= set(names):
        parts.append("pipeline " + "+".join(names))
    return (" | ".join(parts) or "default")[:250]


# --------------------------------------------------------------------------- the experiment
class ArtifactsOutsideProject(RuntimeError):
    """The MLflow experiment would store this project's artifacts in another folder."""


def _local_path(location: str) -> Path | None:
    parsed = urlparse(location)
    if parsed.scheme == "file":
        return Path(unquote(parsed.path))
    if parsed.scheme == "" or (len(parsed.scheme) == 1 and location[1:3] in (":\\", ":/")):  # a plain path
        return Path(location)
    return None  # a server, a bucket: not a folder of this machine


def check_experiment(client, experiment_id: str, project: Path, tracking_uri: str) -> None:
    """Tag the experiment for MLflow's runs table; stop when its artifacts would land outside ``project``."""
    exp = client.get_experiment(experiment_id)
    if exp.tags.get(EXPERIMENT_KIND[0]) is None:
        client.set_experiment_tag(experiment_id, *EXPERIMENT_KIND)
    folder = _local_path(exp.artifact_location or "")
    project = Path(project).resolve()
    if folder is None or folder.resolve().is_relative_to(project):
        return
    raise ArtifactsOutsideProject(
        f"MLflow experiment '{exp.name}' of {tracking_uri} stores its artifacts in {folder}, outside this "
        f"project ({project}): the store was copied from another folder, and an experiment keeps the "
        "absolute artifact location it was created with. Nothing was run. Fix: either start this copy's "
        f"own store (move {tracking_uri.removeprefix('sqlite:///')} away, e.g. to mlflow.db.old: its runs "
        "stay readable with `mlflow ui --backend-store-uri sqlite:///mlflow.db.old`), or give this copy "
        "a new experiment (conf/local/mlflow.yml: copy conf/base's `tracking:` block and change "
        "`experiment.name`); either way the next run creates it with this project's mlartifacts/.")


# --------------------------------------------------------------------------- summary.png
def _headline(metrics: dict[str, float]) -> list[tuple[str, float, tuple[float, float] | None]]:
    """Top-level metrics (no ``.``/``/`` in the key), their ``_ci_low``/``_ci_high`` as an interval."""
    rows = []
    for key in sorted(metrics):
        if "." in key or "/" in key or key.endswith(("_ci_low", "_ci_high")):
            continue
        low, high = metrics.get(f"{key}_ci_low"), metrics.get(f"{key}_ci_high")
        rows.append((key, metrics[key], (low, high) if low is not None and high is not None else None))
    return rows


def summary_figure(name: str, metrics: dict[str, float], outputs: dict[str, str], diffs: dict[str, Any]):
    """A matplotlib figure: the run name, its headline metrics as bars (interval whiskers), and
    what it saved; a run without headline metrics lists its first metrics as text."""
    from matplotlib.figure import Figure

    rows = _headline(metrics)
    fig = Figure(figsize=(7.5, 0.45 * max(len(rows), 4) + 1.6), dpi=100)
    ax = fig.add_axes((0.38, 0.22, 0.58, 0.62))
    fig.suptitle(name, fontsize=11, x=0.02, ha="left")
    changed = ", ".join(f"{k}={_value(v)}" for k, v in list(diffs.items())[:6]) or "none (conf/base)"
    fig.text(0.02, 0.90, f"differs from conf/base: {changed}"[:130], fontsize=7, color="#444")
    if rows:
        y = list(range(len(rows)))[::-1]
        values = [v for _, v, _ in rows]
        ax.barh(y, values, color=["#4c72b0" if ci is None else "#dd8452" for _, _, ci in rows])
        for yi, (_, v, ci) in zip(y, rows):
            if ci:
                ax.plot(ci, [yi, yi], color="black", lw=1.5)
            ax.text(max(v, 0, *(ci or ())), yi, f" {v:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else ""),
                    va="center", fontsize=8)
        ax.set_yticks(y, [k for k, _, _ in rows], fontsize=8)
        ax.axvline(0, color="#888", lw=0.8)
        ax.set_title("headline metrics (bars; whiskers: interval)", fontsize=9)
    else:
        ax.axis("off")
        first = [f"{k} = {metrics[k]:.4g}" for k in sorted(metrics)[:14]]
        ax.text(0, 1, "\n".join(first) or "no metrics logged", va="top", fontsize=8, family="monospace",
                transform=ax.transAxes)
        ax.set_title("metrics (no headline metrics in this run)", fontsize=9)
    import textwrap

    saved = textwrap.shorten("saved: " + (", ".join(sorted(outputs)) or "nothing versioned"), 260, placeholder=" ...")
    fig.text(0.02, 0.02, "\n".join(textwrap.wrap(saved, 130)), fontsize=7, color="#444", va="bottom")
    return fig


def log_summary(client, run_id: str, name: str, outputs: dict[str, str], diffs: dict[str, Any]) -> None:
    """Draw :func:`summary_figure` from the run's logged metrics and log it as ``summary.png``
    (root); its headline metrics join the experiment's shared ``headline`` view (:func:`share_headline_view`)."""
    run = client.get_run(run_id)
    metrics = dict(run.data.metrics)
    fig = summary_figure(name, metrics, outputs, diffs)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "summary.png"
        fig.savefig(path)
        client.log_artifact(run_id, str(path))
    share_headline_view(client, run.info.experiment_id, [k for k, _, _ in _headline(metrics)])


# MLflow's runs table shows no metric column until one is picked under "Columns", a choice the
# browser keeps (localStorage); there is no server-side default. A *shared view* is what MLflow
# offers instead: an experiment tag mlflow.sharedViewState.<key> holding the table's state, opened
# by the URL #/experiments/<id>/runs?viewStateShareKey=<key>&workflowType=machine_learning ("Share" in the UI makes the same).
HEADLINE_VIEW = "headline"
_VIEW_TAG = "mlflow.sharedViewState."


def headline_view_url(experiment_id: str, base: str = "") -> str:
    return f"{base}/#/experiments/{experiment_id}/runs?viewStateShareKey={HEADLINE_VIEW}&workflowType=machine_learning"


def share_headline_view(client, experiment_id: str, headline: list[str]) -> None:
    """Keep the experiment's ``headline`` view: the runs table with every headline metric seen so
    far (``fidelity``, ``accuracy_<arm>``, ``<arm>_minus_baseline_accuracy``) as columns."""
    import json

    tag = _VIEW_TAG + HEADLINE_VIEW
    try:
        state = json.loads(client.get_experiment(experiment_id).tags.get(tag) or "{}")
    except ValueError:
        state = {}
    columns = [c for c in state.get("selectedColumns", []) if c.startswith("metrics.")]
    columns += [f"metrics.`{k}`" for k in headline if f"metrics.`{k}`" not in columns]
    if not headline and state:
        return
    state = {"orderByKey": "attributes.start_time", "orderByAsc": False, "selectedColumns": columns,
             "runsHiddenMode": "SHOW_ALL"}
    client.set_experiment_tag(experiment_id, tag, json.dumps(state))


class ExperimentChecks:
    """Kedro hook: before kedro-mlflow starts the run (``tryfirst``), :func:`check_experiment` on
    the experiment kedro-mlflow set up for this session (main process only)."""

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any]) -> None:
        import mlflow
        from mlflow.tracking import MlflowClient

        from fu_kedro.launch import is_main_process

        if not is_main_process():
            return
        active = mlflow.active_run()
        try:
            experiment_id = active.info.experiment_id if active else mlflow.tracking.fluent._get_experiment_id()
        except Exception as exc:  # noqa: BLE001 - no MLflow experiment: nothing to check
            log.debug("MLflow: no experiment to check: %s", exc)
            return
        if experiment_id is None:
            return
        uri = mlflow.get_tracking_uri()
        try:
            check_experiment(MlflowClient(uri), experiment_id, Path(run_params.get("project_path") or Path.cwd()), uri)
        except ArtifactsOutsideProject:
            raise
        except Exception as exc:  # noqa: BLE001 - an unreadable store is kedro-mlflow's to report
            log.warning("MLflow: could not check the experiment: %s", exc)
