"""Seeded, batched image generation with a diffusers ``StableDiffusionPipeline``.

Used by ``synthesis`` (the synthetic batches) and by ``lora_training`` (its validation grid).

Reproducibility rules, each measured on this project's CPU build (see docs/synthesis.md):

* **One generator per image.** Image *i* gets its own CPU ``torch.Generator`` seeded with
  its own seed; diffusers draws each image's initial noise from its own generator when it
  gets a list of them, so the noise of an image does not depend on its neighbours.
* **A fixed call shape.** The noise alone is not enough: CPU BLAS/oneDNN kernels choose
  their blocking and reduction order from the *batch size* (and the thread count), so the
  same image computed in a batch of 1, 2 or 16 differs in the last float bits and, after
  rounding to 8 bits, in a pixel now and then. Every pipeline call therefore runs exactly
  ``batch_size`` rows: a short last batch (or a single image regenerated alone) is padded
  with copies of its first row, which are thrown away. With the same call shape and thread
  count an image is pixel-identical whatever else is in its batch, at any position — so a
  batch, any shard of it, any process's share of it and any single regenerated image agree.
  The batch size and the thread count are written to the manifest for that reason.
* **Deterministic samplers only** (:data:`SCHEDULERS`): after the initial noise nothing is
  random.

On a GPU the same holds for a fixed call shape as long as the kernels are deterministic;
that was not run here (no GPU on the reference machine).
"""
from __future__ import annotations

import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import pandas as pd
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    StableDiffusionPipeline,
    UniPCMultistepScheduler,
)
from tqdm.auto import tqdm

from fu_kedro.devices import resolve_device
from fu_kedro.lineage import sha256_file
from fu_kedro.models.lora import LoraAdapter, apply_lora
from fu_kedro.models.training import encode_prompts

log = logging.getLogger(__name__)

# name -> (scheduler class, config overrides). All deterministic (no ancestral/SDE noise).
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "dpm++_multistep": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc_multistep": (UniPCMultistepScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
}

LORA_ADAPTER_NAME = "fu_lora"


def image_seed(base_seed: int, index: int) -> int:
    """The seed of image ``index`` of a batch made with ``base_seed`` (a 32-bit hash of both).

    NumPy's ``SeedSequence`` mixes the two numbers, so batches with neighbouring base seeds
    do not share seeds (``base_seed + index`` would: base 42 image 1 == base 43 image 0).
    """
    if int(base_seed) < 0 or int(index) < 0:
        raise ValueError(f"seeds are non-negative integers, got base_seed={base_seed}, index={index}")
    return int(np.random.SeedSequence([int(base_seed), int(index)]).generate_state(1, dtype=np.uint32)[0])


def shard_indices(n: int, shard_index: int, num_shards: int) -> range:
    """Image indices of shard ``shard_index`` of ``num_shards``: contiguous, sizes differ by at most one.

    The same split ``accelerate``'s ``split_between_processes`` makes, so a shard and a
    process's share of a batch are cut the same way.
    """
    if num_shards < 1 or not 0 <= shard_index < num_shards:
        raise ValueError(f"shard_index must be in [0, num_shards) and num_shards >= 1, got {shard_index} of {num_shards}")
    per, extra = divmod(n, num_shards)
    start = shard_index * per + min(shard_index, extra)
    return range(start, start + per + (1 if shard_index < extra else 0))


def use_scheduler(pipe: StableDiffusionPipeline, name: str) -> None:
    """Give ``pipe`` the sampler ``name`` (see :data:`SCHEDULERS`), built from its own noise schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {sorted(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)


@contextmanager
def torch_threads(n: int | None) -> Iterator[int]:
    """Run the block with ``n`` intra-op threads (``None``: as set); yields the count in use."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


@contextmanager
def cpu_threads(n: int | None) -> Iterator[int]:
    """:func:`torch_threads` and the same limit on the BLAS/OpenMP pools numpy, scipy and
    scikit-learn use (``threadpoolctl``); yields torch's count in use."""
    from threadpoolctl import threadpool_limits

    with torch_threads(n) as used, threadpool_limits(limits=n):
        yield used


def to_gray_uint8(images: np.ndarray) -> np.ndarray:
    """Pipeline output ``(N, H, W, 3)`` floats in [0, 1] -> ``uint8 (N, H, W)`` grayscale (channel mean)."""
    return (images.mean(axis=-1) * 255).round().clip(0, 255).astype(np.uint8)


