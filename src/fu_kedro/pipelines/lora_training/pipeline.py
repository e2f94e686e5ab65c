"""``lora_training`` pipeline: prior corpus + source images -> base model -> LoRA adapter -> grid, curves, lineage, metrics.

The tiny base is trained on ``prior_corpus`` (broad phantom styles, FU-LoRA's "broad
prior"; ``base_model.tiny.train_on``), the LoRA on ``lora_subset`` (20 per class of the
one-hospital source).

Reusing an earlier tiny base instead of training it again (documented in the README)::

    kedro run --pipeline lora_training --from-nodes fit_lora_adapter_node \
        [--load-versions base_model:<version>]

``--from-nodes`` skips ``build_base_model_node``; ``base_model`` (and, by default, its
training history) is then loaded from the catalog — the latest version, or the pinned one.
``fit_lora_adapter_node`` trains the adapter or, with ``lora_training.adapter_source=file``,
uses ``imported_lora_adapter`` (a router node: parameters are not known when the pipeline is built).
The pretrained base and the imported adapter file are catalog entries whose path is a
parameter (``pretrained_base``: ``base_model.pretrained_path``; ``imported_lora_adapter``:
``adapter_file``); they load ``None`` when it is not set, and are read only when used.
``fit_lora_adapter_refits_node`` trains the independent fits 1..K-1 of ``lora_training.lora.fits``
(nothing when K = 1, the default) into ``lora_adapter_fits``.
"""
from kedro.pipeline import Node, Pipeline

from fu_kedro.data_sources.prior_corpus import make_prior_corpus

from .nodes import (
    adapter_lineage,
    build_base_model,
    fit_lora_adapter,
    fit_lora_adapter_refits,
    plot_loss_curves,
    render_validation_grid,
    training_metrics,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                make_prior_corpus,
                inputs=["params:lora_training.base_model.tiny.prior", "params:classes", "params:seed"],
                outputs="prior_corpus",
                name="make_prior_corpus_node",
            ),
            Node(
                build_base_model,
                inputs=[
                    "source_images",
                    "prior_corpus",
                    "params:lora_training",
                    "params:ingestion.caption_template",
                    "params:seed",
                    "pretrained_base",
                ],
                outputs=["base_model", "base_training_history"],
                name="build_base_model_node",
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
                inputs=["base_training_history", "lora_training_history"],
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
                inputs=["base_training_history", "lora_training_history", "lora_training_summary", "lora_lineage"],
                outputs="lora_training_metrics",
                name="log_training_metrics_node",
            ),
        ],
        tags="lora_training",
    )
