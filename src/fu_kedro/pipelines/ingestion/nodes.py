"""Nodes of the ``ingestion`` pipeline: read + validate + preprocess both domains, split the
source by patient, draw the LoRA subset, report what was skipped, count, and draw a preview.
Source and target are checked not to overlap (files, pixels, patients) before the split.

Each node takes the ``ingestion`` block as Kedro passes it and reads it through its schema,
``cfg = IngestionParams.from_any(ingestion)`` (:mod:`fu_kedro.schema`); the readers of
:mod:`fu_kedro.data_sources` get the dict."""
from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from fu_kedro.data_sources import CLASSES
from fu_kedro.data_sources.readers import read_domain
from fu_kedro.data_sources.separation import check_domain_separation
from fu_kedro.data_sources.validation import REPORT_COLUMNS
from fu_kedro.datasets import ImageSet
from fu_kedro.schema import as_dict

from .params import IngestionParams

logger = logging.getLogger(__name__)


def read_source_images(source_format: str, source_path: str | None, seed: int,
                       ingestion: dict[str, Any], classes: list[str]) -> tuple[ImageSet, pd.DataFrame]:
    """Read, validate and preprocess the source (training) domain.

    Args:
        source_format: ``phantom | fetal_planes_db | african | folders``.
        source_path: folder of the source data (unused for phantom).
        seed: global seed (phantom pixels).
        ingestion: the ``ingestion`` parameters.
        classes: the top-level ``classes``: the source must have a usable image of each
            (an "empty class" stops the run, whatever ``on_bad_input`` says).

    Returns:
        The source ``ImageSet`` (square uint8 images of ``image_size``; meta image_id,
        patient_id, label, domain="source", center, machine, source_file) without a split
        yet, and its quarantine rows (``file, reason, domain``).
    """
    IngestionParams.from_any(ingestion)  # every key, before any image is read
    return read_domain(source_format, source_path, "source", seed, as_dict(ingestion), required=list(classes))


def read_target_images(target_format: str, target_path: str | None, seed: int,
                       ingestion: dict[str, Any]) -> tuple[ImageSet, pd.DataFrame]:
    """Read, validate and preprocess the target (zero-shot test) domain.

    Returns the target ``ImageSet`` with ``domain="target"`` and ``split="test"`` on
    every row (the target is never split or trained on), and its quarantine rows. Classes
    it must have: ``ingestion.required_classes.target`` (conf/base: none, as a target center may
    lack a class, and the African set has no 'other').
    """
    required = IngestionParams.from_any(ingestion).required_classes.target
    images, report = read_domain(target_format, target_path, "target", seed, as_dict(ingestion), required=list(required))
    images.meta["split"] = "test"
    return images, report


def check_source_target_separation(source_images: ImageSet, target_images: ImageSet,
                                   ingestion: dict[str, Any]) -> ImageSet:
    """Stop if the target overlaps the source: same folder, a shared file, identical decoded
    pixels, a near-duplicate picture (perceptual hash within
    ``ingestion.near_duplicate_max_distance`` bits, flips included), or a shared patient id under
    the same patient numbering (always fatal; the error names a few examples and the count).
    Returns the source set unchanged, so the split waits for this check."""
    check_domain_separation(source_images, target_images, IngestionParams.from_any(ingestion).near_duplicate_max_distance)
    return source_images


