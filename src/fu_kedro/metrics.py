"""Zero-shot classification metrics, patient-level bootstrap, and the per-experiment summary.

Everything here works from a predictions table alone (one row per experiment, seed and
target image, with ``label``, ``prediction`` and one ``prob_<class>`` column per source
class), so every figure in ``zero_shot_metrics.json`` can be recomputed from
``zero_shot_predictions.csv``. The arithmetic is scikit-learn's; this module only decides
which labels, which rows and which columns go in.

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
import sklearn
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    confusion_matrix,
    precision_recall_fscore_support,
    roc_auc_score,
)
from sklearn.preprocessing import label_binarize

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

    ``full=False`` (bootstrap) skips balanced accuracy (equal to macro recall when every
    class is present) and the weighted averages, to keep resampling affordable.
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
        onehot_true = label_binarize(t, classes=present)
        out["roc_auc_macro"] = float(roc_auc_score(onehot_true, proba_present, average="macro"))
        out["auc_hard_label"] = float(
            roc_auc_score(onehot_true, label_binarize(p, classes=present), average="macro")
        )
    else:  # one class only: a ROC curve needs negatives
        out["roc_auc_macro"] = float("nan")
        out["auc_hard_label"] = float("nan")
    return out


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


def patient_keys(frame: pd.DataFrame) -> np.ndarray:
    """One key per row naming its patient; patient ids are only unique within a center."""
    return (frame["center"].astype(str) + "::" + frame["patient_id"].astype(str)).to_numpy()


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
        picked = rng.integers(0, len(uniq), size=len(uniq))
        out.append(np.concatenate([rows_of[p] for p in picked]))
    return out


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


def summarise_zero_shot(
    predictions: pd.DataFrame,
    classes: list[str],
    n_bootstrap: int,
    ci: float,
    seed: int,
    baseline: str = "baseline",
) -> dict[str, Any]:
    """All zero-shot metrics of every experiment, with intervals and differences to the baseline.

    Args:
        predictions: the predictions table (see module docstring). Every experiment must hold
            predictions for the same target images (one row per image per seed).
        classes: the classifier's (source) label space, in ``prob_<class>`` column order.
        n_bootstrap: patient-level bootstrap resamples (0 = no intervals).
        ci: interval coverage, e.g. 0.95.
        seed: seed of the bootstrap resampling.
        baseline: training-set name every other training set is compared with.

    Returns:
        JSON-ready dict: ``experiments[<key>]`` with, per protocol, ``per_seed``, ``mean``,
        ``sd``, ``ci`` (bootstrap of the seed-mean), ``confusion_matrix`` (summed over seeds;
        rows true, columns predicted), and ``per_center`` (mean and sd over seeds);
        ``differences[<key>]`` = experiment - baseline of the same backbone and augmentation,
        with a paired bootstrap interval (the same patients resampled for both).
    """
    _check_predictions(predictions, classes)
    pred = predictions.copy()
    pred["augmentation"] = pred["augmentation"].map(_as_bool)
    target_classes = [c for c in classes if c in set(pred["label"])]
    groups = list(pred.groupby(GROUP_COLUMNS, sort=True))
    # Bootstrap rows index one seed's table; all seeds and experiments share the image order.
    reference = None
    tables: dict[str, list[tuple[int, pd.DataFrame]]] = {}
    for (experiment, backbone, aug), frame in groups:
        key = experiment_key(experiment, backbone, aug)
        tables[key] = []
        for s, seed_frame in frame.groupby("seed", sort=True):
            seed_frame = seed_frame.sort_values("image_id").reset_index(drop=True)
            if reference is None:
                reference = seed_frame[["image_id", "patient_id", "center"]]
            elif not seed_frame["image_id"].equals(reference["image_id"]):
                raise ValueError(f"experiment {key} seed {s} did not predict the same target images as the others")
            tables[key].append((int(s), seed_frame))
    if reference is None:
        raise ValueError("zero-shot predictions table is empty")
    boot_idx = bootstrap_patient_indices(patient_keys(reference), n_bootstrap, seed) if n_bootstrap else []
    alpha = (1.0 - ci) / 2.0

    result: dict[str, Any] = {
        "classes": list(classes),
        "target_classes": target_classes,
        "n_target_images": int(len(reference)),
        "n_target_patients": int(len(np.unique(patient_keys(reference)))),
        "bootstrap": {"n_resamples": int(n_bootstrap), "ci": ci, "unit": "patient (center::patient_id)", "seed": seed},
        "experiments": {},
        "differences": {},
    }
    boot_values: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for (experiment, backbone, aug), _ in groups:
        key = experiment_key(experiment, backbone, aug)
        entry: dict[str, Any] = {
            "experiment": experiment,
            "backbone": backbone,
            "augmentation": bool(aug),
            "seeds": [s for s, _ in tables[key]],
        }
        for protocol in PROTOCOLS:
            per_seed, cms, prepared = {}, [], []
            for s, frame in tables[key]:
                y_true = frame["label"].to_numpy(dtype=object)
                y_pred, proba, pcls = protocol_predictions(frame, classes, target_classes, protocol)
                prepared.append((y_true, y_pred, proba, pcls))
                per_seed[str(s)] = classification_metrics(y_true, y_pred, proba, pcls, target_classes)
                cms.append(confusion_matrix(y_true, y_pred, labels=classes))
            mean, sd = _mean_sd(list(per_seed.values()))
            block: dict[str, Any] = {
                "per_seed": per_seed,
                "mean": mean,
                "sd": sd,
                "confusion_matrix": {"labels": list(classes), "matrix": np.sum(cms, axis=0).tolist()},
                "per_center": _per_center(tables[key], classes, target_classes, protocol),
            }
            if boot_idx and protocol == "all_classes":
                values = _bootstrap(prepared, boot_idx, target_classes)
                boot_values[(key, protocol)] = values
                block["ci"] = {m: _interval(v, alpha) for m, v in values.items()}
            entry[protocol] = block
        result["experiments"][key] = entry

    for key, entry in result["experiments"].items():
        if entry["experiment"] == baseline:
            continue
        base_key = experiment_key(baseline, entry["backbone"], entry["augmentation"])
        if base_key not in result["experiments"]:
            continue
        diff: dict[str, Any] = {"experiment": key, "baseline": base_key}
        for protocol in PROTOCOLS:
            block = {}
            for m in BOOTSTRAP_METRICS:
                d = {
                    "mean": entry[protocol]["mean"][m] - result["experiments"][base_key][protocol]["mean"][m],
                }
                if (key, protocol) in boot_values:
                    d["ci"] = _interval(boot_values[(key, protocol)][m] - boot_values[(base_key, protocol)][m], alpha)
                block[m] = d
            diff[protocol] = block
        result["differences"][f"{key} - {base_key}"] = diff
    return result


def _bootstrap(prepared, boot_idx, target_classes) -> dict[str, np.ndarray]:
    """Seed-mean of each ``BOOTSTRAP_METRICS`` entry on every resample (rows = patients' images)."""
    coded = []
    for y_true, y_pred, proba, pcls in prepared:
        space = list(dict.fromkeys(list(pcls) + sorted(set(map(str, y_pred)))))
        coded.append((_codes(y_true, space), _codes(y_pred, space), proba, [space.index(c) for c in target_classes]))
    values = {m: np.empty(len(boot_idx)) for m in BOOTSTRAP_METRICS}
    # inputs were validated once above; skipping sklearn's per-call checks makes resampling ~2x faster
    with warnings.catch_warnings(), sklearn.config_context(assume_finite=True, skip_parameter_validation=True):
        # resamples often predict a class absent from their labels (``other``): expected here
        warnings.simplefilter("ignore", UserWarning)
        for b, idx in enumerate(boot_idx):
            per_seed = []
            for t, p, proba, eval_codes in coded:
                tb = t[idx]
                present = [c for c in eval_codes if np.any(tb == c)]
                per_seed.append(_core_metrics(tb, p[idx], proba[idx][:, present], present, full=False))
            for m in BOOTSTRAP_METRICS:
                values[m][b] = np.mean([sm[m] for sm in per_seed])
    return values


def _interval(values: np.ndarray, alpha: float) -> list[float]:
    """Percentile interval; resamples where a metric is undefined (NaN) are left out."""
    values = values[np.isfinite(values)]
    if not len(values):
        return [float("nan"), float("nan")]
    return [float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))]


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
