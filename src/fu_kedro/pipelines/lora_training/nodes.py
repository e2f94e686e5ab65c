"""Nodes of the ``lora_training`` pipeline: base model -> LoRA adapter -> loss curve + validation grid.

One way to get the base for every profile: the catalog entry ``pretrained_base``, a diffusers
folder at ``lora_training.base_model.pretrained_path`` (:func:`load_base_model`): the shipped
tiny base ``models/tiny-phantom-sd`` (default; made by the ``base_training`` pipeline, "tiny
base trained by base_training, not Stable Diffusion"), a base made by ``base_training`` in the
same run (``with_base_training``, e.g. ``real_cpu``), or SD v1.5 (the paper; a local folder or
the local Hugging Face cache, nothing is downloaded), its weights read by the dataset.

The LoRA step: peft layers on the UNet's attention projections (optionally the text encoder),
trained on the LoRA subset's captioned images with the one denoiser loop of
:mod:`fu_kedro.models.training` (accelerate: CPU, one GPU, or several).
``adapter_source: file`` skips training and passes on an existing LoRA file (diffusers or
kohya-ss format, e.g. the published FU-LoRA adapters; the catalog entry
``imported_lora_adapter`` reads it) through the same catalog entry.

No node opens a file: the base and the imported adapter come in as catalog entries whose
path is a parameter (``conf/base/catalog_lora_training.yml``). Each node reads the
``lora_training`` block through its schema, ``cfg = LoraTrainingParams.from_any(params)``
(:mod:`fu_kedro.schema`); the adapter's metadata records the block's ``lora`` as it was given.
"""
from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fu_kedro.datasets.image_set import ImageSet  # noqa: E402
from fu_kedro.models.base_model import BaseModel  # noqa: E402
from fu_kedro.models.diffusion import check_resolution as _check_resolution  # noqa: E402
from fu_kedro.models.diffusion import pipeline_hash  # noqa: E402
from fu_kedro.models.generation import generate_images, torch_threads  # noqa: E402
from fu_kedro.models.lora import (  # noqa: E402
    ImportedAdapter,
    LoraAdapter,
    LoraAdapterFits,
    apply_lora,
    attach_lora,
    export_lora,
    lora_fit_seed,
)
from fu_kedro.models.training import (  # noqa: E402
    LoopConfig,
    denoising_loss,
    encode_to_latents,
    resize_images,
    summarize,
    time_capped_at,
    tokenize,
    train_denoiser,
)
from fu_kedro.pipelines.base_training.nodes import loop_config  # noqa: E402
from fu_kedro.schema import as_dict  # noqa: E402

from .params import LoraTrainingParams  # noqa: E402

log = logging.getLogger(__name__)


def check_resolution(resolution: int, factor: int) -> None:
    """The VAE must take ``lora_training.resolution`` (:func:`fu_kedro.models.diffusion.check_resolution`)."""
    _check_resolution(resolution, factor, "lora_training.resolution")


def _captions(image_set: ImageSet, template: str) -> list[str]:
    """Each image's own ``caption`` where it has one, else ``template``."""
    own = image_set.meta["caption"] if "caption" in image_set.meta.columns else pd.Series([None] * len(image_set))
    labels = image_set.meta["label"].astype(str)
    return [str(c) if isinstance(c, str) and c else template.format(plane=label) for c, label in zip(own, labels)]


def _capped(stage: str, history: list[dict]) -> dict[str, int]:
    step = time_capped_at(history)
    return {} if step is None else {stage: step}


