"""The schema of the ``base_training`` block (``conf/base/parameters_base_training.yml``), and of
a training loop's knobs (:class:`LoopParams`, also ``lora_training.lora``).

See :mod:`fu_kedro.schema` for the rules and how nodes read a block.
"""
from __future__ import annotations

from typing import Any, Literal

from fu_kedro.schema import (
    Block,
    Bool,
    CaptionTemplate,
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
)


LoopPrecision = precision_literal("no", "fp16", "bf16")  # YAML's false (an unquoted no) is taken as "no"


class LoopParams(Block):
    """The knobs of a training loop (:class:`fu_kedro.models.training.LoopConfig`, ``seed`` aside).

    Every loop's block sets ``max_steps`` (a fixed step budget), ``max_minutes`` (an optional
    wall-clock cap, ``null`` = none), ``batch_size`` and ``learning_rate``; a subclass makes
    the other knobs its block sets required. A knob a block's conf leaves out (declared ``=
    None`` below, ``null`` not allowed) is ``LoopConfig``'s own default: :meth:`loop_knobs`
    passes only the knobs that were set.
    """

    max_steps: PosInt
    max_minutes: NonNegFloat | None  # 0: stop after the first step
    batch_size: PosInt
    learning_rate: PosFloat
    weight_decay: NonNegFloat = None
    warmup_steps: NonNegInt = None
    ema_decay: OpenFraction | None = None
    mixed_precision: LoopPrecision = None
    gradient_accumulation_steps: PosInt = None
    gradient_checkpointing: Bool = None
    caption_dropout: Fraction = None
    min_snr_gamma: PosFloat | None = None
    noise_offset: NonNegFloat = None
    text_encoder_learning_rate: PosFloat | None = None
    log_every: PosInt = None

    def loop_knobs(self) -> dict[str, Any]:
        """The loop knobs this block sets (for ``LoopConfig(**knobs, seed=...)``)."""
        return self.model_dump(include=set(LoopParams.model_fields), exclude_unset=True)


class AutoencoderParams(LoopParams):
    BLOCK = "base_training.autoencoder"

    kl_weight: NonNegFloat  # read by the node, not a loop knob


class DenoiserParams(LoopParams):
    BLOCK = "base_training.denoiser"

    caption_dropout: Fraction
    ema_decay: OpenFraction | None
    min_snr_gamma: PosFloat | None
    weight_decay: NonNegFloat


class Styles(Block):
    """Uniform [low, high] ranges of the prior's acquisition styles (``fu_kedro.data_sources.prior_corpus``)."""

    BLOCK = "base_training.prior.styles"

    gain: Range
    speckle: Range
    noise: Range
    zoom: Range
    sector_deg: Range
    apex: Range
    attenuation: Range
    gamma: Range


class PriorParams(Block):
    """``base_training.prior``: the broad prior corpus."""

    BLOCK = "base_training.prior"

    n_per_class: NonNegInt  # 0 = an empty corpus
    image_size: PosInt
    breadth: Fraction
    linear_probe_fraction: Fraction
    styles: Styles
    # optional (conf/base leaves it out): the prior's own caption; absent or null = the project's
    caption_template: CaptionTemplate | None = None


class BaseTrainingParams(Block):
    """``base_training``: the tiny SD-architecture base trained from scratch."""

    BLOCK = "base_training"

    name: NonEmptyStr
    description: Str
    output_path: NonEmptyStr
    resolution: PosInt
    torch_threads: PosInt | None
    # overrides of fu_kedro.models.diffusion.TINY_CONFIG, per part
    architecture: dict[Literal["vae", "unet", "text_encoder", "scheduler"], dict[Str, Any]]
    train_on: Literal["prior", "source", "prior+source"]
    source_repeats: PosInt
    prior: PriorParams
    autoencoder: AutoencoderParams
    denoiser: DenoiserParams
