"""Nodes of the ``evaluation`` pipeline: classifiers on real vs hybrid data, zero-shot metrics,
synthetic-data quality, one report.

Data flow (see ``pipeline.py``): image sets -> tensors once -> a validated experiment plan
-> one trained classifier per (training set, backbone, augmentation, seed) -> target
predictions -> metrics; the baseline classifiers and a synthetic-only (CAS) classifier
judge the synthetic batch; everything ends in one report.

Each node reads the ``evaluation`` block through its schema,
``cfg = EvaluationParams.from_any(params)`` (:mod:`fu_kedro.schema`); the classifiers'
augmentation and the quality report get the block's dicts as given.
"""
from __future__ import annotations

import functools
import inspect
import logging
from contextlib import contextmanager
from typing import Any

import mlflow
import numpy as np
import pandas as pd

from fu_kedro.classifiers import (
    TensorSet,
    TrainConfig,
    TrainedClassifier,
    build_classifier,
    check_backbone,
    extract_features,
    predict_proba,
    prepare_tensors,
)
from fu_kedro.classifiers.pool import ClassifierJob, fit_all
from fu_kedro.classifiers.sampling import Batching
from fu_kedro.classifiers.train import curve_metrics
from fu_kedro.datasets import ImageSet
from fu_kedro.devices import resolve_device
from fu_kedro.launch import distributed_state
from fu_kedro.lineage import to_jsonable
from fu_kedro.models.generation import cpu_threads
from fu_kedro.schema import as_dict
from fu_kedro.workers import effective_workers

from . import arms as arm_defs
from . import quality
from .metrics import experiment_key, prob_columns, summarise_zero_shot
from .params import EvaluationParams

log = logging.getLogger(__name__)


def train_config(cfg: EvaluationParams) -> TrainConfig:
    """The classifiers' schedule, ``evaluation.train``, as a :class:`TrainConfig`."""
    return TrainConfig(**cfg.train.model_dump())


def batching(cfg: EvaluationParams) -> Batching:
    """Where each step's images come from, ``evaluation.batching``."""
    return Batching(**cfg.batching.model_dump())


@contextmanager
def stage_threads(params: dict | EvaluationParams | None):
    """``evaluation.torch_threads`` for torch *and* for the BLAS/OpenMP pools numpy, scipy and
    scikit-learn use (``threadpoolctl``): with more threads than free cores they thrash on a
    busy machine (a 512-feature Fréchet distance took 17 s instead of 0.2 s under load).
    ``params`` ``None``: as set."""
    with cpu_threads(None if params is None else EvaluationParams.from_any(params).torch_threads) as used:
        yield used


def in_stage_threads(func):
    """Run a node under :func:`stage_threads` of its ``params`` argument (same signature and docstring)."""
    signature = inspect.signature(func)

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with stage_threads(signature.bind(*args, **kwargs).arguments.get("params")):
            return func(*args, **kwargs)

    return wrapper


def set_mlflow_tags(tags: dict[str, Any]) -> None:
    """Tags on the active MLflow run (kedro-mlflow's); nothing when no run is active (tests, plain sessions)."""
    if mlflow.active_run() is not None:
        mlflow.set_tags({k: str(v) for k, v in tags.items()})


# --------------------------------------------------------------------------- data
def prepare_classifier_data(
    source_images: ImageSet, target_images: ImageSet, synthetic_batch: ImageSet, params: dict, classes: list[str]
) -> dict[str, Any]:
    """Check the three image sets against the label space and turn them into tensors once.

    Args:
        source_images: real source images; meta ``label`` and ``split`` (train | val),
            ``patient_id``, ``center``.
        target_images: real target images (zero-shot test only); meta ``label``,
            ``patient_id``, ``center``.
        synthetic_batch: synthetic images; meta ``label`` = prompted class. May be empty.
        params: ``evaluation`` parameters (``image_size``, ``quality.memorisation_size``).
        classes: the top-level ``classes``: the classifier's label space, in this order.

    Returns:
        dict with ``classes``, ``image_size``, ``source_train``, ``source_val``, ``target``,
        ``synthetic`` (``TensorSet``; ``synthetic`` is ``None`` when the batch is empty),
        ``memorisation_images`` (uint8 arrays at the copy-check resolution) and ``info``
        (counts and the synthetic batch's lineage).

    Raises:
        ValueError: a label outside ``classes`` (naming set and labels), a source without
            train/val patients, a target without patient/center columns.
    """
    cfg = EvaluationParams.from_any(params)
    read_paper_table(cfg.report.paper_table)  # a missing file stops the run now, not at the report
    classes = list(classes)
    size = cfg.image_size
    splits = _check_real_sets(source_images, target_images, classes)
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
    batch = synthetic_batch if synthetic is not None else None
    mem_size, data["memorisation_images"] = _memorisation_images(source_images, splits, batch, classes, size, cfg)
    if synthetic is not None:
        meta = synthetic.meta
        meta["replicate"] = (pd.to_numeric(meta["replicate"]).astype(int) if "replicate" in meta.columns
                             else np.zeros(len(meta), int))
    data["info"] = {
        "n_source_train": len(data["source_train"]),
        "n_source_val": len(data["source_val"]),
        "n_target": len(target),
        "n_synthetic": 0 if synthetic is None else len(synthetic),
        "source_info": source_images.info,
        "target_info": target_images.info,
        "synthetic_info": synthetic_batch.info if synthetic_batch is not None else {},
        "target_classes": [c for c in classes if c in set(target.meta["label"].astype(str))],
        "memorisation_size": int(mem_size),
        "synthetic_replicates": [] if synthetic is None else sorted(map(int, synthetic.meta["replicate"].unique())),
    }
    log.info(
        "evaluation data at %d px: %d source train, %d source val, %d target, %d synthetic images",
        size, *(data["info"][k] for k in ("n_source_train", "n_source_val", "n_target", "n_synthetic")),
    )
    return data


