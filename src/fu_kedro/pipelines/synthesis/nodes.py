"""Nodes of the ``synthesis`` pipeline: plan a batch -> generate (a shard of) it -> merge -> preview.

* :func:`plan_synthetic_batch` — the manifest of every image before any pixel exists: id,
  class, prompt, per-image seed, sampler settings, and the identity (content hash, catalog
  version) of the base model and the adapter. Bad parameters stop here.
* :func:`generate_synthetic_shard` — the images of one shard (all of them by default) with
  the adapter loaded; under several processes (``python -m fu_kedro.launch``) each process
  makes a contiguous share and all of them get the whole shard back.
* :func:`merge_synthetic_shards` — the shards of the plan, checked complete, as one batch
  whose ``meta`` is the manifest.
* :func:`summarize_synthetic_batch` — preview grid per class and counts for MLflow.

Pixel-reproducibility (batch vs shard vs process vs one image alone) is the business of
:mod:`fu_kedro.models.generation`; see docs/synthesis.md. Each node reads the ``synthesis`` block
through its schema, ``cfg = SynthesisParams.from_any(params)`` (:mod:`fu_kedro.schema`); the
batch's lineage records the block as it was given.
"""
from __future__ import annotations

import copy
import hashlib
import logging
import json
import time
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fu_kedro.datasets.image_set import ImageSet  # noqa: E402
from fu_kedro.datasets.image_set_shards import shard_name  # noqa: E402
from fu_kedro.launch import distributed_state  # noqa: E402
from fu_kedro.models.base_model import BaseModel, describe_base  # noqa: E402
from fu_kedro.models.generation import (  # noqa: E402
    device_and_dtype,
    file_sha256,
    generate_images,
    image_seed,
    library_versions,
    prepare_pipeline,
    shard_indices,
    torch_threads,
)
from fu_kedro.models.lora import LoraAdapter, LoraAdapterFits  # noqa: E402
from fu_kedro.schema import as_dict  # noqa: E402
from fu_kedro.workers import effective_workers, imap_in_workers  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from .params import SynthesisParams  # noqa: E402

log = logging.getLogger(__name__)

# Plan columns that must agree between the plan and a shard's rows for the shard to belong to it.
PLAN_CHECK_COLUMNS = ("index", "image_id", "label", "prompt", "seed", "batch_key")


# --------------------------------------------------------------------------- checks
def _clip_skip(cfg: SynthesisParams, lora_adapter: LoraAdapter) -> int:
    """``synthesis.clip_skip``; ``auto`` = the adapter's training value (``lora_params.clip_skip``
    in its metadata), 0 for an adapter that does not record it (e.g. an imported file)."""
    value = cfg.clip_skip
    if value == "auto":
        trained = lora_adapter.metadata.get("lora_params") or "{}"
        try:
            value = (trained if isinstance(trained, dict) else json.loads(trained)).get("clip_skip")
        except (AttributeError, TypeError, ValueError):
            value = None
    return int(value or 0)


def check_parameters(cfg: SynthesisParams, classes: list[str], known_classes: list[str]) -> None:
    """What the block's schema cannot check alone: the top-level ``classes`` are known class names
    (``ingestion.plane_labels``), and the batch has at least ``num_shards`` images.

    Raises:
        ValueError: naming the unknown classes, or the shards and the batch's size.
    """
    unknown = [c for c in classes if c not in known_classes]
    if unknown:
        raise ValueError(f"synthesis: classes {unknown} are unknown; known classes (ingestion.plane_labels): "
                         f"{sorted(set(known_classes))}")
    images = cfg.images_per_class * len(classes) * cfg.replicates
    if cfg.num_shards > images:
        raise ValueError(f"synthesis.num_shards={cfg.num_shards} is more than the {images} images of the batch")


def _adapter_identity(adapter: LoraAdapter) -> dict[str, str]:
    meta = adapter.metadata
    return {
        "adapter_content_hash": adapter.content_hash,
        "adapter_file_sha256": file_sha256(meta.get("file")),
        "adapter_catalog_version": str(meta.get("catalog_version") or ""),
        "adapter_rank": str(meta.get("rank") or ""),
        "adapter_source": str(meta.get("adapter_source") or meta.get("imported_format") or ""),
    }


