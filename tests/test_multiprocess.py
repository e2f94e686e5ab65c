"""Several processes (2 CPU processes, gloo) give the one-process results.

* LoRA: each of 2 processes trains on half of every batch (DDP); the adapter equals the one
  trained by one process on the whole batch.
* Evaluation grid: each process trains every 2nd classifier run, results are gathered; the
  predictions equal those of one process.
* The real CLI, ``python -m fu_kedro.launch -n 2 run --pipelines ingestion,lora_training``:
  one set of versioned outputs and one MLflow run (the main process's).

The worker side of the first two tests is this file run as a script by ``accelerate launch``
(see ``__main__`` at the bottom); the one-process reference runs inside pytest.
"""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import TINY_RUN_PARAMS, base_params
import torch
from safetensors.torch import load_file, save_file

PROJECT_ROOT = Path(__file__).resolve().parents[1]
LAUNCH_TIMEOUT = 600


def _lora_params() -> dict:
    """conf/base's lora_training block with a tiny budget; text-encoder LoRA and clip skip on, like the paper."""
    conf = base_params("lora_training")
    conf["lora"].update(rank=4, alpha=4, train_text_encoder=True, clip_skip=1, max_steps=3, batch_size=6,
                        caption_dropout=0.3, max_minutes=100, learning_rate=1e-3)
    return conf


def lora_fit(out: Path | None = None) -> tuple[dict, pd.DataFrame]:
    """Fit a LoRA adapter on a tiny random-weight pipeline; the main process writes it to ``out``."""
    from fu_kedro.data_sources import generate_phantoms
    from fu_kedro.launch import distributed_state, is_main_process
    from fu_kedro.models.base_model import BaseModel
    from fu_kedro.models.diffusion import TINY_CONFIG, build_pipeline_from_config
    from fu_kedro.pipelines.lora_training.nodes import fit_lora_adapter

    torch.set_num_threads(1)
    pipe = build_pipeline_from_config(TINY_CONFIG, 32, seed=0)
    subset = generate_phantoms("source", 2, 64, seed=5)  # 10 images, 2 per class
    subset.meta["caption"] = "a photo of fetal " + subset.meta["label"]
    batch_sizes = []  # what this process's UNet sees per training step
    pipe.unet.register_forward_pre_hook(lambda m, args: batch_sizes.append(len(args[0])) if torch.is_grad_enabled() else None)
    adapter, history, _ = fit_lora_adapter(BaseModel(pipe), subset, _lora_params(), seed=0)
    if out is not None:
        (out / f"batch_sizes_{distributed_state().process_index}.json").write_text(json.dumps(batch_sizes))
    if out is not None and is_main_process():
        save_file(adapter.state_dict, str(out / "adapter.safetensors"))
        history.to_csv(out / "history.csv", index=False)
    return adapter.state_dict, history


