"""``synthesis`` pipeline: base model + LoRA adapter -> plan -> shard(s) -> one versioned batch -> preview.

The default run makes the whole batch as its one shard and merges it::

    kedro run --pipeline synthesis [--load-versions base_model:<v>,lora_adapter:<v>]

A big batch split by image index, one shard per machine/GPU, then one merge (the same
parameters and model versions everywhere)::

    kedro run --pipeline synthesis --tags synthesis_shard --params synthesis.num_shards=4,synthesis.shard_index=0
    ...                                                                  (shard_index 1, 2, 3)
    kedro run --pipeline synthesis --tags synthesis_merge --params synthesis.num_shards=4

Several processes on one machine (GPUs, or CPU cores with gloo) share one shard instead::

    python -m fu_kedro.launch --num_processes 2 run --pipeline synthesis

``lora_adapter_fits`` (LoRA fits 1..K-1, ``lora_training.lora.fits``) is read only with
``synthesis.adapter_per_replicate: true`` (replicate r made with fit r); otherwise a project
that never saved it runs as before.
"""
from kedro.pipeline import Node, Pipeline

from .nodes import generate_synthetic_shard, merge_synthetic_shards, plan_synthetic_batch, summarize_synthetic_batch

SHARD, MERGE = "synthesis_shard", "synthesis_merge"


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                plan_synthetic_batch,
                inputs=[
                    "base_model",
                    "lora_adapter",
                    "params:ingestion.caption_template",
                    "params:ingestion.plane_labels",
                    "params:synthesis",
                    "params:classes",
                    "params:seed",
                    "lora_adapter_fits",
                ],
                outputs="synthesis_plan",
                name="plan_synthetic_batch_node",
                tags=[SHARD, MERGE],
            ),
            Node(
                generate_synthetic_shard,
                inputs=["base_model", "lora_adapter", "synthesis_plan", "params:synthesis", "lora_adapter_fits"],
                outputs="synthetic_shards",
                name="generate_synthetic_shard_node",
                tags=[SHARD],
            ),
            Node(
                merge_synthetic_shards,
                inputs=["synthetic_shards", "synthesis_plan", "params:synthesis"],
                outputs="synthetic_batch",
                name="merge_synthetic_shards_node",
                tags=[MERGE],
            ),
            Node(
                summarize_synthetic_batch,
                inputs=["synthetic_batch", "params:synthesis", "params:classes"],
                outputs=["synthetic_preview_grid", "synthesis_metrics"],
                name="summarize_synthetic_batch_node",
                tags=[MERGE],
            ),
        ],
        tags="synthesis",
    )
