"""The schema of the ``evaluation`` block (``conf/base/parameters_evaluation.yml``).

See :mod:`fu_kedro.schema` for the rules and how nodes read a block. The arms' forms are
explained in :mod:`.arms`.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union

from pydantic import Discriminator, Field, Strict, Tag, model_validator

from fu_kedro.schema import (
    Block,
    Bool,
    Device,
    Fraction,
    NonEmptyStr,
    NonNegFloat,
    NonNegInt,
    OpenFraction,
    PosFloat,
    PosInt,
    Range,
    Str,
    precision_literal,
    range_of,
)


# --------------------------------------------------------------------------- arms
class BalancedReal(Block):
    balanced_per_class: PosInt | None  # null: as many as the smallest class has


ClassifierPrecision = precision_literal("auto", "no", "fp16", "bf16")  # YAML's false (an unquoted no) is taken as "no"


class CsvReal(Block):
    csv: NonEmptyStr  # the source-train images named in the file's Image_name column


class PerClassSynthetic(Block):
    per_class: PosInt | None  # null: all of a replicate


class RatioSynthetic(Block):
    ratio: PosFloat  # r x the arm's real images


def _form(value: Any) -> str | None:
    """Which form an arm's ``real`` / ``synthetic`` value has: a word or the key of its mapping."""
    if value is None or isinstance(value, str):
        return "word"
    if isinstance(value, Mapping) and len(value) == 1:
        return next(iter(value))
    return None


Real = Annotated[
    Union[Annotated[Literal["all", "balanced"], Tag("word")],
          Annotated[BalancedReal, Tag("balanced_per_class")],
          Annotated[CsvReal, Tag("csv")]],
    Discriminator(_form, custom_error_type="arm_real",
                  custom_error_message="real is all, balanced, {balanced_per_class: N} or {csv: path}"),
]
Synthetic = Annotated[
    Union[Annotated[Literal["none", "all"] | None, Tag("word")],
          Annotated[PerClassSynthetic, Tag("per_class")],
          Annotated[RatioSynthetic, Tag("ratio")]],
    Discriminator(_form, custom_error_type="arm_synthetic",
                  custom_error_message="synthetic is none, all, {per_class: N} or {ratio: r}"),
]


class ArmParams(Block):
    """One arm: its real and its synthetic images (nothing else differs between arms)."""

    real: Real
    synthetic: Synthetic
    label: Str | None = None  # optional (conf/base sets it for ES_SYN only): the name shown; absent = the arm's name


# --------------------------------------------------------------------------- sub-blocks
class Batching(Block):
    BLOCK = "evaluation.batching"

    rule: Literal["fixed_real", "pooled"]
    real_per_batch: PosInt | None  # null: train.batch_size
    synthetic_per_batch: PosInt | None  # null: train.batch_size


class TrainParams(Block):
    """``evaluation.train``: :class:`fu_kedro.classifiers.TrainConfig`, one schedule for every arm."""

    BLOCK = "evaluation.train"

    steps: PosInt
    eval_every: PosInt
    batch_size: PosInt
    learning_rate: PosFloat
    lr_schedule: Literal["cosine", "constant"]
    weight_decay: NonNegFloat
    selection_metric: Literal["val_loss", "val_accuracy", "last"]
    eval_batch_size: PosInt
    weight_averaging: Literal["none", "ema", "swa"]
    averaging_decay: OpenFraction
    averaging_start: OpenFraction
    bn_recalibration_images: NonNegInt  # 0 = off
    device: Device
    mixed_precision: ClassifierPrecision


UnitScale = Annotated[float, Strict(), Field(gt=0, le=1)]


class Augment(Block):
    """``evaluation.augment``: the paper's DA and the ultrasound machine-to-machine changes."""

    BLOCK = "evaluation.augment"

    rotation_degrees: NonNegFloat
    crop_scale: range_of(UnitScale)
    crop_ratio: range_of(PosFloat)
    hflip_p: Fraction
    gain: range_of(NonNegFloat) | None  # null: off
    gamma: range_of(PosFloat) | None  # null: off
    speckle: NonNegFloat  # 0: off
    speckle_grain: PosInt
    sector_p: Fraction  # 0: off
    sector_half_angle: Range
    sector_depth: range_of(UnitScale)


class Metrics(Block):
    n_bootstrap: NonNegInt  # 0 = no intervals
    ci: Annotated[float, Strict(), Field(gt=0, lt=1)]


class Quality(Block):
    scorer_arm: Str | None  # a real-only arm of evaluation.arms (checked against the plan); null: the first real-only arm
    cas_holdout_fraction: Annotated[float, Strict(), Field(gt=0, lt=1)]
    memorisation_threshold: Literal["auto"] | Annotated[float, Strict(), Field(ge=-1, le=1)]  # a correlation
    memorisation_size: Literal["auto"] | PosInt  # auto: the synthetic images' size
    memorisation_controls: NonNegInt
    memorisation_space: Literal["decoder", "pixels"]
    tsne_perplexity: PosFloat
    max_points_per_class: PosInt


class Report(Block):
    samples_per_class: PosInt
    paper_table: Str | None  # null: the paper's rows are not shown


# --------------------------------------------------------------------------- the block
class EvaluationParams(Block):
    """``evaluation``: classifiers on each arm, zero-shot test, synthetic-data quality, report."""

    BLOCK = "evaluation"

    image_size: PosInt
    arms: dict[NonEmptyStr, ArmParams] = Field(min_length=1)
    comparisons: list[tuple[NonEmptyStr, NonEmptyStr]] | None  # null: every arm minus the first
    synthetic_class_mix: Literal["uniform", "real_prior"]
    batching: Batching
    backbones: list[NonEmptyStr] = Field(min_length=1)
    augmentation: list[Bool] = Field(min_length=1)
    n_seeds: PosInt
    weights: dict[Str, Str]  # backbone -> local ImageNet state-dict file
    torch_threads: PosInt | None
    workers: PosInt
    min_fidelity: Fraction
    on_low_fidelity: Literal["warn", "fail"]
    train: TrainParams
    augment: Augment
    metrics: Metrics
    quality: Quality
    report: Report

    @model_validator(mode="after")
    def _comparisons_name_arms(self):
        for pair in self.comparisons or []:
            if pair[0] == pair[1]:
                raise ValueError(f"comparisons: each entry is [arm, minus arm] of two different arms, got {list(pair)}")
            unknown = [p for p in pair if p not in self.arms]
            if unknown:
                raise ValueError(f"comparisons {list(pair)}: {unknown} not in evaluation.arms {list(self.arms)}")
        name = self.quality.scorer_arm
        real_only = [arm for arm, spec in self.arms.items() if spec.synthetic in ("none", None)]
        if name is not None and name not in real_only:
            raise ValueError(f"evaluation.quality.scorer_arm: {name!r} is not a real-only arm of evaluation.arms "
                             f"(real-only arms: {sorted(real_only)}; all arms: {sorted(self.arms)}); name one of them or null")
        return self