def load_base_model(pretrained_base: BaseModel | None, params: dict[str, Any]) -> BaseModel:
    """The base diffusion model: the catalog entry ``pretrained_base`` — a diffusers folder at
    ``lora_training.base_model.pretrained_path``: the shipped tiny base (``models/tiny-phantom-sd``,
    the default), one made by ``base_training``, or SD v1.5 (the paper) — with its reference.

    Args:
        pretrained_base: the catalog entry (weights read here, on first use of ``pipe``;
            ``None`` when ``pretrained_path`` is not set). In ``with_base_training`` it is that
            run's ``trained_base``.
        params: ``lora_training`` parameters (``resolution``, ``base_model``, ``torch_threads``).

    Returns:
        ``BaseModel``: the pipeline, and ``info`` with ``resolution`` and the weights' content hash.
    """
    cfg = LoraTrainingParams.from_any(params)
    if pretrained_base is None:
        raise ValueError("lora_training.base_model.pretrained_path is not set: name a diffusers folder "
                         "(models/tiny-phantom-sd, the shipped tiny base; or SD v1.5, models/stable-diffusion-v1-5)")
    resolution = cfg.resolution
    with torch_threads(cfg.torch_threads):
        pipe = pretrained_base.pipe  # the weights are read here (datasets.PretrainedBaseDataset)
        check_resolution(resolution, pipe.vae_scale_factor)
        content_hash = pipeline_hash(pipe)
    recorded = (pretrained_base.info.get("trained_by") or {}).get("content_hash")
    if recorded and recorded != content_hash:
        raise ValueError(
            f"{pretrained_base.info.get('model')}: the weights (hash {content_hash[:12]}…) are not those its "
            f"base_lineage.json records ({recorded[:12]}…); remake the folder with the command in that file")
    base = BaseModel(pipe, dict(pretrained_base.info) | {"resolution": resolution, "content_hash": content_hash})
    log.info("base model: %s (hash %s)", base.info["name"], content_hash[:12])
    return base


def fit_lora_adapter(base_model: BaseModel, lora_subset: ImageSet, params: dict[str, Any], seed: int,
                     imported_lora_adapter: ImportedAdapter | None = None):
    """The LoRA adapter as ``lora_training.adapter_source`` says: trained here (``train``,
    :func:`train_lora_adapter`) or the catalog's ``imported_lora_adapter`` (``file``,
    :func:`use_imported_adapter`).

    A router, so that ``kedro run`` and ``--params lora_training.adapter_source=file`` run the
    same node (``fit_lora_adapter_node``) into the same catalog entries: the pipeline is built
    before the parameters are known. ``imported_lora_adapter`` is read only on ``file``.

    Returns:
        (adapter, per-step history, summary dict with the denoising loss on the LoRA images
        with and without the adapter).
    """
    if LoraTrainingParams.from_any(params).adapter_source == "file":
        return use_imported_adapter(base_model, imported_lora_adapter)
    return train_lora_adapter(base_model, lora_subset, params, seed)


def fit_lora_adapter_refits(base_model: BaseModel, lora_subset: ImageSet, lora_adapter: LoraAdapter,
                            params: dict[str, Any], seed: int) -> LoraAdapterFits:
    """LoRA fits 1..K-1 of ``lora_training.lora.fits`` = K, beside ``lora_adapter`` (fit 0).

    Each is :func:`train_lora_adapter` again — the same base weights (a fresh copy each time),
    the same LoRA subset and parameters — with its own seed, :func:`~fu_kedro.models.lora.lora_fit_seed`
    ``(seed, r)`` (fit 0's is the project seed): LoRA init, batch order, noise and caption
    dropout all differ. Synthesis uses fit r for replicate r with
    ``synthesis.adapter_per_replicate``. K = 1 (conf/base) trains nothing and does not load
    the base's weights. ``lora_training.workers`` (CPU, one process) trains that many fits side
    by side in worker processes (:mod:`fu_kedro.workers`), each on ``torch_threads``: the same
    weights as one after the other.

    Returns:
        ``LoraAdapterFits``: the adapters (metadata as fit 0's, plus ``fit``, ``fit_of``) and
        ``info``: K, the fit-0 adapter they belong to, one summary per fit (seed, content
        hash, steps, denoising loss without/with the adapter).
    """
    fits = LoraTrainingParams.from_any(params).lora.fits  # > 1 only with adapter_source: train
    fit_of = {"content_hash": lora_adapter.content_hash, "catalog_version": lora_adapter.metadata.get("catalog_version")}
    info: dict[str, Any] = {"fits": fits, "fit_of": fit_of, "seed": int(seed), "fits_summary": []}
    if fits == 1:
        return LoraAdapterFits([], info)
    from fu_kedro.launch import distributed_state
    from fu_kedro.workers import effective_workers, imap_in_workers

    state = distributed_state()
    workers = effective_workers(LoraTrainingParams.from_any(params).workers, state.device, state.num_processes)
    jobs = [(base_model.pipe, dict(base_model.info), lora_subset, params, lora_fit_seed(seed, r), r + 1, fits)
            for r in range(1, fits)]
    if workers > 1:
        log.info("LoRA fits 2..%d on %d worker processes", fits, min(workers, len(jobs)))
    adapters = []
    for r, (adapter, history, summary) in zip(range(1, fits), imap_in_workers(_refit, jobs, workers)):
        fit_seed = lora_fit_seed(seed, r)
        adapter.metadata.update({"fit": str(r), "fits": str(fits), "fit_of": json.dumps(fit_of, default=str)})
        adapters.append(adapter)
        info["fits_summary"].append({"fit": r, "seed": fit_seed, "content_hash": adapter.content_hash,
                                     "final_loss": float(history["loss"].iloc[-1]) if len(history) else None,
                                     **{k: v for k, v in summary.items() if k != "ran_on"}})
    return LoraAdapterFits(adapters, json.loads(json.dumps(info, default=str)))


