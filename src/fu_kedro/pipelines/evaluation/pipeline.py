"""``evaluation`` pipeline: classifiers on real vs hybrid data, zero-shot metrics, synthetic quality, report.

Contract files and figures go to MLflow too, from their catalog entries' ``metadata.mlflow``
(``fu_kedro.tracking``): each node returns each output once."""
from kedro.pipeline import Node, Pipeline

from .nodes import (
    assess_synthetic_quality,
    build_report,
    check_synthetic_fidelity,
    classifier_curve_metrics,
    compute_zero_shot_metrics,
    make_vae_round_trip_controls,
    plan_experiments,
    predict_target,
    prepare_classifier_data,
    train_baseline_classifiers,
    train_cas_classifier,
    train_synthetic_arm_classifiers,
    zero_shot_mlflow_metrics,
)


# long: the list of nodes — reading it alone tells the data flow (the spaceflights shape)
def create_pipeline(**kwargs) -> Pipeline:
    """source/target images + synthetic batch -> trained classifiers -> contract files and report."""
    return Pipeline(
        [
            Node(
                prepare_classifier_data,
                inputs=["source_images", "target_images", "synthetic_batch", "params:evaluation", "params:classes"],
                outputs="classifier_data",
                name="prepare_classifier_data_node",
            ),
            Node(
                plan_experiments,
                inputs=["classifier_data", "params:evaluation", "params:seed"],
                outputs="evaluation_plan",
                name="plan_experiments_node",
            ),
            Node(
                train_baseline_classifiers,
                inputs=["classifier_data", "evaluation_plan", "params:evaluation"],
                outputs=["baseline_classifiers", "baseline_training_history"],
                name="train_baseline_classifiers_node",
            ),
            Node(  # the quality gate: fidelity first, before any hybrid classifier trains
                check_synthetic_fidelity,
                inputs=["classifier_data", "baseline_classifiers", "evaluation_plan", "params:evaluation",
                        "params:seed"],
                outputs="fidelity_gate",
                name="check_synthetic_fidelity_node",
            ),
            Node(
                train_synthetic_arm_classifiers,
                inputs=["classifier_data", "evaluation_plan", "params:evaluation", "baseline_classifiers",
                        "baseline_training_history", "fidelity_gate"],
                outputs=["trained_classifiers", "classifier_training_history"],
                name="train_synthetic_arm_classifiers_node",
            ),
            Node(
                predict_target,
                inputs=["classifier_data", "trained_classifiers", "evaluation_plan", "params:evaluation"],
                outputs="zero_shot_predictions",
                name="predict_target_node",
            ),
            Node(
                compute_zero_shot_metrics,
                inputs=["zero_shot_predictions", "evaluation_plan", "params:evaluation", "params:classes", "params:seed"],
                outputs="zero_shot_metrics",
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
                inputs=["classifier_data", "evaluation_plan", "params:evaluation", "params:seed", "fidelity_gate"],
                outputs="cas_classifier",
                name="train_cas_classifier_node",
            ),
            Node(
                classifier_curve_metrics,
                inputs=["classifier_training_history", "cas_classifier"],
                outputs="classifier_curve_metrics",
                name="classifier_curve_metrics_node",
            ),
            Node(
                make_vae_round_trip_controls,
                inputs=["base_model", "classifier_data", "params:evaluation", "params:seed"],
                outputs="memorisation_vae_controls",
                name="make_vae_round_trip_controls_node",
            ),
            Node(
                assess_synthetic_quality,
                inputs=["classifier_data", "trained_classifiers", "cas_classifier", "evaluation_plan",
                        "params:evaluation", "params:seed", "fidelity_gate", "memorisation_vae_controls"],
                outputs=["synthetic_quality", "synthetic_embedding"],
                name="assess_synthetic_quality_node",
            ),
            Node(
                build_report,
                inputs=["classifier_data", "evaluation_plan", "classifier_training_history", "zero_shot_metrics",
                        "synthetic_quality", "synthetic_embedding", "params:evaluation", "params:seed"],
                outputs=[
                    "evaluation_report",
                    "evaluation_confusion_matrices",
                    "evaluation_training_curves",
                    "evaluation_sample_grid",
                    "synthetic_embedding_plot",
                    "evaluation_per_center",
                ],
                name="build_report_node",
            ),
        ],
        tags="evaluation",
    )
