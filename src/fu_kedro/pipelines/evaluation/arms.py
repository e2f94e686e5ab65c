"""Training arms as data: what real and what synthetic images each arm trains on (``evaluation.arms``),
and the comparisons to report (``evaluation.comparisons``).

An arm names its real images and its synthetic images, nothing else: every other part of a
classifier's training (schedule, batches of real images, augmentation draws of the real
images, the batch-norm calibration images, seeds) is the same in every arm (see
``fu_kedro.classifiers.sampling`` for the batching rule).

``real``:
  ``all``                          every source-train image;
  ``{balanced_per_class: N}``      N images of every class, drawn by patient with the project
                                   seed (patients in one seeded order; a class takes the
                                   images of each patient in turn until it has N). ``N: null``
                                   (or the string ``balanced``) = as large as the smallest
                                   class of the source-train split allows;
  ``{csv: path}``                  the source-train images named in the CSV's ``Image_name``
                                   column (e.g. the FU-LoRA authors' ``spain_train_1150_balanced.csv``);
                                   listed images that are not in the data, or are held out as
                                   source validation, are counted and reported, never trained on.
``synthetic``:
  ``none`` | ``{per_class: N}`` (``null``, or the string ``all``: as many as the smallest class
  of a replicate has)
  | ``{ratio: r}`` (r x the arm's real images). The class split of that number follows
  ``evaluation.synthetic_class_mix``: ``uniform`` (as the paper) or ``real_prior`` (the
  class shares of the source-train split, the same for every arm). The images are the first
  of one seeded order per class (the classifier seed): two arms asking for the same numbers
  get the same synthetic images.

The string forms (``balanced``, ``all``) are what ``conf/base`` uses, so that an env can replace
them with a mapping (``{csv: path}``, ``{per_class: 1000}``): the envs merge soft, and a mapping
merged over a mapping would keep both keys. The forms are checked by the block's schema
(:class:`.params.ArmParams`) before any node runs; :func:`parse_arms` only reads them.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from fu_kedro.classifiers import TensorSet

from .params import ArmParams, BalancedReal, CsvReal, EvaluationParams, PerClassSynthetic


@dataclass(frozen=True)
class Arm:
    """One training arm: a name, its real images and its synthetic images (see module docstring)."""

    name: str
    label: str
    real: str                   # all | balanced | csv
    balanced_per_class: int | None = None
    csv: str | None = None
    synthetic: str = "none"     # none | per_class | ratio
    synthetic_value: float | None = None  # per_class N (None: smallest class) or the ratio

    @property
    def has_synthetic(self) -> bool:
        return self.synthetic != "none"

    def describe_real(self) -> str:
        if self.real == "all":
            return "all source-train images"
        if self.real == "balanced":
            n = "as many as the smallest class allows" if self.balanced_per_class is None else self.balanced_per_class
            return f"class-balanced, {n} per class, drawn by patient"
        return f"the source-train images named in {self.csv}"

    def describe_synthetic(self) -> str:
        if self.synthetic == "none":
            return "none"
        if self.synthetic == "per_class":
            v = self.synthetic_value
            return f"{'all of a replicate' if v is None else int(v)} per class"
        return f"{self.synthetic_value:g} x the arm's real images"

    def spec(self) -> dict[str, Any]:
        """What the plan records about the arm (JSON-ready)."""
        return {"arm_label": self.label, "real_rule": self.describe_real(), "synthetic_rule": self.describe_synthetic()}


def _arm(name: str, spec: ArmParams) -> Arm:
    """The :class:`Arm` an arm's validated block describes."""
    fields: dict[str, Any] = {"name": str(name), "label": spec.label or str(name)}
    real, syn = spec.real, spec.synthetic
    if isinstance(real, BalancedReal):
        fields.update(real="balanced", balanced_per_class=real.balanced_per_class)
    elif isinstance(real, CsvReal):
        fields.update(real="csv", csv=real.csv)
    else:  # all | balanced (= {balanced_per_class: null})
        fields.update(real=real, balanced_per_class=None)
    if syn in ("none", None):
        fields["synthetic"] = "none"
    elif syn == "all":
        fields.update(synthetic="per_class", synthetic_value=None)
    elif isinstance(syn, PerClassSynthetic):
        fields.update(synthetic="per_class", synthetic_value=syn.per_class)
    else:
        fields.update(synthetic="ratio", synthetic_value=float(syn.ratio))
    return Arm(**fields)


def parse_arms(params: dict | EvaluationParams) -> list[Arm]:
    """``evaluation.arms``, in their order (``params``: the ``evaluation`` block)."""
    return [_arm(name, spec) for name, spec in EvaluationParams.from_any(params).arms.items()]


def parse_comparisons(params: dict | EvaluationParams) -> list[tuple[str, str]]:
    """``evaluation.comparisons``: ``[arm, minus arm]`` pairs of named arms (null: every arm minus the first)."""
    cfg = EvaluationParams.from_any(params)
    if cfg.comparisons is None:
        names = list(cfg.arms)
        return [(n, names[0]) for n in names[1:]]
    return [(str(a), str(b)) for a, b in cfg.comparisons]