def _refit(job):
    """One LoRA fit of :func:`fit_lora_adapter_refits` (a worker's job, or in this process)."""
    pristine, info, lora_subset, params, fit_seed, number, fits = job
    log.info("LoRA fit %d of %d (seed %d)", number, fits, fit_seed)
    base = BaseModel(copy.deepcopy(pristine), info)  # attach_lora adds layers to the pipe it gets
    return train_lora_adapter(base, lora_subset, params, fit_seed)


def use_imported_adapter(base_model: BaseModel, imported: ImportedAdapter | None):
    """An existing adapter file (diffusers or kohya-ss format, read by the catalog entry
    ``imported_lora_adapter``), checked to fit the base model.

    Returns:
        (adapter, an empty history, summary naming the file: path, SHA-256, imported format).
    """
    if imported is None:
        raise ValueError("lora_training.adapter_source is 'file' but lora_training.adapter_file is not set")
    path = imported.path
    adapter = imported.adapter
    _check_adapter_fits(base_model.pipe, adapter, path)
    adapter.metadata.setdefault("base_content_hash", str(base_model.info.get("content_hash")))
    adapter.metadata["adapter_source"] = "file"
    # what was imported (path, format, sha256), for the lineage; the saved version keeps these
    # keys (read_adapter_file), so the lineage does not name the diffusers-format copy instead
    sha256 = imported.sha256
    if adapter.metadata.get("imported_from") == str(Path(path)):  # not kept from an earlier import
        adapter.metadata["imported_sha256"] = sha256
    imported_keys = {f"imported_{k}": adapter.metadata.get(f"imported_{k}", "") for k in ("from", "format", "sha256")}
    log.info("LoRA adapter: read %s (%s format), not trained", path, imported_keys["imported_format"])
    summary = {"adapter_source": "file", "file": str(path), "file_sha256": sha256, **imported_keys}
    return adapter, pd.DataFrame(columns=["stage", "step", "loss", "seconds"]), summary


def train_lora_adapter(base_model: BaseModel, lora_subset: ImageSet, params: dict[str, Any], seed: int):
    """Train the LoRA adapter on the LoRA subset's captioned images.

    Returns:
        (adapter, per-step history, summary dict with the denoising loss on the LoRA images
        with and without the adapter).
    """
    cfg = LoraTrainingParams.from_any(params)
    base_info = dict(base_model.info)
    loop_cfg = loop_config(cfg.lora, seed + 2)
    if len(lora_subset) == 0:
        raise ValueError("lora_training: the LoRA subset is empty — check ingestion.lora_per_class and the source data")
    check_resolution(cfg.resolution, base_model.pipe.vae_scale_factor)

    from fu_kedro.launch import distributed_state

    with torch_threads(cfg.torch_threads) as threads:
        return _train_lora(base_model.pipe, lora_subset, cfg, as_dict(params)["lora"], loop_cfg, base_info, seed,
                           threads, distributed_state().device)