def replicate_adapters(lora_adapter: LoraAdapter, lora_adapter_fits: LoraAdapterFits | None,
                       params: dict[str, Any] | SynthesisParams) -> list[LoraAdapter] | None:
    """The adapter of each replicate with ``synthesis.adapter_per_replicate``: fit r
    (``lora_adapter`` for r = 0, ``lora_adapter_fits`` for r >= 1); None when the option is off
    (every replicate uses ``lora_adapter``).

    Raises:
        ValueError: fewer fits than ``synthesis.replicates`` (naming both parameters and the
            command that makes more), or fits that belong to another ``lora_adapter``.
    """
    cfg = SynthesisParams.from_any(params)
    if not cfg.adapter_per_replicate:
        return None
    replicates = cfg.replicates
    fits = lora_adapter_fits if lora_adapter_fits is not None else LoraAdapterFits([], {"fits": 1}, "not given")
    if fits.fits < replicates:
        where = (f"no lora_adapter_fits is saved ({fits.missing})" if fits.missing else
                 f"lora_adapter_fits (version {fits.info.get('catalog_version') or '?'}) holds {fits.fits} "
                 f"(lora_training.lora.fits={fits.fits})")
        raise ValueError(
            f"synthesis.adapter_per_replicate is true with synthesis.replicates={replicates}: each replicate needs its "
            f"own LoRA fit, {replicates} in all, but {where}. Train them with `kedro run --pipeline lora_training "
            f"--params lora_training.lora.fits={replicates}` (or set synthesis.replicates <= lora_training.lora.fits, "
            f"or synthesis.adapter_per_replicate=false)"
        )
    fit_of = (fits.info.get("fit_of") or {}).get("content_hash")
    if replicates > 1 and fit_of != lora_adapter.content_hash:
        raise ValueError(
            f"lora_adapter_fits (version {fits.info.get('catalog_version') or '?'}) are further fits of the adapter "
            f"{str(fit_of)[:12]}… (lora_adapter version {(fits.info.get('fit_of') or {}).get('catalog_version') or '?'}), "
            f"not of lora_adapter version {lora_adapter.metadata.get('catalog_version') or '?'} "
            f"({lora_adapter.content_hash[:12]}…); pin the matching versions with --load-versions, or re-run lora_training"
        )
    return [lora_adapter] + [fits.adapter(r) for r in range(1, replicates)]


def _fit_identity(adapter: LoraAdapter, fit: int) -> dict[str, Any]:
    """Which LoRA fit made a replicate: the adapter's identity plus fit index, seed and catalog entry."""
    recorded = adapter.metadata.get("seed")
    return _adapter_identity(adapter) | {
        "adapter_fit": fit,
        "adapter_seed": int(recorded) if str(recorded or "").isdigit() else -1,  # -1: not recorded (an imported file)
        "adapter_dataset": "lora_adapter" if fit == 0 else "lora_adapter_fits",
    }


def _resolution(cfg: SynthesisParams, base: dict, base_model: BaseModel) -> int:
    """``synthesis.resolution`` (null: the base model's), checked against the VAE's downsampling factor."""
    resolution = cfg.resolution or base.get("resolution") or base_model.pipe.vae.config.sample_size
    factor = base_model.pipe.vae_scale_factor  # diffusers: 2 ** (VAE levels - 1)
    if int(resolution) % factor:
        raise ValueError(f"synthesis.resolution={resolution} is not a multiple of the VAE's downsampling factor {factor}")
    return int(resolution)