def _check_real_sets(source_images: ImageSet, target_images: ImageSet, classes: list[str]) -> pd.Series:
    """The real sets have the columns, images and source train/val patients evaluation needs; the source splits."""
    if len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(f"classes (the top-level parameter) must be >= 2 distinct class names, got {classes}")
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
    return splits


def _memorisation_images(source_images: ImageSet, splits: pd.Series, synthetic_batch: ImageSet | None,
                         classes: list[str], size: int, cfg: EvaluationParams) -> tuple[int, dict[str, np.ndarray]]:
    """(resolution, uint8 arrays) for the copy check: source train/val and the synthetic batch.

    The copy check compares pixels at the generator's resolution (the synthetic images' own
    size unless quality.memorisation_size is a number), both sides through the same resize:
    a training image that the generator reproduced exactly then correlates 1.0 with it.
    """
    mem_size = cfg.quality.memorisation_size
    if mem_size == "auto":
        mem_size = int(synthetic_batch.images.shape[1]) if synthetic_batch is not None else size
    mem = {"source_train": source_images.select((splits == "train").to_numpy()),
           "source_val": source_images.select((splits == "val").to_numpy())}
    if synthetic_batch is not None:
        mem["synthetic"] = synthetic_batch
    return mem_size, {k: prepare_tensors(v, classes, int(mem_size), k).images[:, 0].numpy() for k, v in mem.items()}


# --------------------------------------------------------------------------- plan
def plan_experiments(classifier_data: dict, params: dict, seed: int) -> list[dict]:
    """Expand the experiment grid and check it before anything trains.

    Args:
        classifier_data: output of ``prepare_classifier_data``.
        params: ``evaluation`` parameters: ``arms`` (name -> real and synthetic images, see
            ``arms.py``), ``comparisons``, ``synthetic_class_mix``, ``batching``,
            ``backbones``, ``augmentation``, ``n_seeds``, ``weights`` (backbone -> file).
        seed: the project seed; run seeds are ``seed, seed + 1, ...``; it also draws the
            balanced real subsets (one subset for every classifier seed).

    Returns:
        One dict per run: experiment (arm name), arm_label, real_rule, synthetic_rule,
        backbone, augmentation, seed, replicate (the synthetic-batch replicate it trains with;
        -1 = none), weights (``"ImageNet weights from <file>"`` or ``"random init"``),
        weights_file, n_real, n_real_patients, real_per_class, real_ids (a hash of the real
        image ids), n_synthetic, synthetic_per_class, synthetic_class_mix, synthetic_ratio,
        arm_seed, and the schedule every arm shares (steps, batching rule, real_per_step,
        synthetic_per_step, batch_size, eval_every, learning_rate, lr_schedule) with the
        draws of each real image it makes, and the torch thread count.

    Raises:
        ValueError: a bad arm or comparison, a synthetic arm with no synthetic images, a
            synthetic quota larger than a replicate has, a balanced subset larger than the
            smallest class, a CSV naming no source-train image, a backbone torchvision lacks,
            a weights file that does not fit its backbone.
    """
    params = EvaluationParams.from_any(params)
    arms = arm_defs.parse_arms(params)
    rule = batching(params)
    mix = params.synthetic_class_mix
    n_syn = classifier_data["info"]["n_synthetic"]
    if any(a.has_synthetic for a in arms) and n_syn == 0:
        raise ValueError(
            f"arms {[a.name for a in arms if a.has_synthetic]} need synthetic images, but synthetic_batch has none; "
            "run the synthesis pipeline first or keep only arms with synthetic: none in evaluation.arms")
    backbones = list(params.backbones)
    weights_files = dict(params.weights)
    descriptions = _check_backbones(backbones, weights_files, classifier_data)
    n_seeds = params.n_seeds
    augmentations = list(params.augmentation)
    cfg = train_config(params)
    plan = []
    for arm in arms:
        real = _arm_real(classifier_data, arm, int(seed))
        quotas = _arm_quotas(classifier_data, arm, real["n_real"], mix)
        for backbone in backbones:
            for aug in augmentations:
                for rep, quota in quotas.items():  # a real-only arm: once per seed; else once per replicate x seed
                    config = {
                        "experiment": arm.name, **arm.spec(), "backbone": backbone, "augmentation": aug,
                        "replicate": rep, "weights": descriptions[backbone], "weights_file": weights_files.get(backbone),
                        **real, "n_synthetic": int(sum(quota.values())),
                        "synthetic_per_class": {classifier_data["classes"][c]: n for c, n in quota.items()},
                        "synthetic_class_mix": mix if arm.has_synthetic else None,
                        "synthetic_ratio": arm.synthetic_value if arm.synthetic == "ratio" else None,
                        "arm_seed": int(seed),
                    }
                    plan.extend(_seeded_runs(config, cfg, rule, int(seed), n_seeds, params.torch_threads))
    fits = _replicate_fits(classifier_data)
    if fits:  # synthesis.adapter_per_replicate: the LoRA fit each synthetic arm's replicate was made with
        for run in plan:
            if run["replicate"] >= 0:
                run["adapter_fit"], run["adapter_content_hash"] = fits[run["replicate"]]
    log.info("evaluation plan: %d classifier runs of %d optimiser steps each (%s batches), arms %s",
             len(plan), cfg.steps, rule.rule, ", ".join(f"{a.name} ({a.describe_real()}; synthetic "
                                                        f"{a.describe_synthetic()})" for a in arms))
    return plan


