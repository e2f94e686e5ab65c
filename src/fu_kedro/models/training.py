"""Training loops: one for the autoencoder, one for the denoiser (base UNet or LoRA).

The denoiser loop is the same for the tiny base (all UNet weights trainable) and for LoRA
fine-tuning of either profile (only the peft layers trainable): which parameters train is
decided before the loop by ``requires_grad``. Device and precision are left to accelerate,
so the same loop runs on CPU, one GPU or several (``accelerate launch``, or
``python -m fu_kedro.launch``). Under N processes every process draws the same global batch
(same seeded generator) and trains on its 1/N share of it; DDP averages the gradients, so
the weights equal those of one process with the same ``batch_size``. Reusable pieces
come from ``diffusers.training_utils`` (``EMAModel``, ``compute_snr``, ``cast_training_params``)
and ``diffusers.optimization.get_scheduler``, as in diffusers' ``train_text_to_image_lora.py``.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, broadcast
from diffusers import AutoencoderKL, StableDiffusionPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, cast_training_params, compute_snr

from fu_kedro.models.diffusion import training_noise_scheduler
from tqdm.auto import tqdm

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The training loss became NaN or infinite."""


@dataclass
class LoopConfig:
    """Knobs of a training loop (all from ``conf/``)."""

    max_steps: int
    batch_size: int
    learning_rate: float
    seed: int
    # Optional wall-clock cap, off by default (None): a cap makes the result depend on how
    # busy the machine is. When it stops a loop, the loop logs a WARNING and its history
    # says so (``time_capped``), which the run records (MLflow tag, lineage, report).
    max_minutes: float | None = None
    weight_decay: float = 1e-2
    warmup_steps: int = 0  # diffusers' constant_with_warmup: lr x step / warmup_steps, then lr (0 = none, every shipped config)
    ema_decay: float | None = None
    mixed_precision: str = "no"
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    caption_dropout: float = 0.0
    min_snr_gamma: float | None = None
    noise_offset: float = 0.0
    text_encoder_learning_rate: float | None = None
    log_every: int = 10

    def __post_init__(self) -> None:
        # `--params ...mixed_precision=no` arrives as YAML's boolean false
        if self.mixed_precision in (False, None):
            self.mixed_precision = "no"


def _fused(accelerator: Accelerator) -> bool:
    """The fused AdamW kernel (one pass over all weights) where torch has it: CPU and CUDA.
    On the tiny base it cut the optimiser's share of a CPU step from ~12 % to ~4 % (torch profiler)."""
    return accelerator.device.type in ("cpu", "cuda")


def _check_finite(loss: torch.Tensor, step: int, last_finite: float | None) -> float:
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(
            f"training loss became {value} at step {step}; last finite loss was {last_finite}. "
            "Lower the learning rate, or use mixed_precision 'no'/'bf16' instead of 'fp16'."
        )
    return value


def _batches(n: int, batch_size: int, generator: torch.Generator):
    """Endless seeded shuffles of range(n), cut into batches (the last short one kept)."""
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n, batch_size):
            yield order[start : start + batch_size]


def to_model_range(images: np.ndarray, channels: int = 3) -> torch.Tensor:
    """uint8 ``(N, H, W)`` grayscale -> float ``(N, C, H, W)`` in [-1, 1] (gray copied to C channels)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).float().div(127.5).sub(1.0)
    return x[:, None].expand(-1, channels, -1, -1).contiguous()


def resize_images(image_set, resolution: int) -> torch.Tensor:
    """An ``ImageSet``'s grayscale images -> model-range tensors ``(N, 3, R, R)`` in [-1, 1]."""
    return to_model_range(image_set.resized_tensor(resolution).squeeze(1).numpy())


