"""A set of grayscale images with one metadata row per image, and its versioned Kedro dataset.

``ImageSet`` is the in-memory form every pipeline passes around: ``images`` is a
``uint8`` array ``(N, H, W)`` and ``meta`` a DataFrame with one row per image in the same
order (column ``image_id`` is required and unique). ``info`` holds set-level facts
(lineage: parameters, hashes, versions).

``ImageSetDataset`` stores it as a folder a person can open::

    <filepath>/<version>/<name>/
        images/<image_id>.png   one 8-bit grayscale PNG per image
        metadata.csv            ``meta`` (one row per image, in order)
        info.json               ``info``

A folder is written whole or not at all: it is built under a temporary name beside its
final place and renamed when every file is on disk, so a failed run never leaves a set
that looks complete. Kedro's ``PartitionedDataset`` cannot be versioned, hence this class.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import numpy as np
import pandas as pd
from kedro.io.core import (
    AbstractVersionedDataset,
    DatasetError,
    Version,
    get_filepath_str,
    get_protocol_and_path,
)
from kedro_datasets._typing import ImagePreview
from PIL import Image

from fu_kedro.lineage import to_jsonable


def row_positions(mask_or_index) -> np.ndarray:
    """Integer row positions from a boolean mask or from positions (``ImageSet.select``, ``TensorSet.subset``)."""
    idx = np.asarray(mask_or_index)
    return np.flatnonzero(idx) if idx.dtype == bool else idx


@dataclass
class ImageSet:
    """Grayscale images ``(N, H, W) uint8`` with aligned per-image metadata."""

    images: np.ndarray
    meta: pd.DataFrame
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.images = np.asarray(self.images)
        if self.images.dtype != np.uint8 or self.images.ndim != 3:
            raise ValueError(
                f"ImageSet.images must be uint8 of shape (N, H, W); got {self.images.dtype} {self.images.shape}"
            )
        if len(self.meta) != len(self.images):
            raise ValueError(f"ImageSet has {len(self.images)} images but {len(self.meta)} metadata rows")
        if "image_id" not in self.meta.columns:
            raise ValueError("ImageSet.meta needs an 'image_id' column")
        dupes = self.meta["image_id"][self.meta["image_id"].duplicated()].tolist()
        if dupes:
            raise ValueError(f"ImageSet has duplicate image_id values: {dupes[:5]}")
        self.meta = self.meta.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.images)

    def select(self, mask_or_index) -> "ImageSet":
        """Rows chosen by a boolean mask or integer positions, as a new set (same ``info``)."""
        idx = row_positions(mask_or_index)
        return ImageSet(self.images[idx], self.meta.iloc[idx].reset_index(drop=True), dict(self.info))

    def resized_tensor(self, size: int):
        """The images as a ``uint8`` torch tensor ``(N, 1, size, size)``, antialiased bilinear
        resize (none when they already have that size) — the one resize the diffusion model,
        its base corpus and the classifiers all use. torch is imported here, not at module
        level: ``settings.py`` loads this module for every ``kedro`` command."""
        import torch
        from torchvision.transforms import v2

        images = torch.from_numpy(np.ascontiguousarray(self.images)).unsqueeze(1)
        if images.shape[-1] != size or images.shape[-2] != size:
            images = v2.functional.resize(images, [size, size], antialias=True)
        return images

    @staticmethod
    def concat(sets: list["ImageSet"], info: dict[str, Any] | None = None) -> "ImageSet":
        """Stack sets of the same image size, keeping every metadata column."""
        sizes = {s.images.shape[1:] for s in sets}
        if len(sizes) != 1:
            raise ValueError(f"cannot concatenate image sets of different sizes: {sorted(sizes)}")
        return ImageSet(
            np.concatenate([s.images for s in sets]),
            pd.concat([s.meta for s in sets], ignore_index=True),
            info or {},
        )


class ImageSetDataset(AbstractVersionedDataset[ImageSet, ImageSet]):
    """Versioned folder of PNGs + ``metadata.csv`` + ``info.json`` (see module docstring).

    Example catalog entry::

        synthetic_batch:
          type: fu_kedro.datasets.ImageSetDataset
          filepath: data/07_model_output/synthetic_batch
          versioned: true
    """

    def __init__(self, filepath: str, version: Version | None = None, metadata: dict | None = None):
        protocol, path = get_protocol_and_path(filepath)
        if protocol != "file":
            raise DatasetError("ImageSetDataset writes to the local file system only")
        self._protocol = protocol
        self._fs = fsspec.filesystem(protocol)
        self.metadata = metadata
        super().__init__(
            filepath=PurePosixPath(path),
            version=version,
            exists_function=self._fs.exists,
            glob_function=self._fs.glob,
        )

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath), "version": self._version}

    def load_folder(self) -> Path:
        """The folder a load reads: ``<filepath>/<version>/<name>`` (``<filepath>`` when not versioned)."""
        return Path(get_filepath_str(self._get_load_path(), self._protocol))

    def load_info(self) -> dict:
        """``info.json`` of the set a load reads, without reading its images (empty if there is none)."""
        info_file = self.load_folder() / "info.json"
        return json.loads(info_file.read_text()) if info_file.is_file() else {}

    def load(self) -> ImageSet:
        folder = self.load_folder()
        data = read_image_set(folder)
        # the catalog version this set came from (``<filepath>/<version>/<name>``), for lineage;
        # never written to info.json (write_image_set drops it): a saved set gets its own
        data.info["version"] = folder.parent.name
        return data

    def save(self, data: ImageSet) -> None:
        folder = Path(get_filepath_str(self._get_save_path(), self._protocol))
        write_image_set(data, folder)

    def _exists(self) -> bool:
        try:
            path = get_filepath_str(self._get_load_path(), self._protocol)
        except DatasetError:
            return False
        return self._fs.exists(path)

    def preview(self, per_class: int = 6, size: int = 64) -> ImagePreview:
        """kedro-viz: the first images of each class of the latest (or pinned) version."""
        from fu_kedro.datasets.previews import image_grid_preview

        return image_grid_preview(self.load(), per_class=per_class, size=size)


def read_image_set(folder: Path) -> ImageSet:
    """Read a folder written by :func:`write_image_set`; a missing file is named in the error."""
    meta_path = folder / "metadata.csv"
    if not meta_path.is_file():
        raise DatasetError(f"{folder}: no metadata.csv (not an image set, or an incomplete one)")
    meta = pd.read_csv(meta_path, keep_default_na=False, dtype={"image_id": str, "patient_id": str})
    images = []
    for image_id in meta["image_id"]:
        png = folder / "images" / f"{image_id}.png"
        if not png.is_file():
            raise DatasetError(f"{png}: listed in {meta_path} but missing")
        with Image.open(png) as im:
            images.append(np.asarray(im.convert("L"), dtype=np.uint8))
    info_path = folder / "info.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    if not images:
        return ImageSet(np.zeros((0, 1, 1), np.uint8), meta, info)
    return ImageSet(np.stack(images), meta, info)


def write_image_set(data: ImageSet, folder: Path) -> None:
    """Write ``data`` to ``folder`` atomically: all files under a temporary name, then one rename."""
    if folder.exists():
        raise DatasetError(f"{folder} exists already; an image set is never overwritten")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        (tmp / "images").mkdir(parents=True)
        for image_id, img in zip(data.meta["image_id"], data.images):
            Image.fromarray(img, mode="L").save(tmp / "images" / f"{image_id}.png")
        data.meta.to_csv(tmp / "metadata.csv", index=False)
        info = {k: v for k, v in data.info.items() if k != "version"}
        (tmp / "info.json").write_text(json.dumps(to_jsonable(info), indent=2))
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