def _arm_real(classifier_data: dict, arm, seed: int) -> dict[str, Any]:
    """What the plan records about an arm's real images (counts, patients, a hash of the ids)."""
    train = classifier_data["source_train"]
    pos, found = arm_defs.real_positions(arm, train, seed, classifier_data["source_val"])
    meta = train.meta.iloc[pos]
    labels = np.asarray(classifier_data["classes"], dtype=object)[train.labels.numpy()[pos]]
    per_class = {c: int((labels == c).sum()) for c in classifier_data["classes"]}
    return {"n_real": int(len(pos)), "n_real_patients": int(meta["patient_id"].nunique()), "real_per_class": per_class,
            "real_ids": arm_defs.ids_digest(meta["image_id"]), **({"real_found": found} if found else {})}


def _arm_quotas(classifier_data: dict, arm, n_real: int, mix: str) -> dict[int, dict[int, int]]:
    """replicate -> class index -> synthetic images the arm takes from it (``{-1: {}}`` for a real-only arm)."""
    if not arm.has_synthetic:
        return {-1: {}}
    synthetic = classifier_data["synthetic"]
    train_labels = classifier_data["source_train"].labels.numpy()
    classes, counts = np.unique(train_labels, return_counts=True)
    prior = {int(c): k / counts.sum() for c, k in zip(classes, counts)}
    out = {}
    for rep in classifier_data["info"].get("synthetic_replicates") or [0]:
        labels = synthetic.labels.numpy()[(synthetic.meta["replicate"] == rep).to_numpy()]
        out[int(rep)] = arm_defs.synthetic_quota(arm, n_real, labels, prior, mix)
    return out


def _replicate_fits(classifier_data: dict) -> dict[int, tuple[int, str]]:
    """replicate -> (LoRA fit, adapter content hash) when the batch was made with one fit per
    replicate (manifest column ``adapter_fit``); empty otherwise."""
    synthetic = classifier_data.get("synthetic")
    if synthetic is None or "adapter_fit" not in synthetic.meta.columns:
        return {}
    first = synthetic.meta.groupby("replicate")[["adapter_fit", "adapter_content_hash"]].first()
    return {int(r): (int(row["adapter_fit"]), str(row["adapter_content_hash"])) for r, row in first.iterrows()}


def _seeded_runs(run: dict, cfg: TrainConfig, rule, seed: int, n_seeds: int, threads: int | None) -> list[dict]:
    """One plan row per classifier seed (``seed, seed + 1, ...``) of one configuration, with the
    schedule every arm shares."""
    schedule = _shared_schedule(cfg, rule, run["n_real"], run["n_synthetic"])
    return [{**run, "seed": seed + i, **schedule, "torch_threads": threads} for i in range(n_seeds)]


def _check_backbones(backbones: list[str], weights_files: dict, classifier_data: dict) -> dict[str, str]:
    """Backbone -> how its weights start (``random init`` or the ImageNet file), each checked now."""
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
    return descriptions


def _shared_schedule(cfg: TrainConfig, rule, n_real: int, n_synthetic: int) -> dict[str, Any]:
    """The schedule, equal for every arm: same steps, lr, evaluations, real images per step
    (``fixed_real``) or images per step (``pooled``), and the draws of each real image this makes."""
    real, syn = rule.sizes(cfg.batch_size, n_real, n_synthetic)
    held = ("optimiser steps, real images per step (one real-image stream, seeded alike in every arm), "
            "learning-rate schedule, evaluations, batch-norm calibration images" if rule.rule == "fixed_real" else
            "optimiser steps, batch size (real and synthetic images shuffled together), learning-rate schedule, "
            "evaluations, batch-norm calibration images")
    batch = real + syn
    real_draws = cfg.steps * (real if rule.rule == "fixed_real" else batch * n_real / (n_real + n_synthetic))
    return {
        "steps": cfg.steps,
        "batching": rule.rule,
        "real_per_step": real if rule.rule == "fixed_real" else None,
        "synthetic_per_step": syn if rule.rule == "fixed_real" else None,
        "batch_size": batch,
        "eval_every": cfg.eval_every,
        "learning_rate": cfg.learning_rate,
        "lr_schedule": cfg.lr_schedule,
        "held_equal": held,
        "passes_over_training_set": round(cfg.steps * batch / (n_real + n_synthetic), 3),
        "draws_per_real_image": round(real_draws / n_real, 3),
    }


def run_key(run: dict) -> str:
    """Name of one planned run: ``<experiment>/<backbone>/<aug|noaug>[/rep<r>]/seed<seed>``."""
    rep = int(run.get("replicate", -1))
    return (f"{experiment_key(run['experiment'], run['backbone'], run['augmentation'])}"
            f"{f'/rep{rep}' if rep >= 0 else ''}/seed{run['seed']}")


# --------------------------------------------------------------------------- training
def arm_images(classifier_data: dict, run: dict, params: dict) -> tuple[TensorSet, TensorSet | None]:
    """The images a planned run trains on: (its arm's real images, its synthetic images or ``None``).

    The real images follow the arm's rule with the plan's ``arm_seed``; the synthetic ones are
    the first ``synthetic_per_class`` images of one order per class seeded by the classifier
    seed, from the run's replicate (so two arms asking for the same numbers get the same images).
    """
    arm = {a.name: a for a in arm_defs.parse_arms(params)}[run["experiment"]]
    train = classifier_data["source_train"]
    real = train.subset(arm_defs.real_positions(arm, train, int(run["arm_seed"]))[0])
    if int(run["n_synthetic"]) == 0:
        return real, None
    synthetic = classifier_data["synthetic"]
    replicate = synthetic.subset((synthetic.meta["replicate"] == int(run.get("replicate", 0))).to_numpy())
    index = {c: i for i, c in enumerate(classifier_data["classes"])}
    quota = {index[c]: int(n) for c, n in run["synthetic_per_class"].items()}
    return real, replicate.subset(arm_defs.synthetic_positions(replicate, quota, int(run["seed"])))


