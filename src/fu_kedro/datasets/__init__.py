"""Kedro datasets of this project (where kedro-datasets has none that fits)."""
from .diffusion import DiffusionModelDataset, LoraAdapterDataset
from .image_set import ImageSet, ImageSetDataset
from .image_set_shards import ImageSetShardsDataset

__all__ = ["DiffusionModelDataset", "ImageSet", "ImageSetDataset", "ImageSetShardsDataset", "LoraAdapterDataset"]
