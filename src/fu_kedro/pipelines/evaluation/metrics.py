"""Zero-shot classification metrics, patient-level bootstrap, and the per-experiment summary.

Everything here works from a predictions table alone (one row per experiment, seed and
target image, with ``label``, ``prediction`` and one ``prob_<class>`` column per source
class), so every figure in ``zero_shot_metrics.json`` can be recomputed from
``zero_shot_predictions.csv``. The arithmetic is scikit-learn's; this module only decides
which labels, which rows and which columns go in. The patient bootstrap computes the same
metrics from weighted counts, every resample at once (:func:`_bootstrap`; checked against
scikit-learn on resampled rows).

Every resampling (patients, seeds, replicates) is :mod:`.bootstrap`'s.

Two protocols:

* ``all_classes`` (the paper's): the prediction is the argmax over all source classes
  (with ``other``); predicting a class the target does not have (``other``) is an error.
  Macro/weighted averages run over the classes present in the target labels.
* ``target_classes``: the argmax over the target's classes only (probabilities
  renormalised over them), i.e. the classifier is told which classes can occur.
"""
from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pandas as pd
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
)
from sklearn.dummy import DummyClassifier

from .bootstrap import (
    bootstrap_patient_indices,
    group_totals,
    hierarchical_resample,
    patient_keys,
    patient_weights,
    percentile_interval,
)

PROTOCOLS = ("all_classes", "target_classes")
GROUP_COLUMNS = ["experiment", "backbone", "augmentation"]
# Metrics that get a bootstrap interval and a hybrid - baseline difference.
BOOTSTRAP_METRICS = (
    "accuracy",
    "precision_macro",
    "recall_macro",
    "f1_macro",
    "roc_auc_macro",
    "auc_hard_label",
)

# What ``ci`` of a difference (and of an arm) is; the hierarchical percentile bootstrap is kept beside it
# (``ci_hierarchical_bootstrap``) for comparison: with 5 seeds it is too narrow.
INTERVAL_METHOD = ("estimate ± t(Welch-Satterthwaite df) · SE; SE² = seed²/S (per-seed differences averaged over "
                   "replicates, S - 1 df) + replicate²/K (crossed seed × replicate ANOVA, K - 1 df) + patients² "
                   "(patient bootstrap of the classifier-averaged difference)")


def prob_columns(classes: list[str]) -> list[str]:
    """Names of the probability columns, ``prob_<class>``, in class order."""
    return [f"prob_{c}" for c in classes]


def experiment_key(experiment: str, backbone: str, augmentation: bool) -> str:
    """The one string that names an experiment configuration in JSON and MLflow keys."""
    return f"{experiment}/{backbone}/{'aug' if _as_bool(augmentation) else 'noaug'}"


def _as_bool(value: Any) -> bool:
    if isinstance(value, str):
        if value.lower() in ("true", "1"):
            return True
        if value.lower() in ("false", "0"):
            return False
        raise ValueError(f"augmentation value {value!r} is not a boolean")
    return bool(value)


def _codes(labels: np.ndarray, classes: list[str]) -> np.ndarray:
    """Class names -> integer codes (index in ``classes``; -1 for a name outside it).

    scikit-learn is several times faster on integers than on object arrays, which matters
    for the bootstrap.
    """
    return pd.Categorical(np.asarray(labels, dtype=object), categories=list(classes)).codes.astype(np.int64)


def classification_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, proba: np.ndarray, proba_classes: list[str], eval_classes: list[str]
) -> dict[str, float]:
    """Accuracy, balanced accuracy, precision/recall/F1 (macro, weighted), ROC-AUC, hard-label AUC.

    Args:
        y_true: true class names, shape (N,).
        y_pred: predicted class names, shape (N,); may contain classes outside ``eval_classes``
            (they count as errors).
        proba: class probabilities (N, len(proba_classes)).
        proba_classes: class of each ``proba`` column.
        eval_classes: classes averaged over (macro/weighted) and scored one-vs-rest for AUC;
            only those present in ``y_true`` are used, since a class without positives has
            no recall and no ROC curve.

    Returns:
        dict of floats. ``roc_auc_macro`` is the macro mean of one-vs-rest ROC-AUCs from the
        probabilities; ``auc_hard_label`` is the same computed from one-hot predictions (the
        FU-LoRA notebook's AUC), kept for comparison with the paper.
    """
    space = list(dict.fromkeys(list(proba_classes) + list(eval_classes) + sorted(set(map(str, y_pred)))))
    t, p = _codes(y_true, space), _codes(y_pred, space)
    present = [space.index(c) for c in eval_classes if np.any(t == space.index(c))]
    cols = [list(proba_classes).index(space[c]) for c in present]
    out: dict[str, float] = {"n_images": int(len(t))}
    with warnings.catch_warnings():
        # predicting a class the labels do not contain (``other`` on the target) is expected
        warnings.filterwarnings("ignore", message="y_pred contains classes not in y_true")
        out.update(_core_metrics(t, p, np.asarray(proba)[:, cols], present, full=True))
    return out


def _core_metrics(t: np.ndarray, p: np.ndarray, proba_present: np.ndarray, present: list[int], full: bool) -> dict:
    """The metrics on integer codes; ``proba_present`` holds the columns of the ``present`` classes.

    ``full=False`` skips balanced accuracy and the weighted averages.
    """
    out = {"accuracy": float(accuracy_score(t, p))}
    if full:
        out["balanced_accuracy"] = float(balanced_accuracy_score(t, p))
    for average in ("macro", "weighted") if full else ("macro",):
        pr, rc, f, _ = precision_recall_fscore_support(t, p, labels=present, average=average, zero_division=0)
        out[f"precision_{average}"] = float(pr)
        out[f"recall_{average}"] = float(rc)
        out[f"f1_{average}"] = float(f)
    if len(present) >= 2:
        # one indicator column per present class; label_binarize would return a single column
        # for two classes (a center or a resample with two planes), which roc_auc_score rejects
        onehot_true = _indicators(t, present)
        out["roc_auc_macro"] = float(roc_auc_score(onehot_true, proba_present, average="macro"))
        out["auc_hard_label"] = float(roc_auc_score(onehot_true, _indicators(p, present), average="macro"))
    else:  # one class only: a ROC curve needs negatives
        out["roc_auc_macro"] = float("nan")
        out["auc_hard_label"] = float("nan")
    return out