def training_set(classifier_data: dict, run: dict, params: dict) -> TensorSet:
    """A planned run's real and synthetic images as one set (real first)."""
    real, synthetic = arm_images(classifier_data, run, params)
    return real if synthetic is None else TensorSet.concat([real, synthetic])


def calibration_images(classifier_data: dict, experiment_plan: list[dict], params: dict) -> TensorSet:
    """The real images batch-norm statistics are re-estimated on: those every planned arm trains on."""
    names = list(dict.fromkeys(run["experiment"] for run in experiment_plan))
    arms = [a for a in arm_defs.parse_arms(params) if a.name in names]
    train = classifier_data["source_train"]
    return train.subset(arm_defs.calibration_pool(arms, train, int(experiment_plan[0]["arm_seed"])))


def _job(name: str, run: dict, train, val, classifier_data: dict, cfg, params: dict, synthetic=None,
         calibration=None, batching=None) -> ClassifierJob:
    """One planned run as a :class:`ClassifierJob` (what its weights depend on)."""
    return ClassifierJob(
        name=name, backbone=run["backbone"], n_classes=len(classifier_data["classes"]),
        image_size=classifier_data["image_size"], weights_file=run["weights_file"], seed=int(run["seed"]),
        train=train, val=val, cfg=cfg, augmentation=as_dict(params)["augment"] if run["augmentation"] else None,
        threads=EvaluationParams.from_any(params).torch_threads, synthetic=synthetic,
        batching=batching, calibration=calibration,
    )


def _workers(params: dict, cfg, state) -> int:
    """``evaluation.workers`` as it applies here (1 on a CUDA device or under several launcher processes)."""
    return effective_workers(EvaluationParams.from_any(params).workers,
                             resolve_device(cfg.device, "evaluation.train.device"), state.num_processes)


def train_experiments(
    classifier_data: dict, experiment_plan: list[dict], params: dict, arms: str = "all"
) -> tuple[dict[str, TrainedClassifier], pd.DataFrame]:
    """Train one classifier per planned run; select checkpoints on source validation patients.

    Args:
        classifier_data: output of ``prepare_classifier_data``.
        experiment_plan: output of ``plan_experiments``.
        params: ``evaluation`` parameters (``train``, ``augment``, ``torch_threads``).
        arms: ``all`` | ``baseline`` (runs without synthetic images) | ``synthetic`` (the others).

    Returns:
        (classifiers by ``run_key``, training history with one row per run and evaluation:
        run, experiment, backbone, augmentation, seed, replicate, step, epoch, lr,
        train_loss, train_accuracy, val_loss, val_accuracy, best_step, best_epoch). Curves
        go to MLflow as the loop runs.

    Every run gets the same schedule (``evaluation.train.steps`` optimiser steps of one
    batch each), whatever the size of its training set. Under several processes
    (``python -m fu_kedro.launch -n N run ...``) process k trains runs k, k + N, ...; the
    results are gathered so that every process returns all of them, in plan order — the
    same classifiers and table as one process.
    """
    cfg = train_config(EvaluationParams.from_any(params))
    chosen = [
        run for run in experiment_plan
        if arms == "all" or (arms == "baseline") == (int(run["n_synthetic"]) == 0)
    ]
    # Under several processes (fu_kedro.launch) each trains every n-th run; all get all results.
    state = distributed_state()
    mine = list(range(len(chosen)))[state.process_index :: state.num_processes]
    trained, histories = {}, []
    jobs = []
    calibration = calibration_images(classifier_data, experiment_plan, params) if cfg.bn_recalibration_images else None
    for i in mine:
        run = chosen[i]
        log.info("classifier %d/%d (%s arms): %s (%s)", i + 1, len(chosen), arms, run_key(run), run["weights"])
        real, synthetic = arm_images(classifier_data, run, params)
        jobs.append(_job(curve_run_name(run_key(run)), run, real, classifier_data["source_val"], classifier_data,
                         cfg, params, synthetic, calibration, batching(EvaluationParams.from_any(params))))
    with stage_threads(params):
        fitted = fit_all(jobs, _workers(params, cfg, state))
    for i, (result, _) in zip(mine, fitted):
        run = chosen[i]
        key = run_key(run)
        result.info.update(run)
        trained[key] = result
        hist = result.history.copy()
        hist.insert(0, "run", key)
        for col in ("experiment", "backbone", "augmentation", "seed", "replicate"):
            hist[col] = run.get(col, -1)
        for col in ("device", "autocast", "memory_format", "torch_threads", "batch_size", "steps", "batching"):
            hist[col] = result.info[col]  # what this run actually ran on
        hist["real_ids"] = run["real_ids"]
        hist["best_step"] = result.best_step
        hist["best_epoch"] = float(hist.loc[hist["step"] == result.best_step, "epoch"].iloc[0])
        histories.append(hist)
    if state.num_processes > 1:
        trained, histories = _gather_runs(trained, histories, chosen)
        for result in trained.values():
            result.model.to(resolve_device(cfg.device, "evaluation.train.device"))  # predictions run on this process's device
    history = pd.concat(histories, ignore_index=True) if histories else pd.DataFrame()
    if trained:
        first = next(iter(trained.values())).info
        set_mlflow_tags({f"evaluation.ran_on.{k}": first[k] for k in
                         ("device", "autocast", "grad_scaler", "memory_format", "optimiser", "batch_size",
                          "eval_batch_size", "torch_threads", "steps")})
    return trained, history


