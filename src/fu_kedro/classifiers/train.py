"""The one classifier training loop (baseline, hybrid, fidelity scorer and CAS models all use it).

A run is a fixed number of optimiser steps (``steps``), the same for every training set, so
that the arms of a comparison get the same schedule whatever their size: each step is one
batch of exactly ``batch_size`` images drawn from a reshuffled pass over the training set
(an incomplete last batch of a pass is dropped, so the step count is the schedule, not a
by-product of set size). The learning rate follows a cosine decay to 0 over the steps
(``lr_schedule``). Every ``eval_every`` steps (and at the last step) the model is scored on
the held-out validation set; the weights of the best evaluation are kept (checkpoint
selection by ``selection_metric``; ``last`` keeps the final step's weights, the evaluations
then only draw the curves). There is no early stop: a few validation images make a noisy stopping rule,
and a stopped run would have a different schedule from its partner. The validation set is
whatever the caller passes; the evaluation pipeline passes source validation patients
only, never target images.

Device (``device``, ``mixed_precision`` in ``evaluation.train``): on the CPU (``auto``
wherever torch sees no CUDA device) training runs in float32 and the GPU path changes
nothing, bit for bit (``tests/test_classifier.py``). On a CUDA device the model and the
whole ``uint8`` image tensor are moved to the GPU once, so every batch is indexed,
augmented and normalised there: no host-to-device copy per batch and no DataLoader workers
to keep the GPU fed (at 224 px an image is 50 kB, 20,000 images about 1 GB of GPU memory;
a set that does not fit would need pinned host memory and per-batch copies instead, which
is not implemented). Model and inputs use the channels-last memory format; the forward pass
runs under autocast (bf16 where the GPU supports it, else fp16 with a ``GradScaler``);
losses and accuracies stay on the device and are read once per evaluation, so the CPU does
not wait for the GPU after every step. Validation and prediction run in float32. What a run
actually used (device, autocast dtype, memory format, fused optimiser, batch sizes, threads)
is returned in ``TrainedClassifier.info`` and recorded by the evaluation pipeline.

Untested here (no CUDA device where this was written): the CUDA device choice, autocast on
CUDA, fp16 with ``GradScaler`` and the fused AdamW on CUDA, channels-last, the
device-resident tensors. Tested on the CPU: the default is unchanged, bad settings fail
before training, and the autocast + ``GradScaler`` code of ``train_step`` runs (CPU bf16).

Why this loop does not use ``accelerate`` (the diffusion loops do): accelerate keeps one
mixed-precision setting and one device per *process* (``AcceleratorState``), and a second
``Accelerator`` asking for another raises. A ``kedro run`` trains the LoRA (e.g. fp16 in
``conf/paper``) and then the classifiers (``auto``: bf16 on an Ampere GPU) in one process,
and the classifiers' precision is a per-run setting. Swapping in ``Accelerator`` was tried
(same bits on the CPU, float32 and bf16) but needed accelerate's private
``AcceleratorState._reset_state()`` around every run and dropped the CPU test of the
``GradScaler`` branch; the explicit ``torch.autocast`` + ``GradScaler`` here is ~15 lines.

Curves: each evaluation's ``train_loss``, ``train_accuracy`` (means over the steps since the
last evaluation), ``val_loss`` and ``val_accuracy`` are a row of the returned history; the
evaluation pipeline sends them to MLflow through the catalog (``curve_metrics``, keys
``<run_name>.<metric>``, MLflow step = optimiser step).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import accuracy_score
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from tqdm.auto import tqdm

from fu_kedro.devices import resolve_device

from .data import BatchAugmentation, TensorSet, build_augmentation, to_model_input
from .sampling import Batching, BatchStream
from .sampling import index_stream as batch_indices  # noqa: F401 (its old home)

log = logging.getLogger(__name__)

MIXED_PRECISION = ("auto", "no", "fp16", "bf16")


@dataclass
class TrainConfig:
    """Knobs of one training run (``evaluation.train`` in the parameters, checked by its schema,
    :class:`fu_kedro.pipelines.evaluation.params.TrainParams`)."""

    steps: int = 300  # optimiser steps per run, the same for every training set (the schedule)
    eval_every: int = 25  # score the validation set every this many steps (and at the last step)
    batch_size: int = 64
    learning_rate: float = 1e-3
    weight_decay: float = 1e-4
    lr_schedule: str = "cosine"  # cosine: decays to 0 over ``steps`` | constant
    # val_loss (lower is better) | val_accuracy (higher) | last: the weights at the end of the fixed schedule, the
    # evaluations then only draw the curves (a rule for tiny validation sets, where the best of many noisy evaluations is mostly noise)
    selection_metric: str = "val_loss"
    eval_batch_size: int = 256
    bn_recalibration_images: int = 256  # 0 = off; see train_classifier
    device: str = "auto"  # auto: this process's CUDA device if there is one, else cpu | cpu | cuda | cuda:N
    mixed_precision: str = "auto"  # auto | no | fp16 | bf16; see autocast_dtype
    # none: the trained weights | ema: an exponential moving average of them (decay per step) | swa: their equal
    # average from a share of the steps on (torch.optim.swa_utils); evaluated and kept instead of the raw weights
    weight_averaging: str = "none"
    averaging_decay: float = 0.9  # ema: weight of the running average at each step
    averaging_start: float = 0.5  # swa: share of the steps after which every step's weights join the average


@dataclass
class TrainedClassifier:
    """A trained model (best validation evaluation, eval mode) and how it was made."""

    model: nn.Module
    history: pd.DataFrame
    best_step: int
    info: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DevicePlan:
    """Where one training run computes and how: device, autocast dtype (``None`` = float32), memory format."""

    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format

    @property
    def grad_scaling(self) -> bool:
        """fp16 gradients underflow without loss scaling; bf16 has float32's range and needs none."""
        return self.amp_dtype == torch.float16