def patient_hash(patient_id: str, seed: int) -> float:
    """A number in [0, 1) fixed by (seed, patient id) alone: sha256, not Python's salted ``hash``."""
    digest = hashlib.sha256(f"{int(seed)}:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def split_source_by_patient(source: ImageSet, seed: int, ingestion: dict[str, Any]) -> ImageSet:
    """Add ``split`` (``train``/``val``) so that no patient is on both sides.

    A patient is in ``val`` iff ``patient_hash(patient_id, seed) < ingestion.val_fraction``.
    Each patient's side depends on its own id and the seed only, so quarantining one image (or
    one patient) moves no other patient between train and val. The price: class shares on the
    val side are not tuned, they scatter around ``val_fraction`` (binomially over patients); the
    log shows them and a class with no val (or no train) image is warned about.
    ``val_fraction: 0`` puts everything in train.
    """
    val_fraction = IngestionParams.from_any(ingestion).val_fraction  # in [0, 1)
    meta = source.meta.copy()
    meta["split"] = "train"
    if val_fraction > 0:
        n_patients = meta["patient_id"].nunique()
        if n_patients < 2:
            raise ValueError(f"cannot split {n_patients} source patient(s) into train/val; set ingestion.val_fraction: 0")
        u = {p: patient_hash(str(p), seed) for p in meta["patient_id"].unique()}
        meta.loc[meta["patient_id"].map(u) < val_fraction, "split"] = "val"
        table = meta.groupby(["label", "split"]).size().unstack(fill_value=0).reindex(columns=["train", "val"],
                                                                                     fill_value=0)
        for label, row in table.iterrows():
            if row["val"] == 0 or row["train"] == 0:
                logger.warning("source split: class %r has %d train and %d val image(s) (val_fraction=%s, seed=%d)",
                               label, row["train"], row["val"], val_fraction, int(seed))
    out = ImageSet(source.images, meta, dict(source.info))
    out.info["split"] = {"method": "patient_hash", "val_fraction": val_fraction, "seed": int(seed),
                         "train": int((meta["split"] == "train").sum()), "val": int((meta["split"] == "val").sum())}
    # one fingerprint of which image is on which side: later pipelines' inputs can be matched
    # to the split they were made from (fu_kedro.prerequisites)
    rows = "\n".join(f"{i},{p},{lab},{sp}" for i, p, lab, sp in
                      sorted(zip(meta["image_id"].astype(str), meta["patient_id"].astype(str), meta["label"],
                                 meta["split"])))
    out.info["split_id"] = hashlib.sha256(rows.encode()).hexdigest()[:16]
    logger.info("source split by patient: %s",
                meta.groupby(["split", "label"]).size().unstack(fill_value=0).to_dict("index"))
    return out


def draw_lora_subset(source_images: ImageSet, seed: int, ingestion: dict[str, Any],
                     classes: list[str]) -> ImageSet:
    """Seeded, class-balanced LoRA training subset drawn from the source *train* side only.

    Takes ``ingestion.lora_per_class`` images of each class of the top-level ``classes`` (a
    class with fewer train images gives all it has, with a warning naming the class and the
    counts; images of other labels are not drawn) and adds ``caption`` from
    ``ingestion.caption_template`` (``{plane}`` = the label word).
    """
    cfg = IngestionParams.from_any(ingestion)
    per_class, template = cfg.lora_per_class, cfg.caption_template
    rng = np.random.default_rng([int(seed), 2])
    train = np.flatnonzero(source_images.meta["split"].to_numpy() == "train")
    labels = source_images.meta["label"].to_numpy()
    chosen = []
    for c in classes:
        pool = train[labels[train] == c]
        if len(pool) < per_class:
            logger.warning("lora_subset: class %r has only %d source train image(s), fewer than "
                           "lora_per_class=%d; using all %d", c, len(pool), per_class, len(pool))
        chosen.extend(sorted(rng.choice(pool, size=min(per_class, len(pool)), replace=False)))
    subset = source_images.select(np.array(chosen, dtype=int))
    subset.meta["caption"] = [template.format(plane=p) for p in subset.meta["label"]]
    subset.info.update({"lora_per_class": per_class, "caption_template": template, "seed": int(seed),
                        "classes": list(classes)})
    return subset


def build_quarantine_report(source_report: pd.DataFrame,
                            target_report: pd.DataFrame) -> pd.DataFrame:
    """One table of every skipped item of both domains: ``file, reason, domain`` (may be
    empty). (Also an MLflow artifact: the catalog entry's ``metadata.mlflow``.)"""
    return pd.concat([source_report, target_report], ignore_index=True)[REPORT_COLUMNS]


def count_ingestion(source_images: ImageSet, target_images: ImageSet, lora_subset: ImageSet) -> dict[str, dict]:
    """MLflow metrics (``{name: {"value", "step"}}``; the catalog prefixes ``ingestion.``): read/kept/skipped per domain, images
    per class and split, LoRA subset size per class."""
    metrics: dict[str, float] = {}
    for domain, s in (("source", source_images), ("target", target_images)):
        for k, v in s.info.get("counts", {}).items():
            metrics[f"{domain}.{k}"] = v
        for c, n in s.meta["label"].value_counts().items():
            metrics[f"{domain}.class.{c}"] = n
        metrics[f"{domain}.patients"] = s.meta["patient_id"].nunique()
    for split, n in source_images.meta["split"].value_counts().items():
        metrics[f"source.split.{split}"] = n
    metrics["target.centers"] = target_images.meta["center"].nunique()
    for c, n in lora_subset.meta["label"].value_counts().items():
        metrics[f"lora_subset.{c}"] = n
    return {k: {"value": float(v), "step": 0} for k, v in sorted(metrics.items())}


def _spread(meta: pd.DataFrame, idx: np.ndarray, by: str, n: int) -> list[int]:
    # round-robin over centers/machines so the grid shows every acquisition setting
    groups = [list(idx[meta.loc[idx, by].to_numpy() == g]) for g in sorted(meta.loc[idx, by].unique())]
    out: list[int] = []
    while len(out) < n and any(groups):
        for g in groups:
            if g and len(out) < n:
                out.append(g.pop(0))
    return out


def plot_preview_grid(source_images: ImageSet, target_images: ImageSet,
                      ingestion: dict[str, Any]) -> Figure:
    """A grid, one row per class: ``preview.per_class`` source images (left, spread over
    machines) and as many target images (right, spread over centers), titled with their
    machine/center. Returns the matplotlib ``Figure`` (versioned PNG, also logged to MLflow)."""
    n = IngestionParams.from_any(ingestion).preview.per_class
    fig = Figure(figsize=(1.6 * 2 * n + 0.6, 1.75 * len(CLASSES) + 0.6), dpi=100)
    axes = fig.subplots(len(CLASSES), 2 * n, squeeze=False)
    for r, c in enumerate(CLASSES):
        for d, (s, by) in enumerate(((source_images, "machine"), (target_images, "center"))):
            idx = np.flatnonzero(s.meta["label"].to_numpy() == c)
            picks = _spread(s.meta, idx, by, n)
            for k in range(n):
                ax = axes[r, d * n + k]
                ax.set_xticks([])
                ax.set_yticks([])
                if k < len(picks):
                    ax.imshow(s.images[picks[k]], cmap="gray", vmin=0, vmax=255)
                    ax.set_title(str(s.meta.loc[picks[k], by])[:16], fontsize=7)
                else:
                    ax.set_facecolor("#f0e0e0")
                    ax.text(0.5, 0.5, "none", ha="center", va="center", fontsize=8, transform=ax.transAxes)
                if k == 0 and d == 0:
                    ax.set_ylabel(c, fontsize=11)
    fig.text(0.27, 0.985, f"source ({source_images.info.get('format', '?')})", ha="center", va="top", fontsize=12)
    fig.text(0.75, 0.985, f"target ({target_images.info.get('format', '?')})", ha="center", va="top", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return fig