# --------------------------------------------------------------------------- real images
def read_image_list(path: str, where: str) -> set[str]:
    """The ``Image_name`` column of a split list (comma-separated, UTF-8 with or without BOM)."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{where}: the image list {path} does not exist (resolved {file.resolve()})")
    table = pd.read_csv(file, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    if "Image_name" not in table.columns:
        raise ValueError(f"{where}: {path} has no Image_name column (columns: {list(table.columns)})")
    return set(table["Image_name"].str.strip()) - {""}


def _balanced(train: TensorSet, per_class: int | None, seed: int, where: str) -> np.ndarray:
    labels = train.labels.numpy()
    classes, counts = np.unique(labels, return_counts=True)
    n = int(counts.min()) if per_class is None else int(per_class)
    if n > counts.min():
        small = int(classes[counts.argmin()])
        raise ValueError(f"{where}: {n} per class, but source train has only {counts.min()} images of class index "
                         f"{small}; use balanced_per_class: null (as many as the smallest class allows)")
    patients = train.meta["patient_id"].astype(str).to_numpy()
    order = np.random.default_rng([int(seed), 23]).permutation(np.unique(patients))
    rank = {p: i for i, p in enumerate(order)}
    ids = train.meta["image_id"].astype(str).to_numpy()
    # images sorted by (the patient's place in the seeded order, image id): a class takes them in turn
    walk = sorted(range(len(labels)), key=lambda i: (rank[patients[i]], ids[i]))
    picked = [i for c in classes for i in [j for j in walk if labels[j] == c][:n]]
    return np.sort(np.asarray(picked, dtype=int))


def real_positions(arm: Arm, train: TensorSet, seed: int, val: TensorSet | None = None) -> tuple[np.ndarray, dict]:
    """Positions in ``train`` (source train) of the arm's real images, and what the rule found."""
    where = f"evaluation.arms.{arm.name}.real"
    if arm.real == "all":
        return np.arange(len(train)), {}
    if arm.real == "balanced":
        pos = _balanced(train, arm.balanced_per_class, seed, where)
        return pos, {"balanced_per_class": int(len(pos) // max(1, len(np.unique(train.labels.numpy()))))}
    listed = read_image_list(arm.csv, where)
    ids = train.meta["image_id"].astype(str)
    pos = np.flatnonzero(ids.isin(listed).to_numpy())
    in_val = int(val.meta["image_id"].astype(str).isin(listed).sum()) if val is not None else 0
    if not len(pos):
        raise ValueError(f"{where}: none of the {len(listed)} images named in {arm.csv} is in the source train "
                         f"split ({in_val} are source-validation images)")
    return pos, {"csv": arm.csv, "csv_listed": len(listed), "csv_in_source_train": int(len(pos)),
                 "csv_in_source_val": in_val}


def calibration_pool(arms: list[Arm], train: TensorSet, seed: int) -> np.ndarray:
    """Positions of the real images every arm trains on (the intersection of the arms' real images):
    batch-norm statistics are re-estimated on these, the same images for every arm."""
    common = None
    for arm in arms:
        pos = set(real_positions(arm, train, seed)[0].tolist())
        common = pos if common is None else common & pos
    if not common:
        raise ValueError("evaluation.arms: no real image is in every arm, so batch-norm statistics cannot come "
                         "from the same real images for every arm (set evaluation.train.bn_recalibration_images: 0)")
    return np.asarray(sorted(common), dtype=int)


def ids_digest(ids) -> str:
    """A short hash of a set of image ids (the plan's record of which real images an arm has)."""
    return hashlib.sha256("\n".join(sorted(map(str, ids))).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- synthetic images
def synthetic_quota(arm: Arm, n_real: int, replicate_labels: np.ndarray, prior: dict[int, float],
                    mix: str) -> dict[int, int]:
    """Class index -> how many synthetic images the arm takes from one replicate."""
    if not arm.has_synthetic:
        return {}
    classes, counts = np.unique(replicate_labels, return_counts=True)
    if arm.synthetic == "per_class":
        per = int(counts.min()) if arm.synthetic_value is None else int(arm.synthetic_value)
        total = per * len(classes)
    else:
        total = int(round(arm.synthetic_value * n_real))
    if mix == "uniform":
        shares = np.full(len(classes), 1.0 / len(classes))
    else:
        shares = np.array([prior.get(int(c), 0.0) for c in classes])
        shares = shares / shares.sum()
    raw = shares * total
    quota = np.floor(raw).astype(int)
    quota[np.argsort(-(raw - quota), kind="stable")[: total - quota.sum()]] += 1
    short = [(int(c), int(q), int(k)) for c, q, k in zip(classes, quota, counts) if q > k]
    if short:
        c, q, k = short[0]
        raise ValueError(f"evaluation.arms.{arm.name}.synthetic ({arm.describe_synthetic()}, {mix} class mix) needs "
                         f"{q} synthetic images of class index {c}; a replicate of the batch has {k}")
    return {int(c): int(q) for c, q in zip(classes, quota)}


def synthetic_positions(replicate: TensorSet, quota: dict[int, int], seed: int) -> np.ndarray:
    """The first ``quota[c]`` images of class c in one seeded order per class (nested: a smaller
    quota takes a prefix of a larger one; the same quota gives the same images in every arm)."""
    labels = replicate.labels.numpy()
    picked = []
    for c, q in sorted(quota.items()):
        idx = np.flatnonzero(labels == c)
        picked.append(idx[np.random.default_rng([int(seed), int(c)]).permutation(len(idx))[:q]])
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, int)
