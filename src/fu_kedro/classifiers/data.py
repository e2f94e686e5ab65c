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
from fu_kedro.datasets.image_set import row_positions

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
        idx = row_positions(index)
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
    # Ultrasound-specific photometric knobs (``UltrasoundAugmentation``); ``None`` = off, and
    # then not one extra random number is drawn: the output is bit-identical to the paper's DA.
    ultrasound: "UltrasoundAugmentation | None" = None

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
        if self.ultrasound is not None:
            out = self.ultrasound(out, generator)
        return out.round_().clamp_(0, 255).to(torch.uint8)


def _pair(value, where: str) -> tuple[float, float] | None:
    """``[lo, hi]`` as floats, ``None``/absent as ``None`` (off); lo > hi is an error."""
    if value is None:
        return None
    lo, hi = (float(v) for v in value)
    if lo > hi:
        raise ValueError(f"evaluation.augment.{where}: [lo, hi] needs lo <= hi, got {list(value)}")
    return lo, hi


@dataclass(frozen=True)
class UltrasoundAugmentation:
    """Photometric and field-of-view changes between ultrasound machines, per image, on a batch.

    Applied after the geometric resampling of ``BatchAugmentation`` on float pixel values
    (0-255), each knob only if set, in this order:

    * ``gain`` [lo, hi]: overall brightness (machine gain), pixel x ``U(lo, hi)``.
    * ``gamma`` [lo, hi]: display curve, ``255 (x/255) ** g`` with ``log g ~ U(log lo, log hi)``.
    * ``speckle``: multiplicative speckle-like noise, pixel x ``(1 + s n)`` with ``n ~ N(0, 1)``
      per pixel, smoothed by a ``speckle_grain`` x ``speckle_grain`` box filter (and rescaled to
      unit variance) so the grain is larger than one pixel; ``s ~ U(0, speckle)`` per image.
    * ``sector_p``: with this probability per image, keep only a fan (sector scan) with its
      apex at the top centre and half-angle ``U(sector_half_angle)`` degrees, and cut it at a
      depth ``U(sector_depth)`` (fraction of the image height below the apex); outside is black
      — a narrower or shallower field of view than the image's own, as another machine
      or preset would show.

    Random parameters come from the caller's CPU generator (drawn after the geometric ones),
    so a seed gives the same augmentation on any device.
    """

    gain: tuple[float, float] | None = None
    gamma: tuple[float, float] | None = None
    speckle: float = 0.0
    speckle_grain: int = 1
    sector_p: float = 0.0
    sector_half_angle: tuple[float, float] = (30.0, 45.0)
    sector_depth: tuple[float, float] = (0.8, 1.0)

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``float (B, C, S, S)`` in [0, 255] -> the same shape, changed per image (not clamped)."""
        g, n, dev = generator, len(x), x.device
        per_image = (n,) + (1,) * (x.dim() - 1)
        if self.gain is not None:
            x = x * torch.empty(n).uniform_(*self.gain, generator=g).view(per_image).to(dev)
        if self.gamma is not None:
            log_g = torch.empty(n).uniform_(*np.log(self.gamma), generator=g).view(per_image).to(dev)
            x = 255.0 * (x.clamp(0, 255) / 255.0).pow(log_g.exp())
        if self.speckle > 0:
            s = (torch.rand(n, generator=g) * self.speckle).view(per_image).to(dev)
            noise = torch.randn(x.shape, generator=g).to(dev)
            k = int(self.speckle_grain)
            if k > 1:  # a coarser grain; the box filter's variance loss is undone (k*k summed -> /k)
                c = x.shape[1]
                noise = nn.functional.avg_pool2d(noise, k, stride=1, padding=k // 2, count_include_pad=False)
                noise = noise[..., : x.shape[-2], : x.shape[-1]] * k
                noise = noise.view(n, c, *x.shape[-2:])
            x = x * (1 + s * noise).clamp_(min=0)
        if self.sector_p > 0:
            apply = torch.rand(n, generator=g) < self.sector_p
            half = torch.deg2rad(torch.empty(n).uniform_(*self.sector_half_angle, generator=g))
            depth = torch.empty(n).uniform_(*self.sector_depth, generator=g)
            h, w = x.shape[-2:]
            yy = (torch.arange(h, dtype=torch.float32) + 0.5) / h  # 0 at the top (apex), 1 at the bottom
            xx = (torch.arange(w, dtype=torch.float32) + 0.5) / w - 0.5
            yy, xx = torch.meshgrid(yy, xx, indexing="ij")
            angle, radius = torch.atan2(xx, yy).abs(), (xx**2 + yy**2).sqrt()
            inside = (angle[None] <= half.view(-1, 1, 1)) & (radius[None] <= depth.view(-1, 1, 1))
            keep = inside | ~apply.view(-1, 1, 1)
            x = x * keep.unsqueeze(1).to(dev, x.dtype)
        return x


# the knobs of ``evaluation.augment``: the paper's DA (required) and the ultrasound ones (optional, off when absent)
AUGMENT_KEYS = ("rotation_degrees", "crop_scale", "crop_ratio", "hflip_p")
ULTRASOUND_KEYS = ("gain", "gamma", "speckle", "speckle_grain", "sector_p", "sector_half_angle", "sector_depth")


def build_ultrasound(cfg: dict) -> UltrasoundAugmentation | None:
    """``UltrasoundAugmentation`` from the optional knobs of ``evaluation.augment``, or ``None``
    when none of them is on (absent, ``null``, 0): the paper's DA then runs exactly as before."""
    gain, gamma = _pair(cfg.get("gain"), "gain"), _pair(cfg.get("gamma"), "gamma")
    speckle, sector_p = float(cfg.get("speckle") or 0.0), float(cfg.get("sector_p") or 0.0)
    if not 0 <= sector_p <= 1:
        raise ValueError(f"evaluation.augment.sector_p must be in [0, 1], got {sector_p}")
    if gain is not None and gain[0] < 0 or gamma is not None and gamma[0] <= 0 or speckle < 0:
        raise ValueError("evaluation.augment: gain must be >= 0, gamma > 0 and speckle >= 0")
    if gain is None and gamma is None and speckle == 0 and sector_p == 0:
        return None
    grain = cfg.get("speckle_grain")
    grain = 1 if grain is None else int(grain)
    if grain < 1:
        raise ValueError(f"evaluation.augment.speckle_grain must be >= 1, got {grain}")
    return UltrasoundAugmentation(
        gain=gain,
        gamma=gamma,
        speckle=speckle,
        speckle_grain=grain,
        sector_p=sector_p,
        sector_half_angle=_pair(cfg.get("sector_half_angle"), "sector_half_angle") or (30.0, 45.0),
        sector_depth=_pair(cfg.get("sector_depth"), "sector_depth") or (0.8, 1.0),
    )