def autocast_dtype(mixed_precision: str, device_type: str, bf16_supported: bool) -> torch.dtype | None:
    """The autocast dtype for ``mixed_precision`` on a device, ``None`` for float32.

    On CUDA: ``auto`` is bf16 where the GPU supports it (Ampere and later), else fp16. On
    the CPU: ``auto`` and ``no`` are float32 (so the CPU default is unchanged); ``bf16`` is
    CPU autocast; ``fp16`` is refused, as the CPU has no fp16 convolutions.
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision must be one of {list(MIXED_PRECISION)}, got {mixed_precision!r}")
    if mixed_precision == "no" or (mixed_precision == "auto" and device_type != "cuda"):
        return None
    if mixed_precision == "auto":
        return torch.bfloat16 if bf16_supported else torch.float16
    if mixed_precision == "fp16" and device_type != "cuda":
        raise ValueError(
            f"mixed_precision fp16 needs a CUDA device, training is on {device_type} "
            "(no fp16 convolutions there); use auto, no or bf16"
        )
    return torch.float16 if mixed_precision == "fp16" else torch.bfloat16


def device_plan(cfg: TrainConfig) -> DevicePlan:
    """The device, autocast dtype and memory format a run with ``cfg`` uses (channels-last on CUDA only)."""
    device = resolve_device(cfg.device, "evaluation.train.device")
    cuda = device.type == "cuda"
    amp = autocast_dtype(cfg.mixed_precision, device.type, cuda and torch.cuda.is_bf16_supported())
    return DevicePlan(device, amp, torch.channels_last if cuda else torch.contiguous_format)


def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def make_optimiser(model: nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over all parameters; the fused kernel (one pass over the weights instead of
    several) is about 4x faster than the default per-parameter-group loop on the CPU."""
    return torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay, fused=True)


