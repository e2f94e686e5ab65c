"""``lora_training`` pipeline: base model -> LoRA adapter -> grid, curves, lineage, metrics.

The base is the catalog entry ``pretrained_base``: the diffusers folder at
``lora_training.base_model.pretrained_path`` — the shipped tiny base ``models/tiny-phantom-sd``
(default; made by the ``base_training`` pipeline), or SD v1.5 (the paper) — read by
``load_base_model_node`` into ``base_model`` (its reference: path and content hash). The LoRA
is trained on ``lora_subset`` (20 per class of the one-hospital source). In the registry's
``with_base_training`` the input ``pretrained_base`` is that run's ``trained_base`` instead.

Reusing the saved ``base_model`` reference without reading ``pretrained_base`` again::

    kedro run --pipeline lora_training --from-nodes fit_lora_adapter_node \
        [--load-versions base_model:<version>]

``fit_lora_adapter_node`` trains the adapter or, with ``lora_training.adapter_source=file``,
uses ``imported_lora_adapter`` (a router node: parameters are not known when the pipeline is built).
The base and the imported adapter file are catalog entries whose path is a parameter
(``pretrained_base``: ``base_model.pretrained_path``; ``imported_lora_adapter``: ``adapter_file``);
they load ``None`` when it is not set, and are read only when used.
``fit_lora_adapter_refits_node`` trains the independent fits 1..K-1 of ``lora_training.lora.fits``
(nothing when K = 1, the default) into ``lora_adapter_fits``.
"""
from kedro.pipeline import Node, Pipeline

from .nodes import (
    adapter_lineage,
    fit_lora_adapter,
    fit_lora_adapter_refits,
    load_base_model,
    plot_loss_curves,
    render_validation_grid,
    training_metrics,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                load_base_model,
                inputs=["pretrained_base", "params:lora_training"],
                outputs="base_model",
                name="load_base_model_node",
            ),
            Node(
                fit_lora_adapter,
                inputs=["base_model", "lora_subset", "params:lora_training", "params:seed", "imported_lora_adapter"],
                outputs=["lora_adapter", "lora_training_history", "lora_training_summary"],
                name="fit_lora_adapter_node",
            ),
            Node(
                fit_lora_adapter_refits,
                inputs=["base_model", "lora_subset", "lora_adapter", "params:lora_training", "params:seed"],
                outputs="lora_adapter_fits",
                name="fit_lora_adapter_refits_node",
            ),
            Node(
                render_validation_grid,
                inputs=[
                    "base_model",
                    "lora_adapter",
                    "params:lora_training",
                    "params:classes",
                    "params:ingestion.caption_template",
                    "params:seed",
                ],
                outputs="lora_validation_grid",
                name="render_validation_grid_node",
            ),
            Node(
                plot_loss_curves,
                inputs="lora_training_history",
                outputs="lora_loss_curves",
                name="plot_loss_curves_node",
            ),
            Node(
                adapter_lineage,
                inputs=["base_model", "lora_adapter", "lora_training_summary"],
                outputs="lora_lineage",
                name="adapter_lineage_node",
            ),
            Node(
                training_metrics,
                inputs=["lora_training_history", "lora_training_summary", "lora_lineage"],
                outputs="lora_training_metrics",
                name="log_training_metrics_node",
            ),
        ],
        tags="lora_training",
    )