def _indicators(codes: np.ndarray, present: list[int]) -> np.ndarray:
    """``(N, len(present))`` 0/1 matrix: row i has a 1 in the column of its class (one-vs-rest labels)."""
    return (np.asarray(codes)[:, None] == np.asarray(present)[None, :]).astype(np.int64)


def protocol_predictions(
    frame: pd.DataFrame, classes: list[str], target_classes: list[str], protocol: str
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Predictions and probabilities of one protocol from a predictions table.

    ``all_classes`` uses the ``prediction`` column and every ``prob_<class>`` column;
    ``target_classes`` takes the argmax over the target's class columns, renormalised.
    Returns (predicted labels, probabilities, their column classes).
    """
    proba = frame[prob_columns(classes)].to_numpy(dtype=np.float64)
    if protocol == "all_classes":
        return frame["prediction"].to_numpy(dtype=object), proba, list(classes)
    if protocol == "target_classes":
        cols = [classes.index(c) for c in target_classes]
        sub = proba[:, cols]
        sub = sub / np.clip(sub.sum(axis=1, keepdims=True), 1e-12, None)
        pred = np.asarray(target_classes, dtype=object)[sub.argmax(axis=1)]
        return pred, sub, list(target_classes)
    raise ValueError(f"unknown protocol {protocol!r}; expected one of {PROTOCOLS}")


def _check_predictions(pred: pd.DataFrame, classes: list[str]) -> None:
    needed = GROUP_COLUMNS + ["seed", "image_id", "patient_id", "center", "label", "prediction"] + prob_columns(
        classes
    )
    missing = [c for c in needed if c not in pred.columns]
    if missing:
        raise ValueError(f"zero-shot predictions table lacks columns {missing}")
    unknown = sorted(set(pred["label"]) - set(classes))
    if unknown:
        raise ValueError(f"target labels {unknown} are not in the classifier's label space {classes}")


def _mean_sd(per_seed: list[dict[str, float]]) -> tuple[dict, dict]:
    df = pd.DataFrame(per_seed)
    # ddof=1: the spread of a metric over independent training seeds
    sd = df.std(ddof=1) if len(df) > 1 else df.iloc[0] * 0.0
    return {k: float(v) for k, v in df.mean().items()}, {k: float(v) for k, v in sd.items()}


RUN_COLUMNS = ["replicate", "seed"]


def _runs_of(frame: pd.DataFrame) -> list[tuple[int, int, pd.DataFrame]]:
    """(replicate, seed, rows) of every classifier in one configuration, rows sorted by image id."""
    out = []
    for (r, s), sub in frame.groupby(RUN_COLUMNS, sort=True):
        out.append((int(r), int(s), sub.sort_values("image_id").reset_index(drop=True)))
    return out


def paired_seed_test(per_seed_difference: dict[str, float]) -> dict[str, Any]:
    """Paired tests of per-seed differences (arm - baseline, same seed): t-test and Wilcoxon signed-rank.

    The Wilcoxon test drops zero differences (scipy's ``zero_method="wilcox"``), so its
    floor is set by the ``n_nonzero`` differences it ranks: the exact two-sided p-value cannot
    go below ``2 / 2**n_nonzero`` (0.0625 with 5 non-zero differences, 0.125 with 4).
    """
    from scipy import stats

    d = np.array([v for v in per_seed_difference.values() if v is not None and np.isfinite(v)], dtype=float)
    nonzero = int(np.count_nonzero(d))
    out: dict[str, Any] = {"n_seeds": int(len(d)), "mean": float(d.mean()) if len(d) else None,
                           "sd": float(d.std(ddof=1)) if len(d) > 1 else None,
                           "n_positive": int((d > 0).sum()), "n_nonzero": nonzero, "t_test": None, "wilcoxon": None}
    if len(d) >= 2 and np.ptp(d) > 0:
        t = stats.ttest_1samp(d, 0.0)
        out["t_test"] = {"statistic": float(t.statistic), "df": int(len(d) - 1), "p_value": float(t.pvalue)}
    if nonzero >= 1:
        w = stats.wilcoxon(d, zero_method="wilcox")
        out["wilcoxon"] = {"statistic": float(w.statistic), "p_value": float(w.pvalue), "n_nonzero": nonzero,
                           "smallest_possible_p": float(2.0 / 2 ** nonzero)}
    return out


def per_class_recall(y_true: np.ndarray, y_pred: np.ndarray, target_classes: list[str]) -> dict[str, float]:
    """Recall of every target class (sklearn ``recall_score``, ``average=None``)."""
    values = recall_score(y_true, y_pred, labels=target_classes, average=None, zero_division=0)
    return {c: float(v) for c, v in zip(target_classes, values)}


def reference_scores(frame: pd.DataFrame, classes: list[str], target_classes: list[str], seed: int,
                     n_draws: int = 100) -> dict:
    """Scores of predictors that never look at the image, on the target (all-class protocol).

    ``majority``: always the target's most frequent class (it knows the target's class
    balance: the floor a classifier must beat); ``uniform``: a uniform guess over the source
    classes, averaged over ``n_draws`` draws. Both are ``sklearn.dummy.DummyClassifier``;
    their constant probabilities give a ROC-AUC of 0.5 by definition.
    """
    y = frame["label"].to_numpy(dtype=object)
    x = np.zeros((len(y), 1))
    majority = DummyClassifier(strategy="most_frequent").fit(x, y)
    guesses = [
        DummyClassifier(strategy="uniform", random_state=seed + i).fit(np.zeros((len(classes), 1)), classes).predict(x)
        for i in range(n_draws)
    ]
    out = {}
    for name, preds in (("majority", [majority.predict(x)]), ("uniform", guesses)):
        rows = []
        for p in preds:
            pr, rc, f, _ = precision_recall_fscore_support(y, p, labels=target_classes, zero_division=0)
            rows.append({"accuracy": accuracy_score(y, p), "precision_macro": pr.mean(), "recall_macro": rc.mean(),
                         "f1_macro": f.mean(), **{f"recall_{c}": v for c, v in zip(target_classes, rc)}})
        mean = pd.DataFrame(rows).mean()
        out[name] = {k: float(v) for k, v in mean.items() if not k.startswith("recall_") or k == "recall_macro"}
        out[name]["roc_auc_macro"] = out[name]["auc_hard_label"] = 0.5
        out[name]["per_class_recall"] = {c: float(mean[f"recall_{c}"]) for c in target_classes}
    out["majority"]["predicts"] = str(majority.predict(x[:1])[0])
    out["uniform"]["predicts"] = "uniform over " + ", ".join(classes)
    return out


def summarise_zero_shot(
    predictions: pd.DataFrame,
    classes: list[str],
    n_bootstrap: int,
    ci: float,
    seed: int,
    baseline: str = "baseline",
    replicate_fits: bool = False,
    comparisons: list[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """All zero-shot metrics of every experiment, with intervals and differences to the baseline.

    Args:
        predictions: the predictions table (see module docstring); an optional ``replicate``
            column names the synthetic-batch replicate a classifier was trained with (-1 or
            absent: none). Every classifier must predict the same target images.
        classes: the classifier's (source) label space, in ``prob_<class>`` column order.
        n_bootstrap: bootstrap resamples (0 = no intervals).
        ci: interval coverage, e.g. 0.95.
        seed: seed of the bootstrap resampling.
        baseline: without ``comparisons``: the arm every other arm is compared with.
        comparisons: ``[(arm, minus arm), ...]``: the differences to compute, for every
            backbone and augmentation both arms have (any arm minus any arm; see
            :func:`compare_arms`).
        replicate_fits: the synthetic replicates come from independent LoRA fits
            (``synthesis.adapter_per_replicate``), not only independent sampling seeds of one
            adapter: ``bootstrap.conditional_on`` says the interval covers the fits too.

    Returns:
        JSON-ready dict: ``experiments[<key>]`` with, per protocol, ``per_seed`` (mean over
        replicates), ``mean`` (over all classifiers), ``sd`` (over seeds),
        ``per_class_recall``, ``ci`` (t interval over seeds, replicates and patients;
        all_classes only), ``ci_test_patients_only`` (classifiers fixed),
        ``confusion_matrix`` (summed over classifiers; rows true, columns predicted),
        ``per_center``; ``differences[<key>]`` = experiment - baseline of the same backbone
        and augmentation, paired by seed, with the t interval, the power plan, per-seed
        differences, a paired test and variance components; ``reference`` = majority-class
        and uniform-guess scores.
    """
    pred, runs, reference = _runs_by_experiment(predictions, classes)
    target_classes = [c for c in classes if c in set(pred["label"])]
    boot_idx = bootstrap_patient_indices(patient_keys(reference), n_bootstrap, seed) if n_bootstrap else []
    alpha = (1.0 - ci) / 2.0
    n_reps = max([len({r for r, _, _ in v if r >= 0}) for v in runs.values()] + [0])
    result: dict[str, Any] = {
        "classes": list(classes),
        "target_classes": target_classes,
        "n_target_images": int(len(reference)),
        "n_target_patients": int(len(np.unique(patient_keys(reference)))),
        "bootstrap": _bootstrap_description(n_bootstrap, ci, seed, n_reps, replicate_fits),
        "reference": reference_scores(reference, classes, target_classes, seed),
        "experiments": {},
        "differences": {},
    }
    cubes: dict[tuple[str, str], np.ndarray] = {}  # (key, metric) -> (B, K, S)
    for (experiment, backbone, aug), key in _experiment_names(pred):
        entry, cube = _experiment_entry(experiment, backbone, aug, runs[key], classes, target_classes,
                                        boot_idx, n_bootstrap, alpha, seed)
        cubes.update({(key, m): c for m, c in cube.items()})
        result["experiments"][key] = entry
    if comparisons is None:
        comparisons = [(e["experiment"], baseline) for e in result["experiments"].values() if e["experiment"] != baseline]
        comparisons = list(dict.fromkeys(comparisons))
    for arm, minus in comparisons:
        for key, entry in list(result["experiments"].items()):
            base_key = experiment_key(minus, entry["backbone"], entry["augmentation"])
            if entry["experiment"] == arm and base_key in result["experiments"]:
                diff = compare_arms(key, base_key, result["experiments"], cubes, n_bootstrap, alpha, seed)
                diff["comparison"] = [arm, minus]
                diff["per_center"] = center_differences(runs[key], runs[base_key], classes, target_classes,
                                                        n_bootstrap, alpha, seed)
                result["differences"][f"{key} - {base_key}"] = diff
    return result


def compare_arms(key: str, base_key: str, experiments: dict, cubes: dict, n_bootstrap: int, alpha: float,
                 seed: int) -> dict[str, Any]:
    """``key`` minus ``base_key`` (same backbone and augmentation), paired by seed, whatever synthetic
    images either has.

    A real-only ``base_key`` (no replicates) pairs with every replicate of ``key``
    (:func:`_difference` as it is). Two arms with the same synthetic replicates pair by
    (replicate, seed): their difference cube ``A - B`` goes through the same resampling against
    a zero arm. A real-only ``key`` minus an arm with replicates is the negated reverse.
    """
    reps_a, reps_b = experiments[key]["replicates"], experiments[base_key]["replicates"]
    if not reps_b:
        return _difference(key, base_key, experiments, cubes, n_bootstrap, alpha, seed)
    if not reps_a:
        return _negated(compare_arms(base_key, key, experiments, cubes, n_bootstrap, alpha, seed), key, base_key)
    if reps_a != reps_b:
        raise ValueError(f"{key} - {base_key}: the arms have different synthetic replicates ({reps_a} vs {reps_b}); "
                         "two arms with synthetic images are paired by replicate and seed")
    paired = {}
    for (k, m), cube in cubes.items():
        if k == key and (base_key, m) in cubes:
            paired[(key, m)] = cube - cubes[(base_key, m)]
            paired[(base_key, m)] = np.zeros((cube.shape[0], 1, cube.shape[2]))
    diff = _difference(key, base_key, experiments, paired, n_bootstrap, alpha, seed)
    diff["paired_by"] = "replicate and seed"
    return diff


def _negated(diff: dict[str, Any], key: str, base_key: str) -> dict[str, Any]:
    """``B - A`` from ``A - B``: means, per-seed values and intervals change sign; spreads stay."""
    def flip(d):
        out = dict(d, mean=-d["mean"], per_seed={s: -v for s, v in d["per_seed"].items()})
        for name in ("ci", "ci_hierarchical_bootstrap", "ci_test_patients_only"):
            if name in d:
                out[name] = [-d[name][1], -d[name][0]]
        if "paired_test" in d:
            out["paired_test"] = paired_seed_test(out["per_seed"])
        return out

    return {**diff, "experiment": key, "baseline": base_key,
            **{p: {m: flip(v) for m, v in diff[p].items()} for p in PROTOCOLS}}


def center_differences(runs_a: list, runs_b: list, classes: list[str], target_classes: list[str], n_bootstrap: int,
                       alpha: float, seed: int) -> dict[str, Any]:
    """Per target center: accuracy of arm A minus arm B (paper protocol), paired as :func:`compare_arms`,
    with the t interval over replicates, seeds and the center's patients (the hierarchical bootstrap beside it)."""
    del target_classes  # accuracy under the paper protocol: argmax over all source classes
    out: dict[str, Any] = {}
    frame = runs_a[0][2]
    centers = frame["center"].astype(str).to_numpy()
    patients = patient_keys(frame)

    def cube(runs):  # (images, K, S) correct, in (replicate, seed) order
        reps = sorted({r for r, _, _ in runs})
        seeds = sorted({s for _, s, _ in runs})
        cell = {(r, s): (f["prediction"].astype(str) == f["label"].astype(str)).to_numpy(float) for r, s, f in runs}
        return np.stack([np.stack([cell[(r, s)] for s in seeds], axis=1) for r in reps], axis=1), reps, seeds

    a, reps_a, seeds_a = cube(runs_a)
    b, reps_b, seeds_b = cube(runs_b)
    if seeds_a != seeds_b or (reps_a != reps_b and -1 not in reps_a + reps_b):
        return out
    rng = np.random.default_rng([seed, 3])
    for center in sorted(set(centers)):
        sel = centers == center
        pats, sums_a, n_img = group_totals(a[sel], patients[sel])  # per patient: (K, S) sums, images
        _, sums_b, _ = group_totals(b[sel], patients[sel])
        acc_a, acc_b = sums_a.sum(0) / n_img.sum(), sums_b.sum(0) / n_img.sum()  # (K, S)
        diff_ks = acc_a - acc_b  # broadcasts a real-only arm (K = 1) over the other's replicates
        entry: dict[str, Any] = {"n_images": int(sel.sum()), "n_patients": int(len(pats)),
                                 "accuracy": {"mean": float(diff_ks.mean()),
                                              "per_seed": {str(s): float(v) for s, v in zip(seeds_a, diff_ks.mean(0))}}}
        if n_bootstrap:
            w = patient_weights(rng, len(pats), n_bootstrap)
            denom = (w @ n_img)[:, None, None]
            ca = np.einsum("bp,pks->bks", w, sums_a) / denom
            cb = np.einsum("bp,pks->bks", w, sums_b) / denom
            if reps_b == [-1]:
                values = hierarchical_resample(ca, cb[:, 0, :], n_bootstrap, rng)
            elif reps_a == [-1]:  # A real-only, B with replicates: the reverse, negated
                values = -hierarchical_resample(cb, ca[:, 0, :], n_bootstrap, rng)
            else:  # the same replicates: paired by (replicate, seed)
                values = hierarchical_resample(ca - cb, None, n_bootstrap, rng)
            entry["accuracy"]["ci_hierarchical_bootstrap"] = percentile_interval(values, alpha)
            if reps_b == [-1]:
                comps = variance_components(ca, cb[:, 0, :], acc_a, acc_b[0])
            elif reps_a == [-1]:
                comps = variance_components(cb, ca[:, 0, :], acc_b, acc_a[0])  # the reverse: the same spread
            else:
                comps = variance_components(ca - cb, None, acc_a - acc_b)
            entry["accuracy"]["ci"] = t_interval(entry["accuracy"]["mean"], comps, 1.0 - 2.0 * alpha)["ci"]
        out[center] = entry
    return out


def _experiment_names(pred: pd.DataFrame) -> list[tuple[tuple, str]]:
    """((experiment, backbone, augmentation), key) of every experiment, in the table's sorted group order."""
    return [(names, experiment_key(*names)) for names, _ in pred.groupby(GROUP_COLUMNS, sort=True)]


def _runs_by_experiment(predictions: pd.DataFrame, classes: list[str]):
    """(the checked table, experiment key -> its (replicate, seed, frame) runs, the target images every run predicted)."""
    _check_predictions(predictions, classes)
    pred = predictions.copy()
    pred["augmentation"] = pred["augmentation"].map(_as_bool)
    if "replicate" not in pred.columns:
        pred["replicate"] = -1
    pred["replicate"] = pd.to_numeric(pred["replicate"], errors="coerce").fillna(-1).astype(int)
    reference = None
    runs: dict[str, list[tuple[int, int, pd.DataFrame]]] = {}
    for (experiment, backbone, aug), frame in pred.groupby(GROUP_COLUMNS, sort=True):
        key = experiment_key(experiment, backbone, aug)
        runs[key] = _runs_of(frame)
        for _, s, run_frame in runs[key]:
            if reference is None:
                reference = run_frame[["image_id", "patient_id", "center", "label"]]
            elif not run_frame["image_id"].equals(reference["image_id"]):
                raise ValueError(f"experiment {key} seed {s} did not predict the same target images as the others")
    if reference is None:
        raise ValueError("zero-shot predictions table is empty")
    return pred, runs, reference


def _bootstrap_description(n_bootstrap: int, ci: float, seed: int, n_reps: int, replicate_fits: bool = False) -> dict[str, Any]:
    refit = replicate_fits and n_reps > 1
    out = {
        "n_resamples": int(n_bootstrap), "ci": ci, "unit": "patient (center::patient_id)", "seed": seed,
        "levels": ["synthetic-batch replicate" + (" (its own LoRA fit and sampling seeds)" if refit else ""),
                   "classifier seed (paired between arms)", "target patient (one draw shared by all classifiers)"],
        "n_replicates": n_reps,
        "interval": INTERVAL_METHOD,
        "base_model": "held fixed (as SD v1.5 is in the paper): no interval covers a different base model",
        "conditional_on": (
            f"this base model and the LoRA subset; covers classifier seeds, test patients and {n_reps} synthetic "
            "batches, each from its own independent LoRA fit (synthesis.adapter_per_replicate) and its own "
            "sampling seeds" if refit else
            f"this base model and LoRA adapter; covers classifier seeds, test patients and {n_reps} synthetic "
            "batches from independent sampling seeds" if n_reps > 1 else
            "this base model, this LoRA adapter and this one synthetic batch (synthesis.replicates = 1): covers "
            "classifier seeds and test patients, not the generator's variance"
        ),
    }
    if refit:  # only then, so that a run without it writes the keys it always wrote
        out["replicate_lora_fits"] = True
    return out


def _experiment_entry(experiment, backbone, aug, runs, classes, target_classes, boot_idx, n_bootstrap, alpha, seed):
    """One experiment's entry (every protocol) and its bootstrap cubes (metric -> (B, K, S))."""
    key = experiment_key(experiment, backbone, aug)
    reps = sorted({r for r, _, _ in runs})
    seeds = sorted({s for _, s, _ in runs})
    cell = {(r, s): f for r, s, f in runs}
    missing = [(r, s) for r in reps for s in seeds if (r, s) not in cell]
    if missing:
        raise ValueError(f"experiment {key}: no predictions for (replicate, seed) {missing[:3]}; every "
                         "replicate needs every seed")
    entry: dict[str, Any] = {
        "experiment": experiment,
        "backbone": backbone,
        "augmentation": bool(aug),
        "seeds": seeds,
        "n_seeds": len(seeds),
        "replicates": [r for r in reps if r >= 0],
        "n_classifiers": len(cell),
    }
    cubes: dict[str, np.ndarray] = {}
    for protocol in PROTOCOLS:
        block, prepared = _protocol_block(cell, reps, seeds, classes, target_classes, protocol)
        if boot_idx and protocol == "all_classes":
            flat = _bootstrap(prepared, boot_idx, target_classes)  # metric -> (B, n_classifiers)
            column = {rs: j for j, rs in enumerate(cell)}
            order = [[column[(r, s)] for s in seeds] for r in reps]
            cubes = {m: v[:, order] for m, v in flat.items()}  # metric -> (B, K, S)
            block["ci"] = {m: t_interval(block["mean"][m], variance_components(c, full_a=_cells(block, m, seeds)),
                                         1.0 - 2.0 * alpha)["ci"] for m, c in cubes.items()}
            block["ci_test_patients_only"] = {m: percentile_interval(c.mean(axis=(1, 2)), alpha)
                                              for m, c in cubes.items()}
        entry[protocol] = block
    return entry, cubes


def _protocol_block(cell: dict, reps: list[int], seeds: list[int], classes, target_classes, protocol: str):
    """One protocol's metrics of one experiment (per seed, mean, sd, recall, confusion, per center) and the
    per-classifier predictions the bootstrap resamples."""
    per_run, cms, prepared, recalls = {}, [], [], []
    for (r, s), frame in cell.items():
        y_true = frame["label"].to_numpy(dtype=object)
        y_pred, proba, pcls = protocol_predictions(frame, classes, target_classes, protocol)
        prepared.append((y_true, y_pred, proba, pcls))
        per_run[(r, s)] = classification_metrics(y_true, y_pred, proba, pcls, target_classes)
        recalls.append(per_class_recall(y_true, y_pred, target_classes))
        cms.append(confusion_matrix(y_true, y_pred, labels=classes))
    per_seed = {
        str(s): {k: float(v) for k, v in pd.DataFrame([per_run[(r, s)] for r in reps]).mean().items()}
        for s in seeds
    }
    mean, sd = _mean_sd(list(per_seed.values()))
    block: dict[str, Any] = {
        "per_seed": per_seed,
        "mean": mean,
        "sd": sd,
        "per_class_recall": {c: float(np.mean([rc[c] for rc in recalls])) for c in target_classes},
        "confusion_matrix": {"labels": list(classes), "matrix": np.sum(cms, axis=0).tolist()},
        "per_center": _per_center([(s, f) for (_, s), f in cell.items()], classes, target_classes, protocol),
    }
    if len(reps) > 1:
        block["per_replicate_seed"] = {f"rep{r}/seed{s}": per_run[(r, s)] for r, s in cell}
        rep_means = pd.DataFrame([pd.DataFrame([per_run[(r, s)] for s in seeds]).mean() for r in reps])
        block["sd_between_replicates"] = {k: float(v) for k, v in rep_means.std(ddof=1).items()}
    return block, prepared


def _difference(key: str, base_key: str, experiments: dict, cubes: dict, n_bootstrap: int, alpha: float,
                seed: int) -> dict[str, Any]:
    """Experiment minus its baseline (same backbone and augmentation), paired by seed."""
    entry, base = experiments[key], experiments[base_key]
    paired = entry["seeds"] == base["seeds"]
    shared = [s for s in entry["seeds"] if s in base["seeds"]]
    diff: dict[str, Any] = {"experiment": key, "baseline": base_key, "paired_by": "seed", "seeds": shared}
    for protocol in PROTOCOLS:
        block = {}
        for m in BOOTSTRAP_METRICS:
            per_seed = {str(s): entry[protocol]["per_seed"][str(s)][m] - base[protocol]["per_seed"][str(s)][m]
                        for s in shared}
            d: dict[str, Any] = {"mean": entry[protocol]["mean"][m] - base[protocol]["mean"][m],
                                 "per_seed": per_seed}
            if (key, m) in cubes and paired:
                a, b = cubes[(key, m)], cubes[(base_key, m)][:, 0, :]
                cells_a, cells_b = _cells(entry[protocol], m, shared), _cells(base[protocol], m, shared)
                if base["replicates"]:  # paired by replicate and seed (compare_arms): the cube holds A - B
                    cells_a, cells_b = cells_a - cells_b, np.zeros_like(cells_b)
                comps = variance_components(a, b, cells_a, cells_b[0])
                interval = t_interval(d["mean"], comps, 1.0 - 2.0 * alpha)
                d["ci"] = interval.pop("ci")
                d["interval"] = {"method": INTERVAL_METHOD, **interval}
                rng = np.random.default_rng([seed, 2])
                d["ci_hierarchical_bootstrap"] = percentile_interval(hierarchical_resample(a, b, n_bootstrap, rng),
                                                                     alpha)
                d["ci_test_patients_only"] = percentile_interval(a.mean(axis=(1, 2)) - b.mean(axis=1), alpha)
                d["variance_components"] = comps
                d["power"] = power_plan(comps)
            if protocol == "all_classes":
                d["paired_test"] = paired_seed_test(per_seed)
            block[m] = d
        diff[protocol] = block
    return diff


def _cells(block: dict, metric: str, seeds: list) -> np.ndarray:
    """``(K, S)`` one protocol block's metric of every (replicate, seed) classifier on all target patients."""
    cells = block.get("per_replicate_seed")
    if not cells:
        return np.array([[block["per_seed"][str(s)][metric] for s in seeds]], dtype=float)
    reps = sorted({int(k.split("/")[0].removeprefix("rep")) for k in cells})
    return np.array([[cells[f"rep{r}/seed{s}"][metric] for s in seeds] for r in reps], dtype=float)


def variance_components(a: np.ndarray, b: np.ndarray | None = None, full_a: np.ndarray | None = None,
                        full_b: np.ndarray | None = None) -> dict[str, Any]:
    """Variance components of a (paired) mean, from the bootstrap cube: classifier seeds, generator
    replicates and test patients.

    ``a``: ``(B, K, S)`` arm metric per patient draw, replicate, seed; ``b``: ``(B, S)`` the
    paired baseline's (``None``: arm ``a`` alone); ``full_a`` ``(K, S)`` and ``full_b`` ``(S,)``:
    the same on all target patients (default: the mean over the draws, which adds resampling
    noise with few draws). ``D[k, s] = full_a[k, s] - full_b[s]`` is a two-way table: seed s is shared by every replicate (the
    baseline of seed s, the initial weights), replicate k by every seed (its LoRA fit and
    batch). As standard deviations:

    * ``seed``: sd over seeds of the per-seed difference averaged over the replicates (S - 1
      degrees of freedom; with K = 1 the paired t-test's sd);
    * ``replicate``: between generator replicates, net of seed noise,
      ``sqrt(max(0, (MS_rep - MS_res) / S))`` from the crossed two-way ANOVA (mean squares of
      replicates, K - 1 df, and of the residual); None with K = 1 (not measured: the run is
      then conditional on its one batch);
    * ``seed_x_replicate``: ``sqrt(MS_res)``, what one (replicate, seed) cell adds on its own,
      and ``seed_shared``: ``sqrt(max(0, seed**2 - MS_res / K))``, the part of the seed term
      more replicates cannot average out (both None with K = 1; used for planning);
    * ``patients``: sd over patient draws of the difference averaged over all classifiers;
    * ``seed_within_replicate``: the pooled sd over seeds within a replicate (descriptive).

    The estimate's variance is ``seed**2 / S + replicate**2 / K + patients**2``
    (:func:`design_variance`).
    """
    full_a = np.nanmean(a, axis=0) if full_a is None else np.asarray(full_a, dtype=float)
    if b is not None:
        full_b = np.nanmean(b, axis=0) if full_b is None else np.asarray(full_b, dtype=float)
    full = full_a - (full_b[None, :] if b is not None else 0.0)  # (K, S) on all target patients
    k, s = full.shape
    seed_means, rep_means = full.mean(axis=0), full.mean(axis=1)
    seed_var = float(seed_means.var(ddof=1)) if s > 1 else None
    ms_res = ms_rep = None
    if k > 1 and s > 1:
        ms_rep = float(s * rep_means.var(ddof=1))
        ms_res = float(((full - rep_means[:, None] - seed_means[None, :] + full.mean()) ** 2).sum()
                       / ((k - 1) * (s - 1)))
    per_cell = (a.mean(axis=(1, 2)) - b.mean(axis=1)) if b is not None else a.mean(axis=(1, 2))
    return {
        "seed": float(np.sqrt(seed_var)) if seed_var is not None else None,
        "replicate": float(np.sqrt(max(0.0, (ms_rep - ms_res) / s))) if ms_res is not None else None,
        "seed_x_replicate": float(np.sqrt(ms_res)) if ms_res is not None else None,
        "seed_shared": float(np.sqrt(max(0.0, seed_var - ms_res / k))) if ms_res is not None else None,
        "patients": float(per_cell.std(ddof=1)) if len(a) > 1 else None,
        "seed_within_replicate": float(np.sqrt(np.mean(full.var(axis=1, ddof=1)))) if s > 1 else None,
        "K": k, "S": s,
    }


def design_variance(components: dict[str, Any], replicates: int | None = None, seeds: int | None = None,
                    patients_factor: float = 1.0) -> tuple[float, float]:
    """Variance of the estimate and its Satterthwaite degrees of freedom, for K replicates x S seeds.

    ``Var = seed_term / S + replicate**2 / K + patients**2 / patients_factor`` with the sds of
    :func:`variance_components` (defaults: the run's own K and S; ``patients_factor`` 2 = twice
    the target patients). ``seed_term`` is ``seed_shared**2 + seed_x_replicate**2 / K``
    (at the run's own K: ``seed**2``, or ``seed_x_replicate**2 / K`` if that is larger); with
    one replicate measured it is ``seed**2`` whatever K (replicates were not measured). Degrees of freedom: Welch-Satterthwaite over the seed term (S - 1) and the
    replicate term (K - 1); the patient term counts as known (a bootstrap over all target
    patients). Returns ``(variance, df)``; ``df`` is ``inf`` when the classifier part is 0,
    ``nan`` when it is not measured (one seed).
    """
    k, s = int(replicates or components["K"]), int(seeds or components["S"])
    pat = (components.get("patients") or 0.0) ** 2 / patients_factor
    if components.get("seed") is None or s < 2:
        return pat, float("nan")
    if components.get("replicate") is None:  # one replicate measured: the seed term holds all that is known
        terms = [(components["seed"] ** 2 / s, s - 1)]
    else:
        seed_term = components["seed_shared"] ** 2 + components["seed_x_replicate"] ** 2 / k
        terms = [(seed_term / s, s - 1), (components["replicate"] ** 2 / k, k - 1 if k > 1 else np.inf)]
    total = sum(v for v, _ in terms) + pat
    denominator = sum(v ** 2 / df for v, df in terms)  # the patient term: infinite degrees of freedom
    return total, float(total ** 2 / denominator) if denominator > 0 else float("inf")


# the power statement: two-sided 5 % test, 80 % power, a 5-point effect (accuracy as a fraction)
POWER_ALPHA, POWER, POWER_DELTA = 0.05, 0.80, 0.05


def t_interval(estimate: float, components: dict[str, Any], ci: float) -> dict[str, Any]:
    """``estimate ± t(df) · SE`` with ``SE² , df`` from :func:`design_variance` (the run's own K, S).

    The small-sample correction is the t quantile on the Satterthwaite degrees of freedom
    (S - 1 with one replicate: 2.78 at 5 seeds instead of 1.96), where a percentile
    bootstrap over 5 seeds is too narrow (it resamples 5 values, which understates their
    spread by about sqrt(4/5), and its quantiles are coarse).
    """
    from scipy import stats

    var, df = design_variance(components)
    if not np.isfinite(estimate) or not np.isfinite(var) or np.isnan(df):
        return {"ci": [float("nan"), float("nan")], "se": None, "df": None, "half_width": None}
    q = float(stats.t.ppf(0.5 + ci / 2.0, df))
    se = float(np.sqrt(var))
    return {"ci": [float(estimate - q * se), float(estimate + q * se)], "se": se,
            "df": df if np.isfinite(df) else None, "half_width": q * se}


def detectable_difference(components: dict[str, Any], replicates: int | None = None, seeds: int | None = None,
                          patients_factor: float = 1.0, alpha: float = POWER_ALPHA, power: float = POWER) -> float | None:
    """The smallest true difference a design detects with ``power`` in a two-sided ``alpha`` t-test:
    ``(t(1 - alpha/2, df) + t(power, df)) · SE`` (:func:`design_variance`; default: this run's K and S)."""
    from scipy import stats

    var, df = design_variance(components, replicates, seeds, patients_factor)
    if np.isnan(df) or not np.isfinite(var):
        return None
    return float((stats.t.ppf(1.0 - alpha / 2.0, df) + stats.t.ppf(power, df)) * np.sqrt(var))


def seeds_needed(components: dict[str, Any], delta: float = POWER_DELTA, replicates: int | None = None,
                 max_seeds: int = 500) -> int | None:
    """Seeds per replicate (at ``replicates``, default this run's K) for :func:`detectable_difference`
    ≤ ``delta``; ``None``: not within ``max_seeds`` (the patient or replicate term alone is too large)."""
    for s in range(2, max_seeds + 1):
        mde = detectable_difference(components, replicates, s)
        if mde is not None and mde <= delta:
            return s
    return None


def replicates_needed(components: dict[str, Any], delta: float = POWER_DELTA, seeds: int | None = None,
                      max_replicates: int = 200) -> int | None:
    """Generator replicates (at ``seeds``, default this run's S) for :func:`detectable_difference` ≤
    ``delta``; ``None``: not within ``max_replicates``, or the replicate term was not measured (K = 1)."""
    if components.get("replicate") is None:
        return None
    for k in range(2, max_replicates + 1):
        mde = detectable_difference(components, k, seeds)
        if mde is not None and mde <= delta:
            return k
    return None


def power_plan(components: dict[str, Any], delta: float = POWER_DELTA) -> dict[str, Any]:
    """What this run could detect and what a ``delta`` effect needs (two-sided 5 %, 80 % power).

    ``detectable_difference``: the smallest true difference this run's K x S design detects;
    ``seeds_needed`` (at this K) and ``replicates_needed`` (at this S) for ``delta``; when no
    number of classifiers is enough, ``patients_factor_needed``: how many times the target
    patients the patient term alone needs (normal approximation).
    """
    k, s = components["K"], components["S"]
    z = 1.959963985 + 0.841621234  # normal quantiles of a two-sided 5 % test at 80 % power
    pat = components.get("patients") or 0.0
    return {
        "alpha": POWER_ALPHA, "power": POWER, "delta": delta, "K": k, "S": s,
        "detectable_difference": detectable_difference(components),
        "seeds_needed": seeds_needed(components, delta, k),
        "replicates_needed": replicates_needed(components, delta, s),
        "patients_factor_needed": float((z * pat / delta) ** 2) if pat else None,
    }


def _bootstrap(prepared, boot_idx, target_classes) -> dict[str, np.ndarray]:
    """Each ``BOOTSTRAP_METRICS`` entry of every classifier on every patient resample: ``(B, n_classifiers)``.

    The metrics of one resample are functions of how often each image is drawn, so every
    resample is a row of weights ``W`` (``B x images``) and each metric comes from weighted
    counts, all resamples at once: accuracy, and per class the true positives, true and
    predicted counts (precision, recall, F1 as scikit-learn computes them from the same counts,
    macro-averaged over the classes present in the resample, ``zero_division=0``); ROC-AUC one
    class against the rest as the weighted Mann-Whitney statistic (ties count one half),
    which is what ``roc_auc_score`` computes on the resampled rows, equal to it up to float
    rounding (``tests/test_metrics.py``); ``auc_hard_label`` the same on one-hot predictions.
    """
    n = len(prepared[0][0]) if prepared else 0
    weights = np.stack([np.bincount(idx, minlength=n) for idx in boot_idx]).astype(float)  # (B, N)
    values = {m: np.empty((len(boot_idx), len(prepared))) for m in BOOTSTRAP_METRICS}
    for j, (y_true, y_pred, proba, pcls) in enumerate(prepared):
        space = list(dict.fromkeys(list(pcls) + sorted(set(map(str, y_pred)))))
        t, p = _codes(y_true, space), _codes(y_pred, space)
        codes = np.array([space.index(c) for c in target_classes])
        scores = _weighted_scores(weights, t, p, np.asarray(proba, dtype=float)[:, codes], codes)
        for m in BOOTSTRAP_METRICS:
            values[m][:, j] = scores[m]
    return values


def _weighted_scores(w: np.ndarray, t: np.ndarray, p: np.ndarray, proba: np.ndarray, codes: np.ndarray) -> dict:
    """:data:`BOOTSTRAP_METRICS` for every row of image weights ``w`` (``B x N``); ``proba``
    holds the columns of the classes ``codes``."""
    is_true = (t[:, None] == codes[None, :]).astype(float)  # (N, C)
    is_pred = (p[:, None] == codes[None, :]).astype(float)
    tp, true, pred = w @ (is_true * is_pred), w @ is_true, w @ is_pred  # (B, C) weighted counts
    present = true > 0
    n_present = present.sum(axis=1)

    def macro(per_class):  # mean over the classes present in each resample
        return np.where(present, per_class, 0.0).sum(axis=1) / n_present

    with np.errstate(divide="ignore", invalid="ignore"):
        out = {
            "accuracy": (w @ (t == p).astype(float)) / w.sum(axis=1),
            "precision_macro": macro(np.where(pred > 0, tp / pred, 0.0)),
            "recall_macro": macro(np.where(present, tp / true, 0.0)),
            "f1_macro": macro(np.where(true + pred > 0, 2.0 * tp / (true + pred), 0.0)),
        }
        for name, score in (("roc_auc_macro", proba), ("auc_hard_label", is_pred)):
            auc = np.stack([_weighted_auc(w, score[:, c], is_true[:, c]) for c in range(len(codes))], axis=1)
            out[name] = np.where(n_present >= 2, macro(np.where(present, auc, 0.0)), np.nan)
    return out


def _weighted_auc(w: np.ndarray, score: np.ndarray, positive: np.ndarray) -> np.ndarray:
    """ROC-AUC of ``score`` for the ``positive`` images under each row of weights ``w``: the
    weighted share of (positive, negative) pairs ranked right, ties one half."""
    _, group = np.unique(score, return_inverse=True)  # tie groups, ascending score
    member = np.zeros((len(score), group.max() + 1))
    member[np.arange(len(score)), group] = 1.0
    pos, neg = w @ (member * positive[:, None]), w @ (member * (1.0 - positive)[:, None])  # (B, groups)
    below = np.cumsum(neg, axis=1) - neg
    return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def _per_center(seed_tables, classes, target_classes, protocol) -> dict[str, Any]:
    centers = sorted(set(seed_tables[0][1]["center"].astype(str)))
    out = {}
    for center in centers:
        per_seed = []
        for _, frame in seed_tables:
            sub = frame[frame["center"].astype(str) == center]
            y_pred, proba, pcls = protocol_predictions(sub, classes, target_classes, protocol)
            per_seed.append(
                classification_metrics(sub["label"].to_numpy(dtype=object), y_pred, proba, pcls, target_classes)
            )
        mean, sd = _mean_sd(per_seed)
        out[center] = {"mean": mean, "sd": sd}
    return out
