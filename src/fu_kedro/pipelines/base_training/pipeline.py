"""``base_training``: prior corpus -> tiny base -> ``trained_base`` (a diffusers folder + ``base_lineage.json``).

``kedro run --pipeline base_training`` needs no other pipeline: it trains on the phantom prior
corpus alone and writes the folder at ``base_training.output_path``. conf/base's values are
the ones the shipped base ``models/tiny-phantom-sd`` was made with, so

    kedro run --pipeline base_training

remakes it (into ``data/06_models/tiny-phantom-sd``; ``--params base_training.output_path=...``
elsewhere), the same weights bit for bit on a CPU of the same capability (its lineage file says which).

:func:`create_pipeline_with_source` is the variant for a base that also learns from the
source-train images (``base_training.train_on: prior+source``, the ``real_cpu`` profile): the
pipeline registry's ``with_base_training`` runs it between ``ingestion`` and ``lora_training``.
"""
from kedro.pipeline import Node, Pipeline

from .nodes import base_training_corpus, make_prior_corpus, plot_base_loss_curves, train_base_model


def _prior_corpus_node() -> Node:
    return Node(
        make_prior_corpus,
        inputs=["params:base_training.prior", "params:classes", "params:seed"],
        outputs="prior_corpus",
        name="make_prior_corpus_node",
    )


def _training_nodes(corpus: str) -> list[Node]:
    return [
        Node(
            train_base_model,
            inputs=[corpus, "params:base_training", "params:ingestion.caption_template", "params:seed"],
            outputs=["trained_base", "base_training_history"],
            name="train_base_model_node",
        ),
        Node(plot_base_loss_curves, inputs="base_training_history", outputs="base_loss_curves",
             name="plot_base_loss_curves_node"),
    ]


def create_pipeline(**kwargs) -> Pipeline:
    """The base trained on the prior corpus alone (``train_on: prior``): no ingestion needed."""
    return Pipeline([_prior_corpus_node(), *_training_nodes("prior_corpus")], tags="base_training")


def create_pipeline_with_source(**kwargs) -> Pipeline:
    """The base trained on ``base_training_corpus`` (prior and/or ingestion's ``source_images``, as ``train_on`` says)."""
    corpus = Node(base_training_corpus, inputs=["prior_corpus", "source_images", "params:base_training"],
                  outputs="base_training_corpus", name="base_training_corpus_node")
    return Pipeline([_prior_corpus_node(), corpus, *_training_nodes("base_training_corpus")], tags="base_training")
