"""The schema of the ``synthesis`` block (``conf/base/parameters_synthesis.yml``).

See :mod:`fu_kedro.schema` for the rules and how nodes read a block. Checks that need more
than this block (the top-level ``classes`` against ``ingestion.plane_labels``, ``num_shards``
against the batch's size) are the plan node's (:func:`.nodes.plan_synthetic_batch`).
"""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, Strict, model_validator

from fu_kedro.schema import Block, Bool, Device, Float, NonNegFloat, NonNegInt, PosInt, Str

# fu_kedro.models.generation.SCHEDULERS (deterministic samplers only; its keys, tests/test_params_schema.py)
Scheduler = Literal["dpm++_multistep", "unipc_multistep", "ddim", "euler"]


class Preview(Block):
    per_class: PosInt


class SynthesisParams(Block):
    """``synthesis``: the synthetic batch, its sampler and where it is made."""

    BLOCK = "synthesis"

    images_per_class: PosInt
    replicates: PosInt
    adapter_per_replicate: Bool
    scheduler: Scheduler
    steps: PosInt
    guidance_scale: NonNegFloat
    negative_prompt: Str | None  # null = the empty prompt
    lora_scale: Float
    clip_skip: Literal["auto"] | NonNegInt  # auto = as the adapter was trained
    batch_size: PosInt
    resolution: Annotated[int, Strict(), Field(ge=8, multiple_of=8)] | None  # null = the base model's
    base_seed: NonNegInt | None  # null = the project seed
    num_shards: PosInt
    shard_index: NonNegInt
    device: Device
    precision: Literal["auto", "fp32", "fp16", "bf16"]
    fuse_lora: Literal["auto"] | Bool
    torch_threads: PosInt | None  # null = torch's default
    workers: PosInt  # CPU, one process: generating processes side by side (same pixels as 1)
    preview: Preview

    @model_validator(mode="after")
    def _shard_in_range(self):
        if self.shard_index >= self.num_shards:
            raise ValueError(f"shard_index={self.shard_index} is not in [0, num_shards={self.num_shards})")
        return self
