"""The classifier data path: images decoded and resized once, kept as tensors, augmented on tensors.

The paper's notebook decodes every PNG from disk in every epoch (PIL + torchvision
transforms); here an ``ImageSet`` (already decoded by the catalog) becomes one ``uint8``
tensor ``(N, 1, S, S)`` at the classifier's resolution, and each batch is augmented (one
vectorised resampling for the whole batch) and normalised in memory, on whichever device
holds the tensor. ``benchmarks/bench_classifier_data_path.py`` measures the difference.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

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
    images = image_set.resized_tensor(image_size)
    index = {c: i for i, c in enumerate(classes)}
    y = torch.tensor([index[c] for c in labels], dtype=torch.long)
    return TensorSet(images.contiguous(), y, image_set.meta.reset_index(drop=True).copy())


# torchvision's RandomResizedCrop redraws a box that does not fit up to 10 times.
CROP_ATTEMPTS = 10


@dataclass(frozen=True)
class BatchAugmentation:
    """The paper's augmentation, with its own random parameters per image, for a whole batch at once.

    Per image, as torchvision's ``RandomRotation -> RandomResizedCrop(S) -> RandomHorizontalFlip``:
    a rotation by U(-``rotation_degrees``, +``rotation_degrees``) (corners filled black), a crop
    box whose area is U(``crop_scale``) of the image and whose aspect ratio is log-uniform in
    ``crop_ratio`` (redrawn up to 10 times until it fits, else the whole image), resized back
    to S x S, then a horizontal flip with probability ``hflip_p``. The three are composed into
    one affine map per image and applied with one bilinear ``grid_sample`` to the batch: one
    resampling instead of two, no Python loop over images, and the same on a GPU as on the
    CPU. Parameters are drawn on the CPU from the caller's generator, so a seed gives the same
    augmentation on any device.
    """

    rotation_degrees: float
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip_p: float

    def affine(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``float32 (n, 2, 3)`` maps from output to input coordinates (``affine_grid`` convention)."""
        g = generator
        angle = torch.deg2rad((2 * torch.rand(n, generator=g) - 1) * self.rotation_degrees)
        area = torch.empty(n, CROP_ATTEMPTS).uniform_(*self.crop_scale, generator=g)
        log_ratio = torch.empty(n, CROP_ATTEMPTS).uniform_(*np.log(self.crop_ratio), generator=g)
        w, h = (area * log_ratio.exp()).sqrt(), (area / log_ratio.exp()).sqrt()  # fractions of the side
        fits = (w <= 1) & (h <= 1)
        first = fits.to(torch.uint8).argmax(1, keepdim=True)  # first attempt that fits
        whole = ~fits.any(1)
        w = w.gather(1, first).squeeze(1).masked_fill(whole, 1.0)
        h = h.gather(1, first).squeeze(1).masked_fill(whole, 1.0)
        # box centre in normalised coordinates [-1, 1], the box inside the image
        cx = 2 * (torch.rand(n, generator=g) * (1 - w) + w / 2) - 1
        cy = 2 * (torch.rand(n, generator=g) * (1 - h) + h / 2) - 1
        flip = torch.where(torch.rand(n, generator=g) < self.hflip_p, -1.0, 1.0)
        # output (x, y) -> flipped -> into the crop box -> rotated into the source image
        cos, sin = angle.cos(), angle.sin()
        return torch.stack(
            [
                torch.stack([cos * flip * w, -sin * h, cos * cx - sin * cy], 1),
                torch.stack([sin * flip * w, cos * h, sin * cx + cos * cy], 1),
            ],
            1,
        )

    def __call__(self, batch: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``uint8 (B, C, S, S)`` on any device -> augmented ``uint8 (B, C, S, S)`` on the same device."""
        theta = self.affine(len(batch), generator).to(batch.device)
        grid = nn.functional.affine_grid(theta, list(batch.shape), align_corners=False)
        out = nn.functional.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.round_().clamp_(0, 255).to(torch.uint8)


def build_augmentation(cfg: dict) -> BatchAugmentation:
    """The paper's augmentation from its knobs: ``rotation_degrees``, ``crop_scale`` [lo, hi],
    ``crop_ratio`` [lo, hi], ``hflip_p`` (``evaluation.augment``)."""
    return BatchAugmentation(
        rotation_degrees=float(cfg["rotation_degrees"]),
        crop_scale=(float(cfg["crop_scale"][0]), float(cfg["crop_scale"][1])),
        crop_ratio=(float(cfg["crop_ratio"][0]), float(cfg["crop_ratio"][1])),
        hflip_p=float(cfg["hflip_p"]),
    )


def to_model_input(batch: torch.Tensor) -> torch.Tensor:
    """``uint8 (B, 1, S, S)`` -> ImageNet-normalised ``float32 (B, 3, S, S)`` on the batch's device."""
    x = batch.to(torch.float32).div_(255.0).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return (x - mean) / std