def train_autoencoder(vae: AutoencoderKL, images: torch.Tensor, cfg: LoopConfig, kl_weight: float) -> list[dict]:
    """Train a (small) ``AutoencoderKL`` to reconstruct ``images``; returns the loss history.

    Loss: mean squared reconstruction error + ``kl_weight`` x KL to the unit Gaussian.

    Under several processes every process trains the same VAE on the same batches (this
    small first stage of the tiny base is not split: ``encode``/``decode`` would bypass a
    DDP wrapper's gradient sync), and the main process's weights are copied to the others
    at the end.
    """
    accelerator = Accelerator(mixed_precision=cfg.mixed_precision)
    gen = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    vae.train().requires_grad_(True)
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=_fused(accelerator))
    if accelerator.num_processes == 1:
        vae, opt = accelerator.prepare(vae, opt)
    else:
        vae = vae.to(accelerator.device)
        opt = accelerator.prepare(opt)
    history: list[dict] = []
    start, last = time.monotonic(), None
    bar = tqdm(total=cfg.max_steps, desc="autoencoder", leave=False)
    for step, idx in enumerate(_batches(len(images), cfg.batch_size, gen), start=1):
        x = images[idx].to(accelerator.device)
        with accelerator.autocast():
            posterior = vae.encode(x).latent_dist
            recon = vae.decode(posterior.sample(generator=None)).sample
            rec = F.mse_loss(recon.float(), x.float())
            kl = posterior.kl().mean() / x[0].numel()
            loss = rec + kl_weight * kl
        last = _check_finite(loss, step, last)
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad(set_to_none=True)
        elapsed = time.monotonic() - start
        history.append({"step": step, "loss": last, "reconstruction": rec.item(), "seconds": elapsed})
        bar.update(1)
        bar.set_postfix(loss=f"{last:.4f}")
        if step >= cfg.max_steps:
            break
        if _out_of_time(accelerator, elapsed, cfg):
            _warn_time_cap("autoencoder", step, cfg, history)
            break
    bar.close()
    log.info("autoencoder: %d steps in %.0f s, final reconstruction MSE %.4f", step, elapsed, history[-1]["reconstruction"])
    vae = accelerator.unwrap_model(vae).eval().requires_grad_(False)
    if accelerator.num_processes > 1:
        for tensor in vae.state_dict().values():
            tensor.copy_(broadcast(tensor, from_process=0))
    accelerator.free_memory()
    return history


@torch.no_grad()
def encode_to_latents(vae: AutoencoderKL, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """Posterior means of ``images`` times the VAE's scaling factor (latents are cached once)."""
    out = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size].to(vae.device, vae.dtype)
        out.append(vae.encode(x).latent_dist.mean.float().cpu())
    return torch.cat(out) * vae.config.scaling_factor


def tokenize(pipe: StableDiffusionPipeline, captions: list[str]) -> torch.Tensor:
    """Token ids ``(N, 77)`` of ``captions``, padded like the pipeline pads prompts."""
    return pipe.tokenizer(
        captions, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids


def _caption_states(text_encoder, token_ids: torch.Tensor, empty_ids: torch.Tensor, device, clip_skip: int | None):
    """A frozen text encoder gives the same states for the same caption: encode each distinct
    caption (and the empty one) once instead of every step. Returns (states, row of each
    caption, row of the empty caption)."""
    with torch.no_grad():
        unique, inverse = torch.unique(torch.cat([token_ids, empty_ids[None]]), dim=0, return_inverse=True)
        states = torch.cat([_encode_ids(text_encoder, unique[i : i + 64].to(device), clip_skip)
                            for i in range(0, len(unique), 64)])
    return states, inverse[:-1], inverse[-1]


def _draw_batch(latents, token_ids, idx, empty_ids, noise_scheduler, cfg: LoopConfig, gen: torch.Generator):
    """Every random draw of one step, made for the whole (global) batch on every process, in a fixed
    order (caption dropout, noise, noise offset, timesteps): (x0, caption ids, dropped, noise, t)."""
    x0 = latents[idx]
    ids = token_ids[idx].clone()
    drop = torch.zeros(len(ids), dtype=torch.bool)
    if cfg.caption_dropout > 0:
        drop = torch.rand(len(ids), generator=gen) < cfg.caption_dropout
        ids[drop] = empty_ids
    noise = torch.randn(x0.shape, generator=gen)
    if cfg.noise_offset:
        noise += cfg.noise_offset * torch.randn((x0.shape[0], x0.shape[1], 1, 1), generator=gen)
    t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=gen)
    return x0, ids, drop, noise, t


def _per_image_loss(pred, target, t, noise_scheduler, min_snr_gamma: float | None) -> torch.Tensor:
    """MSE per image, min-SNR weighted when ``min_snr_gamma`` is set."""
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))
    if min_snr_gamma:
        snr = compute_snr(noise_scheduler, t)
        weight = torch.clamp(snr, max=min_snr_gamma) / snr
        if noise_scheduler.config.prediction_type == "v_prediction":
            weight = torch.clamp(snr, max=min_snr_gamma) / (snr + 1)
        loss = loss * weight
    return loss


def _optimisation(unet_params: list, te_params: list, cfg: LoopConfig, accelerator: Accelerator):
    """(AdamW over the UNet and text-encoder groups, diffusers' constant schedule with linear
    warm-up, optional EMA) of the trained weights (already float32: ``cast_training_params``)."""
    groups = [{"params": unet_params, "lr": cfg.learning_rate}]
    if te_params:
        groups.append({"params": te_params, "lr": cfg.text_encoder_learning_rate or cfg.learning_rate})
    opt = torch.optim.AdamW(groups, weight_decay=cfg.weight_decay, fused=_fused(accelerator))
    sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=cfg.warmup_steps)
    ema = EMAModel(unet_params + te_params, decay=cfg.ema_decay, foreach=True) if cfg.ema_decay else None
    return opt, sched, ema