def _train_lora(pipe, lora_subset: ImageSet, cfg: LoraTrainingParams, lora_given: dict[str, Any], loop_cfg: LoopConfig,
                base_info: dict, seed: int, threads: int, device):
    """Fit the peft LoRA on the LoRA subset (the loop of :func:`train_lora_adapter`); ``lora_given``:
    the ``lora`` block as given, recorded in the adapter's metadata."""
    lora = cfg.lora
    rank = lora.rank
    resolution = cfg.resolution
    # VAE and text encoder on this process's device beside the UNet that accelerate moves
    # there (GPU: latents are encoded on the GPU; the validation grid runs on one device).
    # CPU: a no-op. Not run on a GPU here.
    pipe = pipe.to(device)
    x = resize_images(lora_subset, resolution)
    latents = encode_to_latents(pipe.vae, x)  # cached once; the VAE is frozen
    captions = _captions(lora_subset, "{plane}")
    ids = tokenize(pipe, captions)
    clip_skip = lora.clip_skip
    # the before/after check on fixed noise: passes over the subset (conf/base: 4; at 512 px each
    # pass is a UNet call per 32 images, so the paper rehearsal on CPU uses 1)
    repeats = lora.loss_check_repeats
    before = denoising_loss(pipe, latents, ids, seed=seed, repeats=repeats, clip_skip=clip_skip)
    alpha = float(lora.alpha or rank)
    attach_lora(
        pipe,
        rank=rank,
        alpha=alpha,
        unet_targets=tuple(lora.unet_targets),
        train_text_encoder=lora.train_text_encoder,
        seed=seed,
    )
    hist = train_denoiser(pipe, latents, ids, loop_cfg, clip_skip=clip_skip)
    ran_on = _what_ran(pipe, loop_cfg, threads)
    after = denoising_loss(pipe, latents, ids, seed=seed, repeats=repeats, clip_skip=clip_skip)
    log.info("LoRA: %s; denoising loss on the LoRA images %.4f -> %.4f", summarize(hist), before, after)
    adapter = export_lora(
        pipe,
        rank,
        alpha,
        {
            "adapter_source": "train",
            "base_name": base_info.get("name"),
            "base_content_hash": base_info.get("content_hash"),
            "base_catalog_version": base_info.get("catalog_version"),
            "resolution": resolution,
            "lora_params": lora_given,
            "torch_threads": threads,
            "steps": len(hist),
            "time_capped": _capped("lora", hist),
            "base_time_capped": base_info.get("time_capped") or {},
            "lora_subset_version": lora_subset.info.get("version"),
            "lora_subset_image_ids": lora_subset.meta["image_id"].astype(str).tolist(),
            "captions": sorted(set(captions)),
            "caption_template": lora_subset.info.get("caption_template"),
            "seed": seed,
        },
    )
    summary = {
        "adapter_source": "train",
        "steps": len(hist),
        "time_capped": _capped("lora", hist),
        "torch_threads": threads,
        "denoising_loss_without_adapter": before,
        "denoising_loss_with_adapter": after,
        "images": len(lora_subset),
        "ran_on": ran_on,
    }
    return adapter, pd.DataFrame(hist).assign(stage="lora")[["stage", "step", "loss", "seconds"]], summary