# --------------------------------------------------------------------------- nodes
def plan_synthetic_batch(
    base_model: BaseModel,
    lora_adapter: LoraAdapter,
    caption_template: str,
    plane_labels: dict[str, str],
    params: dict[str, Any],
    classes: list[str],
    seed: int,
    lora_adapter_fits: LoraAdapterFits | None = None,
) -> pd.DataFrame:
    """The manifest of the batch to make, one row per image, before any image exists.

    Args:
        base_model: the ``base_model`` catalog entry (``BaseModel``: the pipeline, and its
            info: kind, resolution, content hash, catalog version).
        lora_adapter: the ``lora_adapter`` catalog entry (metadata with its catalog version
            and the content hash of the base it was trained on).
        caption_template: ``ingestion.caption_template``; ``{plane}`` = the class word.
        plane_labels: ``ingestion.plane_labels``; its values are the known class names.
        params: ``synthesis`` parameters.
        classes: the top-level ``classes``: one prompt per class (``{plane}`` = the class), class-major.
        seed: the project seed, the base seed when ``synthesis.base_seed`` is null.
        lora_adapter_fits: the ``lora_adapter_fits`` catalog entry (LoRA fits 1..K-1); used only
            with ``synthesis.adapter_per_replicate``: replicate r is then made with fit r.

    Returns:
        DataFrame with ``index`` (global, class-major), ``image_id``, ``label``, ``prompt``,
        ``negative_prompt``, ``seed`` (the image's own), ``replicate`` (which of the
        ``synthesis.replicates`` independent batches it belongs to), ``base_seed`` (its
        replicate's: the base seed + replicate), ``scheduler``,
        ``steps``, ``guidance``, ``lora_scale``, ``resolution``, ``batch_size`` (the call
        shape), base model and adapter identity, and ``batch_key`` (hash of all of it). With
        ``synthesis.adapter_per_replicate`` each row's adapter columns are its replicate's fit's,
        plus ``adapter_fit``, ``adapter_seed`` and ``adapter_dataset`` (``lora_adapter`` for fit 0,
        ``lora_adapter_fits`` else: the entry ``adapter_catalog_version`` is a version of).

    Raises:
        ValueError: bad parameters (see :func:`check_parameters`), a resolution the VAE
            cannot take, an adapter trained on another base model.
    """
    cfg, classes = SynthesisParams.from_any(params), list(classes)
    check_parameters(cfg, classes, sorted(set(plane_labels.values()) | set(plane_labels)))
    base = describe_base(base_model)
    adapter = _adapter_identity(lora_adapter)
    _check_adapter_fits_base(lora_adapter, adapter, base)
    per_replicate_adapters = replicate_adapters(lora_adapter, lora_adapter_fits, cfg)
    resolution = _resolution(cfg, base, base_model)
    base_seed = int(seed if cfg.base_seed is None else cfg.base_seed)
    n = cfg.images_per_class
    replicates = cfg.replicates
    per_replicate = n * len(classes)
    plan = _image_rows(classes, caption_template, n, replicates, base_seed)
    replicate = plan["index"] // per_replicate
    plan = plan.assign(
        negative_prompt=cfg.negative_prompt or "",
        base_seed=base_seed + replicate,
        scheduler=cfg.scheduler,
        steps=cfg.steps,
        guidance=float(cfg.guidance_scale),
        lora_scale=float(cfg.lora_scale),
        clip_skip=_clip_skip(cfg, lora_adapter),
        resolution=int(resolution),
        batch_size=cfg.batch_size,
        base_model_name=str(base.get("name", "")),
        base_model_kind=str(base.get("kind", "")),
        base_model_hash=base["content_hash"],
        base_catalog_version=str(base.get("catalog_version") or ""),
        **adapter,
        replicate=replicate,
    )
    if per_replicate_adapters is not None:  # replicate r made with LoRA fit r: its own adapter columns
        plan = _with_fit_columns(plan, per_replicate_adapters, cfg, base)
    plan["batch_key"] = hashlib.sha256(plan.to_csv(index=False).encode()).hexdigest()[:16]
    log.info(
        "synthesis plan %s: %d images (%d per class: %s) at %d px, %s %d steps, guidance %g, LoRA scale %g, base seed %d",
        plan["batch_key"].iloc[0], len(plan), n, ", ".join(classes), resolution,
        cfg.scheduler, cfg.steps, cfg.guidance_scale, cfg.lora_scale, base_seed,
    )
    return plan