# long: one training loop read top to bottom, as in diffusers' train_text_to_image_lora.py; the
# setup, the random draws and the loss are named steps above, the step order stays in one place
def train_denoiser(
    pipe: StableDiffusionPipeline,
    latents: torch.Tensor,
    token_ids: torch.Tensor,
    cfg: LoopConfig,
    clip_skip: int | None = None,
) -> list[dict]:
    """Train the pipeline's UNet (and text encoder) weights that have ``requires_grad`` set.

    ``latents`` are cached VAE latents (already scaled), ``token_ids`` the tokenised
    captions, one row per latent. With ``caption_dropout`` > 0 a caption is replaced by
    the empty prompt that often, so classifier-free guidance works at sampling time.
    Optional min-SNR loss weighting and noise offset; optional EMA of the trained weights
    (copied into the model at the end). Stops at ``max_steps`` or ``max_minutes``,
    whichever comes first. Returns the per-step history (step, loss, seconds).
    """
    unet, text_encoder = pipe.unet, pipe.text_encoder
    noise_scheduler = training_noise_scheduler(pipe)
    unet_params = [p for p in unet.parameters() if p.requires_grad]
    te_params = [p for p in text_encoder.parameters() if p.requires_grad]
    if not unet_params and not te_params:
        raise ValueError("train_denoiser: no trainable parameters (nothing has requires_grad)")
    # With clip skip the last text-encoder layers do not reach the loss: DDP must not wait
    # for gradients of their LoRA weights.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=bool(te_params and clip_skip))
    accelerator = Accelerator(
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        kwargs_handlers=[ddp],
    )
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    empty_ids = tokenize(pipe, [""])[0]
    if cfg.gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    # the trained weights in float32 even when the frozen base is half precision (autocast does the rest)
    cast_training_params([unet, text_encoder], dtype=torch.float32)
    opt, sched, ema = _optimisation(unet_params, te_params, cfg, accelerator)
    unet.train()
    text_encoder.train(bool(te_params))
    n_proc, rank = accelerator.num_processes, accelerator.process_index
    if te_params or n_proc == 1:
        unet, text_encoder, opt, sched = accelerator.prepare(unet, text_encoder, opt, sched)
    else:  # DDP refuses a module without trainable parameters (the frozen text encoder)
        text_encoder = text_encoder.to(accelerator.device)
        unet, opt, sched = accelerator.prepare(unet, opt, sched)
    device = accelerator.device
    if cfg.batch_size < n_proc:
        raise ValueError(f"batch_size {cfg.batch_size} is smaller than the {n_proc} processes it is split between")

    cached = None if te_params else _caption_states(text_encoder, token_ids, empty_ids, device, clip_skip)

    history: list[dict] = []
    start, last, step = time.monotonic(), None, 0
    bar = tqdm(total=cfg.max_steps, desc="denoiser", leave=False)
    batches = _batches(len(latents), cfg.batch_size, gen)
    while step < cfg.max_steps:
        idx = next(batches)
        with accelerator.accumulate(unet, text_encoder):
            x0, ids, drop, noise, t = _draw_batch(latents, token_ids, idx, empty_ids, noise_scheduler, cfg, gen)
            # ...then each process keeps its share (all of it when there is one process)
            global_batch = len(idx)
            share = torch.arange(global_batch).tensor_split(n_proc)[rank]
            idx, ids, drop = idx[share], ids[share], drop[share]
            x0, noise, t = x0[share].to(device), noise[share].to(device), t[share].to(device)
            noisy = noise_scheduler.add_noise(x0, noise, t)
            if cached is not None:
                rows = torch.where(drop, cached[2], cached[1][idx])
                hidden = cached[0][rows]
            else:
                hidden = _encode_ids(text_encoder, ids.to(device), clip_skip)
            if noise_scheduler.config.prediction_type == "v_prediction":
                target = noise_scheduler.get_velocity(x0, noise, t)
            else:
                target = noise
            with accelerator.autocast():
                pred = unet(noisy, t, hidden).sample
            loss = _per_image_loss(pred, target, t, noise_scheduler, cfg.min_snr_gamma)
            if n_proc == 1:
                loss = loss.mean()
            else:
                # this share's sum / (global batch / processes): DDP averages the gradients over
                # the processes, which makes them those of the mean over the global batch
                loss = loss.sum() * n_proc / global_batch
            # every process logs (and checks) the global batch's mean loss
            global_loss = loss if n_proc == 1 else accelerator.reduce(loss.detach(), reduction="mean")
            last = _check_finite(global_loss, step + 1, last)
            accelerator.backward(loss)
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        if accelerator.sync_gradients:
            step += 1
            if ema is not None:
                ema.step(unet_params + te_params)
            elapsed = time.monotonic() - start
            history.append({"step": step, "loss": last, "seconds": elapsed})
            bar.update(1)
            if step % cfg.log_every == 0:
                bar.set_postfix(loss=f"{last:.4f}")
            if step < cfg.max_steps and _out_of_time(accelerator, elapsed, cfg):
                _warn_time_cap("denoiser", step, cfg, history)
                break
    bar.close()
    if ema is not None:
        ema.copy_to(unet_params + te_params)
    unet = accelerator.unwrap_model(unet).eval()
    text_encoder = accelerator.unwrap_model(text_encoder).eval()
    if cfg.gradient_checkpointing:
        unet.disable_gradient_checkpointing()
    accelerator.free_memory()  # drops the DDP wrappers; pipe.unet / pipe.text_encoder stay
    return history


