"""``base_training``: the phantom prior corpus -> a tiny SD-architecture base, saved as a diffusers folder."""
from .pipeline import create_pipeline, create_pipeline_with_source  # noqa: F401
