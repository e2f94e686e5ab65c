"""The base diffusion model of a run: diffusers' pipeline and what is known about it, side by side.

``info`` is the model's reference (``kind``: tiny | pretrained, ``name``, ``resolution``,
``content_hash``; for a pretrained base the ``model`` id/path it is read from; for the tiny
base its training record, e.g. ``time_capped``) plus, once loaded from the catalog, its
``catalog_version``. It is what ``datasets.DiffusionModelDataset`` writes as ``reference.json``.

A base loaded from the catalog reads its weights on the first use of ``pipe``: a node that
needs only ``info`` (the adapter's lineage record) never loads them.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

from diffusers import StableDiffusionPipeline

from fu_kedro.models.diffusion import TINY_BASE_NAME, pipeline_hash


class BaseModel:
    """``pipe`` (given, or made by ``load()`` on first use) and ``info``."""

    def __init__(self, pipe: StableDiffusionPipeline | None = None, info: dict[str, Any] | None = None,
                 load: Callable[[], StableDiffusionPipeline] | None = None):
        self._pipe, self._load = pipe, load
        self.info = {} if info is None else info

    @property
    def pipe(self) -> StableDiffusionPipeline | None:
        if self._pipe is None and self._load is not None:
            self._pipe, self._load = self._load(), None
        return self._pipe

    @pipe.setter
    def pipe(self, value: StableDiffusionPipeline | None) -> None:
        self._pipe, self._load = value, None

    def __repr__(self) -> str:
        state = "loaded" if self._pipe is not None else "not loaded" if self._load else "none"
        return f"BaseModel(info={self.info!r}, pipe {state})"


def describe_base(base: BaseModel) -> dict[str, Any]:
    """The lineage record of a base model: name, source and content hash."""
    info = copy.deepcopy(base.info)
    info.setdefault("name", TINY_BASE_NAME)
    info["content_hash"] = info.get("content_hash") or pipeline_hash(base.pipe)
    return info
