"""The classifier data path: images decoded and resized once, kept as tensors, augmented on tensors.

The paper's notebook decodes every PNG from disk in every epoch (PIL + torchvision
transforms); here an ``ImageSet`` (already decoded by the catalog) becomes one ``uint8``
tensor ``(N, 1, S, S)`` at the classifier's resolution, and each batch is augmented and
normalised in memory. ``benchmarks/bench_classifier_data_path.py`` measures the difference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torchvision.transforms import v2

from fu_kedro.datasets import ImageSet

# ImageNet statistics: the grey image is copied to three channels so ImageNet weights fit.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class TensorSet:
    """Images ``uint8 (N, 1, S, S)``, class indices ``int64 (N,)`` and the images' metadata rows."""

    images: torch.Tensor
    labels: torch.Tensor
    meta: pd.DataFrame

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, index) -> "TensorSet":
        """Rows chosen by a boolean mask or positions, as a new set."""
        idx = np.asarray(index)
        if idx.dtype == bool:
            idx = np.flatnonzero(idx)
        t = torch.as_tensor(idx, dtype=torch.long)
        return TensorSet(self.images[t], self.labels[t], self.meta.iloc[idx].reset_index(drop=True))

    @staticmethod
    def concat(sets: list["TensorSet"]) -> "TensorSet":
        """Stack sets of the same resolution (metadata columns are united)."""
        return TensorSet(
            torch.cat([s.images for s in sets]),
            torch.cat([s.labels for s in sets]),
            pd.concat([s.meta for s in sets], ignore_index=True),
        )


def prepare_tensors(image_set: ImageSet, classes: list[str], image_size: int, where: str) -> TensorSet:
    """Resize an ``ImageSet`` once to ``image_size`` and index its labels by ``classes``.

    Args:
        image_set: decoded grayscale images with a ``label`` column in ``meta``.
        classes: the classifier's label space; a label outside it is an error.
        image_size: side of the square classifier input.
        where: name of the set, used in error messages.

    Returns:
        ``TensorSet`` with ``uint8`` images (antialiased bilinear resize) and class indices.
    """
    if "label" not in image_set.meta.columns:
        raise ValueError(f"{where}: metadata has no 'label' column")
    labels = image_set.meta["label"].astype(str)
    unknown = sorted(set(labels) - set(classes))
    if unknown:
        raise ValueError(f"{where}: labels {unknown} are outside the classifier's label space {list(classes)}")
    images = torch.from_numpy(np.ascontiguousarray(image_set.images)).unsqueeze(1)
    if images.shape[-1] != image_size or images.shape[-2] != image_size:
        images = v2.functional.resize(images, [image_size, image_size], antialias=True)
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[c] for c in labels], dtype=torch.long)
    return TensorSet(images.contiguous(), y, image_set.meta.reset_index(drop=True).copy())


def build_augmentation(cfg: dict, image_size: int) -> v2.Transform:
    """The paper's augmentation on one ``(1, S, S)`` tensor: rotation, random resized crop, horizontal flip.

    ``cfg`` keys: ``rotation_degrees``, ``crop_scale`` [lo, hi], ``crop_ratio`` [lo, hi], ``hflip_p``.
    """
    return v2.Compose(
        [
            v2.RandomRotation(degrees=float(cfg["rotation_degrees"])),
            v2.RandomResizedCrop(
                image_size, scale=tuple(cfg["crop_scale"]), ratio=tuple(cfg["crop_ratio"]), antialias=True
            ),
            v2.RandomHorizontalFlip(p=float(cfg["hflip_p"])),
        ]
    )


def augment_batch(batch: torch.Tensor, augmentation: v2.Transform | None) -> torch.Tensor:
    """Augment each image of a ``uint8 (B, 1, S, S)`` batch with its own random parameters.

    A v2 transform given a whole batch draws one set of parameters for all of it, so images
    go through one at a time (cheap at classifier resolution, all in memory).
    """
    if augmentation is None:
        return batch
    return torch.stack([augmentation(img) for img in batch])


def to_model_input(batch: torch.Tensor) -> torch.Tensor:
    """``uint8 (B, 1, S, S)`` -> ImageNet-normalised ``float32 (B, 3, S, S)``."""
    x = batch.to(torch.float32).div_(255.0).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (x - mean) / std
