"""The top level of the parameters, and the hook that checks every block a run reads before any node.

The top-level keys (``conf/base/parameters.yml``): ``seed``, ``classes``, the data sources
(``source_format``/``source_path``, ``target_format``/``target_path``), ``prerequisites``,
and one block per pipeline, each with its schema in ``pipelines/<name>/params.py``
(:data:`BLOCKS`). :class:`ParameterChecks` validates the top level and every block a node of
the run takes (``params:<block>...``) before the first node, so a misspelt key, a wrong type
or a value out of range stops ``kedro run`` within seconds with one message naming each bad
key (dotted), its block and what the block allows. Rules and the node pattern:
:mod:`fu_kedro.schema`.
"""
from __future__ import annotations

from typing import Any, Literal

from kedro.framework.hooks import hook_impl
from pydantic import Field, ValidationError, field_validator

from fu_kedro.pipelines.base_training.params import BaseTrainingParams
from fu_kedro.pipelines.evaluation.params import EvaluationParams
from fu_kedro.pipelines.ingestion.params import IngestionParams
from fu_kedro.pipelines.lora_training.params import LoraTrainingParams
from fu_kedro.pipelines.synthesis.params import SynthesisParams
from fu_kedro.schema import Block, NonEmptyStr, NonNegInt, ParameterError, Str, message, problems

# the readers of fu_kedro.data_sources.readers (FORMATS)
DataFormat = Literal["phantom", "fetal_planes_db", "african", "folders"]


class Prerequisites(Block):
    on_lineage_mismatch: Literal["fail", "warn"]


class ProjectParams(Block):
    """The top level: flat keys (so that ``--params`` can set them) and the pipelines' blocks.

    The blocks are checked by their own schemas (:data:`BLOCKS`), only when a run reads them.
    """

    seed: NonNegInt
    classes: list[NonEmptyStr] = Field(min_length=1)
    source_format: DataFormat
    source_path: Str | None  # unused for phantom
    target_format: DataFormat
    target_path: Str | None
    prerequisites: Prerequisites
    ingestion: dict[str, Any]
    base_training: dict[str, Any]
    lora_training: dict[str, Any]
    synthesis: dict[str, Any]
    evaluation: dict[str, Any]

    @field_validator("classes")
    @classmethod
    def _distinct(cls, classes: list[str]) -> list[str]:
        repeated = sorted({c for c in classes if classes.count(c) > 1})
        if repeated:
            raise ValueError(f"classes {repeated} are listed more than once")
        return classes


BLOCKS: dict[str, type[Block]] = {
    "ingestion": IngestionParams,
    "base_training": BaseTrainingParams,
    "lora_training": LoraTrainingParams,
    "synthesis": SynthesisParams,
    "evaluation": EvaluationParams,
}


def blocks_read(pipeline) -> list[str]:
    """The blocks of :data:`BLOCKS` that a node of ``pipeline`` takes (``params:<block>[.<key>]``)."""
    names = {name.removeprefix("params:").split(".")[0] for name in pipeline.inputs() if name.startswith("params:")}
    return [b for b in BLOCKS if b in names]


def check_parameters(params: dict[str, Any], blocks: list[str] | None = None) -> None:
    """The top level and ``blocks`` (default: all) of ``params`` (all parameters, as a run resolves
    them); raise :class:`ParameterError` naming every bad key."""
    lines: list[str] = []
    try:
        ProjectParams.model_validate(params)
    except ValidationError as exc:
        lines += problems(exc, ProjectParams, "")
    for name in BLOCKS if blocks is None else blocks:
        if not isinstance(params.get(name), dict):
            continue  # named by the top level's check
        try:
            BLOCKS[name].model_validate(params[name])
        except ValidationError as exc:
            lines += problems(exc, BLOCKS[name], name)
    if lines:
        raise ParameterError(message(lines))


class ParameterChecks:
    """Kedro hook: the top level and every block the run's nodes read are valid, before the first
    node (and before the other hooks: kedro-mlflow opens no run for a bad command)."""

    @hook_impl(tryfirst=True)
    def before_pipeline_run(self, run_params: dict[str, Any], pipeline, catalog) -> None:
        check_parameters(catalog.load("parameters"), blocks_read(pipeline))