def train_baseline_classifiers(classifier_data: dict, experiment_plan: list[dict], params: dict):
    """The runs without synthetic images (the baseline arm; also the fidelity scorers). See ``train_experiments``."""
    return train_experiments(classifier_data, experiment_plan, params, arms="baseline")


def train_synthetic_arm_classifiers(
    classifier_data: dict,
    experiment_plan: list[dict],
    params: dict,
    baseline_classifiers: dict,
    baseline_history: pd.DataFrame,
    fidelity_gate: dict,
):
    """The runs with synthetic images (hybrid, ratios; one per replicate x seed), after the fidelity gate.

    ``fidelity_gate`` is an input so this node runs after the gate (which stops the run when
    ``on_low_fidelity: fail``). Returns every run's classifier and history, baseline
    included, in plan order: ``(trained_classifiers, classifier_training_history)``.
    """
    trained, history = train_experiments(classifier_data, experiment_plan, params, arms="synthetic")
    everything = {**baseline_classifiers, **trained}
    ordered = {run_key(r): everything[run_key(r)] for r in experiment_plan}
    return ordered, pd.concat([baseline_history, history], ignore_index=True)


def _gather_runs(trained: dict, histories: list[pd.DataFrame], experiment_plan: list[dict]):
    """Every process's trained runs on every process, in plan order (the main process then
    sends every run's curves to MLflow: ``classifier_curve_metrics``)."""
    from accelerate.utils import gather_object

    for result in trained.values():
        result.model.cpu()  # a pickled model must not point at this process's GPU
    mine = [(key, trained[key], hist) for key, hist in zip(trained, histories)]
    everyone = {key: (result, hist) for key, result, hist in gather_object(mine)}
    keys = [run_key(run) for run in experiment_plan]
    return {k: everyone[k][0] for k in keys}, [everyone[k][1] for k in keys]


def curve_run_name(key: str) -> str:
    """The MLflow name of a run's curves: its plan key with dots (``hybrid.resnet18.da0.seed0...``)."""
    return key.replace("/", ".")


def cas_run_name(seed: int) -> str:
    """The MLflow name of a CAS classifier's curves."""
    return f"cas.synthetic_only.seed{seed}"


def classifier_curve_metrics(classifier_training_history: pd.DataFrame, cas_classifier: list | None) -> dict:
    """Every classifier's training curves as MLflow metric histories (``classifier_curve_metrics``):
    ``{"<run>.<train_loss|train_accuracy|val_loss|val_accuracy>": [{"value", "step"}, ...]}`` for
    each run of the plan (``classifier_training_history``) and each CAS classifier; step =
    optimiser step."""
    out: dict = {}
    if not classifier_training_history.empty:
        for key, hist in classifier_training_history.groupby("run", sort=False):
            out.update(curve_metrics(curve_run_name(str(key)), hist))
    for result in cas_classifier or []:
        if not result.history.empty:
            out.update(curve_metrics(cas_run_name(result.info["seed"]), result.history))
    return out


# --------------------------------------------------------------------------- quality gate
LOW_FIDELITY_MESSAGE = (
    "synthetic batch not class-faithful (fidelity {fidelity:.3f} < evaluation.min_fidelity {threshold:.2f}); "
    "hybrid numbers say nothing about the method"
)


def _correct_matrix(models: list, data: TensorSet, truth: np.ndarray) -> np.ndarray:
    """``(n_models, n_images)`` booleans: model m labels image i as ``truth[i]`` (class index)."""
    return np.stack([predict_proba(m, data).argmax(axis=1) == truth for m in models])


