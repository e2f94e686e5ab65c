"""SD v1.5 at the paper's settings on this machine: LoRA training steps/s, synthesis images/s, peak memory.

    python benchmarks/bench_sd15.py                      # 512 px, the device found (cuda, else CPU)
    python benchmarks/bench_sd15.py --resolution 256     # smaller, e.g. on a CPU
    python benchmarks/bench_sd15.py --train-steps 20 --images 8 --json out.json

No download: SD v1.5's exact architecture (``fu_kedro.models.diffusion.SD15_CONFIG``: UNet
859.5 M, CLIP text encoder 123.1 M, VAE 83.7 M parameters) is built with random weights.
Speed does not depend on the weights' values, so the figures are those of the real model.

* LoRA training: the ``paper`` env's LoRA knobs (conf/base + conf/paper, as ``kedro run
  --env paper`` resolves them: rank 128, alpha = rank, text-encoder LoRA, clip skip,
  mixed precision and gradient checkpointing as configured — fp16 only on a GPU) through
  the project's own loop (``fu_kedro.models.training.train_denoiser``) at batch 1 on cached
  latents, as ``fit_lora_adapter`` runs it. The first step is warm-up and is not timed.
* Synthesis: ``StableDiffusionPipeline.__call__`` with the trained adapter attached,
  ``--steps`` (25) DPM-Solver++ steps, classifier-free guidance 7.5 (two UNet passes a
  step), VAE decode included; one image per call, ``--images`` calls (after one untimed
  call on a GPU).
* Peak memory: ``torch.cuda.max_memory_allocated`` per phase on a GPU; on CPU the process's
  peak resident set size so far (``ru_maxrss``), which includes the ~4 GB of fp32 weights.
"""
from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch
from kedro.config import OmegaConfigLoader

from fu_kedro.models.diffusion import SD15_CONFIG, TINY_CONFIG, build_pipeline_from_config
from fu_kedro.models.lora import attach_lora
from fu_kedro.models.training import LoopConfig, encode_prompts, tokenize, train_denoiser

PROJECT_ROOT = Path(__file__).resolve().parents[1]


def paper_lora_params() -> dict:
    """``lora_training`` as ``kedro run --env paper`` resolves it (conf/base + conf/paper, soft merge)."""
    from fu_kedro.settings import CONFIG_LOADER_ARGS

    loader = OmegaConfigLoader(str(PROJECT_ROOT / "conf"), env="paper", **CONFIG_LOADER_ARGS)
    return copy.deepcopy(loader["parameters"]["lora_training"])


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9  # Linux: kB