def _what_ran(pipe, loop_cfg: LoopConfig, threads: int) -> dict[str, Any]:
    """What the LoRA training actually computed with (not what was asked for), as the MLflow tags
    ``lora_training.ran_on.<key>`` and in the training summary, like the evaluation's and synthesis' tags."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState()  # the state of the Accelerator train_denoiser ran under
    device = pipe.unet.device
    convs = [p for p in pipe.unet.parameters() if p.dim() == 4 and p.shape[-1] > 1]
    channels_last = bool(convs) and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous() for p in convs)
    ran_on = {
        "device": str(device),
        "mixed_precision": str(state.mixed_precision),  # autocast dtype: no | fp16 | bf16
        "lora_fused": False,  # trained as separate peft layers (synthesis fuses on CUDA)
        "memory_format": "channels_last" if channels_last else "contiguous",
        "optimiser": "AdamW (fused)" if device.type in ("cpu", "cuda") else "AdamW",  # training._fused
        "gradient_checkpointing": bool(loop_cfg.gradient_checkpointing),
        "batch_size": loop_cfg.batch_size,  # global; each process trains on its 1/N share
        "num_processes": state.num_processes,
        "torch_threads": threads,
    }
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tags({f"lora_training.ran_on.{k}": str(v) for k, v in ran_on.items()})
    return ran_on


def _check_adapter_fits(pipe, adapter: LoraAdapter, path) -> None:
    """Load the adapter into (a throwaway adapter slot of) ``pipe``; a mismatch names the file."""
    try:
        apply_lora(pipe, adapter, 1.0, name="fu_check")
    except Exception as exc:  # diffusers/peft raise various types for mismatched keys/shapes
        raise ValueError(f"LoRA adapter file '{path}' does not fit the base model: {exc}") from exc
    pipe.delete_adapters("fu_check")


@torch.no_grad()
def generate(
    pipe, prompts: list[str], seeds: list[int], resolution: int, steps: int, guidance: float, clip_skip: int | None = None
) -> np.ndarray:
    """Images for ``prompts`` (one seeded generator each) as ``uint8 (N, R, R)`` grayscale, in one call."""
    return generate_images(
        pipe, prompts, seeds, resolution=resolution, steps=steps, guidance_scale=guidance, clip_skip=clip_skip
    )


def validation_grid(base_model: BaseModel, lora_adapter: LoraAdapter, params: dict[str, Any], classes: list[str], caption_template: str, seed: int) -> Figure:
    """A few images per class from fixed seeds, without (left) and with (right) the adapter."""
    block = LoraTrainingParams.from_any(params)
    cfg = block.validation
    resolution = block.resolution
    per_class = cfg.per_class
    prompts = [caption_template.format(plane=c) for c in classes for _ in range(per_class)]
    seeds = [seed + i for i in range(per_class)] * len(classes)
    clip_skip = block.lora.clip_skip  # as the adapter was trained
    pipe = base_model.pipe
    pipe.set_progress_bar_config(disable=True)
    without = generate(pipe, prompts, seeds, resolution, cfg.steps, cfg.guidance_scale, clip_skip)
    apply_lora(pipe, lora_adapter, cfg.lora_scale)
    with_lora = generate(pipe, prompts, seeds, resolution, cfg.steps, cfg.guidance_scale, clip_skip)
    fig, axes = plt.subplots(
        len(classes), 2, figsize=(2 * 0.9 * per_class + 0.5, 0.95 * len(classes) + 0.6), squeeze=False
    )
    for r, cls in enumerate(classes):
        for c, (images, title) in enumerate([(without, "base"), (with_lora, "base + LoRA")]):
            row = images[r * per_class : (r + 1) * per_class]
            axes[r, c].imshow(np.concatenate(list(row), axis=1), cmap="gray", vmin=0, vmax=255)
            axes[r, c].set_xticks([])
            axes[r, c].set_yticks([])
            if r == 0:
                axes[r, c].set_title(title, fontsize=9)
            if c == 0:
                axes[r, c].set_ylabel(cls, fontsize=9)
    name = base_model.info.get("name", "base")
    fig.suptitle(f"validation: {name}; seeds {seed}..{seed + per_class - 1}", fontsize=8)
    fig.tight_layout()
    return fig


def loss_curves(lora_history: pd.DataFrame) -> Figure:
    """Loss per step of the LoRA (raw, and a moving average); the base's curves are base_training's ``base_loss_curves``."""
    fig, ax = plt.subplots(1, 1, figsize=(4, 3))
    h = lora_history[lora_history["stage"] == "lora"] if "stage" in lora_history else lora_history.iloc[:0]
    if len(h):
        ax.plot(h["step"], h["loss"], alpha=0.3, lw=0.8)
        ax.plot(h["step"], h["loss"].rolling(max(1, len(h) // 20), min_periods=1).mean(), lw=1.5)
        ax.set(title="lora", xlabel="step", ylabel="loss", yscale="log")
    else:
        ax.text(0.5, 0.5, "no LoRA training in this run (adapter from file)", ha="center")
    fig.tight_layout()
    return fig


def _history_metric(h: pd.DataFrame, max_points: int = 200) -> list[dict]:
    """A loss history as MLflow metric history, averaged into at most ``max_points`` windows."""
    if h.empty:
        return []
    window = int(np.ceil(len(h) / max_points))
    grouped = h.groupby(np.arange(len(h)) // window)
    return [{"value": float(g["loss"].mean()), "step": int(g["step"].iloc[-1])} for _, g in grouped]


def _tag_time_capped(capped: dict[str, int]) -> None:
    """Mark the MLflow run (if any) whose model stopped on a wall-clock cap: not reproducible."""
    import mlflow

    if mlflow.active_run() is not None:
        mlflow.set_tag("fu_kedro.time_capped", ", ".join(f"{k}@step{v}" for k, v in capped.items()))
        mlflow.set_tag("fu_kedro.reproducible", "false")


def render_validation_grid(base_model: BaseModel, lora_adapter: LoraAdapter, params: dict[str, Any], classes: list[str],
                           caption_template: str, seed: int) -> Figure:
    """The validation grid: per class, fixed seeds, base (left) vs base + LoRA (right), under
    ``lora_training.torch_threads``."""
    with torch_threads(LoraTrainingParams.from_any(params).torch_threads):
        return validation_grid(base_model, lora_adapter, params, classes, caption_template, seed)


def plot_loss_curves(lora_history: pd.DataFrame) -> Figure:
    """The LoRA's loss-curve figure."""
    return loss_curves(lora_history)


