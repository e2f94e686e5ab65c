"""Train several classifiers side by side in worker processes, with the same weights as one by one.

The evaluation trains 15 small classifiers on the phantom default (5 seeds each of the
baseline, the CAS model and the hybrid arm), each on ``evaluation.torch_threads`` threads.
One thread per classifier is what keeps a busy machine from thrashing (see
docs/results/2026-11-28-evaluation-cost.md), so on an idle 2-core machine one core would sit unused.
``evaluation.workers`` trains that many classifiers at the same time, each in its own
process on its own ``torch_threads`` threads.

Why the result does not depend on it: a job carries everything its classifier depends on
(backbone, seed, training and validation tensors, schedule, augmentation, thread count);
``fit`` seeds torch and builds the model exactly as the sequential loop does, and a worker
runs the same float32 CPU kernels on the same thread count. So ``workers: 2`` gives the
same weights, histories and predictions as ``workers: 1``, bit for bit (pinned by
``tests/test_classifier.py``), only sooner; the results come back in job order. On a
loaded machine two single-threaded processes slow down without spin-waiting.

Workers are loky processes (:mod:`fu_kedro.workers`, joblib's reusable executor): started
once per run and reused by every evaluation node. ``workers`` is 1 (in this process) when
training runs on a CUDA device (one GPU is shared by processes through ``fu_kedro.launch``
instead) or under that launcher with several processes.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fu_kedro.workers import map_in_workers

from .backbones import build_classifier
from .data import TensorSet
from .sampling import Batching
from .train import TrainConfig, TrainedClassifier, train_classifier

log = logging.getLogger(__name__)


@dataclass
class ClassifierJob:
    """One classifier to train: everything its weights depend on."""

    name: str                  # run name: progress label and MLflow curve prefix
    backbone: str
    n_classes: int
    image_size: int
    weights_file: str | None   # local ImageNet state dict, or None (random init)
    seed: int
    train: TensorSet
    val: TensorSet
    cfg: TrainConfig
    augmentation: dict | None
    threads: int | None        # torch intra-op threads (None: as set)
    synthetic: TensorSet | None = None    # synthetic images beside ``train`` (the real ones)
    batching: Batching | None = None      # where each step's images come from (None: pooled)
    calibration: TensorSet | None = None  # batch-norm calibration images (None: train)


def fit(job: ClassifierJob) -> tuple[TrainedClassifier, str]:
    """Build and train one classifier: ``(result, weights)``, weights = what initialised the backbone."""
    from fu_kedro.models.generation import cpu_threads

    with cpu_threads(job.threads):  # what evaluation's stage_threads sets, here for a worker process
        torch.manual_seed(job.seed)  # head and random-init weights depend on the seed
        model, weights = build_classifier(job.backbone, job.n_classes, job.image_size, job.weights_file)
        result = train_classifier(model, job.train, job.val, job.cfg, seed=job.seed,
                                  augmentation=job.augmentation, run_name=job.name, synthetic=job.synthetic,
                                  batching=job.batching, calibration=job.calibration)
    return result, weights


def fit_all(jobs: list[ClassifierJob], workers: int) -> list[tuple[TrainedClassifier, str]]:
    """Train ``jobs`` on ``workers`` processes (1: here, one after the other); results in job order."""
    workers = max(1, min(int(workers), len(jobs)))
    if workers > 1:
        log.info("training %d classifiers on %d worker processes (%s threads each)", len(jobs), workers,
                 jobs[0].threads or "default")
    return map_in_workers(fit, jobs, workers)