def _with_fit_columns(plan: pd.DataFrame, adapters: list[LoraAdapter], cfg: SynthesisParams, base: dict) -> pd.DataFrame:
    """The plan with each row's adapter columns set to its replicate's LoRA fit's (each checked
    against the base), plus ``adapter_fit``, ``adapter_seed``, ``adapter_dataset``."""
    fits = []
    for r, fit_adapter in enumerate(adapters):
        _check_adapter_fits_base(fit_adapter, _adapter_identity(fit_adapter), base)
        fits.append(_fit_identity(fit_adapter, r) | {"clip_skip": _clip_skip(cfg, fit_adapter)})
    by_replicate = pd.DataFrame(fits)
    for column in by_replicate.columns:
        plan[column] = by_replicate[column].to_numpy()[plan["replicate"].to_numpy()]
    return plan


def _check_adapter_fits_base(lora_adapter: LoraAdapter, adapter: dict, base: dict) -> None:
    """The adapter was trained on this base model (same content hash), else the versions to pin."""
    trained_on = lora_adapter.metadata.get("base_content_hash")
    if trained_on and trained_on not in ("None", "null") and trained_on != base["content_hash"]:
        raise ValueError(
            f"the LoRA adapter (version {adapter['adapter_catalog_version'] or '?'}) was trained on base model "
            f"{trained_on[:12]}…, but base_model (version {base.get('catalog_version') or '?'}) is "
            f"{base['content_hash'][:12]}…; pin matching versions, e.g. --load-versions "
            f"base_model:{lora_adapter.metadata.get('base_catalog_version', '<version>')}"
        )


def _image_rows(classes: list[str], caption_template: str, n: int, replicates: int, base_seed: int) -> pd.DataFrame:
    """index, image_id, label, prompt and seed of every image, class-major within each replicate.

    Replicate r is a whole batch of its own, sampled from base seed base_seed + r (image seeds are a
    hash of (base seed, index within the replicate)): K independent draws from the same generator.
    """
    per_replicate = n * len(classes)
    rows = []
    for r in range(replicates):
        for c, label in enumerate(classes):
            prompt = caption_template.format(plane=label)
            for k in range(n):
                local = c * n + k
                i = r * per_replicate + local
                rows.append({"index": i, "image_id": f"{label}_{i:05d}", "label": label, "prompt": prompt,
                             "seed": image_seed(base_seed + r, local)})
    return pd.DataFrame(rows)


