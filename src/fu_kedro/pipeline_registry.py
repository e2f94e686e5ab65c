"""The project's pipelines. ``__default__`` runs four in data-flow order on the shipped base.

``base_training`` trains a tiny base on the phantom prior corpus alone (it needs no other
pipeline) into ``base_training.output_path``; conf/base's values remake the shipped
``models/tiny-phantom-sd``. ``with_base_training`` is ``__default__`` with the base trained in
the same run, after ingestion, on what ``base_training.train_on`` says (e.g. the phantom prior
plus the source-train images: ``kedro run --env real_cpu --pipeline with_base_training``);
``lora_training`` then reads that run's ``trained_base`` instead of ``pretrained_base``.
"""
from __future__ import annotations

from kedro.pipeline import Pipeline, pipeline

from fu_kedro.pipelines.base_training import pipeline as base_training
from fu_kedro.pipelines.evaluation import pipeline as evaluation
from fu_kedro.pipelines.ingestion import pipeline as ingestion
from fu_kedro.pipelines.lora_training import pipeline as lora_training
from fu_kedro.pipelines.synthesis import pipeline as synthesis

PIPELINE_ORDER = ("ingestion", "lora_training", "synthesis", "evaluation")


def register_pipelines() -> dict[str, Pipeline]:
    """Register ``ingestion``, ``base_training``, ``lora_training``, ``synthesis``, ``evaluation``,
    ``__default__`` and ``with_base_training``."""
    pipelines = {
        "ingestion": ingestion.create_pipeline(),
        "base_training": base_training.create_pipeline(),
        "lora_training": lora_training.create_pipeline(),
        "synthesis": synthesis.create_pipeline(),
        "evaluation": evaluation.create_pipeline(),
    }
    pipelines["__default__"] = sum((pipelines[name] for name in PIPELINE_ORDER), Pipeline([]))
    lora_on_trained_base = pipeline(pipelines["lora_training"], inputs={"pretrained_base": "trained_base"})
    pipelines["with_base_training"] = (pipelines["ingestion"] + base_training.create_pipeline_with_source()
                                       + lora_on_trained_base + pipelines["synthesis"] + pipelines["evaluation"])
    return pipelines
