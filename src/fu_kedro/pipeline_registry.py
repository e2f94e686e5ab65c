"""The project's pipelines. ``__default__`` runs all four in data-flow order."""
from __future__ import annotations

from kedro.pipeline import Pipeline

from fu_kedro.pipelines import evaluation, ingestion, lora_training, synthesis

PIPELINE_ORDER = ("ingestion", "lora_training", "synthesis", "evaluation")


def register_pipelines() -> dict[str, Pipeline]:
    """Register ``ingestion``, ``lora_training``, ``synthesis``, ``evaluation`` and ``__default__``."""
    pipelines = {
        "ingestion": ingestion.create_pipeline(),
        "lora_training": lora_training.create_pipeline(),
        "synthesis": synthesis.create_pipeline(),
        "evaluation": evaluation.create_pipeline(),
    }
    pipelines["__default__"] = sum((pipelines[name] for name in PIPELINE_ORDER), Pipeline([]))
    return pipelines