def _out_of_time(accelerator: Accelerator, elapsed: float, cfg: LoopConfig) -> bool:
    """The optional wall-clock cap is spent — on any process: all of them stop at the same step.

    ``max_minutes`` None (the default) means no cap: the loop runs exactly ``max_steps``.
    """
    if cfg.max_minutes is None:
        return False
    if accelerator.num_processes == 1:
        return elapsed > cfg.max_minutes * 60
    if elapsed > cfg.max_minutes * 60:
        accelerator.set_trigger()
    return accelerator.check_trigger()


def _warn_time_cap(loop: str, step: int, cfg: LoopConfig, history: list[dict]) -> None:
    """Say loudly that a loop stopped on the clock: the result is not reproducible."""
    log.warning(
        "%s: wall-clock cap max_minutes=%s stopped training at step %d of max_steps=%d — "
        "the result depends on machine load and is NOT reproducible; set max_minutes: null "
        "for a fixed step budget",
        loop, cfg.max_minutes, step, cfg.max_steps,
    )
    if history:
        history[-1]["time_capped"] = True


def time_capped_at(history: list[dict]) -> int | None:
    """The step at which a loop's wall-clock cap stopped it, or None if it ran its step budget."""
    return next((int(h["step"]) for h in history if h.get("time_capped")), None)


def _encode_ids(text_encoder, ids: torch.Tensor, clip_skip: int | None) -> torch.Tensor:
    """Text-encoder states the way ``StableDiffusionPipeline.encode_prompt`` computes them."""
    if not clip_skip:
        return text_encoder(ids)[0]
    out = text_encoder(ids, output_hidden_states=True)
    hidden = out.hidden_states[-(clip_skip + 1)]
    model = getattr(text_encoder, "module", text_encoder)  # the CLIP model inside a DDP wrapper
    return model.final_layer_norm(hidden) if hasattr(model, "final_layer_norm") else hidden


@torch.no_grad()
def encode_prompts(pipe: StableDiffusionPipeline, prompts: list[str], clip_skip: int | None) -> torch.Tensor:
    """Prompt embeddings as the denoiser was trained on them (``clip_skip`` included), on the
    pipeline's device and dtype; for ``pipe(prompt_embeds=...)`` at generation time."""
    ids = tokenize(pipe, list(prompts)).to(pipe.text_encoder.device)
    return _encode_ids(pipe.text_encoder, ids, clip_skip).to(pipe.unet.dtype)


@torch.no_grad()
def denoising_loss(
    pipe: StableDiffusionPipeline,
    latents: torch.Tensor,
    token_ids: torch.Tensor,
    seed: int,
    repeats: int = 4,
    clip_skip: int | None = None,
) -> float:
    """Mean epsilon/v MSE of the pipeline on fixed (seeded) noise and timesteps — for comparisons."""
    noise_scheduler = training_noise_scheduler(pipe)
    gen = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    device = pipe.unet.device
    for _ in range(repeats):
        for start in range(0, len(latents), 32):
            x0 = latents[start : start + 32].to(device)
            ids = token_ids[start : start + 32].to(device)
            noise = torch.randn(x0.shape, generator=gen).to(device)
            t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x0),), generator=gen).to(device)
            target = (
                noise_scheduler.get_velocity(x0, noise, t)
                if noise_scheduler.config.prediction_type == "v_prediction"
                else noise
            )
            pred = pipe.unet(noise_scheduler.add_noise(x0, noise, t), t, _encode_ids(pipe.text_encoder, ids, clip_skip)).sample
            total += float(F.mse_loss(pred.float(), target.float(), reduction="sum"))
            count += target.numel()
    return total / count


def summarize(history: list[dict[str, Any]]) -> dict[str, float]:
    """First/last-window mean loss and step count of a history (for logs and tests)."""
    losses = [h["loss"] for h in history]
    k = max(1, len(losses) // 10)
    return {"steps": len(losses), "loss_start": float(np.mean(losses[:k])), "loss_end": float(np.mean(losses[-k:]))}
