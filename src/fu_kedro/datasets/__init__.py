"""Kedro datasets of this project (where kedro-datasets has none that fits)."""
from .diffusion import DiffusionModelDataset, LoraAdapterDataset
from .image_set import ImageSet, ImageSetDataset

__all__ = ["DiffusionModelDataset", "ImageSet", "ImageSetDataset", "LoraAdapterDataset"]
