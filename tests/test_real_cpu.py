"""The real-data CPU profile (``kedro run --env real_cpu``, docs/real_data.md) and the
ultrasound augmentation it turns on (``evaluation.augment``: gain, gamma, speckle, sector)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from conftest import project_parameters

from fu_kedro.classifiers import build_augmentation
from fu_kedro.classifiers.data import BatchAugmentation, UltrasoundAugmentation, build_ultrasound

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PAPER_DA = {"rotation_degrees": 15, "crop_scale": [0.8, 1.0], "crop_ratio": [0.9, 1.1], "hflip_p": 0.5}
US_DA = {"gain": [0.7, 1.3], "gamma": [0.8, 1.25], "speckle": 0.3, "speckle_grain": 2,
         "sector_p": 0.5, "sector_half_angle": [30, 45], "sector_depth": [0.8, 1.0]}


def _batch(n=8, size=32, seed=0):
    return torch.randint(0, 256, (n, 1, size, size), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _reference_paper_da(aug: BatchAugmentation, batch, generator):
    """The paper's DA as it was before the ultrasound knobs existed (one affine resampling)."""
    theta = aug.affine(len(batch), generator)
    grid = torch.nn.functional.affine_grid(theta, list(batch.shape), align_corners=False)
    out = torch.nn.functional.grid_sample(batch.float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out.round_().clamp_(0, 255).to(torch.uint8)


@pytest.mark.parametrize("off", [{}, {"gain": None, "gamma": None, "speckle": 0, "sector_p": 0.0}])
def test_ultrasound_knobs_off_leave_the_paper_da_bit_identical(off):
    """Absent or zero knobs: no extra random draw, the same bits and the same generator state."""
    aug = build_augmentation(PAPER_DA | off)
    assert aug.ultrasound is None
    batch = _batch()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(aug(batch, g1), _reference_paper_da(aug, batch, g2))
    assert torch.equal(g1.get_state(), g2.get_state())


def test_paper_profile_turns_the_ultrasound_knobs_off():
    """conf/base turns the ultrasound DA on (commit 9c46b0e); the paper's DA is geometric only."""
    p = _params("paper")
    assert build_ultrasound(p["evaluation"]["augment"]) is None


def test_ultrasound_augmentation_is_seeded_per_image_and_changes_intensity():
    aug = build_augmentation(PAPER_DA | US_DA)
    assert isinstance(aug.ultrasound, UltrasoundAugmentation)
    batch = torch.full((16, 1, 32, 32), 128, dtype=torch.uint8)
    a = aug(batch, torch.Generator().manual_seed(5))
    b = aug(batch, torch.Generator().manual_seed(5))
    c = aug(batch, torch.Generator().manual_seed(6))
    assert a.dtype == torch.uint8 and a.shape == batch.shape
    assert torch.equal(a, b) and not torch.equal(a, c)
    # per image, not one draw for the batch: the images' mean levels differ
    centre = a[:, 0, 12:20, 12:20].float().mean((1, 2))
    assert centre.std() > 3


def test_each_ultrasound_knob_alone():
    flat = torch.full((64, 1, 32, 32), 100.0)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    gain = UltrasoundAugmentation(gain=(0.5, 1.5))(flat, g())
    per_image = gain[:, 0, 0, 0]
    assert torch.all((per_image >= 50) & (per_image <= 150)) and torch.equal(gain, per_image.view(-1, 1, 1, 1).expand_as(gain))
    gamma = UltrasoundAugmentation(gamma=(2.0, 2.0))(flat, g())
    assert torch.allclose(gamma, torch.full_like(flat, 255 * (100 / 255) ** 2))
    speckle = UltrasoundAugmentation(speckle=0.5, speckle_grain=3)(flat, g())
    assert speckle.min() >= 0 and 0.5 < speckle.std() and abs(speckle.mean() - 100) < 2
    fan = UltrasoundAugmentation(sector_p=1.0, sector_half_angle=(30, 30), sector_depth=(1.0, 1.0))(flat, g())
    assert torch.all(fan[:, 0, 0, 0] == 0) and torch.all(fan[:, 0, 0, 31] == 0)   # top corners: outside the fan
    assert torch.all(fan[:, 0, 20, 16] == 100)                                      # straight below the apex: inside
    none = UltrasoundAugmentation(sector_p=0.0 + 1e-9, sector_half_angle=(10, 10))(flat, g())
    assert torch.equal(none, flat)  # probability ~0: no image is masked


@pytest.mark.parametrize("bad", [{"gain": [1.3, 0.7]}, {"sector_p": 1.5}, {"gamma": [0, 1]}, {"speckle": -0.1},
                                 {"speckle": 0.1, "speckle_grain": 0}])
def test_bad_ultrasound_knobs_are_named(bad):
    with pytest.raises(ValueError, match="evaluation.augment"):
        build_augmentation(PAPER_DA | bad)


def test_unknown_augment_key_still_stops_the_run():
    from fu_kedro.pipelines.evaluation.params import Augment
    from fu_kedro.schema import ParameterError

    Augment.from_any(PAPER_DA | US_DA)
    with pytest.raises(ParameterError, match=r"evaluation\.augment\.specle: unknown key in evaluation\.augment"):
        Augment.from_any(PAPER_DA | US_DA | {"specle": 0.2})


def _params(env: str) -> dict:
    """conf/base soft-merged with conf/<env>, as Kedro loads them for ``--env <env>`` (the conftest loader)."""
    return project_parameters(env)


def _real_cpu_params() -> dict:
    return _params("real_cpu")


def test_real_cpu_profile_matches_resolution_end_to_end():
    p = _real_cpu_params()
    assert p["source_format"] == "fetal_planes_db" and p["target_format"] == "african"
    size = p["evaluation"]["image_size"]
    assert p["lora_training"]["resolution"] == size
    assert p["synthesis"]["resolution"] in (None, size)
    assert p["evaluation"]["quality"]["memorisation_size"] in ("auto", size)
    assert p["evaluation"]["n_seeds"] >= 5
    # K = 2 generator replicates, each its own LoRA fit
    assert p["synthesis"]["replicates"] >= 2 and p["synthesis"]["adapter_per_replicate"]
    assert p["lora_training"]["lora"]["fits"] >= p["synthesis"]["replicates"]
    assert p["base_training"]["train_on"] == "prior+source" and p["base_training"]["resolution"] == size
    # the LoRA reads the base this profile trains (with_base_training), also in a later lora_training-only run
    assert p["lora_training"]["base_model"]["pretrained_path"] == p["base_training"]["output_path"]
    assert build_ultrasound(p["evaluation"]["augment"]) is not None
    # soft merge: the blocks keep the base keys the env does not set
    assert "unet_targets" in p["lora_training"]["lora"] and "bn_recalibration_images" in p["evaluation"]["train"]


# the real_cpu profile with every step budget shrunk: every node runs on the real shared data
SHRUNK = [
    "base_training.prior.n_per_class=4",
    "base_training.autoencoder.max_steps=2",
    "base_training.denoiser.max_steps=2",
    "lora_training.lora.max_steps=2",
    "lora_training.validation.per_class=1",
    "lora_training.validation.steps=2",
    "synthesis.images_per_class=2",
    "synthesis.steps=2",
    "synthesis.batch_size=5",
    "synthesis.preview.per_class=1",
    "evaluation.n_seeds=1",
    "evaluation.train.steps=2",
    "evaluation.train.eval_every=1",
    "evaluation.train.bn_recalibration_images=16",
    "evaluation.metrics.n_bootstrap=5",
    "evaluation.quality.memorisation_controls=2",
    "evaluation.quality.tsne_perplexity=5",
]


@pytest.mark.slow  # one `kedro run --env real_cpu --pipeline with_base_training` subprocess on the real sample: 69 s CPU, 2.5 min wall at load 6 (measured)
def test_real_cpu_profile_runs_on_the_real_shared_data(tmp_path, fetal_planes_db_sample, african_planes_dev):
    from conftest import copy_project

    project = copy_project(PROJECT_ROOT, tmp_path / "project")
    params = [f"source_path={fetal_planes_db_sample}", f"target_path={african_planes_dev}", *SHRUNK]
    env = dict(os.environ, TQDM_DISABLE="1", KEDRO_DISABLE_TELEMETRY="1")
    cmd = [sys.executable, "-m", "kedro", "run", "--env", "real_cpu", "--pipeline", "with_base_training",
           "--params", ",".join(params)]
    proc = subprocess.run(cmd, cwd=project, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    profile = _real_cpu_params()
    size, replicates = profile["evaluation"]["image_size"], profile["synthesis"]["replicates"]
    reporting = project / "data" / "08_reporting"
    batches = list((project / "data" / "07_model_output" / "synthetic_batch").glob("*/synthetic_batch"))
    assert len(batches) == 1
    from fu_kedro.datasets.image_set import read_image_set

    synthetic = read_image_set(batches[0])
    assert len(synthetic) == 2 * 5 * replicates and synthetic.images.shape[1:] == (size, size)  # at the classifier's size
    assert sorted(set(synthetic.meta["replicate"])) == list(range(replicates))
    metrics = json.loads(next((reporting / "zero_shot_metrics.json").glob("*/zero_shot_metrics.json")).read_text())
    assert metrics
    quality = json.loads(next((reporting / "synthetic_quality.json").glob("*/synthetic_quality.json")).read_text())
    assert quality.get("fidelity") is not None
    # the base was trained in this run on phantoms + the real source-train images (x4), and the LoRA used it
    lineage = json.loads((project / "data/06_models/real-cpu-base/base_lineage.json").read_text())
    assert lineage["trained_on"]["train_on"] == "prior+source" and lineage["trained_on"]["source_repeats"] == 4
    assert lineage["trained_on"]["images"] == 4 * 5 + 4 * int((read_image_set(next(
        (project / "data/03_primary/source_images").glob("*/source_images"))).meta["split"] == "train").sum())
    lora = json.loads(next((reporting / "lora_lineage.json").glob("*/lora_lineage.json")).read_text())
    assert lora["base_model"]["content_hash"] == lineage["content_hash"]


# A fixed validation curve for steps 2, 4, 6, 8 (a stub scorer): val_loss lowest at 4,
# val_accuracy highest at 6, neither at the end, on any machine.
FIXED_CURVE = {2: (0.9, 0.25), 4: (0.5, 0.5), 6: (0.7, 0.75), 8: (0.8, 0.625)}


def test_selection_metric_last_keeps_the_final_step_and_the_other_rules_are_unchanged(monkeypatch):
    """``selection_metric: last`` (real_cpu): the weights at the end of the fixed schedule, whatever
    the validation curve says; val_loss / val_accuracy still keep their best evaluation. The
    curve is fixed (the scorer is stubbed), so which evaluation is best does not depend on the
    CPU's float paths; the training itself is real."""
    from fu_kedro.classifiers import TrainConfig, build_classifier, train_classifier
    from fu_kedro.classifiers import train as train_module
    from fu_kedro.classifiers.data import TensorSet

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 1, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.arange(20) % 2
    data = TensorSet(images, labels, pd.DataFrame({"image_id": [str(i) for i in range(20)]}))
    train, val = data.subset(np.arange(12)), data.subset(np.arange(12, 20))
    states: list[dict] = []  # the weights at each evaluation, in order (steps 2, 4, 6, 8)

    def fixed_scorer(model, data, batch_size):
        states.append({k: v.clone() for k, v in model.state_dict().items()})
        return FIXED_CURVE[2 * len(states)]

    monkeypatch.setattr(train_module, "_evaluate", fixed_scorer)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs, seen = {}, {}
        for rule in ("last", "val_loss", "val_accuracy"):
            states.clear()
            cfg = TrainConfig(steps=8, eval_every=2, batch_size=4, learning_rate=1e-2, selection_metric=rule,
                              bn_recalibration_images=8)
            torch.manual_seed(3)
            model, _ = build_classifier("resnet18", 2, 16)
            runs[rule] = train_classifier(model, train, val, cfg, seed=3)
            seen[rule] = list(states)
    finally:
        torch.set_num_threads(before)
    assert list(runs["last"].history["step"]) == [2, 4, 6, 8]
    assert list(runs["last"].history["val_loss"]) == [v for v, _ in FIXED_CURVE.values()]
    for rule, step in (("last", 8), ("val_loss", 4), ("val_accuracy", 6)):
        run = runs[rule]
        assert run.best_step == step and run.info["best_step"] == step, rule
        # same seed, same schedule, one machine: the curves are the same bits, only the kept weights differ
        pd.testing.assert_frame_equal(run.history, runs["last"].history)
        kept, at_step = run.model.state_dict(), seen[rule][step // 2 - 1]
        assert all(torch.equal(kept[k], at_step[k]) for k in at_step), f"{rule}: not the weights of step {step}"
    later = seen["last"][-1]  # the weights did change between evaluations (the check above can fail)
    assert not all(torch.equal(seen["last"][1][k], later[k]) for k in later)
    from fu_kedro.pipelines.evaluation.params import TrainParams
    from fu_kedro.schema import ParameterError

    with pytest.raises(ParameterError, match=r"evaluation\.train\.selection_metric: 'smoothed' in evaluation\.train; "
                                             "allowed values: 'val_loss', 'val_accuracy' or 'last'"):
        TrainParams.from_any(project_parameters("real_cpu")["evaluation"]["train"] | {"selection_metric": "smoothed"})
