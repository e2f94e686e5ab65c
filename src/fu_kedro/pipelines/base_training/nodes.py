"""Nodes of the ``base_training`` pipeline: a tiny SD-architecture base trained from scratch.

The base is a small ``StableDiffusionPipeline`` (the same diffusers classes as SD v1.5:
``AutoencoderKL`` + ``UNet2DConditionModel`` + CLIP text encoder + the committed offline
tokenizer) built from :data:`fu_kedro.models.diffusion.TINY_CONFIG` and trained on the broad
phantom prior corpus (FU-LoRA's structure: a broad prior, then a LoRA on 20 images per class),
or on the prior plus the source-train images (``train_on: prior+source``, the ``real_cpu``
profile). First the VAE, then the UNet on cached latents with caption dropout (for
classifier-free guidance) and EMA weights, each a fixed number of steps on a fixed number of
threads: same parameters, same bits on the same CPU model (recorded: ``cpu_model``, ``cpu_capability``).

The result is the catalog entry ``trained_base``: a diffusers folder (``save_pretrained``) with
``base_lineage.json`` (parameters, corpus hash, final losses, threads, CPU capability, and the
command and commit, added when it is saved). ``lora_training`` loads such a folder, or SD v1.5,
through one catalog entry (``pretrained_base``). The project ships one, ``models/tiny-phantom-sd``.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import platform
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fu_kedro.data_sources import prior_corpus  # noqa: E402
from fu_kedro.datasets.image_set import ImageSet  # noqa: E402
from fu_kedro.models.base_model import BaseModel  # noqa: E402
from fu_kedro.models.diffusion import TINY_CONFIG, build_pipeline_from_config, check_resolution, pipeline_hash  # noqa: E402
from fu_kedro.models.generation import torch_threads  # noqa: E402
from fu_kedro.models.training import (  # noqa: E402
    LoopConfig,
    encode_to_latents,
    resize_images,
    summarize,
    time_capped_at,
    tokenize,
    train_autoencoder,
    train_denoiser,
)
from fu_kedro.schema import as_dict  # noqa: E402
from fu_kedro.software import cpu_model  # noqa: E402

from .params import BaseTrainingParams, LoopParams, PriorParams  # noqa: E402

log = logging.getLogger(__name__)

FINAL_LOSS_WINDOW = 100  # final loss = mean of the last this-many steps (the last step alone is one noisy batch)


def deep_update(base: dict, overrides: dict | None) -> dict:
    out = copy.deepcopy(base)
    for key, value in (overrides or {}).items():
        out[key] = deep_update(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def loop_config(cfg: LoopParams, seed: int) -> LoopConfig:
    """The ``LoopConfig`` of one loop's validated block (its knobs that conf sets) and ``seed``."""
    return LoopConfig(**cfg.loop_knobs(), seed=int(seed))


def make_prior_corpus(prior: dict[str, Any], classes: list[str], seed: int) -> ImageSet:
    """The broad prior corpus (:func:`fu_kedro.data_sources.prior_corpus.make_prior_corpus`) of
    ``base_training.prior``, checked against its schema first."""
    PriorParams.from_any(prior)
    return prior_corpus.make_prior_corpus(as_dict(prior), classes, seed)


def image_set_sha256(images: ImageSet) -> str:
    """SHA-256 of what training reads from an image set: the pixels, and each image's id, label and caption."""
    digest = hashlib.sha256(images.images.tobytes())
    columns = [c for c in ("image_id", "label", "caption") if c in images.meta.columns]
    digest.update(images.meta[columns].astype(str).to_csv(index=False).encode())
    return digest.hexdigest()


