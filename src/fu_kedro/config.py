"""Reading ``conf/``: the project's config loader, and blocks of parameters into typed settings, strictly.

``ProjectConfigLoader`` is Kedro's ``OmegaConfigLoader`` plus one resolver for the catalog,
``${params:<dotted.key>}``: a catalog entry whose path is a parameter (the pretrained base,
an imported LoRA file) reads it from the run's resolved parameters — conf/base, the env's
parameter files and ``--params``, merged as for the nodes. The parameter stays the one place
where a user sets the path.

Every training loop (autoencoder, base denoiser, LoRA, classifiers, CAS) takes its knobs
from a parameter block. A misspelt key (``lora: {max_step: 5}``) would otherwise be
ignored silently and the loop would run with the default — so an unknown key stops the
run, naming the key, the block and the keys that block accepts.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Iterable, TypeVar

from kedro.config import OmegaConfigLoader
from kedro.framework.hooks import hook_impl
from omegaconf import OmegaConf

T = TypeVar("T")


_REQUIRED = object()
_MISSING = object()


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


class UnknownSettingError(ValueError):
    """A parameter block has a key its loop does not know (most likely a typo)."""


# The class list's old homes: one copy per block until issue #16; now the top-level `classes`
# parameter (conf/base/parameters.yml) that every node needing it takes as `params:classes`.
MOVED_CLASS_LISTS = (
    "evaluation.classes",
    "synthesis.classes",
    "lora_training.validation.classes",
    "lora_training.base_model.tiny.prior.classes",
    "base_training.prior.classes",
    "ingestion.required_classes.source",
)


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


def moved_class_list_message(keys: Iterable[str]) -> str:
    keys = list(keys)
    return (f"{', '.join(keys)} {'has' if len(keys) == 1 else 'have'} moved to the top-level `classes` parameter "
            "(conf/base/parameters.yml): one list for every pipeline (the source must have each class; the prior "
            "corpus, validation grid, synthetic batch and classifiers use it). Remove the old key(s) and set "
            "`classes` instead, e.g. `kedro run --params classes=[brain]` (several classes: README, "
            "\"The class list\").")


def check_moved_class_lists(params: dict[str, Any]) -> None:
    """Raise :class:`UnknownSettingError` naming every old per-block class list still set in ``params`` (all parameters)."""
    found = [dotted for dotted in MOVED_CLASS_LISTS if _dig(params, dotted, _MISSING) is not _MISSING]
    if found:
        raise UnknownSettingError(moved_class_list_message(found))


def check_keys(values: dict[str, Any], allowed: Iterable[str], where: str) -> None:
    """Raise :class:`UnknownSettingError` if ``values`` has a key outside ``allowed``.

    ``where`` names the block in the message, e.g. ``"lora_training.lora"``. An old home of
    the class list (:data:`MOVED_CLASS_LISTS`) gets a message saying where it went.
    """
    allowed = sorted(set(allowed))
    unknown = sorted(set(values) - set(allowed))
    moved = [f"{where}.{key}" for key in unknown if f"{where}.{key}" in MOVED_CLASS_LISTS]
    if moved:
        raise UnknownSettingError(moved_class_list_message(moved))
    if unknown:
        raise UnknownSettingError(
            f"{where}: unknown key(s) {unknown} — allowed keys are {allowed}. "
            "A misspelt key would silently fall back to its default, so the run stops here."
        )


def strict_dataclass(cls: type[T], values: dict[str, Any] | None, where: str, ignore: Iterable[str] = ()) -> T:
    """``cls(**values)`` after :func:`check_keys` against the dataclass's fields.

    ``ignore`` lists keys that belong to the block but are read elsewhere (for example the
    autoencoder's ``kl_weight``); they are accepted and not passed to ``cls``.
    """
    values = dict(values or {})
    ignore = set(ignore)
    fields = {f.name for f in dataclasses.fields(cls)}
    check_keys(values, fields | ignore, where)
    return cls(**{k: v for k, v in values.items() if k not in ignore})


def check_lora_training(params: dict[str, Any]) -> None:
    """Every training block of ``lora_training`` (the base block, the LoRA) is complete and has
    no unknown key. Raises naming the block and key."""
    from fu_kedro.pipelines.lora_training.nodes import LORA_KEYS, _loop, check_base_model_block

    block = params.get("lora_training") or {}
    check_base_model_block(block.get("base_model") or {})
    if block.get("adapter_source", "train") == "train" and "lora" in block:
        _loop(block["lora"], 0, "lora_training.lora", LORA_KEYS)


class ParameterChecks:
    """Kedro hook: the training blocks (and, for any pipeline, the old class-list keys) are checked
    before any node runs, so a typo stops ``kedro run`` within seconds instead of after the steps
    before the loop that reads it."""

    @hook_impl
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        params = catalog.load("parameters")
        check_moved_class_lists(params)  # any pipeline: an old class-list key would be ignored silently
        names = {node.name for node in pipeline.nodes}
        if names & {"load_base_model_node", "fit_lora_adapter_node"}:
            check_lora_training(params)
        if "train_base_model_node" in names:
            from fu_kedro.pipelines.base_training.nodes import check_base_training

            check_base_training(params.get("base_training") or {})
