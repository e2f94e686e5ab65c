"""The base diffusion model of a run: diffusers' pipeline and what is known about it, side by side.

``info`` is the model's reference (``kind``: tiny | pretrained, ``name``, ``resolution``,
``content_hash``; for a pretrained base the ``model`` id/path it is read from; for the tiny
base its training record, e.g. ``time_capped``) plus, once loaded from the catalog, its
``catalog_version``. It is what ``datasets.DiffusionModelDataset`` writes as ``reference.json``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

from diffusers import StableDiffusionPipeline

from fu_kedro.models.diffusion import TINY_BASE_NAME, pipeline_hash


@dataclass
class BaseModel:
    pipe: StableDiffusionPipeline
    info: dict[str, Any] = field(default_factory=dict)


def describe_base(base: BaseModel) -> dict[str, Any]:
    """The lineage record of a base model: name, source and content hash."""
    info = copy.deepcopy(base.info)
    info.setdefault("name", TINY_BASE_NAME)
    info["content_hash"] = info.get("content_hash") or pipeline_hash(base.pipe)
    return info
