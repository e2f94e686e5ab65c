"""Images/second of the synthesis generator vs a plain one-call-per-image loop, same model and settings.

    nice -n 19 python benchmarks/bench_synthesis.py [--per-class 16] [--batch-size 16] [--steps 20]

The model is the latest trained tiny base + LoRA adapter in the catalog
(data/06_models/base_model, data/06_models/lora_adapter.safetensors) when there is one,
else a random tiny model with a random adapter (said in the output). Both methods run on
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

from fu_kedro.datasets import DiffusionModelDataset, LoraAdapterDataset  # noqa: E402
from fu_kedro.models.diffusion import TINY_CONFIG, build_pipeline_from_config  # noqa: E402
from fu_kedro.models.generation import generate_images, image_seed, prepare_pipeline, to_gray_uint8  # noqa: E402
from fu_kedro.models.lora import attach_lora, export_lora  # noqa: E402


def load_model(resolution: int):
    """The catalog's latest tiny base + adapter, else a random tiny model with a random adapter."""
    base_dir, adapter_dir = ROOT / "data/06_models/base_model", ROOT / "data/06_models/lora_adapter.safetensors"
    if base_dir.is_dir() and any(base_dir.iterdir()) and adapter_dir.is_dir() and any(adapter_dir.iterdir()):
        base = DiffusionModelDataset(str(base_dir), version=Version(None, None)).load()
        adapter = LoraAdapterDataset(str(adapter_dir), version=Version(None, None)).load()
        what = f"trained tiny base {base.fu_base_info.get('catalog_version')} + adapter {adapter.metadata.get('catalog_version')}"
        return base, adapter, what, int(base.fu_base_info.get("resolution") or resolution)
    base = build_pipeline_from_config(TINY_CONFIG, resolution, seed=0)
    attach_lora(base, rank=8, alpha=8, seed=0)
    with torch.no_grad():
        for name, p in base.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.02)
    adapter = export_lora(base, 8, 8, {})
    base.unet.delete_adapters("default")
    return base, adapter, "random tiny model + random adapter (no trained model in the catalog)", resolution


def main() -> None:
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
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    pipe, adapter, what, resolution = load_model(args.resolution)
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


if __name__ == "__main__":
    main()