def machine() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    cores = len(__import__("os").sched_getaffinity(0))
    return f"{platform.processor() or platform.machine()}, {cores} cores, torch threads {torch.get_num_threads()}"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--resolution", type=int, default=512, help="image side in px (paper: 512)")
    ap.add_argument("--steps", type=int, default=25, help="sampling steps per image")
    ap.add_argument("--train-steps", type=int, default=None, help="timed LoRA steps (default: 20 on GPU, 2 on CPU)")
    ap.add_argument("--images", type=int, default=None, help="timed images (default: 8 on GPU, 1 on CPU)")
    ap.add_argument("--warmup-images", type=int, default=None,
                    help="untimed images first (default: 1 on GPU for kernel selection, 0 on CPU where one image takes minutes)")
    ap.add_argument("--device", default=None, help="cuda | cpu (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's, = the cores)")
    ap.add_argument("--gradient-checkpointing", choices=["config", "on", "off"], default="config",
                    help="override the paper env's lora.gradient_checkpointing (e.g. 'on' to fit CPU RAM)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--architecture", choices=["sd15", "tiny"], default="sd15",
                    help="tiny: the project's tiny base architecture instead (the test suite's smoke run; figures meaningless)")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = device.type == "cuda"
    train_steps = args.train_steps or (20 if gpu else 2)
    n_images = args.images or (8 if gpu else 1)
    warmup_images = args.warmup_images if args.warmup_images is not None else (1 if gpu else 0)
    params = paper_lora_params()
    lora = params["lora"]
    if args.gradient_checkpointing != "config":
        lora["gradient_checkpointing"] = args.gradient_checkpointing == "on"
    if not gpu:
        lora["mixed_precision"] = "no"  # fp16 autocast does not run on CPU
    res = args.resolution
    if res % 8:
        ap.error("--resolution must be a multiple of 8")

    t0 = time.perf_counter()
    pipe = build_pipeline_from_config(SD15_CONFIG if args.architecture == "sd15" else TINY_CONFIG, res, seed=0)
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device)
    build_s = time.perf_counter() - t0
    counts = {n: sum(p.numel() for p in getattr(pipe, n).parameters()) / 1e6 for n in ("unet", "text_encoder", "vae")}

    # --- LoRA training, batch 1, cached latents (the VAE encodes each image once before training)
    rank = int(lora["rank"])
    attach_lora(pipe, rank=rank, alpha=float(lora.get("alpha") or rank), unet_targets=tuple(lora["unet_targets"]),
                train_text_encoder=bool(lora["train_text_encoder"]), seed=0)
    trainable = sum(p.numel() for m in (pipe.unet, pipe.text_encoder) for p in m.parameters() if p.requires_grad) / 1e6
    n = 4
    latents = torch.randn(n, 4, res // pipe.vae_scale_factor, res // pipe.vae_scale_factor, generator=torch.Generator().manual_seed(0))
    ids = tokenize(pipe, [f"a photo of fetal {c}" for c in ("abdomen", "brain", "femur", "thorax")][:n])
    cfg = LoopConfig(**{k: v for k, v in lora.items() if k in LoopConfig.__dataclass_fields__}
                     | {"max_steps": train_steps + 1, "max_minutes": 10**6, "batch_size": 1, "seed": 0, "log_every": 1})
    if gpu:
        torch.cuda.reset_peak_memory_stats(device)
    history = train_denoiser(pipe, latents, ids, cfg, clip_skip=lora.get("clip_skip"))
    seconds = [h["seconds"] for h in history]
    train_s = seconds[-1] - seconds[0]  # first step = warm-up
    steps_per_s = train_steps / train_s
    train_mem = peak_memory_gb(device)
    assert all(np.isfinite(h["loss"]) for h in history)

    # --- synthesis with the adapter attached
    if gpu:
        pipe.to(torch.float16)
        torch.cuda.reset_peak_memory_stats(device)
    kwargs = dict(height=res, width=res, num_inference_steps=args.steps, guidance_scale=float(params["validation"]["guidance_scale"]),
                  output_type="np")
    with torch.no_grad():
        # the prompt states as synthesis makes them: encode_prompts (diffusers 0.42's own
        # encode_prompt(clip_skip=...) fails under transformers 5), with the training clip skip
        prompts = {k: encode_prompts(pipe, [text], lora.get("clip_skip"))
                   for k, text in (("prompt_embeds", "a photo of fetal brain"), ("negative_prompt_embeds", ""))}
        for _ in range(warmup_images):
            pipe(generator=torch.Generator().manual_seed(0), **prompts, **kwargs)
        if gpu:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(n_images):
            prompts = {k: encode_prompts(pipe, [text], lora.get("clip_skip"))
                       for k, text in (("prompt_embeds", "a photo of fetal brain"), ("negative_prompt_embeds", ""))}
            image = pipe(generator=torch.Generator().manual_seed(i + 1), **prompts, **kwargs).images
        if gpu:
            torch.cuda.synchronize()
        synth_s = time.perf_counter() - t0
    assert image.shape == (1, res, res, 3)
    synth_mem = peak_memory_gb(device)

    result = {
        "date": dt.datetime.now().isoformat(timespec="minutes"),
        "machine": machine(),
        "device": str(device),
        "torch": torch.__version__,
        "resolution": res,
        "parameters_M": {k: round(v, 1) for k, v in counts.items()},
        "build_seconds": round(build_s, 1),
        "lora": {"rank": rank, "alpha": float(lora.get("alpha") or rank), "text_encoder": bool(lora["train_text_encoder"]),
                 "clip_skip": lora.get("clip_skip"), "mixed_precision": lora["mixed_precision"],
                 "gradient_checkpointing": bool(lora["gradient_checkpointing"]), "trainable_M": round(trainable, 1),
                 "batch_size": 1, "timed_steps": train_steps, "seconds": round(train_s, 1),
                 "steps_per_s": round(steps_per_s, 4), "peak_memory_gb": round(train_mem, 2),
                 "peak_memory_kind": "max_memory_allocated" if gpu else "peak RSS (process)"},
        "synthesis": {"steps": args.steps, "guidance_scale": kwargs["guidance_scale"], "images": n_images,
                      "warmup_images": warmup_images,
                      "dtype": "float16" if gpu else "float32", "seconds": round(synth_s, 1),
                      "images_per_s": round(n_images / synth_s, 5), "seconds_per_image": round(synth_s / n_images, 1),
                      "peak_memory_gb": round(synth_mem, 2)},
    }
    print(f"{'SD v1.5' if args.architecture == 'sd15' else 'tiny base'} architecture (random weights) on {result['machine']} [{device}], {res} px, torch {torch.__version__}")
    print(f"  parameters: UNet {counts['unet']:.1f} M, text encoder {counts['text_encoder']:.1f} M, VAE {counts['vae']:.1f} M")
    r = result["lora"]
    print(f"  LoRA training (rank {rank}, alpha {r['alpha']:g}, TE LoRA {r['text_encoder']}, clip_skip {r['clip_skip']}, "
          f"{r['mixed_precision']}, grad ckpt {r['gradient_checkpointing']}, {trainable:.1f} M trainable), batch 1: "
          f"{steps_per_s:.4f} steps/s ({train_s / train_steps:.1f} s/step over {train_steps} steps); "
          f"peak memory {train_mem:.2f} GB ({r['peak_memory_kind']})")
    s = result["synthesis"]
    print(f"  synthesis ({args.steps} steps, CFG {s['guidance_scale']:g}, {s['dtype']}, adapter attached): "
          f"{s['images_per_s']:.5f} images/s ({s['seconds_per_image']:.1f} s/image over {n_images}); "
          f"peak memory {synth_mem:.2f} GB")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
