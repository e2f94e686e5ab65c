"""Kedro datasets of this project (where kedro-datasets has none that fits).

Imported lazily (PEP 562): ``fu_kedro.datasets.versions`` and the hooks that use it are
loaded for every ``kedro`` command, the model datasets (torch, diffusers) only when used.
"""
from __future__ import annotations

import importlib

_HOMES = {
    "DiffusionModelDataset": ".diffusion",
    "LoraAdapterDataset": ".diffusion",
    "LoraAdapterFitsDataset": ".diffusion",
    "LoraAdapterFileDataset": ".diffusion",
    "PretrainedBaseDataset": ".diffusion",
    "TrainedBaseDataset": ".diffusion",
    "ImageSet": ".image_set",
    "ImageSetDataset": ".image_set",
    "ImageSetShardsDataset": ".image_set_shards",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