def training_batches(
    train: TensorSet,
    batch_size: int,
    order: torch.Generator,
    augmentation: BatchAugmentation | None,
    augment_rng: torch.Generator,
    memory_format: torch.memory_format = torch.contiguous_format,
):
    """One epoch of shuffled ``(model input, labels)`` batches made in memory from ``train``.

    Batches are made on the device that holds ``train``'s tensors; the order and the
    augmentation parameters come from CPU generators, so they do not depend on the device.
    A batch of one is skipped (it breaks batch norm and says nothing) unless the set has one image.
    """
    for idx in torch.randperm(len(train), generator=order).split(batch_size):
        if len(idx) < 2 and len(train) > 1:
            continue
        idx = idx.to(train.images.device)
        batch = train.images[idx]
        if augmentation is not None:
            batch = augmentation(batch, augment_rng)
        yield to_model_input(batch).contiguous(memory_format=memory_format), train.labels[idx]


def train_step(
    model: nn.Module,
    optimiser: torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    amp_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on cross-entropy, the forward pass under autocast if ``amp_dtype``
    is set, the loss scaled by ``scaler`` if given (fp16); returns (loss, logits)."""
    with torch.autocast(x.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
        logits = _logits(model(x))
        loss = nn.functional.cross_entropy(logits, y)
    optimiser.zero_grad(set_to_none=True)
    if scaler is None:
        loss.backward()
        optimiser.step()
    else:
        scaler.scale(loss).backward()
        scaler.step(optimiser)  # skipped when the scaled gradients overflowed
        scaler.update()
    return loss, logits


EPOCH_METRICS = ("train_loss", "train_accuracy", "val_loss", "val_accuracy")


def curve_metrics(run_name: str, history: pd.DataFrame) -> dict[str, list[dict[str, float]]]:
    """One run's curves as MLflow metric histories: ``{"<run_name>.<metric>": [{"value", "step"}, ...]}``,
    MLflow step = optimiser step (the format of kedro-mlflow's ``MlflowMetricsHistoryDataset``)."""
    return {
        f"{run_name}.{m}": [{"value": float(v), "step": int(s)} for v, s in zip(history[m], history["step"])]
        for m in EPOCH_METRICS
    }


def weight_averager(model: nn.Module, cfg: TrainConfig) -> tuple[AveragedModel | None, int]:
    """The running average of ``model``'s weights ``cfg.weight_averaging`` asks for (``None``: none) and the
    first step that joins it. Buffers (batch-norm statistics) are averaged too; they are re-estimated before
    each evaluation anyway when ``bn_recalibration_images`` is on."""
    if cfg.weight_averaging == "none":
        return None, cfg.steps + 1
    if cfg.weight_averaging == "ema":
        return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(float(cfg.averaging_decay)), use_buffers=True), 1
    return AveragedModel(model, use_buffers=True), int(cfg.averaging_start * cfg.steps) + 1


def _evaluate(model: nn.Module, data: TensorSet, batch_size: int) -> tuple[float, float]:
    proba = predict_proba(model, data, batch_size)
    loss = nn.functional.nll_loss(torch.log(torch.from_numpy(proba).clamp_min(1e-12)), data.labels).item()
    return float(loss), float(accuracy_score(data.labels.numpy(), proba.argmax(axis=1)))


# long: one training loop read top to bottom (the shape of diffusers' training examples); its
# step order is what tests/test_reproducibility.py pins, so it is not cut into pieces
def train_classifier(
    model: nn.Module,
    train: TensorSet,
    val: TensorSet,
    cfg: TrainConfig,
    seed: int,
    augmentation: dict | None = None,
    run_name: str = "classifier",
    synthetic: TensorSet | None = None,
    batching: Batching | None = None,
    calibration: TensorSet | None = None,
) -> TrainedClassifier:
    """Train ``model`` for ``cfg.steps`` optimiser steps on ``train``, keep the best evaluation on ``val``.

    Args:
        model: a freshly built classifier (its head sized to the label space).
        train: training tensors (``uint8`` images, class indices).
        val: validation tensors used only for checkpoint selection.
        cfg: loop knobs, including the device and mixed precision (see ``device_plan``).
        seed: seeds shuffling and augmentation (a generator each, so augmentation on/off
            does not change the batch order); same seed, inputs and thread count -> same
            weights on the same device.
        augmentation: augmentation knobs (see ``build_augmentation``) or ``None`` for none.
        run_name: prefix of the MLflow metric keys and the progress bar label.
        synthetic: synthetic training tensors beside the real ``train`` ones (``None``: none).
        batching: where each step's images come from (``fu_kedro.classifiers.sampling``;
            ``None``: ``pooled``, all images shuffled together as one set).
        calibration: images the batch-norm statistics are re-estimated on (``None``: ``train``).

    Returns:
        ``TrainedClassifier`` in eval mode holding the weights of the best evaluation, on the
        training device; ``history`` has one row per evaluation (step, epoch = images drawn /
        training-set size, lr, train_loss and train_accuracy since the previous evaluation,
        val_loss, val_accuracy, and the cumulative draws: real_draws, synthetic_draws,
        real_draws_min/max over the real images); ``info`` records the schedule, what the run
        ran on and ``real_draw_counts`` (real image id -> times drawn).
    """
    if len(train) == 0 or len(val) == 0:
        raise ValueError(f"{run_name}: empty training ({len(train)}) or validation ({len(val)}) set")
    if len(train) < 2:
        raise ValueError(f"{run_name}: a training set of {len(train)} image cannot train batch norm")
    plan = device_plan(cfg)  # before any work: a bad device or precision fails here
    model.to(plan.device, memory_format=plan.memory_format)
    # the whole uint8 set goes to the device once; batches are made there (a no-op on the CPU)
    train = TensorSet(train.images.to(plan.device), train.labels.to(plan.device), train.meta)
    if synthetic is not None and len(synthetic):
        synthetic = TensorSet(synthetic.images.to(plan.device), synthetic.labels.to(plan.device), synthetic.meta)
    cal_set = train if calibration is None else calibration
    scaler = torch.amp.GradScaler(plan.device.type) if plan.grad_scaling else None
    torch.manual_seed(seed)
    aug = build_augmentation(augmentation) if augmentation else None
    stream = BatchStream(train, synthetic, batching or Batching(), cfg.batch_size, seed, aug, plan.memory_format)
    optimiser = make_optimiser(model, cfg)
    schedule = (
        torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=cfg.steps)
        if cfg.lr_schedule == "cosine" else None
    )
    sign = 1.0 if cfg.selection_metric == "val_loss" else -1.0
    last = cfg.selection_metric == "last"
    best_score, best_step, best_state = np.inf, 0, None
    rows = []
    averaged, average_from = weight_averager(model, cfg)
    calibration_idx = torch.randperm(len(cal_set), generator=torch.Generator().manual_seed(seed)).to(plan.device)
    cal_images = cal_set.images.to(plan.device)
    batch_size = stream.batch_size
    n_images = len(train) + (0 if synthetic is None else len(synthetic))
    # kept on the device and read once per evaluation: no wait for the GPU after every step
    losses, correct, seen = [], 0, 0
    model.train()
    for step in tqdm(range(1, cfg.steps + 1), desc=run_name, unit="step", leave=False):
        x, y = next(stream)
        loss, logits = train_step(model, optimiser, x, y, plan.amp_dtype, scaler)
        lr = optimiser.param_groups[0]["lr"]
        if schedule is not None:
            schedule.step()
        if averaged is not None and step >= average_from:
            averaged.update_parameters(model)
        losses.append(loss.detach())
        correct = correct + (logits.argmax(1) == y).sum()
        seen += len(y)
        if step % cfg.eval_every and step != cfg.steps:
            continue
        batch_losses = torch.stack(losses).double().cpu().numpy()
        if not np.isfinite(batch_losses).all():
            bad = batch_losses[~np.isfinite(batch_losses)][0]
            raise FloatingPointError(f"{run_name}: training loss became {bad} before step {step}")
        net = averaged.module if averaged is not None and int(averaged.n_averaged) > 0 else model
        if cfg.bn_recalibration_images:
            # With few steps the batch-norm running averages (momentum 0.1) are still far from
            # the data when validation starts: eval-mode outputs then collapse to one class.
            # Re-estimating them on un-augmented training images fixes that at the cost of one
            # forward pass over at most this many images.
            n_cal = min(cfg.bn_recalibration_images, len(cal_set))
            cal = to_model_input(cal_images[calibration_idx[:n_cal]]).contiguous(memory_format=plan.memory_format)
            update_bn([cal[i : i + cfg.batch_size] for i in range(0, n_cal, cfg.batch_size)], net)
        val_loss, val_acc = _evaluate(net, val, cfg.eval_batch_size)
        model.train()
        row = {
            "step": step,
            "epoch": step * batch_size / n_images,
            "lr": float(lr),
            "train_loss": float(batch_losses.mean()),
            "train_accuracy": int(correct) / seen,
            "val_loss": val_loss,
            "val_accuracy": val_acc,
            **stream.draws(),
        }
        rows.append(row)
        losses, correct, seen = [], 0, 0
        score = -float(step) if last else sign * row[cfg.selection_metric]
        if score < best_score:
            best_score, best_step = score, step
            # `last`: the model as it ends is what is kept, no copy needed at each evaluation
            best_state = None if last else copy.deepcopy(net.state_dict())
    model = net  # the averaged weights when averaging is on (``net`` of the last evaluation)
    if best_state is not None:
        model.load_state_dict(best_state)
    model.eval()
    history = pd.DataFrame(rows)
    best = history.loc[history["step"] == best_step].iloc[0]
    log.info(
        "%s: %d steps (%.1f passes over %d images), best at step %d (val_loss %.3f, val_accuracy %.3f)",
        run_name, cfg.steps, cfg.steps * batch_size / n_images, n_images, best_step,
        best["val_loss"], best["val_accuracy"],
    )
    return TrainedClassifier(
        model, history, best_step,
        {
            "seed": seed, "n_train": n_images, "n_val": len(val), "steps": cfg.steps,
            "batch_size": batch_size, "passes_over_training_set": cfg.steps * batch_size / n_images,
            "best_step": best_step, "weight_averaging": cfg.weight_averaging, **ran_on(plan, cfg),
            "batching": (batching or Batching()).rule, "real_per_step": stream.draws()["real_draws"] / cfg.steps,
            "real_draw_counts": dict(zip(train.meta["image_id"].astype(str), stream.real_draws.tolist()))
            if "image_id" in train.meta else stream.real_draws.tolist(),
        },
    )