def check_synthetic_fidelity(
    classifier_data: dict, baseline_classifiers: dict, experiment_plan: list[dict], params: dict, seed: int
) -> dict:
    """The quality gate: is the synthetic batch class-faithful enough for the hybrid numbers to mean anything?

    The classifiers of ``quality.scorer_arm`` (real source images only; first
    backbone/augmentation, every seed) label every synthetic image; fidelity = share labelled as the class it was
    prompted for. Beside it, the same scorers' accuracy on held-out real source-val images
    (train-real/test-real): the reference fidelity is to be read against. Intervals: 95 %
    bootstrap over scorer seeds and images (val images by patient).

    Below ``evaluation.min_fidelity`` the run logs an ERROR, tags the MLflow run
    (``evaluation.synthetic_gate = failed``) and the report carries a red banner; with
    ``evaluation.on_low_fidelity: fail`` it stops here, before any hybrid classifier trains.

    Returns:
        dict: status (passed | failed | no synthetic batch), threshold, action, fidelity,
        fidelity_ci, fidelity_per_seed, fidelity_per_replicate, per_class, scorer
        (run keys), scorer_accuracy_source_val (+ ci, per seed), note, message.
    """
    cfg = EvaluationParams.from_any(params)
    threshold, action = cfg.min_fidelity, cfg.on_low_fidelity
    synthetic = classifier_data["synthetic"]
    gate: dict[str, Any] = {"threshold": threshold, "action": action}
    if synthetic is None:
        gate.update(status="no synthetic batch", fidelity=None)
        return gate
    scorers = _first_config_runs(experiment_plan, _reference_arm(experiment_plan, params))
    if not scorers:
        raise ValueError("the fidelity gate needs baseline runs (evaluation.arms must include an arm with synthetic: none)")
    models = [baseline_classifiers[run_key(r)].model for r in scorers]
    val = classifier_data["source_val"]
    n_boot = max(cfg.metrics.n_bootstrap, 1)
    with stage_threads(cfg):
        syn_correct = _correct_matrix(models, synthetic, synthetic.labels.numpy())
        val_correct = _correct_matrix(models, val, val.labels.numpy())
    val_groups = val.meta["patient_id"].astype(str).to_numpy() if "patient_id" in val.meta else None
    fid = float(syn_correct.mean())
    ref = float(val_correct.mean())
    names = np.asarray(classifier_data["classes"], dtype=object)
    prompted = names[synthetic.labels.numpy()]
    replicate = synthetic.meta["replicate"].to_numpy()
    gate.update(
        fidelity=fid,
        fidelity_ci=quality.seed_item_interval(syn_correct, None, n_boot, seed),
        fidelity_per_seed={str(r["seed"]): float(c.mean()) for r, c in zip(scorers, syn_correct)},
        fidelity_per_replicate={str(k): float(syn_correct[:, replicate == k].mean()) for k in np.unique(replicate)},
        per_class={c: float(syn_correct[:, prompted == c].mean()) for c in classifier_data["classes"]
                   if (prompted == c).any()},
        scorer=[run_key(r) for r in scorers],
        scorer_accuracy_source_val=ref,
        scorer_accuracy_source_val_ci=quality.seed_item_interval(val_correct, val_groups, n_boot, seed),
        scorer_accuracy_source_val_per_seed={str(r["seed"]): float(c.mean()) for r, c in zip(scorers, val_correct)},
        n_source_val=len(val),
        status="passed" if fid >= threshold else "failed",
    )
    gate["note"] = (
        "fidelity is well above the scorers' own accuracy on real held-out images: the synthetic images may be "
        "prototypes (too easy) or copies; see memorisation and diversity" if fid > ref + 0.1 else
        "fidelity read against the scorers' accuracy on real held-out images"
    )
    set_mlflow_tags({"evaluation.synthetic_gate": gate["status"], "evaluation.fidelity": f"{fid:.4f}",
                     "evaluation.min_fidelity": threshold})
    if gate["status"] == "failed":
        gate["message"] = LOW_FIDELITY_MESSAGE.format(fidelity=fid, threshold=threshold)
        log.error(gate["message"])
        if action == "fail":
            raise ValueError(gate["message"] + " (evaluation.on_low_fidelity: fail)")
    else:
        log.info("synthetic batch passed the fidelity gate: %.3f >= %.2f (scorers' real source-val accuracy %.3f)",
                 fid, threshold, ref)
    return to_jsonable(gate, finite=True)


# --------------------------------------------------------------------------- zero-shot
def predict_target(
    classifier_data: dict, trained_classifiers: dict, experiment_plan: list[dict], params: dict | None = None
) -> pd.DataFrame:
    """Zero-shot predictions of every trained classifier on every target image.

    Returns:
        The contract table, one row per (classifier, target image): experiment, backbone,
        augmentation, seed, image_id, patient_id, center, label, prediction (argmax over all
        source classes, ``other`` included), ``prob_<class>`` per source class, then
        ``replicate`` (synthetic-batch replicate the classifier trained with, -1 = none).
    """
    classes = classifier_data["classes"]
    target = classifier_data["target"]
    frames = []
    with stage_threads(params):
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
            frame["replicate"] = int(run.get("replicate", -1))
            frames.append(frame)
    return pd.concat(frames, ignore_index=True)


@in_stage_threads
def compute_zero_shot_metrics(
    zero_shot_predictions: pd.DataFrame, experiment_plan: list[dict], params: dict, classes: list[str], seed: int
) -> dict:
    """Metrics of every experiment from the predictions table alone, plus what each was trained on.

    Args:
        zero_shot_predictions: output of ``predict_target`` (or the CSV read back).
        experiment_plan: adds #real, #synthetic and the weights to each experiment.
        params: ``evaluation`` parameters (``metrics.n_bootstrap``, ``metrics.ci``).
        classes: the top-level ``classes`` (the label space, in order).
        seed: bootstrap seed.

    Returns:
        The ``zero_shot_metrics.json`` content (see ``fu_kedro.metrics.summarise_zero_shot``),
        each experiment also carrying ``n_real``, ``n_synthetic`` and ``weights``.
    """
    cfg = EvaluationParams.from_any(params)
    result = summarise_zero_shot(
        zero_shot_predictions,
        list(classes),
        n_bootstrap=cfg.metrics.n_bootstrap,
        ci=cfg.metrics.ci,
        seed=int(seed),
        replicate_fits=len({run["adapter_content_hash"] for run in experiment_plan if "adapter_content_hash" in run}) > 1,
        comparisons=arm_defs.parse_comparisons(cfg),
    )
    for run in experiment_plan:
        entry = result["experiments"].get(experiment_key(run["experiment"], run["backbone"], run["augmentation"]))
        if entry is not None:
            entry.update({k: run.get(k) for k in PLAN_FIELDS_IN_METRICS})
    result["arms"] = {
        "batching": cfg.batching.rule,
        "synthetic_class_mix": cfg.synthetic_class_mix,
        "order": list(dict.fromkeys(run["experiment"] for run in experiment_plan)),
        "comparisons": [list(c) for c in arm_defs.parse_comparisons(cfg)],
    }
    return to_jsonable(result, finite=True)