def base_training_corpus(prior_corpus: ImageSet, source_images: ImageSet, params: dict[str, Any]) -> ImageSet:
    """The images the base is trained on, as ``base_training.train_on`` says: the broad prior
    corpus (``prior``), the source *training* split (``source``), or both (``prior+source``).
    Never target images. (``with_base_training`` only: ``base_training`` alone trains on the
    prior corpus and needs no ingestion.)

    ``source_repeats``: each source-train image appears this many times in the
    corpus — kohya-ss's dataset ``num_repeats`` — so a few real images are not drowned by a
    larger prior (same number of training steps, other proportions)."""
    cfg = BaseTrainingParams.from_any(params)
    train_on, source_repeats = cfg.train_on, cfg.source_repeats
    parts = []
    if "prior" in train_on:
        if len(prior_corpus) == 0:
            raise ValueError("base_training.train_on uses the prior corpus, but it is empty "
                             "(base_training.prior.n_per_class is 0)")
        parts.append(prior_corpus)
    if "source" in train_on:
        split = source_images.meta.get("split")
        train = source_images.select(split.to_numpy() == "train") if split is not None else source_images
        if len(train) == 0:
            raise ValueError("base_training: the source set has no training images (split == 'train')")
        if source_repeats > 1:  # copy k of an image is row image_id~k (ids stay unique)
            copies = [train] + [ImageSet(train.images, train.meta.assign(image_id=train.meta["image_id"].astype(str) + f"~{k}"),
                                         dict(train.info)) for k in range(1, source_repeats)]
            train = ImageSet.concat(copies, info=dict(train.info))
        parts.append(train)
    if len(parts) == 1:
        corpus = parts[0]
    else:
        size = source_images.images.shape[1]
        resized = [ImageSet(p.resized_tensor(size).squeeze(1).numpy(), p.meta, dict(p.info)) for p in parts]
        corpus = ImageSet.concat(resized, info={"parts": [p.info.get("format") for p in parts]})
    return ImageSet(corpus.images, corpus.meta, dict(corpus.info) | {
        "train_on": train_on,
        "source_version": source_images.info.get("version") if "source" in train_on else None,
        "prior_corpus_version": prior_corpus.info.get("version") if "prior" in train_on else None,
        "prior_breadth": prior_corpus.info.get("breadth") if "prior" in train_on else None,
        **({"prior_caption_template": prior_corpus.info["caption_template"]}
           if "prior" in train_on and "caption_template" in prior_corpus.info else {}),
    })


def _corpus_record(corpus: ImageSet, cfg: BaseTrainingParams) -> dict[str, Any]:
    """What the base was trained on (for its lineage record); refuses a corpus that is not what ``train_on`` says."""
    train_on = cfg.train_on
    got = corpus.info.get("train_on", "prior" if corpus.info.get("format") == "prior_corpus" else None)
    if got != train_on:
        raise ValueError(
            f"base_training.train_on is {train_on!r}, but `kedro run --pipeline base_training` trains on the prior "
            "corpus alone (it needs no ingestion). A base that learns from the source images too is made by "
            "`kedro run --pipeline with_base_training` (ingestion -> base_training -> lora_training -> synthesis "
            "-> evaluation), as `--env real_cpu` does (README, Profiles)")
    record = {
        "train_on": train_on,
        "images": len(corpus),
        "per_class": {str(k): int(v) for k, v in corpus.meta["label"].value_counts().sort_index().items()},
        "corpus_sha256": image_set_sha256(corpus),
    }
    if got == "prior" and "train_on" not in corpus.info:  # the prior corpus itself
        record |= {"prior_corpus_version": corpus.info.get("version"), "prior_breadth": corpus.info.get("breadth"),
                   **({"prior_caption_template": corpus.info["caption_template"]} if "caption_template" in corpus.info else {})}
    else:
        record |= {k: corpus.info.get(k) for k in ("source_version", "prior_corpus_version", "prior_breadth",
                                                     "prior_caption_template") if corpus.info.get(k) is not None}
    if cfg.source_repeats != 1 and "source" in train_on:
        record["source_repeats"] = cfg.source_repeats
    return record


def _captions(images: ImageSet, template: str) -> list[str]:
    """Each image's own ``caption`` where it has one (e.g. the prior's ``caption_template``), else ``template``."""
    own = images.meta["caption"] if "caption" in images.meta.columns else pd.Series([None] * len(images))
    labels = images.meta["label"].astype(str)
    return [str(c) if isinstance(c, str) and c else template.format(plane=label) for c, label in zip(own, labels)]


def _final_loss(history: list[dict]) -> dict[str, float]:
    tail = [h["loss"] for h in history[-FINAL_LOSS_WINDOW:]]
    return {"last_step": float(history[-1]["loss"]), f"mean_last_{len(tail)}": float(sum(tail) / len(tail))}


def _capped(stage: str, history: list[dict]) -> dict[str, int]:
    step = time_capped_at(history)
    return {} if step is None else {stage: step}


