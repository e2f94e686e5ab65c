"""The schema of the ``lora_training`` block (``conf/base/parameters_lora_training.yml``).

See :mod:`fu_kedro.schema` for the rules and how nodes read a block.
"""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from fu_kedro.pipelines.base_training.params import LoopParams, LoopPrecision
from fu_kedro.schema import (
    Block,
    Bool,
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


class BaseModelParams(Block):
    # a diffusers folder (or a hub id in the local cache), read by the catalog entry pretrained_base
    pretrained_path: Str | None


class LoraParams(LoopParams):
    """``lora_training.lora``: the peft LoRA and its loop."""

    BLOCK = "lora_training.lora"

    rank: PosInt
    alpha: PosInt | PosFloat | None  # null = rank
    unet_targets: list[NonEmptyStr] = Field(min_length=1)
    train_text_encoder: Bool
    text_encoder_learning_rate: PosFloat | None
    loss_check_repeats: PosInt
    caption_dropout: Fraction
    ema_decay: OpenFraction | None
    mixed_precision: LoopPrecision
    gradient_checkpointing: Bool
    gradient_accumulation_steps: PosInt
    noise_offset: NonNegFloat
    min_snr_gamma: PosFloat | None
    clip_skip: NonNegInt | None  # diffusers' count (kohya's "clip skip 2" = 1)
    fits: PosInt  # independent LoRA fits K (1 = none beside lora_adapter)


class ValidationGrid(Block):
    per_class: PosInt
    steps: PosInt
    guidance_scale: NonNegFloat
    lora_scale: Float


class LoraTrainingParams(Block):
    """``lora_training``: the base model to load and the LoRA fitted on it."""

    BLOCK = "lora_training"

    resolution: PosInt
    torch_threads: PosInt | None
    workers: PosInt  # CPU, one process: LoRA fits 2..K side by side (same weights as 1)
    base_model: BaseModelParams
    adapter_source: Literal["train", "file"]
    adapter_file: Str | None
    lora: LoraParams
    validation: ValidationGrid

    @model_validator(mode="after")
    def _fits_need_training(self):
        if self.lora.fits > 1 and self.adapter_source != "train":
            raise ValueError(f"lora.fits={self.lora.fits} needs adapter_source: train (an adapter read from a file "
                             "cannot be fitted again); set lora_training.lora.fits=1")
        return self
