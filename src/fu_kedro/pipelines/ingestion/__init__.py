"""The ``ingestion`` pipeline.

The pipeline (and its nodes, which import torch) load on first use of ``create_pipeline``,
so that ``params`` (the block's schema) imports without them.
"""

__all__ = ["create_pipeline"]


def __getattr__(name: str):
    if name in __all__:
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
