"""Kedro datasets of this project (where kedro-datasets has none that fits)."""
from .image_set import ImageSet, ImageSetDataset

__all__ = ["ImageSet", "ImageSetDataset"]
