"""The working store of synthesis shards: one image-set folder per shard of a batch.

::

    <filepath>/<batch_key>/shard-00000-of-00002/   images/*.png, metadata.csv, info.json
    <filepath>/<batch_key>/shard-00001-of-00002/

``batch_key`` is a hash of the batch's whole plan (every manifest field of every image,
the base model's and the adapter's content hashes included), so shards of different
batches never mix. A shard folder is written whole under a temporary name and renamed
(:func:`~fu_kedro.datasets.image_set.write_image_set`). A shard written again is staged
complete first and only then swapped in (old folder renamed away, new one renamed in, old
one deleted): a failed write leaves the old shard whole, and no reader ever finds a
partial shard under a shard name.

Kedro's ``PartitionedDataset`` cannot hold these (its partitions are files, not folders),
hence this small dataset. ``load`` returns ``{"<batch_key>/shard-…": loader}`` (lazy, like
``PartitionedDataset``); ``save`` takes ``{"<batch_key>/shard-…": ImageSet}``.
"""
from __future__ import annotations

import os
import shutil
import uuid
from functools import partial
from pathlib import Path
from typing import Any, Callable

from kedro.io.core import AbstractDataset, DatasetError

from fu_kedro.datasets.image_set import ImageSet, read_image_set, write_image_set


def shard_name(batch_key: str, shard_index: int, num_shards: int) -> str:
    return f"{batch_key}/shard-{shard_index:05d}-of-{num_shards:05d}"


class ImageSetShardsDataset(AbstractDataset[dict[str, ImageSet], dict[str, Callable[[], ImageSet]]]):
    """Folders of shards ``<batch_key>/shard-KKKKK-of-NNNNN`` (see the module docstring)."""

    def __init__(self, filepath: str, metadata: dict | None = None):
        self._root = Path(filepath)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._root)}

    def load(self) -> dict[str, Callable[[], ImageSet]]:
        if not self._root.is_dir():
            return {}
        found = {}
        for meta in sorted(self._root.glob("*/shard-*/metadata.csv")):
            folder = meta.parent
            if folder.name.startswith(".") or folder.parent.name.startswith("."):
                continue  # a shard being written or replaced
            found[f"{folder.parent.name}/{folder.name}"] = partial(read_image_set, folder)
        return found

    def save(self, data: dict[str, ImageSet]) -> None:
        for name, image_set in data.items():
            parts = Path(name).parts
            if len(parts) != 2 or any(p.startswith(".") or p in ("", "..") for p in parts):
                raise DatasetError(f"shard name must be '<batch_key>/<shard>', got {name!r}")
            folder = self._root / name
            staged = folder.parent / f".{folder.name}.staged-{uuid.uuid4().hex[:8]}"
            write_image_set(image_set, staged)  # complete, or nothing
            old = folder.parent / f".{folder.name}.old-{uuid.uuid4().hex[:8]}"
            if folder.exists():
                os.replace(folder, old)
            try:
                os.replace(staged, folder)
            except BaseException:
                if old.exists():
                    os.replace(old, folder)
                shutil.rmtree(staged, ignore_errors=True)
                raise
            shutil.rmtree(old, ignore_errors=True)

    def _exists(self) -> bool:
        return bool(self.load())
