"""Every resampling of the evaluation: patients, classifier seeds and generator replicates drawn
with replacement, and percentile intervals.

The unit of the target is the patient (``center::patient_id``, :func:`patient_keys`): a
drawn patient brings all of its images, so intervals reflect the number of patients, not of
images. Users:

* ``metrics.py`` (``zero_shot_metrics.json``): one set of patient resamples shared by every
  classifier (:func:`bootstrap_patient_indices`), the hierarchical resample of a (paired) mean
  over replicates, seeds and those patient draws (:func:`hierarchical_resample`), and per
  target center the patient totals (:func:`group_totals`) with multinomial patient weights
  (:func:`patient_weights`);
* ``quality.py`` and ``nodes.py`` (fidelity, CAS and their real-image references in
  ``synthetic_quality.json``): the seed × image interval (:func:`seed_item_interval`).

Each user seeds its own generator, and the order of the draws is part of every number made
from them: a change here changes saved results.
"""
from __future__ import annotations

import numpy as np
import pandas as pd


def patient_keys(frame: pd.DataFrame) -> np.ndarray:
    """One key per row naming its patient; patient ids are only unique within a center."""
    return (frame["center"].astype(str) + "::" + frame["patient_id"].astype(str)).to_numpy()


def draw_groups(rng: np.random.Generator, n_groups: int) -> np.ndarray:
    """One bootstrap draw: ``n_groups`` group indices, with replacement."""
    return rng.integers(0, n_groups, size=n_groups)


def group_totals(values: np.ndarray, groups: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per group (e.g. patient): the sum of every column of ``values`` over its items, and its item count.

    Args:
        values: ``(n_items, ...)`` scores per item (trailing axes: one score per classifier).
        groups: ``(n_items,)`` the group of each item.

    Returns:
        (sorted group keys, ``(n_groups, ...)`` sums, ``(n_groups,)`` item counts as floats).
    """
    uniq, inverse = np.unique(np.asarray(groups), return_inverse=True)
    values = np.asarray(values, dtype=float)
    columns = values.reshape(len(inverse), -1).T
    sums = np.stack([np.bincount(inverse, weights=col, minlength=len(uniq)) for col in columns], axis=1)
    counts = np.bincount(inverse, minlength=len(uniq)).astype(float)
    return uniq, sums.reshape(len(uniq), *values.shape[1:]), counts


def patient_weights(rng: np.random.Generator, n_groups: int, n_boot: int) -> np.ndarray:
    """``(n_boot, n_groups)``: how often each group is drawn in each of ``n_boot`` resamples (as floats)."""
    return rng.multinomial(n_groups, np.full(n_groups, 1.0 / n_groups), size=n_boot).astype(float)


def bootstrap_patient_indices(keys: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """Row indices of ``n_boot`` cluster-bootstrap resamples: patients drawn with replacement.

    Each resample draws as many patients as there are, with replacement, and takes every row
    of each drawn patient (a patient drawn twice contributes its rows twice), so images of
    one patient stay together and intervals reflect the number of patients, not images.
    """
    uniq, inverse = np.unique(keys, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == i) for i in range(len(uniq))]
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n_boot):
        picked = draw_groups(rng, len(uniq))
        out.append(np.concatenate([rows_of[p] for p in picked]))
    return out


def hierarchical_resample(
    values_a: np.ndarray, values_b: np.ndarray | None, n_boot: int, rng: np.random.Generator
) -> np.ndarray:
    """Hierarchical bootstrap of a (paired) mean: generator replicates -> seeds -> test patients.

    Args:
        values_a: ``(B, K, S)`` metric of arm A's classifier (replicate k, seed s) on patient
            resample b (the same patient draws for every classifier).
        values_b: ``(B, S)`` the paired arm's classifier of seed s on the same patient
            resamples (the baseline does not depend on the synthetic batch), or ``None``
            for the interval of arm A alone.
        n_boot: number of outer resamples; resample i uses patient draw ``i % B``.
        rng: draws the replicates and seeds.

    Returns:
        ``(n_boot,)``: per resample, K replicates drawn with replacement, within each drawn
        replicate S seeds drawn with replacement, one shared patient draw, and the mean over
        the drawn (replicate, seed) cells of ``A - B`` (``A`` if ``values_b`` is None). Arm B
        is paired with A through the seed: it uses exactly the seeds drawn for A.
    """
    n_patient_draws, k, s = values_a.shape
    reps = rng.integers(0, k, size=(n_boot, k))
    seeds = rng.integers(0, s, size=(n_boot, k, s))
    b = np.arange(n_boot) % n_patient_draws
    cells = values_a[b[:, None, None], reps[:, :, None], seeds]  # (n_boot, k, s)
    if values_b is not None:
        cells = cells - values_b[b[:, None, None], seeds]
    return cells.reshape(n_boot, -1).mean(axis=1)


def seed_item_interval(
    correct: np.ndarray, groups: np.ndarray | None, n_boot: int, seed: int, ci: float = 0.95
) -> list[float]:
    """Percentile interval of a mean score over classifier seeds and images, by two-level bootstrap.

    ``correct``: ``(n_seeds, n_items)`` scores (e.g. 1 = right). Each resample draws seeds
    with replacement and, independently, items with replacement (whole ``groups`` — e.g.
    patients — together when given); the statistic is the mean over the drawn cells.
    """
    correct = np.asarray(correct, dtype=float)
    rng = np.random.default_rng([seed, 3])
    n_seeds, n_items = correct.shape
    # per group and seed: (sum, count), so a drawn group contributes all its items
    uniq, sums, counts = group_totals(correct.T, np.arange(n_items) if groups is None else groups)
    sums = np.ascontiguousarray(sums.T)  # (n_seeds, n_groups)
    stats = np.empty(n_boot)
    for b in range(n_boot):
        s = draw_groups(rng, n_seeds)
        g = np.bincount(draw_groups(rng, len(uniq)), minlength=len(uniq))  # times each group is drawn
        stats[b] = (sums[s] @ g).sum() / (n_seeds * (counts @ g))
    return percentile_interval(stats, (1.0 - ci) / 2.0)


def percentile_interval(values: np.ndarray, alpha: float) -> list[float]:
    """Percentile interval ``[alpha, 1 - alpha]``; resamples where a metric is undefined (NaN) are left out."""
    values = values[np.isfinite(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))]
