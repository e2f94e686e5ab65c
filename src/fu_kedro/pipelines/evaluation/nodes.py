"""Nodes of the ``evaluation`` pipeline: classifiers on real vs hybrid data, zero-shot metrics,
synthetic-data quality, one report.

Data flow (see ``pipeline.py``): image sets -> tensors once -> a validated experiment plan
-> one trained classifier per (training set, backbone, augmentation, seed) -> target
predictions -> metrics; the baseline classifiers and a synthetic-only (CAS) classifier
judge the synthetic batch; everything ends in one report.
"""
from __future__ import annotations

import html
import logging
import math
from typing import Any

import mlflow
import numpy as np
import pandas as pd
import torch

from fu_kedro.classifiers import (
    TensorSet,
    TrainConfig,
    TrainedClassifier,
    build_classifier,
    check_backbone,
    extract_features,
    predict_proba,
    prepare_tensors,
    train_classifier,
)
from fu_kedro.classifiers.train import log_epoch_metrics, resolve_device
from fu_kedro.datasets import ImageSet
from fu_kedro.launch import distributed_state
from fu_kedro.metrics import experiment_key, prob_columns, summarise_zero_shot

from . import quality

log = logging.getLogger(__name__)

TRAINING_SETS = ("baseline", "hybrid")


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> None and numpy scalars -> Python, so the JSON files are standard JSON."""
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


# --------------------------------------------------------------------------- data
def prepare_classifier_data(
    source_images: ImageSet, target_images: ImageSet, synthetic_batch: ImageSet, params: dict
) -> dict[str, Any]:
    """Check the three image sets against the label space and turn them into tensors once.

    Args:
        source_images: real source images; meta ``label`` and ``split`` (train | val),
            ``patient_id``, ``center``.
        target_images: real target images (zero-shot test only); meta ``label``,
            ``patient_id``, ``center``.
        synthetic_batch: synthetic images; meta ``label`` = prompted class. May be empty.
        params: ``evaluation`` parameters (``classes``, ``image_size``,
            ``quality.memorisation_size``).

    Returns:
        dict with ``classes``, ``image_size``, ``source_train``, ``source_val``, ``target``,
        ``synthetic`` (``TensorSet``; ``synthetic`` is ``None`` when the batch is empty),
        ``memorisation_images`` (uint8 arrays at the copy-check resolution) and ``info``
        (counts and the synthetic batch's lineage).

    Raises:
        ValueError: a label outside ``classes`` (naming set and labels), a source without
            train/val patients, a target without patient/center columns.
    """
    classes = list(params["classes"])
    size = int(params["image_size"])
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(f"evaluation.classes must be >= 2 distinct class names, got {classes}")
    for name, images, columns in (
        ("source_images", source_images, ["label", "split", "patient_id"]),
        ("target_images", target_images, ["label", "patient_id", "center"]),
    ):
        missing = [c for c in columns if c not in images.meta.columns]
        if missing:
            raise ValueError(f"{name}: metadata lacks columns {missing}")
        if len(images) == 0:
            raise ValueError(f"{name} has no images")
    splits = source_images.meta["split"].astype(str)
    for split in ("train", "val"):
        if not (splits == split).any():
            raise ValueError(
                f"source_images has no '{split}' images: checkpoint selection needs held-out source "
                "validation patients (ingestion.val_fraction > 0)"
            )
    overlap = set(source_images.meta.loc[splits == "train", "patient_id"]) & set(
        source_images.meta.loc[splits == "val", "patient_id"]
    )
    if overlap:
        raise ValueError(f"source_images: patients {sorted(overlap)[:5]} are in both train and val splits")
    source = prepare_tensors(source_images, classes, size, "source_images")
    target = prepare_tensors(target_images, classes, size, "target_images")
    synthetic = None
    if synthetic_batch is not None and len(synthetic_batch):
        synthetic = prepare_tensors(synthetic_batch, classes, size, "synthetic_batch")
    data = {
        "classes": classes,
        "image_size": size,
        "source_train": source.subset((splits == "train").to_numpy()),
        "source_val": source.subset((splits == "val").to_numpy()),
        "target": target,
        "synthetic": synthetic,
    }
    # The copy check compares pixels at a higher resolution than the classifier sees: at 32 px
    # two different real images already correlate above 0.95.
    mem_size = int(params["quality"]["memorisation_size"])
    mem = {"source_train": source_images.select((splits == "train").to_numpy()),
           "source_val": source_images.select((splits == "val").to_numpy())}
    if synthetic is not None:
        mem["synthetic"] = synthetic_batch
    data["memorisation_images"] = {
        k: prepare_tensors(v, classes, mem_size, k).images[:, 0].numpy() for k, v in mem.items()
    }
    data["info"] = {
        "n_source_train": len(data["source_train"]),
        "n_source_val": len(data["source_val"]),
        "n_target": len(target),
        "n_synthetic": 0 if synthetic is None else len(synthetic),
        "source_info": source_images.info,
        "target_info": target_images.info,
        "synthetic_info": synthetic_batch.info if synthetic_batch is not None else {},
        "target_classes": [c for c in classes if c in set(target.meta["label"].astype(str))],
    }
    log.info(
        "evaluation data at %d px: %d source train, %d source val, %d target, %d synthetic images",
        size, *(data["info"][k] for k in ("n_source_train", "n_source_val", "n_target", "n_synthetic")),
    )
    return data


# --------------------------------------------------------------------------- plan
def _ratio_name(ratio: float) -> str:
    return f"hybrid_x{ratio:g}"


def plan_experiments(classifier_data: dict, params: dict, seed: int) -> list[dict]:
    """Expand the experiment grid and check it before anything trains.

    Args:
        classifier_data: output of ``prepare_classifier_data``.
        params: ``evaluation`` parameters: ``training_sets``, ``synthetic_ratios``,
            ``backbones``, ``augmentation``, ``n_seeds``, ``weights`` (backbone -> file).
        seed: the project seed; run seeds are ``seed, seed + 1, ...``.

    Returns:
        One dict per run: experiment (training-set name), backbone, augmentation, seed,
        weights (``"ImageNet weights from <file>"`` or ``"random init"``), weights_file,
        n_real, n_synthetic, synthetic_ratio.

    Raises:
        ValueError: unknown training set, a hybrid set with no synthetic images, a ratio
            needing more synthetic images than there are, a backbone torchvision lacks, a
            weights file that does not fit its backbone.
    """
    sets = list(params["training_sets"])
    unknown = [s for s in sets if s not in TRAINING_SETS]
    if unknown:
        raise ValueError(f"evaluation.training_sets {unknown} unknown; choose from {list(TRAINING_SETS)}")
    ratios = [float(r) for r in (params.get("synthetic_ratios") or [])]
    n_real = len(classifier_data["source_train"])
    n_syn = classifier_data["info"]["n_synthetic"]
    if ("hybrid" in sets or ratios) and n_syn == 0:
        raise ValueError(
            "a hybrid experiment needs synthetic images, but synthetic_batch has none; run the synthesis "
            "pipeline first or set evaluation.training_sets: [baseline] and synthetic_ratios: []"
        )
    for r in ratios:
        if r <= 0 or round(r * n_real) > n_syn:
            raise ValueError(
                f"synthetic ratio {r:g} needs {round(r * n_real)} synthetic images ({n_real} real train images); "
                f"the synthetic batch has {n_syn} and ratios must be > 0"
            )
    backbones = list(params["backbones"])
    weights_files = dict(params.get("weights") or {})
    stray = sorted(set(weights_files) - set(backbones))
    if stray:
        log.warning("evaluation.weights names backbones not in the grid (ignored): %s", stray)
    descriptions = {}
    for name in backbones:
        check_backbone(name)
        # builds the model and loads the file now, so a mismatch stops the run before training
        _, descriptions[name] = build_classifier(
            name, len(classifier_data["classes"]), classifier_data["image_size"], weights_files.get(name)
        )
    n_seeds = int(params["n_seeds"])
    if n_seeds < 1:
        raise ValueError(f"evaluation.n_seeds must be >= 1, got {n_seeds}")
    augmentations = [bool(a) for a in params["augmentation"]]
    training = [(s, None) for s in sets] + [(_ratio_name(r), r) for r in ratios]
    plan = []
    for experiment, ratio in training:
        n_s = 0 if experiment == "baseline" else (n_syn if ratio is None else int(round(ratio * n_real)))
        for backbone in backbones:
            for aug in augmentations:
                for i in range(n_seeds):
                    plan.append(
                        {
                            "experiment": experiment,
                            "backbone": backbone,
                            "augmentation": aug,
                            "seed": int(seed) + i,
                            "weights": descriptions[backbone],
                            "weights_file": weights_files.get(backbone),
                            "n_real": n_real,
                            "n_synthetic": n_s,
                            "synthetic_ratio": ratio,
                        }
                    )
    log.info("evaluation plan: %d classifier runs", len(plan))
    return plan


def run_key(run: dict) -> str:
    """Name of one planned run: ``<experiment>/<backbone>/<aug|noaug>/seed<seed>``."""
    return f"{experiment_key(run['experiment'], run['backbone'], run['augmentation'])}/seed{run['seed']}"


# --------------------------------------------------------------------------- training
def _synthetic_subset(synthetic: TensorSet, n: int, seed: int) -> TensorSet:
    """``n`` synthetic images drawn class-stratified (proportional to the batch) with ``seed``."""
    if n >= len(synthetic):
        return synthetic
    rng = np.random.default_rng(seed)
    labels = synthetic.labels.numpy()
    picked = []
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.floor(counts / counts.sum() * n).astype(int)
    quota[np.argsort(-(counts / counts.sum() * n - quota))[: n - quota.sum()]] += 1
    for c, q in zip(classes, quota):
        picked.append(rng.choice(np.flatnonzero(labels == c), q, replace=False))
    return synthetic.subset(np.sort(np.concatenate(picked)))


def training_set(classifier_data: dict, run: dict) -> TensorSet:
    """The images a planned run trains on: real source train, plus synthetic images for hybrids."""
    real = classifier_data["source_train"]
    if run["n_synthetic"] == 0:
        return real
    syn = _synthetic_subset(classifier_data["synthetic"], run["n_synthetic"], run["seed"])
    return TensorSet.concat([real, syn])


def train_experiments(
    classifier_data: dict, experiment_plan: list[dict], params: dict
) -> tuple[dict[str, TrainedClassifier], pd.DataFrame]:
    """Train one classifier per planned run; select checkpoints on source validation patients.

    Args:
        classifier_data: output of ``prepare_classifier_data``.
        experiment_plan: output of ``plan_experiments``.
        params: ``evaluation`` parameters (``train``, ``augment``).

    Returns:
        (classifiers by ``run_key``, training history with one row per run and epoch:
        run, experiment, backbone, augmentation, seed, epoch, train_loss, train_accuracy,
        val_loss, val_accuracy, best_epoch). Curves go to MLflow as the loop runs.

    Under several processes (``python -m fu_kedro.launch -n N run ...``) process k trains
    runs k, k + N, ...; the results are gathered so that every process returns all of them,
    in plan order — the same classifiers and table as one process.
    """
    cfg = TrainConfig(**params["train"])
    classes = classifier_data["classes"]
    # Under several processes (fu_kedro.launch) each trains every n-th run; all get all results.
    state = distributed_state()
    mine = list(range(len(experiment_plan)))[state.process_index :: state.num_processes]
    trained, histories = {}, []
    for i in mine:
        run = experiment_plan[i]
        key = run_key(run)
        log.info("classifier %d/%d: %s (%s)", i + 1, len(experiment_plan), key, run["weights"])
        torch.manual_seed(run["seed"])  # head and random-init weights depend on the seed
        model, _ = build_classifier(run["backbone"], len(classes), classifier_data["image_size"], run["weights_file"])
        result = train_classifier(
            model,
            training_set(classifier_data, run),
            classifier_data["source_val"],
            cfg,
            seed=run["seed"],
            augmentation=params["augment"] if run["augmentation"] else None,
            run_name=key.replace("/", "."),
        )
        result.info.update(run)
        trained[key] = result
        hist = result.history.copy()
        hist.insert(0, "run", key)
        for col in ("experiment", "backbone", "augmentation", "seed"):
            hist[col] = run[col]
        hist["best_epoch"] = result.best_epoch
        histories.append(hist)
    if state.num_processes > 1:
        trained, histories = _gather_runs(trained, histories, experiment_plan, state.process_index)
        for result in trained.values():
            result.model.to(resolve_device(cfg.device))  # predictions run on this process's device
    return trained, pd.concat(histories, ignore_index=True)


def _gather_runs(trained: dict, histories: list[pd.DataFrame], experiment_plan: list[dict], rank: int):
    """Every process's trained runs on every process, in plan order; MLflow gets the other processes' curves.

    Only the main process logs to MLflow (fu_kedro.settings); the curves of runs trained
    elsewhere are logged here, after the fact, with the same keys ``train_classifier`` uses.
    """
    from accelerate.utils import gather_object

    for result in trained.values():
        result.model.cpu()  # a pickled model must not point at this process's GPU
    mine = [(key, trained[key], hist, rank) for key, hist in zip(trained, histories)]
    everyone = {key: (result, hist, source) for key, result, hist, source in gather_object(mine)}
    if mlflow.active_run() is not None:
        for key, (_, hist, source) in everyone.items():
            if source != rank:
                for row in hist.to_dict("records"):
                    log_epoch_metrics(key.replace("/", "."), row)  # the run_name train_experiments gives
    keys = [run_key(run) for run in experiment_plan]
    return {k: everyone[k][0] for k in keys}, [everyone[k][1] for k in keys]


# --------------------------------------------------------------------------- zero-shot
def predict_target(classifier_data: dict, trained_classifiers: dict, experiment_plan: list[dict]) -> pd.DataFrame:
    """Zero-shot predictions of every trained classifier on every target image.

    Returns:
        The contract table, one row per (experiment, seed, target image): experiment,
        backbone, augmentation, seed, image_id, patient_id, center, label, prediction
        (argmax over all source classes, ``other`` included) and ``prob_<class>`` per
        source class.
    """
    classes = classifier_data["classes"]
    target = classifier_data["target"]
    frames = []
    for run in experiment_plan:
        proba = predict_proba(trained_classifiers[run_key(run)].model, target)
        frame = pd.DataFrame(
            {
                "experiment": run["experiment"],
                "backbone": run["backbone"],
                "augmentation": run["augmentation"],
                "seed": run["seed"],
                "image_id": target.meta["image_id"].astype(str).to_numpy(),
                "patient_id": target.meta["patient_id"].astype(str).to_numpy(),
                "center": target.meta["center"].astype(str).to_numpy(),
                "label": target.meta["label"].astype(str).to_numpy(),
                "prediction": np.asarray(classes, dtype=object)[proba.argmax(axis=1)],
            }
        )
        frame[prob_columns(classes)] = proba
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)


def compute_zero_shot_metrics(
    zero_shot_predictions: pd.DataFrame, experiment_plan: list[dict], params: dict, seed: int
) -> dict:
    """Metrics of every experiment from the predictions table alone, plus what each was trained on.

    Args:
        zero_shot_predictions: output of ``predict_target`` (or the CSV read back).
        experiment_plan: adds #real, #synthetic and the weights to each experiment.
        params: ``evaluation`` parameters (``classes``, ``metrics.n_bootstrap``, ``metrics.ci``).
        seed: bootstrap seed.

    Returns:
        The ``zero_shot_metrics.json`` content (see ``fu_kedro.metrics.summarise_zero_shot``),
        each experiment also carrying ``n_real``, ``n_synthetic`` and ``weights``.
    """
    result = summarise_zero_shot(
        zero_shot_predictions,
        list(params["classes"]),
        n_bootstrap=int(params["metrics"]["n_bootstrap"]),
        ci=float(params["metrics"]["ci"]),
        seed=int(seed),
    )
    for run in experiment_plan:
        entry = result["experiments"].get(experiment_key(run["experiment"], run["backbone"], run["augmentation"]))
        if entry is not None:
            entry.update({k: run[k] for k in ("n_real", "n_synthetic", "weights", "synthetic_ratio")})
    return _json_safe(result)


def zero_shot_mlflow_metrics(zero_shot_metrics: dict) -> dict:
    """Headline metrics for MLflow: ``{"<experiment key>.<metric>": {"value", "step"}}`` (seed mean, paper protocol).

    The catalog's ``MlflowMetricsHistoryDataset`` (prefix ``zero_shot``) logs them as
    ``zero_shot.<experiment key>.<metric>``.
    """
    out = {}
    for key, entry in zero_shot_metrics["experiments"].items():
        for m in ("accuracy", "f1_macro", "roc_auc_macro", "auc_hard_label"):
            value = entry["all_classes"]["mean"].get(m)
            if value is not None:
                out[f"{key}.{m}"] = {"value": float(value), "step": 0}
    return out


# --------------------------------------------------------------------------- synthetic quality
def _first_config_runs(experiment_plan: list[dict], experiment: str) -> list[dict]:
    first = experiment_plan[0]
    return [
        r for r in experiment_plan
        if r["experiment"] == experiment and r["backbone"] == first["backbone"] and r["augmentation"] == first["augmentation"]
    ]


def train_cas_classifier(classifier_data: dict, experiment_plan: list[dict], params: dict, seed: int):
    """Train the CAS classifier: synthetic images only, same backbone/augmentation as the first run.

    Checkpoint selection uses a class-stratified held-out share of the *synthetic* images
    (``quality.cas_holdout_fraction``), so the real images it is scored on stay unseen.

    Returns:
        ``TrainedClassifier`` (its ``info`` says backbone, weights, seed, sizes), or ``None``
        when the synthetic batch is empty.
    """
    synthetic = classifier_data["synthetic"]
    if synthetic is None:
        return None
    run = experiment_plan[0]
    rng = np.random.default_rng(seed)
    labels = synthetic.labels.numpy()
    held = np.zeros(len(labels), bool)
    frac = float(params["quality"]["cas_holdout_fraction"])
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        k = max(1, int(round(frac * len(idx)))) if len(idx) > 1 else 0
        held[rng.choice(idx, k, replace=False)] = True
    torch.manual_seed(seed)
    model, weights = build_classifier(
        run["backbone"], len(classifier_data["classes"]), classifier_data["image_size"], run["weights_file"]
    )
    result = train_classifier(
        model,
        synthetic.subset(~held),
        synthetic.subset(held),
        TrainConfig(**params["train"]),
        seed=seed,
        augmentation=params["augment"] if run["augmentation"] else None,
        run_name="cas.synthetic_only",
    )
    result.info.update({"backbone": run["backbone"], "augmentation": run["augmentation"], "weights": weights})
    return result


def assess_synthetic_quality(
    classifier_data: dict,
    trained_classifiers: dict,
    cas_classifier,
    experiment_plan: list[dict],
    params: dict,
    seed: int,
) -> tuple[dict, pd.DataFrame]:
    """Judge the synthetic batch: fidelity, CAS, feature-space distance, diversity, memorisation.

    Args:
        classifier_data: output of ``prepare_classifier_data``.
        trained_classifiers: the baseline runs (first backbone/augmentation of the plan) score
            fidelity (every seed, averaged) and give the feature space (first seed).
        cas_classifier: output of ``train_cas_classifier``.
        experiment_plan: which runs are the baseline.
        params: ``evaluation`` parameters (``quality``).
        seed: seeds t-SNE and subsampling.

    Returns:
        (``synthetic_quality.json`` content, t-SNE table with class, kind, x, y). Key fields:
        ``fidelity`` and ``cas_accuracy`` (overall fractions), ``n_images``, ``feature_space``,
        ``per_class``.
    """
    classes = classifier_data["classes"]
    synthetic = classifier_data["synthetic"]
    empty = pd.DataFrame(columns=["class", "kind", "x", "y"])
    if synthetic is None:
        return {"n_images": 0, "fidelity": None, "cas_accuracy": None, "note": "synthetic batch is empty"}, empty
    baselines = _first_config_runs(experiment_plan, "baseline")
    if not baselines:
        raise ValueError("synthetic quality needs baseline runs (evaluation.training_sets must include baseline)")
    names = np.asarray(classes, dtype=object)
    prompted = names[synthetic.labels.numpy()]
    fid_runs = []
    for run in baselines:
        pred = names[predict_proba(trained_classifiers[run_key(run)].model, synthetic).argmax(axis=1)]
        fid_runs.append(quality.fidelity(prompted, pred, classes))
    scorer = trained_classifiers[run_key(baselines[0])].model
    q = params["quality"]

    # CAS: synthetic-only classifier on real images it never saw
    cas = {}
    for name, data in (("source_val", classifier_data["source_val"]), ("target", classifier_data["target"])):
        pred = names[predict_proba(cas_classifier.model, data).argmax(axis=1)]
        truth = names[data.labels.numpy()]
        cas[name] = quality.fidelity(truth, pred, classes)  # share of each real class recognised

    real_train = classifier_data["source_train"]
    f_real = extract_features(scorer, real_train)
    f_val = extract_features(scorer, classifier_data["source_val"])
    f_syn = extract_features(scorer, synthetic)
    real_names = names[real_train.labels.numpy()]
    val_names = names[classifier_data["source_val"].labels.numpy()]
    mem = classifier_data["memorisation_images"]
    sim, nn_idx = quality.nearest_real_similarity(mem["synthetic"], mem["source_train"])
    ref_sim, _ = quality.nearest_real_similarity(mem["source_val"], mem["source_train"])
    threshold = float(q["memorisation_threshold"])
    flagged = np.flatnonzero(sim >= threshold)

    per_class = {}
    for c in classes:
        s_mask, r_mask, v_mask = prompted == c, real_names == c, val_names == c
        if not s_mask.any():
            continue
        div_syn = quality.mean_pairwise_cosine_distance(f_syn[s_mask])
        div_real = quality.mean_pairwise_cosine_distance(f_real[r_mask])
        per_class[c] = {
            "n_images": int(s_mask.sum()),
            "fidelity": float(np.mean([f["per_class"].get(c, np.nan) for f in fid_runs])),
            "cas_recall_source_val": cas["source_val"]["per_class"].get(c),
            "cas_recall_target": cas["target"]["per_class"].get(c),
            "frechet_distance_to_real_train": quality.frechet_distance(f_syn[s_mask], f_real[r_mask]),
            "frechet_distance_real_val_reference": quality.frechet_distance(f_val[v_mask], f_real[r_mask]),
            "diversity_synthetic": div_syn,
            "diversity_real_train": div_real,
            "diversity_ratio": div_syn / div_real if div_real and np.isfinite(div_real) else None,
            "max_nearest_real_correlation": float(sim[s_mask].max()),
            "n_flagged_copies": int(np.sum(sim[s_mask] >= threshold)),
        }
    meta = synthetic.meta
    report = {
        "n_images": int(len(synthetic)),
        "feature_space": (
            f"penultimate layer of the baseline classifier {run_key(baselines[0])} "
            f"({baselines[0]['backbone']}, {baselines[0]['weights']}, trained on real source train images, "
            f"{classifier_data['image_size']} px); Fréchet distance in this space is not FID"
        ),
        "fidelity": float(np.mean([f["overall"] for f in fid_runs])),
        "fidelity_per_seed": {str(r["seed"]): f["overall"] for r, f in zip(baselines, fid_runs)},
        "fidelity_scorer": [run_key(r) for r in baselines],
        "cas_accuracy": cas["source_val"]["overall"],
        "cas_accuracy_target": cas["target"]["overall"],
        "cas_classifier": {k: cas_classifier.info.get(k) for k in ("backbone", "augmentation", "weights", "seed", "n_train", "n_val")}
        | {"best_epoch": cas_classifier.best_epoch, "selection": "held-out synthetic images"},
        "frechet_distance_to_real_train": quality.frechet_distance(f_syn, f_real),
        "frechet_distance_real_val_reference": quality.frechet_distance(f_val, f_real),
        "diversity_synthetic": quality.mean_pairwise_cosine_distance(f_syn),
        "diversity_real_train": quality.mean_pairwise_cosine_distance(f_real),
        "memorisation": {
            "method": "max Pearson correlation of pixels with any real source-train image "
                      f"at {mem['synthetic'].shape[-1]} px",
            "threshold": threshold,
            "real_val_reference_max_correlation": float(ref_sim.max()),
            "real_val_reference_p99": float(np.quantile(ref_sim, 0.99)),
            "n_flagged": int(len(flagged)),
            "flagged": [
                {
                    "image_id": str(meta["image_id"].iloc[i]),
                    "nearest_real_image_id": str(real_train.meta["image_id"].iloc[nn_idx[i]]),
                    "correlation": float(sim[i]),
                }
                for i in flagged
            ],
        },
        "per_class": per_class,
        "lineage": classifier_data["info"].get("synthetic_info", {}),
    }
    embedding = quality.per_class_embedding(
        f_real, real_names, f_syn, prompted, classes,
        perplexity=float(q["tsne_perplexity"]), max_per_class=int(q["max_points_per_class"]), seed=int(seed),
    )
    log.info(
        "synthetic quality: fidelity %.3f, CAS %.3f (source val) / %.3f (target), %d flagged copies",
        report["fidelity"], report["cas_accuracy"], report["cas_accuracy_target"], len(flagged),
    )
    return _json_safe(report), embedding


# --------------------------------------------------------------------------- report
def build_report(
    classifier_data: dict,
    experiment_plan: list[dict],
    training_history: pd.DataFrame,
    zero_shot_metrics: dict,
    synthetic_quality: dict,
    synthetic_embedding: pd.DataFrame,
    params: dict,
    seed: int,
):
    """Render the evaluation report (one self-contained HTML page) and its figures.

    Args:
        classifier_data: images for the sample grid and the data description.
        experiment_plan: runs, with the weights each started from.
        training_history: per-epoch curves of every run.
        zero_shot_metrics: output of ``compute_zero_shot_metrics``.
        synthetic_quality: output of ``assess_synthetic_quality``.
        synthetic_embedding: t-SNE table of ``assess_synthetic_quality``.
        params: ``evaluation`` parameters (``report.samples_per_class``).
        seed: seeds the choice of sample images.

    Returns:
        (HTML text, confusion-matrix figure, training-curve figure, sample-grid figure,
        embedding figure, per-center figure); the figures are also embedded in the HTML.
    """
    from . import report as rp

    info = classifier_data["info"]
    figs = {
        "confusion": rp.plot_confusion_matrices(zero_shot_metrics),
        "curves": rp.plot_training_curves(training_history),
        "samples": rp.plot_sample_grid(classifier_data, int(params["report"]["samples_per_class"]), seed),
        "embedding": rp.plot_embedding(synthetic_embedding),
        "per_center": rp.plot_per_center(zero_shot_metrics),
    }
    img = {k: f"<img src='{rp.figure_to_data_uri(f)}'>" for k, f in figs.items()}
    runs = pd.DataFrame(experiment_plan)
    weights = (
        runs.groupby(["experiment", "backbone", "augmentation"], sort=False)
        .agg(seeds=("seed", lambda s: ", ".join(map(str, s))), weights=("weights", "first"),
             n_real=("n_real", "first"), n_synthetic=("n_synthetic", "first"))
        .reset_index()
    )
    best = training_history.groupby("run", sort=False)[["best_epoch"]].first().reset_index()
    syn_info = info.get("synthetic_info") or {}
    data_rows = pd.DataFrame(
        [
            {"set": "source train (real)", "images": info["n_source_train"], "from": _describe(info["source_info"])},
            {"set": "source val (real, checkpoint selection)", "images": info["n_source_val"], "from": _describe(info["source_info"])},
            {"set": "target (zero-shot test only)", "images": info["n_target"], "from": _describe(info["target_info"])},
            {"set": "synthetic batch", "images": info["n_synthetic"], "from": _describe(syn_info)},
        ]
    )
    q = synthetic_quality
    quality_rows = pd.DataFrame(
        [{"class": c, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}}
         for c, d in (q.get("per_class") or {}).items()]
    )
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    mem = q.get("memorisation") or {}
    quality_html = (
        f"<p>n_images = {q.get('n_images')}; <b>fidelity = {fmt(q.get('fidelity'))}</b> (share of synthetic images the "
        f"real-only baseline assigns to their prompted class, mean over baseline seeds); <b>CAS = {fmt(q.get('cas_accuracy'))}</b> "
        f"(synthetic-only classifier, accuracy on real source-val patients; on the target: {fmt(q.get('cas_accuracy_target'))}).</p>"
        f"<p>Feature space: {html.escape(str(q.get('feature_space', 'n/a')))}. Fréchet distance synthetic vs real train "
        f"{fmt(q.get('frechet_distance_to_real_train'))} (reference real val vs real train: "
        f"{fmt(q.get('frechet_distance_real_val_reference'))}); diversity (mean pairwise cosine distance) synthetic "
        f"{fmt(q.get('diversity_synthetic'))} vs real {fmt(q.get('diversity_real_train'))}.</p>"
        f"<p>Memorisation: {html.escape(str(mem.get('method', 'n/a')))}; threshold {mem.get('threshold')}; "
        f"flagged {mem.get('n_flagged')} (real-vs-real reference: max {fmt(mem.get('real_val_reference_max_correlation'))}, "
        f"p99 {fmt(mem.get('real_val_reference_p99'))}).</p>"
        + (rp._table(quality_rows) if len(quality_rows) else "")
    )
    m = zero_shot_metrics
    sections = [
        ("Data and weights", rp._table(data_rows) + rp._table(weights)
         + f"<p class='note'>Classifier input {classifier_data['image_size']} px grayscale copied to 3 channels; "
           "checkpoints selected on source validation patients only; nothing ran on a GPU.</p>"),
        ("Zero-shot comparison (paper protocol: argmax over all source classes, 'other' is an error)",
         rp._table(rp.comparison_table(m, "all_classes"))
         + f"<p class='note'>Percent; mean ± sd over seeds [{100 * m['bootstrap']['ci']:.0f}% patient-bootstrap interval of "
           f"the seed mean, {m['bootstrap']['n_resamples']} resamples, {m['n_target_patients']} patients, "
           f"{m['n_target_images']} images]. Recall/Precision/F-score are macro over the target classes "
           f"{m['target_classes']}. AUC = one-vs-rest ROC-AUC from probabilities; AUC (hard) = from one-hot "
           "predictions as in the FU-LoRA notebook.</p>"),
        ("Zero-shot comparison restricted to the target's classes", rp._table(rp.comparison_table(m, "target_classes"))),
        ("Differences to the baseline (percentage points, paired bootstrap)", rp._table(rp.differences_table(m))),
        ("Per target center", img["per_center"] + rp._table(rp.per_center_table(m))),
        ("Confusion matrices", img["confusion"]),
        ("Training curves (source validation)", img["curves"] + rp._table(best)),
        ("Synthetic data quality", quality_html + img["embedding"]),
        ("Samples (rows: classes)", img["samples"]),
    ]
    page = rp.render_html(sections, "FU-LoRA evaluation: zero-shot classification and synthetic-data quality")
    return page, figs["confusion"], figs["curves"], figs["samples"], figs["embedding"], figs["per_center"]


def _describe(info: dict) -> str:
    if not info:
        return "n/a"
    keep = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool)) and len(str(v)) < 80}
    return ", ".join(f"{k}={v}" for k, v in list(keep.items())[:8]) or "n/a"