def ran_on(plan: DevicePlan, cfg: TrainConfig) -> dict[str, Any]:
    """What a run actually computed with, for the plan, the report and MLflow (not what was asked for)."""
    return {
        "device": str(plan.device),
        "autocast": str(plan.amp_dtype).removeprefix("torch.") if plan.amp_dtype else "no",
        "grad_scaler": plan.grad_scaling,
        "memory_format": "channels_last" if plan.memory_format == torch.channels_last else "contiguous",
        "optimiser": "AdamW (fused)",
        "eval_batch_size": cfg.eval_batch_size,
        "torch_threads": torch.get_num_threads(),
    }


@torch.no_grad()
def predict_proba(model: nn.Module, data: TensorSet, batch_size: int = 256) -> np.ndarray:
    """Softmax probabilities ``float64 (N, n_classes)`` of a model in eval mode, computed in
    float32 on the model's device."""
    model.eval()
    device = _device_of(model)
    out = [
        torch.softmax(_logits(model(to_model_input(data.images[i : i + batch_size].to(device)))), dim=1).cpu()
        for i in range(0, len(data), batch_size)
    ]
    return torch.cat(out).to(torch.float64).numpy() if out else np.zeros((0, 0))


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no linear head to take features from")
    return linears[-1]


@torch.no_grad()
def extract_features(model: nn.Module, data: TensorSet, batch_size: int = 256) -> np.ndarray:
    """Penultimate-layer features ``float64 (N, D)``: the input of the model's last linear layer."""
    captured: list[torch.Tensor] = []
    handle = _last_linear(model).register_forward_hook(lambda mod, inp, out: captured.append(inp[0].detach().cpu()))
    device = _device_of(model)
    try:
        model.eval()
        for i in range(0, len(data), batch_size):
            model(to_model_input(data.images[i : i + batch_size].to(device)))
    finally:
        handle.remove()
    return torch.cat(captured).to(torch.float64).numpy()