def generate_synthetic_shard(base_model: BaseModel, lora_adapter: LoraAdapter, plan: pd.DataFrame, params: dict[str, Any],
                             lora_adapter_fits: LoraAdapterFits | None = None) -> dict[str, ImageSet]:
    """The images of shard ``shard_index`` of ``num_shards`` of the plan (the whole plan by default).

    Each row is made with its own adapter: ``lora_adapter``, or with
    ``synthesis.adapter_per_replicate`` its ``adapter_fit`` (from ``lora_adapter_fits``), each
    on its own copy of the base; a shard or process makes only the fits its rows need.

    Under several processes the shard is split again, contiguously, between them
    (``split_between_processes``), and gathered back (``gather_object``): every process
    returns the whole shard, in plan order. On CUDA the model runs in fp16 with the
    adapter fused into its weights (``synthesis.precision``/``fuse_lora``: auto); on CPU
    in fp32 with the adapter as peft layers.

    Returns:
        ``{"<batch_key>/shard-KKKKK-of-NNNNN": ImageSet}``: the shard's images, ``meta`` = its
        plan rows plus how they were made (device, dtype, fused, threads, library versions).
    """
    cfg = SynthesisParams.from_any(params)
    shard, shards = cfg.shard_index, cfg.num_shards
    indices = list(shard_indices(len(plan), shard, shards))
    state = distributed_state()
    device, dtype = device_and_dtype(cfg.device, cfg.precision, state)
    fuse = device.type == "cuda" if cfg.fuse_lora == "auto" else cfg.fuse_lora
    first = plan.iloc[0]
    adapters = _row_adapters(lora_adapter, lora_adapter_fits, plan, cfg)
    pristine, pipes = base_model.pipe, {}
    workers = effective_workers(cfg.workers, device, state.num_processes)
    if len(adapters) == 1 and workers == 1:  # one adapter for every row (synthesis.adapter_per_replicate: false): the base itself
        pipes = {fit: prepare_pipeline(pristine, adapter, float(first["lora_scale"]), device, dtype, fuse,
                                       str(first["scheduler"])) for fit, adapter in adapters.items()}
    # else a copy of the untouched base per fit, prepared when a row needs it (fusing changes the weights)

    def pipe_for(fit: int):  # the base with this fit's adapter, ready to sample
        return pipes.pop(fit) if fit in pipes else prepare_pipeline(
            copy.deepcopy(pristine), adapters[fit], float(first["lora_scale"]), device, dtype, fuse, str(first["scheduler"]))

    started = time.perf_counter()
    if workers > 1:  # worker processes on this machine's cores, whole pipeline calls each
        made = _generate_in_workers(plan, indices, pristine, adapters, device, dtype, fuse, cfg, workers,
                                    desc=f"synthesis shard {shard}/{shards}")
    else:
        with state.split_between_processes(indices) as mine, torch_threads(cfg.torch_threads) as threads:
            desc = f"synthesis shard {shard}/{shards}" + (f" (process {state.process_index})" if state.num_processes > 1 else "")
            images = _generate_rows(plan, list(mine), pipe_for, progress=state.is_main_process, desc=desc,
                                    name_fits=len(adapters) > 1)
            made = [(i, img, threads, state.process_index) for i, img in zip(mine, images)]
    seconds = time.perf_counter() - started
    if state.num_processes > 1:
        from accelerate.utils import gather_object

        made = sorted(gather_object(made), key=lambda m: m[0])
    meta = plan.iloc[[m[0] for m in made]].reset_index(drop=True).assign(
        shard=f"{shard}-of-{shards}",
        process_index=[m[3] for m in made],
        num_processes=state.num_processes,
        device=device.type,
        dtype=str(dtype).removeprefix("torch."),
        lora_fused=fuse,
        torch_threads=[m[2] for m in made],
        workers=workers,
        **library_versions(),
    )
    resolution = int(first["resolution"])
    stack = np.stack([m[1] for m in made]) if made else np.zeros((0, resolution, resolution), np.uint8)
    info = {
        "batch_key": str(first["batch_key"]),
        "shard_index": shard,
        "num_shards": shards,
        "n_images": len(made),
        "seconds": round(seconds, 3),
        "num_processes": state.num_processes,
        "workers": workers,
    }
    capped = {loop: step for adapter in adapters.values() for loop, step in time_capped_loops(base_model, adapter).items()}
    if capped:  # only then: an uncapped run's batch is unchanged
        info["time_capped"] = capped
    log.info("synthesis shard %d/%d: %d images in %.1f s on %s (%s, LoRA %s)", shard, shards, len(made), seconds,
             device.type, str(dtype).removeprefix("torch."), "fused" if fuse else "as peft layers")
    return {shard_name(info["batch_key"], shard, shards): ImageSet(stack, meta, info)}


def _fit_of_row(plan: pd.DataFrame) -> np.ndarray:
    """Each plan row's LoRA fit (``adapter_fit``; all fit 0 without it)."""
    return plan["adapter_fit"].to_numpy() if "adapter_fit" in plan.columns else np.zeros(len(plan), int)


def _generate_rows(plan: pd.DataFrame, mine: list[int], pipe_for: Callable[[int], Any], progress: bool, desc: str,
                   name_fits: bool) -> np.ndarray:
    """The images of plan rows ``mine``, the rows of each LoRA fit (``adapter_fit``; all fit 0
    without it) in one ``generate_images`` call on ``pipe_for(fit)``, in row order."""
    first = plan.iloc[0]
    fit_of_row = _fit_of_row(plan)
    images = np.zeros((len(mine), int(first["resolution"]), int(first["resolution"])), np.uint8)
    for fit in dict.fromkeys(fit_of_row[mine].tolist()):  # the fits of these rows, in row order
        at = [j for j, i in enumerate(mine) if fit_of_row[i] == fit]
        pipe = pipe_for(fit)
        rows = plan.iloc[[mine[j] for j in at]]
        images[at] = generate_images(
            pipe,
            rows["prompt"].tolist(),
            rows["seed"].tolist(),
            negative_prompts=rows["negative_prompt"].tolist(),
            resolution=int(first["resolution"]),
            steps=int(first["steps"]),
            guidance_scale=float(first["guidance"]),
            batch_size=int(first["batch_size"]),
            clip_skip=int(rows["clip_skip"].iloc[0]),
            progress=progress,
            desc=desc + (f", LoRA fit {fit}" if name_fits else ""),
        )
        del pipe  # a fit's rows are contiguous (replicate-major plan): its copy is not needed again
    return images