# what each experiment's metrics entry carries from the plan (what its arm trained on)
PLAN_FIELDS_IN_METRICS = ("n_real", "n_real_patients", "real_per_class", "real_found", "n_synthetic",
                          "synthetic_per_class", "synthetic_class_mix", "weights", "synthetic_ratio", "arm_label",
                          "real_rule", "synthetic_rule", "batching", "real_per_step", "synthetic_per_step",
                          "draws_per_real_image")


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
def _reference_arm(experiment_plan: list[dict], params: dict | EvaluationParams) -> str | None:
    """The real-only arm whose classifiers score the synthetic batch (fidelity gate, CAS schedule,
    feature space): ``evaluation.quality.scorer_arm``, or with ``null`` the first arm of
    ``evaluation.arms`` without synthetic images.

    conf/base names BAL: scorers trained on the class-balanced real images label each class on
    its own merits, where ES's scorers carry ES's class prior (Other 42 %, abdomen 6 %) into the
    fidelity and read a faithful abdomen image as Other.
    """
    name = EvaluationParams.from_any(params).quality.scorer_arm  # the schema checked it names a real-only arm
    if name is not None:
        return name
    return next((r["experiment"] for r in experiment_plan if int(r["n_synthetic"]) == 0), None)


def _first_config_runs(experiment_plan: list[dict], experiment: str | None) -> list[dict]:
    first = experiment_plan[0]
    return [
        r for r in experiment_plan
        if r["experiment"] == experiment and r["backbone"] == first["backbone"] and r["augmentation"] == first["augmentation"]
    ]


def train_cas_classifier(
    classifier_data: dict, experiment_plan: list[dict], params: dict, seed: int, fidelity_gate: dict | None = None
):
    """Train the CAS classifiers: synthetic images only, same backbone/augmentation, schedule and
    seeds as the first configuration's baseline runs (one per seed).

    Checkpoint selection uses a class-stratified held-out share of the *synthetic* images
    (``quality.cas_holdout_fraction``), so the real images they are scored on stay unseen.
    All replicates of the batch are pooled. ``fidelity_gate`` is an input only so that this
    runs after the gate (nothing trains on a batch the gate stopped).

    Returns:
        list of ``TrainedClassifier`` (``info``: backbone, weights, seed, sizes), or ``None``
        when the synthetic batch is empty.
    """
    synthetic = classifier_data["synthetic"]
    if synthetic is None:
        return None
    runs = _first_config_runs(experiment_plan, _reference_arm(experiment_plan, params)) or [experiment_plan[0]]
    labels = synthetic.labels.numpy()
    frac = EvaluationParams.from_any(params).quality.cas_holdout_fraction
    cfg = train_config(EvaluationParams.from_any(params))
    jobs = []
    for run in runs:
        rng = np.random.default_rng(run["seed"])
        held = np.zeros(len(labels), bool)
        for c in np.unique(labels):
            idx = np.flatnonzero(labels == c)
            k = max(1, int(round(frac * len(idx)))) if len(idx) > 1 else 0
            held[rng.choice(idx, k, replace=False)] = True
        jobs.append(_job(cas_run_name(run["seed"]), run, synthetic.subset(~held), synthetic.subset(held),
                         classifier_data, cfg, params))
    with stage_threads(params):
        fitted = fit_all(jobs, _workers(params, cfg, distributed_state()))
    out = []
    for run, (result, weights) in zip(runs, fitted):
        result.info.update({"backbone": run["backbone"], "augmentation": run["augmentation"], "weights": weights})
        out.append(result)
    return out


@in_stage_threads
def make_vae_round_trip_controls(base_model, classifier_data: dict, params: dict, seed: int) -> dict:
    """The copy check's images through the base model's VAE (``quality.decoder_space_images``):
    source train, source val, the synthetic batch and the slipped-in controls, each encoded
    and decoded once (the check compares them as the generator's decoder renders them), and
    training images' VAE round trips, a positive control (what a generator that memorised
    them would output). ``quality.memorisation_space: pixels``: nothing (``{}``; the check runs on
    the pixels, without the VAE's cost: one encode + decode per image, ~48 CPU-s each at 512 px)."""
    q = EvaluationParams.from_any(params).quality
    if q.memorisation_space == "pixels":
        return {}
    return quality.decoder_space_images(base_model.pipe.vae, classifier_data["memorisation_images"],
                                        q.memorisation_controls, seed)


@in_stage_threads  # t-SNE, Fréchet and KID too: sklearn/scipy's OpenMP/BLAS pools spin-wait on a busy machine
def assess_synthetic_quality(
    classifier_data: dict,
    trained_classifiers: dict,
    cas_classifier,
    experiment_plan: list[dict],
    params: dict,
    seed: int,
    fidelity_gate: dict | None = None,
    vae_controls: dict | None = None,
) -> tuple[dict, pd.DataFrame]:
    """Judge the synthetic batch: fidelity (from the gate), CAS, feature-space distances, diversity, memorisation.

    Args:
        classifier_data: output of ``prepare_classifier_data``.
        trained_classifiers: the baseline runs (first backbone/augmentation of the plan) give
            the feature space (first seed) and the train-real/test-real reference.
        cas_classifier: output of ``train_cas_classifier`` (one synthetic-only model per seed).
        experiment_plan: which runs are the baseline.
        params: ``evaluation`` parameters (``quality``, ``metrics``).
        seed: seeds t-SNE, subsampling, controls and intervals.
        fidelity_gate: output of ``check_synthetic_fidelity`` (fidelity and its reference).
        vae_controls: output of ``make_vae_round_trip_controls``: the copy check runs in the
            base model's decoder space, with VAE round trips as positive controls (``None`` or
            ``{}``: on the pixels, slipped-in copies only).

    Returns:
        (``synthetic_quality.json`` content, t-SNE table with class, kind, x, y). Key fields:
        ``fidelity`` and ``cas_accuracy`` (overall fractions), ``n_images``, ``feature_space``,
        ``per_class``; each anchored by a reference (``fidelity_reference``,
        ``cas_reference``), intervals over seeds, memorisation controls and threshold.
    """
    synthetic = classifier_data["synthetic"]
    if synthetic is None:
        empty = pd.DataFrame(columns=["class", "kind", "x", "y"])
        return {"n_images": 0, "fidelity": None, "cas_accuracy": None, "note": "synthetic batch is empty"}, empty
    baselines = _first_config_runs(experiment_plan, _reference_arm(experiment_plan, params))
    if not baselines:
        raise ValueError("synthetic quality needs baseline runs (evaluation.arms must include an arm with synthetic: none)")
    cfg = EvaluationParams.from_any(params)
    gate = fidelity_gate or check_synthetic_fidelity(
        classifier_data, trained_classifiers, experiment_plan, cfg.model_copy(update={"on_low_fidelity": "warn"}), seed)
    base_models = [trained_classifiers[run_key(r)].model for r in baselines]
    views = _classifier_views(classifier_data, [c.model for c in cas_classifier], base_models, base_models[0])
    copies = _memorisation(classifier_data, cfg, seed, vae_controls)
    scorer = {"run": run_key(baselines[0]), "backbone": baselines[0]["backbone"], "weights": baselines[0]["weights"]}
    cas_info = [dict(c.info, best_step=c.best_step) for c in cas_classifier]
    report, embedding = quality.synthetic_quality_report(classifier_data, views, gate, copies, cas_info, scorer,
                                                         as_dict(params), seed)
    log.info(
        "synthetic quality: fidelity %.3f (scorers on real val %.3f), CAS %.3f (real-only %.3f) on source val, "
        "%d flagged copies (threshold %.3f)",
        report["fidelity"], gate.get("scorer_accuracy_source_val"), report["cas_accuracy"],
        gate.get("scorer_accuracy_source_val"), report["memorisation"]["n_flagged"], copies["threshold"],
    )
    return to_jsonable(report, finite=True), embedding


