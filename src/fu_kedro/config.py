"""Reading ``conf/``: the project's config loader.

``ProjectConfigLoader`` is Kedro's ``OmegaConfigLoader`` plus one resolver for the catalog,
``${params:<dotted.key>}``: a catalog entry whose path is a parameter (the pretrained base,
an imported LoRA file) reads it from the run's resolved parameters — conf/base, the env's
parameter files and ``--params``, merged as for the nodes. The parameter stays the one place
where a user sets the path.

The parameters' schemas and the hook that checks them before any node runs:
:mod:`fu_kedro.params` (top level) and ``pipelines/<name>/params.py`` (one per block).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

from kedro.config import OmegaConfigLoader
from omegaconf import OmegaConf

_REQUIRED = object()


class ProjectConfigLoader(OmegaConfigLoader):
    """``OmegaConfigLoader`` whose catalog may say ``${params:<dotted.key>}`` (see module docstring).

    Kedro's own ``${runtime_params:...}`` sees ``--params`` only, not an env's parameter files;
    this resolver sees the merged parameters, so ``conf/paper/parameters_lora_training.yml``
    and ``--params lora_training.base_model.pretrained_path=...`` reach the catalog entry alike.
    A key that is not a parameter is an error (a typo would otherwise load nothing).
    """

    def __getitem__(self, key: str) -> dict[str, Any]:
        # ${fu_project_root:} (conf/base/mlflow.yml) is the project this loader reads (the folder
        # holding its conf/), never where the fu_kedro package happens to be imported from: a
        # copied project, or one whose package was imported before Kedro put its src first on
        # sys.path, keeps its MLflow store inside itself.
        root = Path(self.conf_source).resolve().parent.as_posix()
        OmegaConf.register_resolver("fu_project_root", lambda: root, replace=True)
        if key == "catalog" and key not in self:
            params = super().__getitem__("parameters")
            # resolvers are process-global: (re)registered for this loader right before it resolves its catalog
            OmegaConf.register_resolver("params", lambda name, default=_REQUIRED: _dig(params, name, default),
                                        replace=True)
        return super().__getitem__(key)


def _dig(params: dict[str, Any], dotted: str, default: Any = _REQUIRED) -> Any:
    value: Any = params
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            if default is _REQUIRED:
                raise KeyError(f"${{params:{dotted}}} in the catalog: no parameter {dotted!r}")
            return default
        value = value[part]
    return value


def nested_params(pairs: Iterable[str]) -> dict[str, Any]:
    """``kedro run --params`` items (``a.b=value``, values parsed as YAML) as the nested dict a
    ``KedroSession`` takes as ``runtime_params`` (it does not split dotted keys itself)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        *parents, leaf = key.split(".")
        node = out
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return out
