"""``evaluation`` pipeline: classifiers on real vs hybrid data, zero-shot metrics, synthetic quality, report."""
from functools import update_wrapper

from kedro.pipeline import Node, Pipeline

from .nodes import (
    assess_synthetic_quality,
    build_report,
    compute_zero_shot_metrics,
    plan_experiments,
    predict_target,
    prepare_classifier_data,
    train_cas_classifier,
    train_experiments,
    zero_shot_mlflow_metrics,
)


# outputs of each node; '+mlflow' = also written to <name>_mlflow
PLAN_EXPERIMENTS_OUT = ("evaluation_plan+mlflow",)
TRAIN_EXPERIMENTS_OUT = (
    "trained_classifiers",
    "classifier_training_history+mlflow",
)
PREDICT_TARGET_OUT = ("zero_shot_predictions+mlflow",)
COMPUTE_ZERO_SHOT_METRICS_OUT = ("zero_shot_metrics+mlflow",)
ASSESS_SYNTHETIC_QUALITY_OUT = (
    "synthetic_quality+mlflow",
    "synthetic_embedding",
)
BUILD_REPORT_OUT = (
    "evaluation_report+mlflow",
    "evaluation_confusion_matrices+mlflow",
    "evaluation_training_curves+mlflow",
    "evaluation_sample_grid+mlflow",
    "synthetic_embedding_plot+mlflow",
    "evaluation_per_center+mlflow",
)


def with_mlflow_copies(func, copied: list[bool]):
    """``func`` with each output flagged in ``copied`` returned twice: for ``<name>`` (versioned
    local file) and ``<name>_mlflow`` (MLflow artifact); see catalog_evaluation.yml for why."""

    def wrapper(*args):
        out = func(*args)
        out = out if isinstance(out, tuple) else (out,)
        return tuple(x for value, twice in zip(out, copied) for x in ((value, value) if twice else (value,)))

    return update_wrapper(wrapper, func)


def _outputs(*names: str) -> list[str]:
    """Output names; a name ending in ``+mlflow`` also gets its ``_mlflow`` copy."""
    out = []
    for name in names:
        base = name.removesuffix("+mlflow")
        out += [base, f"{base}_mlflow"] if name.endswith("+mlflow") else [base]
    return out


def _copied(*names: str) -> list[bool]:
    return [name.endswith("+mlflow") for name in names]


def create_pipeline(**kwargs) -> Pipeline:
    """source/target images + synthetic batch -> trained classifiers -> contract files and report."""
    return Pipeline(
        [
            Node(
                prepare_classifier_data,
                inputs=["source_images", "target_images", "synthetic_batch", "params:evaluation"],
                outputs="classifier_data",
                name="prepare_classifier_data_node",
            ),
            Node(
                with_mlflow_copies(plan_experiments, _copied(*PLAN_EXPERIMENTS_OUT)),
                inputs=["classifier_data", "params:evaluation", "params:seed"],
                outputs=_outputs(*PLAN_EXPERIMENTS_OUT),
                name="plan_experiments_node",
            ),
            Node(
                with_mlflow_copies(train_experiments, _copied(*TRAIN_EXPERIMENTS_OUT)),
                inputs=["classifier_data", "evaluation_plan", "params:evaluation"],
                outputs=_outputs(*TRAIN_EXPERIMENTS_OUT),
                name="train_experiments_node",
            ),
            Node(
                with_mlflow_copies(predict_target, _copied(*PREDICT_TARGET_OUT)),
                inputs=["classifier_data", "trained_classifiers", "evaluation_plan"],
                outputs=_outputs(*PREDICT_TARGET_OUT),
                name="predict_target_node",
            ),
            Node(
                with_mlflow_copies(compute_zero_shot_metrics, _copied(*COMPUTE_ZERO_SHOT_METRICS_OUT)),
                inputs=["zero_shot_predictions", "evaluation_plan", "params:evaluation", "params:seed"],
                outputs=_outputs(*COMPUTE_ZERO_SHOT_METRICS_OUT),
                name="compute_zero_shot_metrics_node",
            ),
            Node(
                zero_shot_mlflow_metrics,
                inputs="zero_shot_metrics",
                outputs="zero_shot_headline_metrics",
                name="zero_shot_mlflow_metrics_node",
            ),
            Node(
                train_cas_classifier,
                inputs=["classifier_data", "evaluation_plan", "params:evaluation", "params:seed"],
                outputs="cas_classifier",
                name="train_cas_classifier_node",
            ),
            Node(
                with_mlflow_copies(assess_synthetic_quality, _copied(*ASSESS_SYNTHETIC_QUALITY_OUT)),
                inputs=["classifier_data", "trained_classifiers", "cas_classifier", "evaluation_plan",
                        "params:evaluation", "params:seed"],
                outputs=_outputs(*ASSESS_SYNTHETIC_QUALITY_OUT),
                name="assess_synthetic_quality_node",
            ),
            Node(
                with_mlflow_copies(build_report, _copied(*BUILD_REPORT_OUT)),
                inputs=["classifier_data", "evaluation_plan", "classifier_training_history", "zero_shot_metrics",
                        "synthetic_quality", "synthetic_embedding", "params:evaluation", "params:seed"],
                outputs=_outputs(*BUILD_REPORT_OUT),
                name="build_report_node",
            ),
        ],
        tags="evaluation",
    )