def train_base_model(corpus: ImageSet, params: dict[str, Any], caption_template: str, seed: int):
    """Train the tiny base (VAE, then UNet) on ``corpus``.

    Args:
        corpus: the prior corpus (``base_training``) or :func:`base_training_corpus`'s images
            (``with_base_training``).
        params: the ``base_training`` block (resolution, threads, architecture overrides, loops).
        caption_template: ``ingestion.caption_template`` (``{plane}`` = class word) for images
            without their own caption.
        seed: project seed (the VAE loop takes ``seed``, the UNet loop ``seed + 1``).

    Returns:
        (``BaseModel``: the pipeline and its lineage record as ``info``, per-step history).
    """
    cfg = BaseTrainingParams.from_any(params)
    ae_cfg = loop_config(cfg.autoencoder, seed)
    unet_cfg = loop_config(cfg.denoiser, seed + 1)
    resolution = cfg.resolution
    config = deep_update(TINY_CONFIG, cfg.architecture)
    check_resolution(resolution, 2 ** (len(config["vae"]["block_out_channels"]) - 1), "base_training.resolution")
    trained_on = _corpus_record(corpus, cfg)
    with torch_threads(cfg.torch_threads) as threads:
        torch.manual_seed(seed)
        pipe = build_pipeline_from_config(config, resolution, seed)
        log.info("base_training: %s — %s: %d images at %d px (never target images), %d torch thread(s)",
                 cfg.name, trained_on["train_on"], len(corpus), resolution, threads)
        x = resize_images(corpus, resolution)
        ae_hist = train_autoencoder(pipe.vae, x, ae_cfg, kl_weight=cfg.autoencoder.kl_weight)
        pipe.vae.register_to_config(scaling_factor=1.0)  # raw posterior means first...
        latents = encode_to_latents(pipe.vae, x)
        scale = 1.0 / float(latents.std())  # ...then SD's convention: scaled latents have unit spread
        pipe.vae.register_to_config(scaling_factor=scale)
        latents = latents * scale
        ids = tokenize(pipe, _captions(corpus, caption_template))
        pipe.unet.requires_grad_(True)
        pipe.text_encoder.requires_grad_(False)
        unet_hist = train_denoiser(pipe, latents, ids, unet_cfg)
        pipe.unet.requires_grad_(False)
    log.info("base denoiser: %s", summarize(unet_hist))
    pipe.set_progress_bar_config(disable=True)
    import diffusers

    info = {
        "kind": "tiny",
        "name": cfg.name,
        "description": cfg.description,
        "resolution": resolution,
        "seed": int(seed),
        "caption_template": caption_template,
        "parameters": as_dict(params),
        "trained_on": trained_on,
        "steps": {"autoencoder": len(ae_hist), "base_denoiser": len(unet_hist)},
        "final_loss": {"autoencoder": _final_loss(ae_hist), "base_denoiser": _final_loss(unet_hist)},
        "seconds": {"autoencoder": round(ae_hist[-1]["seconds"], 1), "base_denoiser": round(unet_hist[-1]["seconds"], 1)},
        "time_capped": _capped("autoencoder", ae_hist) | _capped("base_denoiser", unet_hist),
        "torch_threads": threads,
        # bits repeat on the same CPU model (the capability alone does not pin the float paths)
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "architecture": config,
        "content_hash": pipeline_hash(pipe),
    }
    history = pd.concat([pd.DataFrame(ae_hist).assign(stage="autoencoder"),
                         pd.DataFrame(unet_hist).assign(stage="base_denoiser")], ignore_index=True)
    return BaseModel(pipe, info), history[["stage", "step", "loss", "seconds"]]


def plot_base_loss_curves(history: pd.DataFrame) -> Figure:
    """Loss per step of the VAE and the UNet (raw, and a moving average), log scale."""
    stages = [s for s in ("autoencoder", "base_denoiser") if s in set(history["stage"])]
    fig, axes = plt.subplots(1, max(1, len(stages)), figsize=(4 * max(1, len(stages)), 3), squeeze=False)
    for ax, stage in zip(axes[0], stages):
        h = history[history["stage"] == stage]
        ax.plot(h["step"], h["loss"], alpha=0.3, lw=0.8)
        ax.plot(h["step"], h["loss"].rolling(max(1, len(h) // 20), min_periods=1).mean(), lw=1.5)
        ax.set(title=stage, xlabel="step", ylabel="loss", yscale="log")
    fig.tight_layout()
    return fig
