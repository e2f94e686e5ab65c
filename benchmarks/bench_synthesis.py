"""Images/second of the synthesis generator vs a plain one-call-per-image loop, same model and settings.

    nice -n 19 python benchmarks/bench_synthesis.py [--per-class 16] [--batch-size 16] [--steps 20]

The model is the catalog's latest base + LoRA adapter (data/06_models/base_model,
data/06_models/lora_adapter.safetensors: what ``synthesis`` would use) when there is one, else
the shipped base (models/tiny-phantom-sd) with a random adapter; ``--model random``: a random
tiny model with a random adapter (said in the output). Both methods run on
the same pipeline object (adapter loaded as peft layers, fp32, CPU unless --device), at the
same resolution, sampler and steps, with the same per-image seeds:

* ``generator``: :func:`fu_kedro.models.generation.generate_images`, ``batch_size`` images
  per pipeline call (what the synthesis pipeline runs);
* ``loop``: ``pipe(prompt, generator=torch.Generator().manual_seed(seed))`` once per image.

Each method gets one untimed warm-up call first. Prints images/s of both and the ratio.
"""
from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from kedro.io.core import Version

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
SHIPPED_BASE = "models/tiny-phantom-sd"

from fu_kedro.datasets import DiffusionModelDataset, LoraAdapterDataset  # noqa: E402
from fu_kedro.models.diffusion import TINY_CONFIG, build_pipeline_from_config, load_pretrained_pipeline  # noqa: E402
from fu_kedro.models.generation import generate_images, image_seed, prepare_pipeline, to_gray_uint8  # noqa: E402
from fu_kedro.models.lora import attach_lora, export_lora  # noqa: E402


def _random_adapter(pipe):
    """A random LoRA (non-zero up weights) for ``pipe``, exported, then taken off the pipe again."""
    attach_lora(pipe, rank=8, alpha=8, seed=0)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    adapter = export_lora(pipe, 8, 8, {})
    pipe.unet.delete_adapters("default")
    return adapter


def load_model(resolution: int, which: str = "catalog"):
    """(pipeline, adapter, what it is, resolution).

    ``catalog``: the catalog's latest base + adapter (what ``synthesis`` would use), else the
    shipped base (``models/tiny-phantom-sd``) with a random adapter. ``random``: a random tiny
    model with a random adapter (no file read).
    """
    base_dir, adapter_dir = ROOT / "data/06_models/base_model", ROOT / "data/06_models/lora_adapter.safetensors"
    if which == "catalog" and base_dir.is_dir() and any(base_dir.iterdir()) and adapter_dir.is_dir() and any(adapter_dir.iterdir()):
        base = DiffusionModelDataset(str(base_dir), version=Version(None, None)).load()
        adapter = LoraAdapterDataset(str(adapter_dir), version=Version(None, None)).load()
        what = (f"catalog base {base.info.get('catalog_version')} ({base.info.get('name')}) "
                f"+ adapter {adapter.metadata.get('catalog_version')}")
        return base.pipe, adapter, what, int(base.info.get("resolution") or resolution)
    if which == "catalog" and (ROOT / SHIPPED_BASE / "model_index.json").is_file():
        pipe = load_pretrained_pipeline(str(ROOT / SHIPPED_BASE))
        return pipe, _random_adapter(pipe), f"shipped base {SHIPPED_BASE} + random adapter (no adapter in the catalog)", \
            int(pipe.vae.config.sample_size)
    pipe = build_pipeline_from_config(TINY_CONFIG, resolution, seed=0)
    return pipe, _random_adapter(pipe), "random tiny model + random adapter", resolution


def main(argv: list[str] | None = None) -> dict:
    conf = yaml.safe_load((ROOT / "conf/base/parameters_synthesis.yml").read_text())["synthesis"]
    template = yaml.safe_load((ROOT / "conf/base/parameters_ingestion.yml").read_text())["ingestion"]["caption_template"]
    classes = yaml.safe_load((ROOT / "conf/base/parameters.yml").read_text())["classes"]  # the one class list
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--per-class", type=int, default=16, help="images per class (5 classes)")
    parser.add_argument("--batch-size", type=int, default=conf["batch_size"])
    parser.add_argument("--steps", type=int, default=conf["steps"])
    parser.add_argument("--guidance", type=float, default=conf["guidance_scale"])
    parser.add_argument("--resolution", type=int, default=32, help="used only for the random model")
    parser.add_argument("--threads", type=int, default=conf["torch_threads"], help="torch threads (default: synthesis.torch_threads)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", choices=["catalog", "random"], default="catalog",
                        help="catalog: the latest base + adapter, else the shipped base + a random adapter; random: no file read")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe, adapter, what, resolution = load_model(args.resolution, args.model)
    prepare_pipeline(pipe, adapter, conf["lora_scale"], torch.device(args.device), torch.float32, False, conf["scheduler"])
    prompts = [template.format(plane=c) for c in classes for _ in range(args.per_class)]
    seeds = [image_seed(42, i) for i in range(len(prompts))]
    settings = dict(resolution=resolution, steps=args.steps, guidance_scale=args.guidance)
    print(f"model: {what}")
    print(f"{len(prompts)} images, {resolution} px, {conf['scheduler']} {args.steps} steps, guidance {args.guidance}, "
          f"batch_size {args.batch_size}, {torch.get_num_threads()} torch threads, device {args.device}; "
          f"{platform.processor() or platform.machine()}, torch {torch.__version__}")

    generate_images(pipe, prompts[: args.batch_size], seeds[: args.batch_size], batch_size=args.batch_size, **settings)
    t0 = time.perf_counter()
    batched = generate_images(pipe, prompts, seeds, batch_size=args.batch_size, **settings)
    t_batched = time.perf_counter() - t0

    def one(prompt: str, seed: int) -> np.ndarray:
        out = pipe(prompt, height=resolution, width=resolution, num_inference_steps=args.steps,
                   guidance_scale=args.guidance, generator=torch.Generator().manual_seed(seed), output_type="np")
        return to_gray_uint8(out.images)[0]

    with torch.no_grad():
        one(prompts[0], seeds[0])
        t0 = time.perf_counter()
        looped = np.stack([one(p, s) for p, s in zip(prompts, seeds)])
        t_loop = time.perf_counter() - t0

    rate_batched, rate_loop = len(prompts) / t_batched, len(prompts) / t_loop
    diff = np.abs(batched.astype(int) - looped.astype(int))
    print(f"generator (batch {args.batch_size}): {rate_batched:.2f} images/s ({t_batched:.1f} s)")
    print(f"loop (1 image per call):  {rate_loop:.2f} images/s ({t_loop:.1f} s)")
    print(f"ratio: {rate_batched / rate_loop:.2f}x (target >= 3x)")
    print(f"same images: max |pixel difference| {diff.max()}, pixels differing {(diff > 0).mean():.4%} "
          "(different call shapes: last-bit float differences, see docs/synthesis.md)")
    return {"model": what, "images": len(prompts), "generator_images_per_s": rate_batched, "loop_images_per_s": rate_loop,
            "ratio": rate_batched / rate_loop, "max_pixel_difference": int(diff.max())}


if __name__ == "__main__":
    main()