def evaluation_grid(out: Path | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Train a 4-run grid (arms ES/HB x 2 seeds) and predict the target; the main process writes the tables."""
    from fu_kedro.data_sources import generate_phantoms
    from fu_kedro.launch import distributed_state, is_main_process
    from fu_kedro.pipelines.evaluation.nodes import (
        plan_experiments,
        predict_target,
        prepare_classifier_data,
        train_experiments,
    )

    import fu_kedro.classifiers.pool as pool

    torch.set_num_threads(1)
    seeds_trained = []  # the runs this process trained (train_classifier's seed and set size)
    # under several launcher processes evaluation.workers is 1: each process trains its runs itself
    train_classifier = pool.train_classifier
    pool.train_classifier = lambda model, train, val, cfg, seed, **kw: (
        seeds_trained.append([seed, len(train)]) or train_classifier(model, train, val, cfg, seed, **kw)
    )
    params = base_params("evaluation")
    params.update(image_size=32, n_seeds=2, backbones=["resnet18"], augmentation=[True])
    params["arms"] = {name: params["arms"][name] for name in ("ES", "HB")}  # the paper's two arms
    params["comparisons"] = [["HB", "ES"]]
    params["quality"] = dict(params["quality"], scorer_arm="ES")
    params["train"].update(steps=6, eval_every=3, batch_size=16, bn_recalibration_images=32)
    source = generate_phantoms("source", 8, 64, seed=1)
    patients = sorted(source.meta["patient_id"].unique())
    source.meta["split"] = np.where(source.meta["patient_id"].isin(patients[::4]), "val", "train")
    target = generate_phantoms("target", 4, 64, seed=2)
    synthetic = generate_phantoms("source", 4, 64, seed=3)
    data = prepare_classifier_data(source, target, synthetic, params, base_params("classes"))
    plan = plan_experiments(data, params, seed=42)
    trained, history = train_experiments(data, plan, params)
    predictions = predict_target(data, trained, plan)
    if out is not None:
        (out / f"runs_{distributed_state().process_index}.json").write_text(json.dumps(seeds_trained))
    if out is not None and is_main_process():
        predictions.to_csv(out / "predictions.csv", index=False)
        history.to_csv(out / "history.csv", index=False)
    return predictions, history


def _launch_two(program: list[str], cwd: Path) -> None:
    from fu_kedro.launch import build_command

    command, env = build_command(2, program, cpu=True)
    env["PYTHONPATH"] = str(PROJECT_ROOT / "tests")
    proc = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


@pytest.fixture
def _one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def test_lora_adapter_from_two_processes_equals_one_process(tmp_path, _one_thread):
    _launch_two([__file__, "lora", str(tmp_path)], tmp_path)
    for rank in (0, 1):  # global batches of 6, 4 (rest of the 10 images), 6: each process trains on half
        assert json.loads((tmp_path / f"batch_sizes_{rank}.json").read_text()) == [3, 2, 3]
    two = load_file(str(tmp_path / "adapter.safetensors"))
    one, history = lora_fit()
    assert set(two) == set(one) and any(k.startswith("text_encoder.") for k in one)
    # Adam divides each gradient element by its own running RMS: where a gradient is ~1e-9, the
    # last bits a 2-process sum changes become a visible share of the step. Hence: every element
    # within 1 % of its tensor's largest entry, and nearly all of them within 1e-4 relative.
    close = 0
    for key in one:
        scale = float(one[key].abs().max())
        assert torch.allclose(two[key], one[key], rtol=0, atol=1e-2 * scale), key
        close += int(torch.isclose(two[key], one[key], rtol=1e-4, atol=1e-7).sum())
    assert close >= 0.99 * sum(v.numel() for v in one.values())
    # the adapter moved away from its initialisation (the comparison is not trivially 0 == 0)
    assert max(float(v.abs().max()) for k, v in one.items() if "up" in k) > 0
    # the logged loss is the global batch's mean on both sides
    np.testing.assert_allclose(pd.read_csv(tmp_path / "history.csv")["loss"], history["loss"], rtol=1e-4)


def test_evaluation_grid_split_over_two_processes_gives_the_same_predictions(tmp_path, _one_thread):
    _launch_two([__file__, "evaluation", str(tmp_path)], tmp_path)
    runs = [json.loads((tmp_path / f"runs_{rank}.json").read_text()) for rank in (0, 1)]
    assert len(runs[0]) == len(runs[1]) == 2 and not {tuple(r) for r in runs[0]} & {tuple(r) for r in runs[1]}
    two = pd.read_csv(tmp_path / "predictions.csv", dtype={"image_id": str, "patient_id": str})
    one, history = evaluation_grid()
    assert len(one) == len(two) == 4 * 16  # 4 runs x 16 target images
    pd.testing.assert_frame_equal(two[one.columns[:9]], one[one.columns[:9]].astype(two.dtypes[:9].to_dict()))
    prob = [c for c in one.columns if c.startswith("prob_")]
    np.testing.assert_allclose(two[prob].to_numpy(), one[prob].to_numpy(), rtol=1e-5, atol=1e-6)
    two_history = pd.read_csv(tmp_path / "history.csv")
    assert list(two_history["run"]) == list(history["run"])  # same plan order as one process


TINY_RUN = ",".join(TINY_RUN_PARAMS)


@pytest.mark.slow
def test_kedro_cli_under_two_processes_writes_once_and_logs_one_mlflow_run(project_copy):
    pipelines = "ingestion,lora_training,synthesis"
    proc = _launch_two(["-m", "kedro", "run", "--pipelines", pipelines, "--params", TINY_RUN], project_copy)
    log = proc.stdout + proc.stderr
    assert "process 1 (not the main process)" in log  # the non-main process kept its outputs in memory
    for folder in ("data/03_primary/source_images", "data/05_model_input/lora_subset", "data/06_models/base_model",
                   "data/06_models/lora_adapter.safetensors", "data/07_model_output/synthetic_batch"):
        assert len(list((project_copy / folder).iterdir())) == 1, folder  # one version, written once
    with sqlite3.connect(project_copy / "mlflow.db") as db:
        runs = db.execute("select run_uuid from runs").fetchall()
        assert len(runs) == 1  # only the main process opened an MLflow run
        steps = db.execute("select count(*) from metrics where key = 'lora_training.lora_loss'").fetchone()[0]
    assert steps == 4  # 4 LoRA steps, each logged once
    lineage = json.loads(next((project_copy / "data/08_reporting/lora_lineage.json").glob("*/lora_lineage.json")).read_text())
    assert lineage["training"]["steps"] == 4
    # synthesis split its 10 images between the two processes; the main process wrote them all
    manifest = pd.read_csv(next((project_copy / "data/07_model_output/synthetic_batch").glob("*/*/metadata.csv")))
    assert len(manifest) == 10 and set(manifest["num_processes"]) == {2} and set(manifest["process_index"]) == {0, 1}


if __name__ == "__main__":  # worker: python tests/test_multiprocess.py lora|evaluation <out dir>
    {"lora": lora_fit, "evaluation": evaluation_grid}[sys.argv[1]](Path(sys.argv[2]))
