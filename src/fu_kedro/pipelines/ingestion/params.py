"""The schema of the ``ingestion`` block (``conf/base/parameters_ingestion.yml``; values there only).

See :mod:`fu_kedro.schema` for the rules (every key required, unknown keys refused) and how
nodes read a block (``IngestionParams.from_any(ingestion)``).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, Strict

from fu_kedro.schema import (
    Block,
    CaptionTemplate,
    Float,
    Fraction,
    NonEmptyStr,
    NonNegFloat,
    NonNegInt,
    OpenFraction,
    PosFloat,
    PosInt,
    Str,
)


class Setting(Block):
    """One acquisition setting of a phantom domain (a source machine or a target center)."""

    name: NonEmptyStr
    gain: NonNegFloat
    speckle: NonNegFloat
    noise: NonNegFloat
    zoom: PosFloat
    sector_deg: NonNegFloat  # 0 = a linear probe (rectangular field of view)
    apex: Float
    attenuation: NonNegFloat
    gamma: PosFloat


class CenterSetting(Setting):
    missing: list[Str]  # classes the center has no images of


class PhantomSource(Block):
    n_per_class: PosInt
    class_proportions: dict[Str, NonNegFloat] | None  # null: n_per_class of each class
    images_per_patient: tuple[PosInt, PosInt]
    settings: list[Setting] = Field(min_length=1)


class PhantomTarget(Block):
    n_per_class: PosInt
    settings: list[CenterSetting] = Field(min_length=1)


class Phantom(Block):
    source: PhantomSource
    target: PhantomTarget


class RequiredClasses(Block):
    target: list[Str]


class Limits(Block):
    min_side: PosInt
    max_side: PosInt
    max_aspect: Annotated[float, Strict(), Field(ge=1)]
    min_dynamic_range: NonNegInt


class Preprocess(Block):
    border_threshold: Annotated[int, Strict(), Field(ge=0, le=255)]  # a grey level
    min_content_fraction: Fraction
    square: Literal["pad", "crop"]


class Preview(Block):
    per_class: PosInt


class IngestionParams(Block):
    """``ingestion``: how both domains are read, checked, split and subset."""

    BLOCK = "ingestion"

    image_size: PosInt
    on_bad_input: Literal["fail", "skip"]
    val_fraction: OpenFraction
    lora_per_class: PosInt
    caption_template: CaptionTemplate
    near_duplicate_max_distance: Annotated[int, Strict(), Field(ge=0, le=256)] | None  # bits of 256; null = unchecked
    exclude_planes: list[Str]
    plane_labels: dict[Str, NonEmptyStr]
    required_classes: RequiredClasses
    limits: Limits
    preprocess: Preprocess
    preview: Preview
    phantom: Phantom