@torch.no_grad()
def generate_images(
    pipe: StableDiffusionPipeline,
    prompts: Sequence[str],
    seeds: Sequence[int],
    *,
    resolution: int,
    steps: int,
    guidance_scale: float,
    negative_prompts: Sequence[str] | None = None,
    batch_size: int | None = None,
    progress: bool = False,
    desc: str = "generating",
    clip_skip: int | None = None,
) -> np.ndarray:
    """Images for ``prompts``, image *i* from its own generator seeded with ``seeds[i]``.

    Calls the pipeline once per ``batch_size`` images (``None``: one call for all), every
    call with exactly ``batch_size`` rows (see the module docstring); progress per image.

    ``clip_skip`` (diffusers' count: 1 = the penultimate CLIP layer, kohya's "clip skip 2")
    conditions on an earlier text-encoder layer, as the adapter was trained
    (``lora_training.lora.clip_skip``). The prompt *and* the negative/unconditional prompt are
    encoded that way — as in training, where the dropped caption "" also went through the
    skipped layers — by :func:`fu_kedro.models.training.encode_prompts` (diffusers 0.42's own
    ``encode_prompt(clip_skip=...)`` fails with transformers 5, which dropped ``text_model``).

    Returns:
        ``uint8 (N, resolution, resolution)`` grayscale images, in the order of ``prompts``.
    """
    n = len(prompts)
    if len(seeds) != n or (negative_prompts is not None and len(negative_prompts) != n):
        raise ValueError(f"generate_images: {n} prompts but {len(seeds)} seeds / negative prompts")
    out = np.empty((n, resolution, resolution), np.uint8)
    if n == 0:
        return out
    batch_size = int(batch_size or n)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    # "" and None give the same unconditional embedding; None keeps diffusers' default path
    if negative_prompts is not None and not any(negative_prompts):
        negative_prompts = None
    pipe.set_progress_bar_config(disable=True)  # our bar counts images, not denoising steps
    if batch_size > 1 and resolution >= 256:
        # decode the batch's latents one image at a time (SD v1.5 at 512 px on CPU, fp32: one
        # call of 5 images peaked above 12 GB); the small default sizes keep one decode call
        pipe.vae.enable_slicing()
    with tqdm(total=n, desc=desc, unit="img", disable=not progress, leave=False) as bar:
        for start in range(0, n, batch_size):
            real = list(range(start, min(start + batch_size, n)))
            rows = real + [real[0]] * (batch_size - len(real))  # fixed call shape (padding is discarded)
            if clip_skip:
                negatives = [""] * len(rows) if negative_prompts is None else [negative_prompts[i] for i in rows]
                text = {
                    "prompt_embeds": encode_prompts(pipe, [prompts[i] for i in rows], clip_skip),
                    "negative_prompt_embeds": encode_prompts(pipe, negatives, clip_skip),
                }
            else:
                text = {
                    "prompt": [prompts[i] for i in rows],
                    "negative_prompt": None if negative_prompts is None else [negative_prompts[i] for i in rows],
                }
            result = pipe(
                **text,
                height=resolution,
                width=resolution,
                num_inference_steps=int(steps),
                guidance_scale=float(guidance_scale),
                generator=[torch.Generator("cpu").manual_seed(int(seeds[i])) for i in rows],
                output_type="np",
            ).images
            out[real[0] : real[-1] + 1] = to_gray_uint8(np.asarray(result[: len(real)], dtype=np.float32))
            bar.update(len(real))
    return out


# --------------------------------------------------------------------------- model setup
def device_and_dtype(device: str = "auto", precision: str = "auto", state=None) -> tuple[torch.device, torch.dtype]:
    """Where and in which precision to generate.

    ``device``: :func:`fu_kedro.devices.resolve_device` (``auto``: this process's CUDA device,
    else CPU); ``precision: auto`` is fp16 on CUDA and fp32 elsewhere (fp16 on CPU fails in
    diffusers' convolutions).
    """
    dev = resolve_device(device, "synthesis.device", state)
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    if precision == "auto":
        dtype = torch.float16 if dev.type == "cuda" else torch.float32
    elif precision in dtypes:
        dtype = dtypes[precision]
    else:
        raise ValueError(f"precision must be auto, fp32, fp16 or bf16, got {precision!r}")
    if dev.type == "cpu" and dtype == torch.float16:
        raise ValueError("precision fp16 on CPU is not supported by diffusers' convolutions; use fp32 (or auto)")
    return dev, dtype