def adapter_lineage(base_model: BaseModel, lora_adapter: LoraAdapter, lora_summary: dict) -> dict[str, Any]:
    """The adapter's lineage record: the base model's reference, the adapter's hash, catalog
    version and metadata, the LoRA summary, and which loops (if any) a wall-clock cap stopped."""
    info = dict(base_model.info)
    capped = dict(info.get("time_capped") or {}) | dict(lora_summary.get("time_capped") or {})
    record = {
        "base_model": {k: v for k, v in info.items() if k != "architecture"},
        "adapter": {
            "content_hash": lora_adapter.content_hash,
            "catalog_version": lora_adapter.metadata.get("catalog_version"),
            "metadata": {k: v for k, v in lora_adapter.metadata.items() if k != "lora_subset_image_ids"},
            "tensors": len(lora_adapter.state_dict),
            "has_text_encoder": lora_adapter.has_text_encoder,
        },
        "training": lora_summary,
        "time_capped": capped,
        "reproducible": not capped,
    }
    return json.loads(json.dumps(record, default=str))


def training_metrics(lora_history: pd.DataFrame, lora_summary: dict, lora_lineage: dict[str, Any]) -> dict[str, Any]:
    """The MLflow metric histories of the LoRA training (loss, steps, seconds, the denoising
    loss with/without the adapter, ``time_capped``); a capped loop (named in the lineage
    record, the base's included) also tags the MLflow run as not reproducible."""
    metrics: dict[str, Any] = {}
    part = lora_history[lora_history["stage"] == "lora"] if "stage" in lora_history else lora_history.iloc[:0]
    if not part.empty:
        metrics["lora_loss"] = _history_metric(part)
        metrics["lora_steps"] = {"value": float(len(part)), "step": 0}
        metrics["lora_seconds"] = {"value": float(part["seconds"].iloc[-1]), "step": 0}
    for key in ("denoising_loss_without_adapter", "denoising_loss_with_adapter"):
        if key in lora_summary:
            metrics[key] = {"value": float(lora_summary[key]), "step": 0}
    capped = dict(lora_lineage.get("time_capped") or {})
    metrics["time_capped"] = {"value": float(bool(capped)), "step": 0}
    if capped:
        _tag_time_capped(capped)
    return metrics