def _classifier_views(classifier_data: dict, cas_models: list, base_models: list, scorer) -> dict:
    """What the classifiers make of the images the quality measures need: CAS (synthetic-only
    classifiers, one per seed) on real images they never saw, beside real-only classifiers of
    the same seeds on the same images (train-real/test-real); the scorer's features."""
    names = np.asarray(classifier_data["classes"], dtype=object)
    val, target = classifier_data["source_val"], classifier_data["target"]
    return {
        "cas_val": _correct_matrix(cas_models, val, val.labels.numpy()),
        "cas_target": _correct_matrix(cas_models, target, target.labels.numpy()),
        "real_target": _correct_matrix(base_models, target, target.labels.numpy()),
        "cas_pred_val": [names[predict_proba(m, val).argmax(axis=1)] for m in cas_models],
        "cas_pred_target": [names[predict_proba(m, target).argmax(axis=1)] for m in cas_models],
        "f_real": extract_features(scorer, classifier_data["source_train"]),
        "f_val": extract_features(scorer, val),
        "f_syn": extract_features(scorer, classifier_data["synthetic"]),
    }


def _memorisation(classifier_data: dict, cfg: EvaluationParams, seed: int, vae_controls) -> dict:
    """The copy check at the generator's resolution, its threshold calibrated on controls."""
    mem = classifier_data["memorisation_images"]
    copies = quality.memorisation_check(mem["synthetic"], mem["source_train"], mem["source_val"],
                                        cfg.quality.memorisation_controls, seed,
                                        cfg.quality.memorisation_threshold, vae_controls)
    calibration = copies["controls"]
    if not calibration["separable"]:
        log.warning("memorisation check (%s space): at %d px a real validation image correlates %.3f with a training "
                    "image, as high as a positive control (%.3f); the copy check cannot tell them apart at this "
                    "resolution", copies["space"], mem["synthetic"].shape[-1], calibration["negative_max"],
                    calibration["positive_min"])
    return copies


# --------------------------------------------------------------------------- report
@in_stage_threads
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

    The top of the page states the question, the answer (hybrid - baseline accuracy) with
    its interval and what the interval covers, the chance rows, and whether the synthetic
    batch passed the fidelity gate (a red banner when it did not).

    Args:
        classifier_data: images for the sample grid and the data description.
        experiment_plan: runs, with the weights and the schedule each had.
        training_history: source-validation curves of every run, with what each ran on.
        zero_shot_metrics: output of ``compute_zero_shot_metrics``.
        synthetic_quality: output of ``assess_synthetic_quality`` (with the gate's verdict).
        synthetic_embedding: t-SNE table of ``assess_synthetic_quality``.
        params: ``evaluation`` parameters (``report.samples_per_class``).
        seed: seeds the choice of sample images.

    Returns:
        (HTML text, confusion-matrix figure, training-curve figure, sample-grid figure,
        embedding figure, per-center figure); the figures are also embedded in the HTML.
    """
    from . import report  # matplotlib: only when the report is built

    cfg = EvaluationParams.from_any(params).report
    return report.evaluation_report(classifier_data, experiment_plan, training_history, zero_shot_metrics,
                                    synthetic_quality, synthetic_embedding, cfg.samples_per_class, seed,
                                    read_paper_table(cfg.paper_table))


def read_paper_table(path: str | None) -> pd.DataFrame | None:
    """The FU-LoRA authors' result table (``evaluation.report.paper_table``; ``None``: not shown)."""
    if not path:
        return None
    from pathlib import Path

    if not Path(path).is_file():
        raise FileNotFoundError(f"evaluation.report.paper_table: {path} does not exist (the FU-LoRA authors' "
                                "paper_table_overall_performance.csv; null leaves the paper's rows out)")
    table = pd.read_csv(path, encoding="utf-8-sig")
    missing = [c for c in report_columns() if c not in table.columns]
    if missing:
        raise ValueError(f"evaluation.report.paper_table: {path} lacks columns {missing}")
    return table


def report_columns() -> list[str]:
    from .report import PAPER_COLUMNS

    return PAPER_COLUMNS