def build_augmentation(cfg: dict) -> BatchAugmentation:
    """The paper's augmentation from its knobs: ``rotation_degrees``, ``crop_scale`` [lo, hi],
    ``crop_ratio`` [lo, hi], ``hflip_p`` (``evaluation.augment``), plus the optional ultrasound
    knobs ``gain``, ``gamma``, ``speckle``, ``speckle_grain``, ``sector_p``,
    ``sector_half_angle``, ``sector_depth`` (``UltrasoundAugmentation``; off when absent)."""
    return BatchAugmentation(
        rotation_degrees=float(cfg["rotation_degrees"]),
        crop_scale=(float(cfg["crop_scale"][0]), float(cfg["crop_scale"][1])),
        crop_ratio=(float(cfg["crop_ratio"][0]), float(cfg["crop_ratio"][1])),
        hflip_p=float(cfg["hflip_p"]),
        ultrasound=build_ultrasound(cfg),
    )


def to_model_input(batch: torch.Tensor) -> torch.Tensor:
    """``uint8 (B, 1, S, S)`` -> ImageNet-normalised ``float32 (B, 3, S, S)`` on the batch's device."""
    x = batch.to(torch.float32).div_(255.0).expand(-1, 3, -1, -1)
    mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
    return (x - mean) / std
