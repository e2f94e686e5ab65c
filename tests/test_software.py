"""Every run records its software (``fu_kedro.software``): package versions, Python, torch's CPU
capability and thread counts, in each ``lineage.json`` and on the run's MLflow run."""
from __future__ import annotations

import importlib.metadata
import json
import platform
from pathlib import Path

import pytest
import torch
from conftest import run_kedro_session

from fu_kedro import lineage as L
from fu_kedro.software import software_record

TINY = {"ingestion": {"phantom": {"source": {"n_per_class": 6}, "target": {"n_per_class": 3}},
                      "image_size": 48, "lora_per_class": 2, "preview": {"per_class": 1}}}


def test_software_record_names_this_environment():
    record = software_record()
    assert record["python"] == platform.python_version()
    assert record["torch"] == torch.__version__
    assert record["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and record["cpu_capability"]
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():  # Linux: the model name the kernel reports
        names = [l.split(":", 1)[1].strip() for l in cpuinfo.read_text(errors="replace").splitlines()
                 if l.lower().startswith("model name")]
        assert not names or record["cpu_model"] == names[0]
    assert record["cpu_model"]
    assert record["torch_threads"] == torch.get_num_threads() >= 1
    assert record["torch_interop_threads"] == torch.get_num_interop_threads() >= 1
    for name in ("torch", "kedro", "pluggy", "mlflow", "kedro-mlflow", "diffusers", "numpy"):
        assert record["packages"][name] == importlib.metadata.version(name), name
    assert len(record["packages"]) > 50 and list(record["packages"]) == sorted(record["packages"])
    assert all(isinstance(b.get("num_threads"), int) for b in record["blas"])
    assert json.loads(json.dumps(record)) == record  # goes into JSON as it is


@pytest.mark.slow  # an ingestion run in a project copy
def test_a_run_records_its_software_in_lineage_and_mlflow(project_copy: Path, tmp_path):
    from mlflow.tracking import MlflowClient

    run_kedro_session(project_copy, "ingestion", TINY)
    folder = project_copy / "data" / "03_primary" / "source_images"
    version = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))[-1]
    sidecar = json.loads((folder / version / L.SIDECAR).read_text())
    software = sidecar["software"]
    assert software["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert software["python"] == platform.python_version()
    assert software["packages"]["torch"] == importlib.metadata.version("torch")
    assert software["packages"]["pluggy"] == importlib.metadata.version("pluggy")

    client = MlflowClient(tracking_uri=f"sqlite:///{project_copy}/mlflow.db")
    (run,) = client.search_runs([client.get_experiment_by_name("fu_kedro").experiment_id])
    tags = run.data.tags
    assert tags["fu.software.cpu_capability"] == software["cpu_capability"]
    assert tags["fu.software.cpu_model"] == software["cpu_model"]  # which CPU: the capability alone does not pin the bits
    assert tags["fu.software.python"] == software["python"] and tags["fu.software.torch"] == software["torch"]
    assert tags["fu.software.torch_threads"] == str(software["torch_threads"])
    logged = json.loads(Path(client.download_artifacts(run.info.run_id, "software.json", str(tmp_path))).read_text())
    assert logged == software  # the same record in MLflow as beside the data
