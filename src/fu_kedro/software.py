"""What software a run ran on, so that a result can be tied to what made it.

``software_record()`` is taken once per ``kedro run`` (``fu_kedro.tracking.LineageHooks``):
it goes into every ``lineage.json`` of the run (key ``software``) and into the run's MLflow
run — tags ``fu.software.<key>`` for the short fields, the whole record as the artifact
``software.json``. Thread counts are the process's at the start of the run (nodes that pin
their own count record it with their outputs, e.g. a classifier's ``ran_on``).
"""
from __future__ import annotations

import importlib.metadata
import platform
import re
import sys
from typing import Any

# the fields that become MLflow tags fu.software.<key> (short values)
TAGGED = ("python", "torch", "cpu_model", "cpu_capability", "torch_threads", "torch_interop_threads", "platform")


def _packages() -> dict[str, str]:
    """Every distribution installed in this environment, ``{normalised name: version}``, sorted."""
    found: dict[str, str] = {}
    for dist in importlib.metadata.distributions():
        name = dist.metadata["Name"]
        if name:
            found.setdefault(re.sub(r"[-_.]+", "-", name).lower(), dist.version)
    return dict(sorted(found.items()))


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else ``platform.processor()``). Two CPUs with the same
    torch capability (e.g. AVX512) can still take other float paths: this says which CPU it was."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _blas() -> list[dict[str, Any]]:
    """The BLAS / OpenMP libraries loaded in this process and their thread counts (threadpoolctl)."""
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return []
    keys = ("user_api", "internal_api", "version", "num_threads", "threading_layer", "architecture")
    return [{k: info[k] for k in keys if k in info} for info in threadpool_info()]


def software_record() -> dict[str, Any]:
    """Python, platform, the CPU model, torch (version, CPU capability, thread counts), the BLAS libraries and
    every installed package with its version."""
    import torch

    return {
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "blas": _blas(),
        "packages": _packages(),
    }


def log_to_mlflow(client, run_id: str, record: dict[str, Any]) -> None:
    """Tags ``fu.software.<key>`` for the short fields, the whole record as ``software.json``."""
    for key in TAGGED:
        client.set_tag(run_id, f"fu.software.{key}", str(record.get(key)))
    client.log_dict(run_id, record, "software.json")