def _worker_chunks(plan: pd.DataFrame, indices: list[int], batch_size: int, workers: int) -> list[list[int]]:
    """``indices`` cut into jobs for ``workers`` processes: each LoRA fit's rows (contiguous, in
    order) in ``workers`` runs of whole ``batch_size`` calls, so every pipeline call holds the
    rows it holds in one process."""
    fit_of_row = _fit_of_row(plan)
    chunks = []
    for fit in dict.fromkeys(fit_of_row[indices].tolist()):
        rows = [i for i in indices if fit_of_row[i] == fit]
        calls = -(-len(rows) // batch_size)
        per = -(-calls // workers) * batch_size
        chunks += [rows[at:at + per] for at in range(0, len(rows), per)]
    return chunks


def _generate_chunk(job) -> tuple[np.ndarray, int]:
    """A worker's job: one chunk of one fit's rows on its own copy of the base; (images, threads)."""
    pristine, adapter, rows, device, dtype, fuse, torch_threads_n = job
    first = rows.iloc[0]
    with torch_threads(torch_threads_n) as threads:
        pipe = prepare_pipeline(pristine, adapter, float(first["lora_scale"]), device, dtype, fuse, str(first["scheduler"]))
        images = _generate_rows(rows, list(range(len(rows))), lambda fit: pipe, progress=False, desc="", name_fits=False)
    return images, threads


def _generate_in_workers(plan: pd.DataFrame, indices: list[int], pristine, adapters: dict, device, dtype, fuse: bool,
                         cfg: SynthesisParams, workers: int, desc: str) -> list[tuple]:
    """The rows ``indices`` made in ``workers`` processes (:mod:`fu_kedro.workers`); the same
    ``(index, image, threads, process)`` tuples, in the same order, as one process makes."""
    chunks = _worker_chunks(plan, indices, int(plan.iloc[0]["batch_size"]), workers)
    fit_of_row = _fit_of_row(plan)
    jobs = [(pristine, adapters[int(fit_of_row[c[0]])], plan.iloc[c], device, dtype, fuse, cfg.torch_threads) for c in chunks]
    log.info("synthesis: %d images on %d worker processes (%s threads each), %d jobs", len(indices), workers,
             cfg.torch_threads or "default", len(jobs))
    made = []
    with tqdm(total=len(indices), desc=f"{desc} ({workers} workers)", unit="img", leave=False) as bar:
        for chunk, (images, threads) in zip(chunks, imap_in_workers(_generate_chunk, jobs, workers)):
            made += [(i, img, threads, 0) for i, img in zip(chunk, images)]
            bar.update(len(chunk))
    return made


def _row_adapters(lora_adapter: LoraAdapter, lora_adapter_fits: LoraAdapterFits | None, plan: pd.DataFrame,
                  cfg: SynthesisParams) -> dict[int, LoraAdapter]:
    """fit -> adapter for the plan's rows (``{0: lora_adapter}`` unless ``adapter_per_replicate``),
    each checked against the content hash the plan recorded for its rows."""
    if "adapter_fit" not in plan.columns:
        return {0: lora_adapter}
    needed = cfg.model_copy(update={"adapter_per_replicate": True, "replicates": int(plan["adapter_fit"].max()) + 1})  # as planned
    adapters = replicate_adapters(lora_adapter, lora_adapter_fits, needed)
    for fit, recorded in plan.groupby("adapter_fit")["adapter_content_hash"].first().items():
        if adapters[int(fit)].content_hash != recorded:
            raise ValueError(f"LoRA fit {fit}: the adapter given is {adapters[int(fit)].content_hash[:12]}…, the plan's "
                             f"rows were planned with {recorded[:12]}…; use the same model versions for plan and shards")
    return {int(fit): adapters[int(fit)] for fit in sorted(plan["adapter_fit"].unique())}


def time_capped_loops(base_model: BaseModel, lora_adapter: LoraAdapter) -> dict[str, int]:
    """The training loops behind the models that a wall-clock cap (``max_minutes``) stopped,
    loop -> step reached (``autoencoder``, ``base_denoiser``: the tiny base; ``lora``): the
    images then depend on how loaded the training machine was. Empty when none was."""
    capped: dict[str, int] = {}
    meta = lora_adapter.metadata
    for recorded in (describe_base(base_model).get("time_capped"), meta.get("base_time_capped"), meta.get("time_capped")):
        if isinstance(recorded, str):  # safetensors metadata holds JSON text
            try:
                recorded = json.loads(recorded)
            except ValueError:
                recorded = None
        if isinstance(recorded, dict):
            capped.update({str(loop): int(step) for loop, step in recorded.items()})
    return capped


def _load(value: ImageSet | Callable[[], ImageSet]) -> ImageSet:
    return value if isinstance(value, ImageSet) else value()


def merge_synthetic_shards(synthetic_shards: dict[str, Any], plan: pd.DataFrame, params: dict[str, Any]) -> ImageSet:
    """All ``num_shards`` shards of the plan as one batch; ``meta`` is the manifest (one row per image).

    Raises:
        ValueError: a shard of this plan is missing (naming the command that makes it), or a
            shard's rows are not the plan's rows for its indices.
    """
    key = str(plan["batch_key"].iloc[0])
    shards = SynthesisParams.from_any(params).num_shards
    names = [shard_name(key, k, shards) for k in range(shards)]
    missing = [k for k, name in enumerate(names) if name not in synthetic_shards]
    if missing:
        raise ValueError(
            f"synthetic batch {key}: shard(s) {missing} of {shards} not found in synthetic_shards; make each with "
            f"`kedro run --pipeline synthesis --tags synthesis_shard --params synthesis.num_shards={shards},"
            f"synthesis.shard_index=<k>` (same parameters and model versions), then merge with "
            f"`kedro run --pipeline synthesis --tags synthesis_merge --params synthesis.num_shards={shards}`"
        )
    parts = []
    for k, name in enumerate(names):
        part = _load(synthetic_shards[name])
        expected = plan.iloc[list(shard_indices(len(plan), k, shards))].reset_index(drop=True)
        got = part.meta.reset_index(drop=True)
        for column in PLAN_CHECK_COLUMNS:
            if len(got) != len(expected) or got[column].astype(str).tolist() != expected[column].astype(str).tolist():
                raise ValueError(f"shard {name}: its rows do not match the plan's rows for shard {k} (column {column!r})")
        parts.append(part)
    parts = [p for p in parts if len(p)]
    batch = ImageSet.concat(parts) if len(parts) > 1 else parts[0]
    first = plan.iloc[0]
    batch.info = {
        "kind": "synthetic",
        "batch_key": key,
        "n_images": len(batch),
        # the plan is class-major in the order of the top-level `classes` it was made with
        "per_class": batch.meta["label"].value_counts().reindex(plan["label"].unique()).fillna(0).astype(int).to_dict(),
        "replicates": int(batch.meta["replicate"].nunique()) if "replicate" in batch.meta else 1,
        "replicate_base_seeds": sorted(map(int, batch.meta["base_seed"].unique())),
        "prompts": dict(zip(plan["label"], plan["prompt"])),
        "base_model": {"name": first["base_model_name"], "content_hash": first["base_model_hash"],
                       "catalog_version": first["base_catalog_version"]},
        "adapter": {"content_hash": first["adapter_content_hash"], "file_sha256": first["adapter_file_sha256"],
                    "catalog_version": first["adapter_catalog_version"]},
        **({"adapter_per_replicate": [  # synthesis.adapter_per_replicate: replicate r made with LoRA fit r
            {"replicate": int(r), "fit": int(row["adapter_fit"]), "seed": int(row["adapter_seed"]),
             "content_hash": row["adapter_content_hash"], "file_sha256": row["adapter_file_sha256"],
             "dataset": row["adapter_dataset"], "catalog_version": row["adapter_catalog_version"]}
            for r, row in plan.groupby("replicate").first().iterrows()]} if "adapter_fit" in plan.columns else {}),
        "shards": [{k: v for k, v in p.info.items()} for p in parts],
        "generation_seconds": round(sum(float(p.info.get("seconds", 0)) for p in parts), 3),
        "parameters": as_dict(params),
    }
    capped = {loop: step for p in parts for loop, step in (p.info.get("time_capped") or {}).items()}
    if capped:  # a wall-clock cap stopped a loop behind these images: the report says so
        batch.info["time_capped"] = capped
    log.info("synthetic batch %s: %d images from %d shard(s)", key, len(batch), shards)
    return batch


def preview_grid(batch: ImageSet, classes: list[str], per_class: int) -> Figure:
    """The first ``per_class`` images of each class, one row per class."""
    fig, axes = plt.subplots(len(classes), 1, figsize=(max(4.0, 1.0 * per_class), 1.05 * len(classes) + 0.7), squeeze=False)
    labels = batch.meta["label"].astype(str).to_numpy()
    side = batch.images.shape[1]
    for ax, label in zip(axes[:, 0], classes):
        picked = batch.images[labels == label][:per_class]
        row = np.full((side, per_class * side), 0, np.uint8)
        for j, img in enumerate(picked):
            row[:, j * side : (j + 1) * side] = img
        ax.imshow(row, cmap="gray", vmin=0, vmax=255, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{label}\n({int((labels == label).sum())})", fontsize=8, rotation=0, ha="right", va="center")
    info = batch.info
    meta = batch.meta.iloc[0] if len(batch) else {}
    fig.suptitle(
        f"synthetic batch {info.get('batch_key', '')}: adapter {str(info.get('adapter', {}).get('catalog_version', ''))}, "
        f"{meta.get('scheduler', '')} {meta.get('steps', '')} steps, guidance {meta.get('guidance', '')}, "
        f"{meta.get('resolution', '')} px",
        fontsize=7,
    )
    fig.tight_layout()
    return fig


def summarize_synthetic_batch(synthetic_batch: ImageSet, params: dict[str, Any], classes: list[str]):
    """Preview grid per class and counts as MLflow metrics (the manifest goes to MLflow with
    ``synthetic_batch`` itself: its catalog ``metadata.mlflow``).

    Returns:
        (figure, metrics ``{name: {"value": x, "step": 0}}``: images, images per class,
        generation seconds and images/second).
    """
    classes = list(classes)
    per_class = SynthesisParams.from_any(params).preview.per_class
    fig = preview_grid(synthetic_batch, classes, per_class)
    labels = synthetic_batch.meta["label"].astype(str)
    metrics = {"images": {"value": float(len(synthetic_batch)), "step": 0}}
    for label in classes:
        metrics[f"images_{label}"] = {"value": float((labels == label).sum()), "step": 0}
    seconds = float(synthetic_batch.info.get("generation_seconds") or 0.0)
    if seconds > 0:
        metrics["generation_seconds"] = {"value": seconds, "step": 0}
        metrics["images_per_second"] = {"value": len(synthetic_batch) / seconds, "step": 0}
    _tag_what_ran(synthetic_batch.meta)
    return fig, metrics


def _tag_what_ran(manifest: pd.DataFrame) -> None:
    """The device-derived settings the batch was actually made with (from its manifest), as MLflow
    tags ``synthesis.ran_on.<key>`` (several values, e.g. shards made on different machines, are joined)."""
    import mlflow

    if mlflow.active_run() is None:
        return
    keys = ("device", "dtype", "lora_fused", "torch_threads", "batch_size", "num_processes", "workers", "replicate")
    tags = {}
    for key in keys:
        if key in manifest.columns:
            values = sorted(map(str, manifest[key].unique()))
            tags[f"synthesis.ran_on.{'replicates' if key == 'replicate' else key}"] = (
                str(len(values)) if key == "replicate" else ", ".join(values))
    mlflow.set_tags(tags)
