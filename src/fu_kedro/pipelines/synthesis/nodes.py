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
:mod:`fu_kedro.models.generation`; see docs/synthesis.md.
"""
from __future__ import annotations

import hashlib
import logging
import json
import time
from numbers import Integral, Real
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
    SCHEDULERS,
    device_and_dtype,
    file_sha256,
    generate_images,
    image_seed,
    library_versions,
    prepare_pipeline,
    shard_indices,
    torch_threads,
)
from fu_kedro.models.lora import LoraAdapter  # noqa: E402

log = logging.getLogger(__name__)

# Plan columns that must agree between the plan and a shard's rows for the shard to belong to it.
PLAN_CHECK_COLUMNS = ("index", "image_id", "label", "prompt", "seed", "batch_key")


# --------------------------------------------------------------------------- checks
def _is_int(value: Any) -> bool:
    return isinstance(value, Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool)


def _clip_skip(params: dict[str, Any], lora_adapter: LoraAdapter) -> int:
    """``synthesis.clip_skip``; ``auto`` = the adapter's training value (``lora_params.clip_skip``
    in its metadata), 0 for an adapter that does not record it (e.g. an imported file)."""
    value = params.get("clip_skip", "auto")
    if value in ("auto", None):
        trained = lora_adapter.metadata.get("lora_params") or "{}"
        try:
            value = (trained if isinstance(trained, dict) else json.loads(trained)).get("clip_skip")
        except (AttributeError, TypeError, ValueError):
            value = None
    return int(value or 0)


def check_parameters(params: dict[str, Any], known_classes: list[str]) -> None:
    """Every ``synthesis`` parameter in range; one error naming each bad one.

    Raises:
        ValueError: zero/negative counts, unknown or repeated class names, an unknown
            sampler, a shard outside ``[0, num_shards)``, a bad resolution, precision or device.
    """
    problems = []
    n = params.get("images_per_class")
    if not _is_int(n) or n < 1:
        problems.append(f"images_per_class must be a positive integer, got {n!r}")
    classes = params.get("classes")
    if not isinstance(classes, (list, tuple)) or not classes:
        problems.append(f"classes must be a non-empty list of class names, got {classes!r}")
    else:
        unknown = [c for c in classes if c not in known_classes]
        if unknown:
            problems.append(f"classes {unknown} are unknown; known classes (ingestion.plane_labels): {sorted(set(known_classes))}")
        repeated = sorted({c for c in classes if list(classes).count(c) > 1})
        if repeated:
            problems.append(f"classes {repeated} are listed more than once")
    for key in ("steps", "batch_size", "num_shards"):
        value = params.get(key)
        if not _is_int(value) or value < 1:
            problems.append(f"{key} must be a positive integer, got {value!r}")
    shard, shards = params.get("shard_index"), params.get("num_shards")
    if not _is_int(shard) or shard < 0 or (_is_int(shards) and shard >= shards):
        problems.append(f"shard_index must be an integer in [0, num_shards={shards}), got {shard!r}")
    elif _is_int(shards) and _is_int(n) and isinstance(classes, (list, tuple)) and shards > n * max(1, len(classes)) * (
        params.get("replicates", 1) if _is_int(params.get("replicates", 1)) else 1
    ):
        problems.append(f"num_shards={shards} is more than the {n * len(classes) * (params.get('replicates', 1) if _is_int(params.get('replicates', 1)) else 1)} images of the batch")
    if not _is_number(params.get("guidance_scale")) or params["guidance_scale"] < 0:
        problems.append(f"guidance_scale must be a number >= 0, got {params.get('guidance_scale')!r}")
    if not _is_number(params.get("lora_scale")):
        problems.append(f"lora_scale must be a number, got {params.get('lora_scale')!r}")
    if params.get("scheduler") not in SCHEDULERS:
        problems.append(f"scheduler must be one of {sorted(SCHEDULERS)}, got {params.get('scheduler')!r}")
    resolution = params.get("resolution")
    if resolution is not None and (not _is_int(resolution) or resolution < 8 or resolution % 8):
        problems.append(f"resolution must be null (the base model's) or a positive multiple of 8, got {resolution!r}")
    base_seed = params.get("base_seed")
    if base_seed is not None and (not _is_int(base_seed) or base_seed < 0):
        problems.append(f"base_seed must be null (the project seed) or an integer >= 0, got {base_seed!r}")
    negative = params.get("negative_prompt")
    if negative is not None and not isinstance(negative, str):
        problems.append(f"negative_prompt must be a string or null, got {negative!r}")
    if params.get("precision", "auto") not in ("auto", "fp32", "fp16", "bf16"):
        problems.append(f"precision must be auto, fp32, fp16 or bf16, got {params.get('precision')!r}")
    if params.get("fuse_lora", "auto") not in ("auto", True, False):
        problems.append(f"fuse_lora must be auto, true or false, got {params.get('fuse_lora')!r}")
    threads = params.get("torch_threads")
    if threads is not None and (not _is_int(threads) or threads < 1):
        problems.append(f"torch_threads must be null or a positive integer, got {threads!r}")
    replicates = params.get("replicates", 1)
    if not _is_int(replicates) or replicates < 1:
        problems.append(f"replicates must be a positive integer, got {replicates!r}")
    if problems:
        raise ValueError("synthesis parameters: " + "; ".join(problems))


def _adapter_identity(adapter: LoraAdapter) -> dict[str, str]:
    meta = adapter.metadata
    return {
        "adapter_content_hash": adapter.content_hash,
        "adapter_file_sha256": file_sha256(meta.get("file")),
        "adapter_catalog_version": str(meta.get("catalog_version") or ""),
        "adapter_rank": str(meta.get("rank") or ""),
        "adapter_source": str(meta.get("adapter_source") or meta.get("imported_format") or ""),
    }


# --------------------------------------------------------------------------- nodes
def plan_synthetic_batch(
    base_model: BaseModel,
    lora_adapter: LoraAdapter,
    caption_template: str,
    plane_labels: dict[str, str],
    params: dict[str, Any],
    seed: int,
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
        seed: the project seed, the base seed when ``synthesis.base_seed`` is null.

    Returns:
        DataFrame with ``index`` (global, class-major), ``image_id``, ``label``, ``prompt``,
        ``negative_prompt``, ``seed`` (the image's own), ``replicate`` (which of the
        ``synthesis.replicates`` independent batches it belongs to), ``base_seed`` (its
        replicate's: the base seed + replicate), ``scheduler``,
        ``steps``, ``guidance``, ``lora_scale``, ``resolution``, ``batch_size`` (the call
        shape), base model and adapter identity, and ``batch_key`` (hash of all of it).

    Raises:
        ValueError: bad parameters (see :func:`check_parameters`), a resolution the VAE
            cannot take, an adapter trained on another base model.
    """
    known = sorted(set(plane_labels.values()) | set(plane_labels))
    check_parameters(params, known)
    base = describe_base(base_model)
    adapter = _adapter_identity(lora_adapter)
    _check_adapter_fits_base(lora_adapter, adapter, base)
    resolution = params.get("resolution") or base.get("resolution") or base_model.pipe.vae.config.sample_size
    factor = base_model.pipe.vae_scale_factor  # diffusers: 2 ** (VAE levels - 1)
    if int(resolution) % factor:
        raise ValueError(f"synthesis.resolution={resolution} is not a multiple of the VAE's downsampling factor {factor}")
    base_seed = int(seed if params.get("base_seed") is None else params["base_seed"])
    n = int(params["images_per_class"])
    replicates = int(params.get("replicates", 1))
    per_replicate = n * len(params["classes"])
    plan = _image_rows(params["classes"], caption_template, n, replicates, base_seed)
    replicate = plan["index"] // per_replicate
    plan = plan.assign(
        negative_prompt=params.get("negative_prompt") or "",
        base_seed=base_seed + replicate,
        scheduler=params["scheduler"],
        steps=int(params["steps"]),
        guidance=float(params["guidance_scale"]),
        lora_scale=float(params["lora_scale"]),
        clip_skip=_clip_skip(params, lora_adapter),
        resolution=int(resolution),
        batch_size=int(params["batch_size"]),
        base_model_name=str(base.get("name", "")),
        base_model_kind=str(base.get("kind", "")),
        base_model_hash=base["content_hash"],
        base_catalog_version=str(base.get("catalog_version") or ""),
        **adapter,
        replicate=replicate,
    )
    plan["batch_key"] = hashlib.sha256(plan.to_csv(index=False).encode()).hexdigest()[:16]
    log.info(
        "synthesis plan %s: %d images (%d per class: %s) at %d px, %s %d steps, guidance %g, LoRA scale %g, base seed %d",
        plan["batch_key"].iloc[0], len(plan), n, ", ".join(params["classes"]), resolution,
        params["scheduler"], params["steps"], params["guidance_scale"], params["lora_scale"], base_seed,
    )
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


