"""Classifier building, the tensor data path and the one training loop."""
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision

from fu_kedro.classifiers import (
    TrainConfig,
    build_augmentation,
    build_classifier,
    extract_features,
    predict_proba,
    prepare_tensors,
    train_classifier,
)
from fu_kedro.classifiers.train import curve_metrics
from fu_kedro.datasets import ImageSet
from fu_kedro.pipelines.evaluation.params import EvaluationParams, TrainParams
from fu_kedro.schema import ParameterError


def _train_block(**over) -> dict:
    """conf/base's ``evaluation.train`` with ``over`` (the block the schema checks before any node)."""
    from conftest import base_params

    return base_params("evaluation")["train"] | over

AUG = {"rotation_degrees": 15, "crop_scale": [0.8, 1.0], "crop_ratio": [0.9, 1.1], "hflip_p": 0.5}


def _bright_dark(n=24, size=40, seed=0):
    """Two trivially separable classes: bright discs and dark squares on noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, labels = [], []
    for i in range(n):
        img = rng.integers(0, 60, (size, size)).astype(np.uint8)
        if i % 2:
            img[(yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 4) ** 2] = 230
            labels.append("brain")
        else:
            img[size // 3: 2 * size // 3, size // 3: 2 * size // 3] = 120
            labels.append("femur")
        images.append(img)
    meta = pd.DataFrame({"image_id": [f"i{i}" for i in range(n)], "label": labels})
    return ImageSet(np.stack(images), meta)


def test_unknown_backbone_is_named():
    with pytest.raises(ValueError, match="resnet7"):
        build_classifier("resnet7", 5, 32)


def test_weights_file_must_match_backbone(tmp_path):
    torch.manual_seed(0)
    imagenet = torchvision.models.mobilenet_v3_small(num_classes=1000)
    path = tmp_path / "mobilenet_v3_small-imagenet.pth"
    torch.save(imagenet.state_dict(), path)
    model, desc = build_classifier("mobilenet_v3_small", 5, 32, str(path))
    assert desc == f"ImageNet weights from {path}"
    assert torch.equal(model.features[0][0].weight, imagenet.features[0][0].weight)
    assert model.classifier[-1].out_features == 5
    with pytest.raises(ValueError, match="does not match backbone 'shufflenet_v2_x0_5'"):
        build_classifier("shufflenet_v2_x0_5", 5, 32, str(path))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_classifier("mobilenet_v3_small", 5, 32, str(tmp_path / "missing.pth"))


def test_random_init_is_recorded():
    _, desc = build_classifier("resnet18", 5, 32)
    assert desc == "random init"


def test_prepare_tensors_resizes_once_and_rejects_unknown_labels():
    images = _bright_dark(n=4, size=40)
    ts = prepare_tensors(images, ["brain", "femur", "other"], 16, "toy")
    assert ts.images.shape == (4, 1, 16, 16) and ts.images.dtype == torch.uint8
    assert ts.labels.tolist() == [1, 0, 1, 0]
    with pytest.raises(ValueError, match=r"toy: labels \['femur'\]"):
        prepare_tensors(images, ["brain", "other"], 16, "toy")


def test_augmentation_draws_parameters_per_image_from_the_generator():
    batch = prepare_tensors(_bright_dark(n=2, size=32), ["brain", "femur"], 32, "toy").images[1:2].repeat(8, 1, 1, 1)
    aug = build_augmentation(AUG)
    out = aug(batch, torch.Generator().manual_seed(0))
    assert out.shape == batch.shape and out.dtype == torch.uint8
    assert len({tuple(o.flatten().tolist()) for o in out}) == len(out)
    assert torch.equal(out, aug(batch, torch.Generator().manual_seed(0)))


def test_augmentation_geometry():
    images = torch.randint(0, 256, (4, 1, 16, 16), dtype=torch.uint8)
    identity = {"rotation_degrees": 0, "crop_scale": [1, 1], "crop_ratio": [1, 1], "hflip_p": 0.0}
    assert torch.equal(build_augmentation(identity)(images), images)
    assert torch.equal(build_augmentation(dict(identity, hflip_p=1.0))(images), images.flip(-1))
    # a box that never fits (ratio 1.5 at full area) falls back to the whole image, as torchvision's
    assert torch.equal(build_augmentation(dict(identity, crop_ratio=[1.5, 1.5]))(images), images)
    # a quarter-area crop is a 2x zoom into a box that lies inside the image
    theta = build_augmentation(dict(identity, crop_scale=[0.25, 0.25])).affine(100, torch.Generator().manual_seed(0))
    assert torch.allclose(theta[:, 0, 0], torch.tensor(0.5)) and torch.allclose(theta[:, 1, 1], torch.tensor(0.5))
    assert bool((theta[:, :, 2].abs() <= 0.5 + 1e-6).all())
    # rotation angles are uniform in +-15 degrees, one per image
    angles = torch.rad2deg(torch.atan2(*build_augmentation(dict(identity, rotation_degrees=15)).affine(
        2000, torch.Generator().manual_seed(0))[:, [1, 0], 0].T))
    assert 14 < angles.abs().max() <= 15 and abs(float(angles.mean())) < 1


@pytest.fixture
def one_thread():
    # tiny models on a CPU shared with other jobs: two OpenMP threads spin against each other
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_training_learns_and_is_seeded(one_thread):
    data = prepare_tensors(_bright_dark(n=32), ["brain", "femur"], 24, "toy")
    train, val = data.subset(np.arange(24)), data.subset(np.arange(24, 32))
    cfg = TrainConfig(steps=12, eval_every=3, batch_size=8, learning_rate=3e-3, selection_metric="val_accuracy")
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        model, _ = build_classifier("resnet18", 2, 24)
        runs.append(train_classifier(model, train, val, cfg, seed=7, augmentation=AUG, run_name="toy"))
    a, b = runs
    pd.testing.assert_frame_equal(a.history, b.history)
    assert a.history["val_accuracy"].max() == 1.0
    proba = predict_proba(a.model, val)
    assert proba.shape == (8, 2) and np.allclose(proba.sum(1), 1.0)
    # a fixed schedule: every run makes exactly `steps` optimiser steps, scored every `eval_every`
    assert a.history["step"].tolist() == [3, 6, 9, 12]
    # the kept checkpoint is the best validation evaluation
    assert a.best_step == int(a.history.loc[a.history["val_accuracy"].idxmax(), "step"])
    assert extract_features(a.model, val).shape == (8, 512)
    # the curves as MLflow metric histories (sent through the catalog by the evaluation pipeline)
    curves = curve_metrics("toy", a.history)
    assert set(curves) == {"toy.train_loss", "toy.train_accuracy", "toy.val_loss", "toy.val_accuracy"}
    assert curves["toy.val_loss"] == [{"value": v, "step": s} for v, s in zip(a.history["val_loss"], [3, 6, 9, 12])]


def _train_toy(cfg, backbone="resnet18"):
    data = prepare_tensors(_bright_dark(n=32), ["brain", "femur"], 24, "toy")
    train, val = data.subset(np.arange(24)), data.subset(np.arange(24, 32))
    torch.manual_seed(7)
    model, _ = build_classifier(backbone, 2, 24)
    return train_classifier(model, train, val, cfg, seed=7, augmentation=AUG, run_name="toy"), val


def test_cpu_default_is_float32_and_unchanged_by_the_gpu_path(one_thread):
    # mixed_precision "auto" (the default) must be exactly "no" on a CPU: same weights,
    # probabilities and curves, bit for bit; mobilenet_v3_small adds dropout (global RNG)
    for backbone in ("resnet18", "mobilenet_v3_small"):
        runs = {
            mp: _train_toy(TrainConfig(steps=6, eval_every=3, batch_size=8, mixed_precision=mp), backbone)
            for mp in ("no", "auto")
        }
        (a, val), (b, _) = runs["no"], runs["auto"]
        assert a.info["device"] == b.info["device"] == "cpu" and a.info["autocast"] == b.info["autocast"] == "no"
        state_a, state_b = a.model.state_dict(), b.model.state_dict()
        assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
        assert all(p.dtype == torch.float32 and p.is_contiguous() for p in b.model.parameters())
        np.testing.assert_array_equal(predict_proba(a.model, val), predict_proba(b.model, val))
        pd.testing.assert_frame_equal(a.history, b.history)


def test_autocast_dtype_per_device():
    from fu_kedro.classifiers.train import autocast_dtype

    assert autocast_dtype("auto", "cuda", bf16_supported=True) == torch.bfloat16
    assert autocast_dtype("auto", "cuda", bf16_supported=False) == torch.float16
    assert autocast_dtype("fp16", "cuda", bf16_supported=True) == torch.float16
    assert autocast_dtype("no", "cuda", bf16_supported=True) is None
    assert autocast_dtype("auto", "cpu", bf16_supported=False) is None
    assert autocast_dtype("bf16", "cpu", bf16_supported=False) == torch.bfloat16
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        autocast_dtype("fp16", "cpu", bf16_supported=False)


def test_bad_precision_or_missing_gpu_fails_before_training():
    with pytest.raises(ParameterError, match=r"evaluation\.train\.mixed_precision: 'fp32' in evaluation\.train; "
                                             "allowed values: 'auto', 'no', 'fp16' or 'bf16'"):
        TrainParams.from_any(_train_block(mixed_precision="fp32"))
    assert TrainParams.from_any(_train_block(mixed_precision=False)).mixed_precision == "no"  # YAML's unquoted no
    data = prepare_tensors(_bright_dark(n=8), ["brain", "femur"], 24, "toy")
    model, _ = build_classifier("resnet18", 2, 24)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="fp16 needs a CUDA device"):
        train_classifier(model, data, data, TrainConfig(device="cpu", mixed_precision="fp16"), seed=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            train_classifier(model, data, data, TrainConfig(device="cuda"), seed=0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_autocast_branch_runs_on_cpu_bf16(one_thread):
    # the code a GPU takes (autocast, loss scaling), exercised on the CPU in bf16
    from fu_kedro.classifiers.train import make_optimiser, train_step

    result, val = _train_toy(TrainConfig(steps=6, eval_every=3, batch_size=8, mixed_precision="bf16"))
    assert result.info["autocast"] == "bfloat16"
    assert all(p.dtype == torch.float32 for p in result.model.parameters())  # autocast, not a bf16 model
    assert np.isfinite(predict_proba(result.model, val)).all()
    torch.manual_seed(0)
    model, _ = build_classifier("resnet18", 2, 24)
    optimiser = make_optimiser(model, TrainConfig())
    before = model.fc.weight.detach().clone()
    x, y = torch.randn(4, 3, 24, 24), torch.tensor([0, 1, 0, 1])
    loss, logits = train_step(model, optimiser, x, y, torch.bfloat16, torch.amp.GradScaler("cpu"))
    assert logits.dtype == torch.bfloat16 and loss.dtype == torch.float32 and torch.isfinite(loss)
    assert not torch.equal(before, model.fc.weight)


def test_every_step_is_one_full_batch_whatever_the_set_size():
    # the floor/ceil mismatch of epoch-based loops is gone: one step = one batch of batch_size
    from fu_kedro.classifiers.train import batch_indices

    for n in (10, 64, 100, 130):
        stream = batch_indices(n, 32, torch.Generator().manual_seed(0))
        batches = [next(stream) for _ in range(12)]
        assert all(len(b) == min(32, n) for b in batches)
        per_pass = max(1, n // 32)
        for k in range(0, 12 - per_pass + 1, per_pass):  # within a pass no image repeats
            seen = torch.cat(batches[k: k + per_pass])
            assert len(seen.unique()) == len(seen)


def test_unknown_training_key_names_the_key_and_the_allowed_ones():
    from fu_kedro.pipelines.evaluation.nodes import train_config

    with pytest.raises(ParameterError, match=r"evaluation\.train\.max_step: unknown key in evaluation\.train; "
                                             r"allowed keys: steps, eval_every"):
        TrainParams.from_any(_train_block(max_step=5))
    from conftest import base_params

    block = base_params("evaluation")
    block["train"]["steps"] = 5
    assert train_config(EvaluationParams.from_any(block)) == TrainConfig(**_train_block(steps=5))
    with pytest.raises(ParameterError, match=r"evaluation\.train\.steps: 0 in evaluation\.train: Input should be "
                                             "greater than or equal to 1"):
        TrainParams.from_any(_train_block(steps=0))


def test_same_thread_count_same_bits_idle_or_loaded(one_thread):
    # Two CPU burners make the machine busy; with the thread count fixed the trained weights and the
    # predictions are bit-identical to an idle run (time changes, results do not).
    import subprocess
    import sys

    idle, val = _train_toy(TrainConfig(steps=6, eval_every=3, batch_size=8))
    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        loaded, _ = _train_toy(TrainConfig(steps=6, eval_every=3, batch_size=8))
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert all(torch.equal(a, b) for a, b in zip(idle.model.state_dict().values(), loaded.model.state_dict().values()))
    np.testing.assert_array_equal(predict_proba(idle.model, val), predict_proba(loaded.model, val))
    assert idle.info["torch_threads"] == loaded.info["torch_threads"] == 1


def test_worker_processes_give_the_same_weights_as_one_by_one(one_thread):
    # evaluation.workers: classifiers trained side by side in loky worker processes come back in
    # job order with the weights, histories and predictions of the sequential loop, bit for bit
    from fu_kedro.classifiers.pool import ClassifierJob, fit_all
    from fu_kedro.workers import effective_workers

    data = prepare_tensors(_bright_dark(n=32), ["brain", "femur"], 24, "toy")
    train, val = data.subset(np.arange(24)), data.subset(np.arange(24, 32))
    cfg = TrainConfig(steps=6, eval_every=3, batch_size=8)
    jobs = [ClassifierJob(f"toy{s}", "resnet18", 2, 24, None, s, train, val, cfg, AUG, 1) for s in (3, 4)]
    one = fit_all(jobs, workers=1)
    two = fit_all(jobs, workers=2)
    for (a, wa), (b, wb) in zip(one, two):
        assert wa == wb == "random init"
        assert all(torch.equal(x, y) for x, y in zip(a.model.state_dict().values(), b.model.state_dict().values()))
        pd.testing.assert_frame_equal(a.history, b.history)
        np.testing.assert_array_equal(predict_proba(a.model, val), predict_proba(b.model, val))
    # different seeds are different models (the order is the jobs' order, not completion order)
    assert not torch.equal(one[0][0].model.conv1.weight, one[1][0].model.conv1.weight)
    assert effective_workers(2, torch.device("cpu"), 1) == 2
    assert effective_workers(2, torch.device("cuda"), 1) == 1 and effective_workers(2, torch.device("cpu"), 4) == 1
    from conftest import base_params

    with pytest.raises(ParameterError, match=r"evaluation\.workers: 0 in evaluation: Input should be greater than"):
        EvaluationParams.from_any(base_params("evaluation") | {"workers": 0})


def test_weight_averaging_keeps_the_average_and_refuses_bad_settings(one_thread):
    # decay 0 (EMA) and averaging only the last step (SWA) make the average the final weights:
    # the kept model must then be the plain loop's final model, bit for bit (the plumbing returns
    # the averaged copy, re-estimates its batch-norm statistics like the plain one's)
    plain, val = _train_toy(TrainConfig(steps=6, eval_every=3, batch_size=8, selection_metric="last"))
    for extra in ({"weight_averaging": "ema", "averaging_decay": 0.0},
                  {"weight_averaging": "swa", "averaging_start": 5 / 6}):
        avg, _ = _train_toy(TrainConfig(steps=6, eval_every=3, batch_size=8, selection_metric="last", **extra))
        assert avg.info["weight_averaging"] == extra["weight_averaging"]
        np.testing.assert_array_equal(predict_proba(avg.model, val), predict_proba(plain.model, val))
    # a real average differs from the final weights, and is what is evaluated and kept
    ema, _ = _train_toy(TrainConfig(steps=6, eval_every=3, batch_size=8, selection_metric="last",
                                    weight_averaging="ema", averaging_decay=0.8))
    assert not np.array_equal(predict_proba(ema.model, val), predict_proba(plain.model, val))
    assert ema.history["val_loss"].iloc[-1] == pytest.approx(
        torch.nn.functional.nll_loss(torch.log(torch.from_numpy(predict_proba(ema.model, val))), val.labels).item())
    with pytest.raises(ParameterError, match=r"evaluation\.train\.weight_averaging: 'polyak' in evaluation\.train; "
                                             "allowed values: 'none', 'ema' or 'swa'"):
        TrainParams.from_any(_train_block(weight_averaging="polyak"))
    with pytest.raises(ParameterError, match=r"evaluation\.train\.averaging_decay: 1\.0 in evaluation\.train: Input "
                                             "should be less than 1"):
        TrainParams.from_any(_train_block(weight_averaging="ema", averaging_decay=1.0))