def prepare_pipeline(
    pipe: StableDiffusionPipeline,
    adapter: LoraAdapter | None,
    lora_scale: float,
    device: torch.device,
    dtype: torch.dtype,
    fuse: bool,
    scheduler: str,
) -> StableDiffusionPipeline:
    """Load the adapter at ``lora_scale`` (optionally fused into the weights), move, set the sampler.

    Fusing (``fuse_lora`` then ``unload_lora_weights``) happens in fp32 before the cast, so
    an fp16 model gets the adapter folded in at full precision and no LoRA layers remain to
    run at every step. Attention stays diffusers' default (``torch``'s SDPA).
    """
    if adapter is not None:
        apply_lora(pipe, adapter, float(lora_scale), name=LORA_ADAPTER_NAME)
        if fuse:
            # the adapter's strength is already set by apply_lora (set_adapters); fuse it as is
            pipe.fuse_lora(components=["unet", "text_encoder"], lora_scale=1.0, adapter_names=[LORA_ADAPTER_NAME])
            pipe.unload_lora_weights()
    if pipe.unet.dtype == dtype:
        pipe.to(device)
    else:  # diffusers warns on every cast, so only cast when needed
        pipe.to(device, dtype)
    use_scheduler(pipe, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


# --------------------------------------------------------------------------- lineage
def library_versions() -> dict[str, str]:
    """Versions of the libraries an image depends on (written to every manifest row)."""
    import accelerate
    import diffusers
    import peft
    import transformers

    return {
        "torch_version": torch.__version__,
        "diffusers_version": diffusers.__version__,
        "peft_version": peft.__version__,
        "transformers_version": transformers.__version__,
        "accelerate_version": accelerate.__version__,
    }


def file_sha256(path: str | Path | None) -> str:
    """SHA-256 of a file's bytes ("" when there is no file, e.g. an adapter built in memory)."""
    return sha256_file(Path(path)) if path and Path(path).is_file() else ""


# Manifest columns that decide an image's pixels (with the base and adapter weights).
REGENERATION_FIELDS = (
    "prompt", "negative_prompt", "seed", "scheduler", "steps", "guidance", "lora_scale", "resolution", "batch_size",
)


def regenerate(pipe: StableDiffusionPipeline, rows: pd.DataFrame, progress: bool = False) -> np.ndarray:
    """The images of manifest ``rows``, rebuilt from the rows' own fields.

    ``pipe`` must hold the rows' base model and adapter (see :func:`prepare_pipeline`, with
    the rows' ``lora_scale``, ``device``/``dtype`` and ``lora_fused``); everything else —
    prompt, negative prompt, seed, sampler, steps, guidance, clip skip, resolution, call shape
    (``batch_size``) and, on CPU, the thread count (``torch_threads``) — is read from the
    rows. Rows may be any subset of a batch, in any order, one at a time.
    """
    missing = [c for c in REGENERATION_FIELDS if c not in rows.columns]
    if missing:
        raise ValueError(f"regenerate: manifest rows lack {missing}")
    rows = rows.reset_index(drop=True)
    threads_col = "torch_threads" if "torch_threads" in rows.columns else None
    if "clip_skip" not in rows.columns:  # manifests written before clip skip was recorded
        rows = rows.assign(clip_skip=0)
    group_keys = ["scheduler", "steps", "guidance", "resolution", "batch_size", "clip_skip"] + (
        [threads_col] if threads_col else []
    )
    results: dict[int, np.ndarray] = {}
    for values, group in rows.groupby(group_keys, sort=False):
        setting = dict(zip(group_keys, values))
        use_scheduler(pipe, str(setting["scheduler"]))
        threads = int(setting[threads_col]) if threads_col and pipe.device.type == "cpu" else None
        with torch_threads(threads):
            images = generate_images(
                pipe,
                group["prompt"].astype(str).tolist(),
                group["seed"].astype(int).tolist(),
                negative_prompts=group["negative_prompt"].astype(str).tolist(),
                resolution=int(setting["resolution"]),
                steps=int(setting["steps"]),
                guidance_scale=float(setting["guidance"]),
                batch_size=int(setting["batch_size"]),
                clip_skip=int(setting["clip_skip"]),
                progress=progress,
                desc="regenerating",
            )
        results.update(zip(group.index, images))
    if not results:
        return np.zeros((0, 1, 1), np.uint8)
    return np.stack([results[i] for i in range(len(rows))])
