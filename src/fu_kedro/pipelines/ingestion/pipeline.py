"""``ingestion``: source/target folders (or phantoms) -> validated, preprocessed, split image sets."""
from kedro.pipeline import Node, Pipeline

from .nodes import (
    build_quarantine_report,
    check_source_target_separation,
    count_ingestion,
    draw_lora_subset,
    plot_preview_grid,
    read_source_images,
    read_target_images,
    split_source_by_patient,
)


def create_pipeline(**kwargs) -> Pipeline:
    return Pipeline(
        [
            Node(
                func=read_source_images,
                inputs=["params:source_format", "params:source_path", "params:seed", "params:ingestion", "params:classes"],
                outputs=["source_images_unsplit", "source_quarantine"],
                name="read_source_images_node",
            ),
            Node(
                func=read_target_images,
                inputs=["params:target_format", "params:target_path", "params:seed", "params:ingestion"],
                outputs=["target_images", "target_quarantine"],
                name="read_target_images_node",
            ),
            Node(
                func=check_source_target_separation,
                inputs=["source_images_unsplit", "target_images", "params:ingestion"],
                outputs="source_images_separated",
                name="check_source_target_separation_node",
            ),
            Node(
                func=split_source_by_patient,
                inputs=["source_images_separated", "params:seed", "params:ingestion"],
                outputs="source_images",
                name="split_source_by_patient_node",
            ),
            Node(
                func=draw_lora_subset,
                inputs=["source_images", "params:seed", "params:ingestion", "params:classes"],
                outputs="lora_subset",
                name="draw_lora_subset_node",
            ),
            Node(
                func=build_quarantine_report,
                inputs=["source_quarantine", "target_quarantine"],
                outputs="quarantine_report",
                name="build_quarantine_report_node",
            ),
            Node(
                func=count_ingestion,
                inputs=["source_images", "target_images", "lora_subset"],
                outputs="ingestion_metrics",
                name="count_ingestion_node",
            ),
            Node(
                func=plot_preview_grid,
                inputs=["source_images", "target_images", "params:ingestion"],
                outputs="ingestion_preview_grid",
                name="plot_preview_grid_node",
            ),
        ],
        tags="ingestion",
    )
