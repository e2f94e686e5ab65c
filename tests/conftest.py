"""Fixtures shared by the project's tests (real sample folders, parameters, phantom sets)."""
from __future__ import annotations

import copy
import functools
import shutil
from pathlib import Path

import pytest
import yaml

PROJECT_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def project_root() -> Path:
    return PROJECT_ROOT


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """``<project root>/../shared/data``: the real samples (read-only; never copy into the repo)."""
    path = (PROJECT_ROOT / ".." / "shared" / "data").resolve()
    if not path.is_dir():
        pytest.fail(f"shared real-data folder not found at {path} (expected ../shared/data beside the project)")
    return path


@pytest.fixture(scope="session")
def fetal_planes_db_sample(shared_data_dir) -> Path:
    """The 100-image FETAL_PLANES_DB sample (20 per class)."""
    path = shared_data_dir / "fetal_planes_db_sample"
    if not (path / "FETAL_PLANES_DB_data.csv").is_file():
        pytest.fail(f"{path}: FETAL_PLANES_DB_data.csv missing")
    return path


@pytest.fixture(scope="session")
def african_planes_dev(shared_data_dir) -> Path:
    """The 217-image African dev set (5 centers, 4 classes, mixed grayscale/RGB)."""
    path = shared_data_dir / "african_planes_dev"
    if not path.is_dir():
        pytest.fail(f"{path}: not found")
    return path


def project_config(key: str, env: str | None = None, runtime_params: dict | None = None) -> dict:
    """The project's resolved ``parameters`` or ``catalog`` as ``kedro run [--env <env>] [--params ...]``
    sees them: the project's config loader and arguments (soft merge of envs, resolvers, ``${params:...}``)."""
    from fu_kedro.settings import CONFIG_LOADER_ARGS, CONFIG_LOADER_CLASS

    loader = CONFIG_LOADER_CLASS(str(PROJECT_ROOT / "conf"), env=env, runtime_params=runtime_params, **CONFIG_LOADER_ARGS)
    return loader[key]


def project_parameters(env: str | None = None, runtime_params: dict | None = None) -> dict:
    """The project's resolved parameters (:func:`project_config`)."""
    return project_config("parameters", env, runtime_params)


@functools.lru_cache(maxsize=1)
def _base_parameters() -> dict:
    return project_parameters("base")


def base_params(block: str) -> dict:
    """A fresh copy of one block of conf/base's parameters, resolved as a run resolves them
    (interpolations resolved): not the raw YAML."""
    return copy.deepcopy(_base_parameters()[block])


@pytest.fixture
def ingestion_params() -> dict:
    """A fresh copy of the ``ingestion:`` block of conf/base/parameters_ingestion.yml."""
    return base_params("ingestion")


@pytest.fixture(scope="session")
def small_phantom_sets():
    """Small seeded phantom source (12 per class) and target (8 per class) sets at 64 px."""
    from fu_kedro.data_sources import generate_phantoms

    return (generate_phantoms("source", 12, 64, seed=7), generate_phantoms("target", 8, 64, seed=7))


def copy_project(project_root: Path, tmp_path: Path) -> Path:
    """The project's conf + pyproject + src + models (the shipped tiny base) in a temporary folder, MLflow pointed there too.

    For tests that run pipelines through a ``KedroSession``: nothing they write lands in
    the real project (data/, mlflow.db).
    """
    shutil.copytree(project_root / "conf", tmp_path / "conf", ignore=shutil.ignore_patterns("local"))
    (tmp_path / "conf" / "local").mkdir()
    shutil.copy(project_root / "pyproject.toml", tmp_path / "pyproject.toml")
    # Kedro wants the package source inside the project folder (a symlink is refused)
    shutil.copytree(project_root / "src", tmp_path / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copytree(project_root / "models", tmp_path / "models", ignore=shutil.ignore_patterns("stable-diffusion-v1-5", "fu-lora"))
    mlflow_yml = tmp_path / "conf" / "local" / "mlflow.yml"
    mlflow_yml.write_text(yaml.safe_dump({"server": {"mlflow_tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}))
    return tmp_path


@pytest.fixture
def project_copy(project_root, tmp_path) -> Path:
    """A temporary copy of the project (see :func:`copy_project`)."""
    return copy_project(project_root, tmp_path)


def run_kedro_session(project: Path, pipeline: str, runtime_params: dict | None = None, **run_kwargs):
    """``kedro run --pipeline <pipeline>`` in-process on a project copy: one MLflow run per call.

    MLflow's fluent API keeps the active run in the process; a run left open by an earlier
    in-process session would make kedro-mlflow log into it ("already active ... mlflow.yml is
    ignored"), so none is left before or after.
    """
    import mlflow
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    while mlflow.active_run():
        mlflow.end_run()
    bootstrap_project(project)
    try:
        with KedroSession.create(project_path=project, runtime_params=runtime_params or {}) as session:
            return session.run(pipeline_name=pipeline, **run_kwargs)
    finally:
        while mlflow.active_run():
            mlflow.end_run()


# `kedro run --params` for a tiny end-to-end run (CLI tests): every node runs, on tiny data
# (the base is the shipped models/tiny-phantom-sd: nothing trains it in a default run)
TINY_RUN_PARAMS = [
    "ingestion.phantom.source.n_per_class=12",
    "ingestion.phantom.source.class_proportions=null",  # 12 of each class (conf/base's shares leave ~3 abdomen of 60)
    "ingestion.phantom.target.n_per_class=4",
    "ingestion.lora_per_class=4",
    "ingestion.image_size=64",
    "lora_training.lora.max_steps=4",
    "lora_training.validation.per_class=1",
    "lora_training.validation.steps=2",
    "synthesis.images_per_class=2",
    "synthesis.steps=2",
    "synthesis.batch_size=2",
    "synthesis.preview.per_class=1",
    # one generator replicate (conf/base: K = 3 LoRA fits, one per replicate); tests of K >= 2 set their own
    "lora_training.lora.fits=1",
    "synthesis.replicates=1",
    "synthesis.adapter_per_replicate=false",
]

# `kedro run --pipeline base_training --params` at shrunk sizes (seconds)
TINY_BASE_PARAMS = [
    "base_training.prior.n_per_class=6",
    "base_training.autoencoder.max_steps=4",
    "base_training.denoiser.max_steps=4",
]

# the evaluation part of a tiny end-to-end run (one seed, the shortest schedule)
TINY_EVAL_PARAMS = [
    "evaluation.n_seeds=1",
    "evaluation.train.steps=4",
    "evaluation.train.eval_every=2",
    "evaluation.metrics.n_bootstrap=10",
    "evaluation.quality.tsne_perplexity=5",
]


def load_script(name: str):
    """``scripts/<name>.py`` imported as a module (the scripts folder is not a package)."""
    import importlib.util
    import sys

    spec = importlib.util.spec_from_file_location(name, PROJECT_ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
