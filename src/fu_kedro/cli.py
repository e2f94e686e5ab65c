"""Project CLI commands: ``kedro lineage <dataset>[@<version>]``.

Registered under the ``kedro.project_commands`` entry point (pyproject.toml); Kedro also
loads a project's ``<package>.cli`` module by itself, so ``cli`` is the name it looks for.
"""
from __future__ import annotations

from pathlib import Path

import click


@click.group(name="fu_kedro")
def cli() -> None:
    """fu_kedro project commands."""


def _catalog_entry(project: Path, env: str | None, name: str):
    """The dataset object of catalog entry ``name`` (no session, so no hook runs)."""
    from kedro.framework.project import settings
    from kedro.framework.startup import bootstrap_project
    from kedro.io import DataCatalog

    bootstrap_project(project)
    loader = settings.CONFIG_LOADER_CLASS(conf_source=str(project / settings.CONF_SOURCE), env=env,
                                          **settings.CONFIG_LOADER_ARGS)
    conf = loader["catalog"]
    if name not in conf:
        raise click.ClickException(f"'{name}' is not a catalog entry; entries: {', '.join(sorted(conf))}")
    entry = dict(conf[name])
    filepath = entry.get("filepath")
    if filepath and not Path(filepath).is_absolute():
        entry["filepath"] = str(project / filepath)
    return DataCatalog.from_config({name: entry}).get(name)


def _mlflow_run_names(project: Path, env: str | None) -> dict[str, str]:
    """run id -> run name (and status) from the project's MLflow store, if it can be read."""
    try:
        from kedro.framework.project import settings

        loader = settings.CONFIG_LOADER_CLASS(conf_source=str(project / settings.CONF_SOURCE), env=env,
                                              **settings.CONFIG_LOADER_ARGS)
        loader.config_patterns.setdefault("mlflow", ["mlflow*", "mlflow*/**", "**/mlflow*"])
        uri = loader["mlflow"]["server"]["mlflow_tracking_uri"]
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            return {}
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=uri)
        names = {}
        for exp in client.search_experiments():
            for run in client.search_runs([exp.experiment_id], max_results=5000):
                names[run.info.run_id] = f"{run.info.run_name}, {run.info.status}"
        return names
    except Exception:  # noqa: BLE001 - names are a nicety; ids are printed anyway
        return {}


@cli.command()
@click.argument("dataset")
@click.option("--env", "-e", default=None, help="Kedro configuration environment (default: local).")
@click.option("--no-mlflow", is_flag=True, help="Do not look up MLflow run names (ids only).")
def lineage(dataset: str, env: str | None, no_mlflow: bool) -> None:
    """Print the versions DATASET[@VERSION] was made from, back to the raw files.

    Each line is a catalog version (``name@version``), the node that made it and the MLflow
    run of that step; in-memory steps and the raw input files (paths + sha256) are listed
    where they were read. Without @VERSION: the latest saved version.

    \b
    kedro lineage zero_shot_metrics
    kedro lineage synthetic_batch@2026-11-28T02.18.18.397Z
    """
    from fu_kedro import lineage as L
    from fu_kedro.datasets.versions import load_version, saved_versions, versioned_path, versioned_root

    project = Path.cwd()
    name, _, version = dataset.partition("@")
    ds = _catalog_entry(project, env, name)
    root = versioned_root(ds)
    if root is None:
        raise click.ClickException(f"'{name}' is not versioned: only versioned entries have a lineage record")
    saved = saved_versions(ds)
    if not saved:
        raise click.ClickException(f"'{name}' has no saved version under {root}")
    if not version:
        version = load_version(ds)
    elif version not in saved:
        raise click.ClickException(f"{name}@{version} is not saved; saved versions (latest 5): {', '.join(saved[-5:])}")
    path = versioned_path(ds, version)
    names = {} if no_mlflow else _mlflow_run_names(project, env)
    tree = L.mark_mixed(L.version_step(name, version, path, project, names=names))
    click.echo("\n".join(L.render_text(tree)))