def generate_synthetic_shard(base_model: BaseModel, lora_adapter: LoraAdapter, plan: pd.DataFrame, params: dict[str, Any]) -> dict[str, ImageSet]:
    """The images of shard ``shard_index`` of ``num_shards`` of the plan (the whole plan by default).

    Under several processes the shard is split again, contiguously, between them
    (``split_between_processes``), and gathered back (``gather_object``): every process
    returns the whole shard, in plan order. On CUDA the model runs in fp16 with the
    adapter fused into its weights (``synthesis.precision``/``fuse_lora``: auto); on CPU
    in fp32 with the adapter as peft layers.

    Returns:
        ``{"<batch_key>/shard-KKKKK-of-NNNNN": ImageSet}``: the shard's images, ``meta`` = its
        plan rows plus how they were made (device, dtype, fused, threads, library versions).
    """
    shard, shards = int(params["shard_index"]), int(params["num_shards"])
    indices = list(shard_indices(len(plan), shard, shards))
    state = distributed_state()
    device, dtype = device_and_dtype(params.get("device", "auto"), params.get("precision", "auto"), state)
    fuse = params.get("fuse_lora", "auto")
    fuse = device.type == "cuda" if fuse == "auto" else bool(fuse)
    first = plan.iloc[0]
    pipe = prepare_pipeline(base_model.pipe, lora_adapter, float(first["lora_scale"]), device, dtype, fuse, str(first["scheduler"]))
    started = time.perf_counter()
    with state.split_between_processes(indices) as mine, torch_threads(params.get("torch_threads")) as threads:
        rows = plan.iloc[mine] if mine else plan.iloc[[]]
        images = generate_images(
            pipe,
            rows["prompt"].tolist(),
            rows["seed"].tolist(),
            negative_prompts=rows["negative_prompt"].tolist(),
            resolution=int(first["resolution"]),
            steps=int(first["steps"]),
            guidance_scale=float(first["guidance"]),
            batch_size=int(first["batch_size"]),
            clip_skip=int(first["clip_skip"]),
            progress=state.is_main_process,
            desc=f"synthesis shard {shard}/{shards}" + (f" (process {state.process_index})" if state.num_processes > 1 else ""),
        )
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
    }
    capped = time_capped_loops(base_model, lora_adapter)
    if capped:  # only then: an uncapped run's batch is unchanged
        info["time_capped"] = capped
    log.info("synthesis shard %d/%d: %d images in %.1f s on %s (%s, LoRA %s)", shard, shards, len(made), seconds,
             device.type, str(dtype).removeprefix("torch."), "fused" if fuse else "as peft layers")
    return {shard_name(info["batch_key"], shard, shards): ImageSet(stack, meta, info)}


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
    shards = int(params["num_shards"])
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
        "per_class": batch.meta["label"].value_counts().reindex(params["classes"]).fillna(0).astype(int).to_dict(),
        "replicates": int(batch.meta["replicate"].nunique()) if "replicate" in batch.meta else 1,
        "replicate_base_seeds": sorted(map(int, batch.meta["base_seed"].unique())),
        "prompts": dict(zip(plan["label"], plan["prompt"])),
        "base_model": {"name": first["base_model_name"], "content_hash": first["base_model_hash"],
                       "catalog_version": first["base_catalog_version"]},
        "adapter": {"content_hash": first["adapter_content_hash"], "file_sha256": first["adapter_file_sha256"],
                    "catalog_version": first["adapter_catalog_version"]},
        "shards": [{k: v for k, v in p.info.items()} for p in parts],
        "generation_seconds": round(sum(float(p.info.get("seconds", 0)) for p in parts), 3),
        "parameters": params,
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


def summarize_synthetic_batch(synthetic_batch: ImageSet, params: dict[str, Any]):
    """Preview grid per class and counts as MLflow metrics (the manifest goes to MLflow with
    ``synthetic_batch`` itself: its catalog ``metadata.mlflow``).

    Returns:
        (figure, metrics ``{name: {"value": x, "step": 0}}``: images, images per class,
        generation seconds and images/second).
    """
    classes = list(params["classes"])
    per_class = int((params.get("preview") or {}).get("per_class", 8))
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
    keys = ("device", "dtype", "lora_fused", "torch_threads", "batch_size", "num_processes", "replicate")
    tags = {}
    for key in keys:
        if key in manifest.columns:
            values = sorted(map(str, manifest[key].unique()))
            tags[f"synthesis.ran_on.{'replicates' if key == 'replicate' else key}"] = (
                str(len(values)) if key == "replicate" else ", ".join(values))
    mlflow.set_tags(tags)
