"""base_training: the tiny base as a diffusers folder with its lineage; the shipped base; same command, same bits.

The shipped base ``models/tiny-phantom-sd`` is what the default ``lora_training`` loads, through
the same catalog entry (``pretrained_base``) and node (``load_base_model``) as SD v1.5.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import PROJECT_ROOT, TINY_BASE_PARAMS, base_params, copy_project

from fu_kedro.data_sources import generate_phantoms
from fu_kedro.data_sources.prior_corpus import make_prior_corpus
from fu_kedro.datasets import PretrainedBaseDataset, TrainedBaseDataset
from fu_kedro.models.diffusion import build_offline_tokenizer, pipeline_hash
from fu_kedro.models.generation import torch_threads
from fu_kedro.pipelines.base_training.nodes import base_training_corpus, plot_base_loss_curves, train_base_model
from fu_kedro.pipelines.lora_training.nodes import (
    adapter_lineage,
    fit_lora_adapter,
    load_base_model,
    plot_loss_curves,
    render_validation_grid,
    training_metrics,
)

CAPTION = "a photo of fetal {plane}"
CLASSES = base_params("classes")
SHIPPED = PROJECT_ROOT / "models" / "tiny-phantom-sd"


@pytest.fixture
def params() -> dict:
    """conf/base's base_training block with CPU-test budgets."""
    p = base_params("base_training")
    p["autoencoder"].update(max_steps=15)
    p["denoiser"].update(max_steps=15)
    p["prior"].update(n_per_class=2, image_size=64)
    return p


def _prior(params) -> object:
    return make_prior_corpus(params["prior"], CLASSES, 3)


def test_a_base_trained_on_the_source_rows_saves_and_loads_like_sd15(params, tmp_path):
    """train_on: source (the old default): train rows only; the folder saved by ``trained_base``
    loads through ``pretrained_base`` + ``load_base_model`` and a LoRA, grid and lineage follow."""
    src = generate_phantoms("source", 6, 64, seed=4)
    src.meta["split"] = np.where(np.arange(len(src)) % 3 == 0, "val", "train")
    params.update(train_on="source")
    with torch_threads(2):
        corpus = base_training_corpus(_prior(params), src, params)
        base, history = train_base_model(corpus, params, CAPTION, seed=1)
    info = base.info
    assert info["trained_on"]["images"] == int((src.meta["split"] == "train").sum())
    assert info["trained_on"]["train_on"] == "source" and info["time_capped"] == {} and info["torch_threads"] == 1
    assert info["cpu_capability"] and info["steps"] == {"autoencoder": 15, "base_denoiser": 15}
    assert set(info["final_loss"]) == {"autoencoder", "base_denoiser"}
    assert (history.groupby("stage").size() == 15).all()
    assert base.pipe.vae.config.scaling_factor != 0.18215  # set from the trained latents' spread
    plot_base_loss_curves(history)

    folder = tmp_path / "my-base"
    TrainedBaseDataset(str(folder)).save(base)
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler", "base_lineage.json"):
        assert (folder / part).exists(), part
    record = json.loads((folder / "base_lineage.json").read_text())
    assert set(record["weights_sha256"]) == {"unet/diffusion_pytorch_model.safetensors",
                                             "vae/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"}
    assert record["made_by"]["command"] and "saved_at" in record["made_by"]

    lora = base_params("lora_training")
    lora["lora"].update(max_steps=6, batch_size=8)
    lora["validation"].update(per_class=1, steps=2)
    lora["base_model"]["pretrained_path"] = str(folder)
    loaded = load_base_model(PretrainedBaseDataset(str(folder)).load(), lora)
    assert loaded.info["content_hash"] == info["content_hash"] == pipeline_hash(base.pipe)
    assert "trained by base_training" in loaded.info["name"] and loaded.info["trained_by"]["seed"] == 1
    train_rows = src.select(src.meta["split"] == "train")
    with torch_threads(2):
        adapter, lora_hist, summary = fit_lora_adapter(loaded, train_rows, lora, seed=1)
        grid = render_validation_grid(loaded, adapter, lora, CLASSES, CAPTION, seed=1)
    plot_loss_curves(lora_hist)
    lineage = adapter_lineage(loaded, adapter, summary)
    metrics = training_metrics(lora_hist, summary, lineage)
    assert len(grid.axes) == 2 * len(CLASSES) and metrics["lora_steps"] == {"value": 6.0, "step": 0}
    assert lineage["base_model"]["content_hash"] == info["content_hash"] and lineage["reproducible"]
    assert adapter.metadata["base_content_hash"] == info["content_hash"]


def test_base_training_alone_trains_on_the_prior_and_refuses_a_source_corpus(params):
    params["autoencoder"].update(max_steps=2)
    params["denoiser"].update(max_steps=2)
    prior = _prior(params)
    with torch_threads(2):
        base, _ = train_base_model(prior, params, CAPTION, seed=1)
    assert params["train_on"] == "prior"  # conf/base's default
    trained_on = base.info["trained_on"]
    assert trained_on["train_on"] == "prior" and trained_on["images"] == len(prior)
    assert len(trained_on["corpus_sha256"]) == 64
    with pytest.raises(ValueError, match=r"train_on is 'prior\+source'.*--pipeline with_base_training"):
        train_base_model(prior, params | {"train_on": "prior+source"}, CAPTION, seed=1)
    with pytest.raises(ValueError, match=r"base_training\.max_step: unknown key in base_training; allowed keys"):
        train_base_model(prior, params | {"max_step": 3}, CAPTION, seed=1)
    with pytest.raises(ValueError, match=r"base_training\.denoiser\.max_steps: missing in base_training\.denoiser"):
        train_base_model(prior, params | {"denoiser": {"batch_size": 4, "learning_rate": 1e-3}}, CAPTION, seed=1)


def test_a_weights_file_that_is_not_its_lineages_is_refused(params, tmp_path):
    params["autoencoder"].update(max_steps=1)
    params["denoiser"].update(max_steps=1)
    with torch_threads(2):
        base, _ = train_base_model(_prior(params), params, CAPTION, seed=1)
    folder = tmp_path / "base"
    TrainedBaseDataset(str(folder)).save(base)
    record = json.loads((folder / "base_lineage.json").read_text())
    (folder / "base_lineage.json").write_text(json.dumps(record | {"content_hash": "0" * 64}))
    lora = base_params("lora_training") | {"base_model": {"pretrained_path": str(folder)}}
    with pytest.raises(ValueError, match="are not those its base_lineage.json records"):
        load_base_model(PretrainedBaseDataset(str(folder)).load(), lora)


def test_the_shipped_base_is_a_small_diffusers_folder_that_matches_its_lineage():
    files = [f for f in SHIPPED.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25 * 2**20
    assert not [f for f in files if f.suffix in (".bin", ".pt", ".pth", ".ckpt")]  # safetensors only
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (SHIPPED / part).exists(), part
    record = json.loads((SHIPPED / "base_lineage.json").read_text())
    for name, digest in record["weights_sha256"].items():
        assert hashlib.sha256((SHIPPED / name).read_bytes()).hexdigest() == digest, name
    # the parameters it was made with are conf/base's (so `kedro run --pipeline base_training` remakes it)
    made_with = {k: v for k, v in record["parameters"].items() if k != "output_path"}
    assert made_with == {k: v for k, v in base_params("base_training").items() if k != "output_path"}
    assert record["seed"] == base_params("seed") and record["cpu_capability"] and record["made_by"]["commit"]
    assert record["time_capped"] == {} and record["trained_on"]["train_on"] == "prior"
    # the default lora_training reads it through pretrained_base; its tokenizer is the committed one
    lora = base_params("lora_training")
    assert lora["base_model"]["pretrained_path"] == "models/tiny-phantom-sd"
    base = load_base_model(PretrainedBaseDataset(str(SHIPPED)).load(), lora)
    assert base.info["content_hash"] == record["content_hash"]
    captions = [CAPTION.format(plane=c) for c in CLASSES] + [""]
    assert base.pipe.tokenizer(captions, padding="max_length").input_ids == \
        build_offline_tokenizer()(captions, padding="max_length").input_ids


def _run(project: Path, pipeline: str, params: list[str], env: str | None = None) -> None:
    cmd = [sys.executable, "-m", "kedro", "run", "--pipeline", pipeline, "--params", ",".join(params)]
    cmd += ["--env", env] if env else []
    proc = subprocess.run(cmd, cwd=project, capture_output=True, text=True, timeout=900,
                          env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "TQDM_DISABLE": "1"})
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]


def _weights(folder: Path) -> dict[str, str]:
    return {str(f.relative_to(folder)): hashlib.sha256(f.read_bytes()).hexdigest()
            for f in sorted(folder.rglob("*")) if f.is_file() and f.name != "base_lineage.json"}


@pytest.mark.slow  # two `kedro run --pipeline base_training` subprocesses at shrunk sizes: ~1 min each under load
def test_kedro_run_base_training_twice_gives_the_same_bits(project_root, tmp_path):
    """The remake command, twice in two project copies: every file of the two folders (weights,
    configs, tokenizer) is byte-identical, and the lineage records the same corpus and content hashes."""
    params = TINY_BASE_PARAMS + ["base_training.denoiser.max_steps=12"]
    folders = []
    for name in ("first", "second"):
        project = copy_project(project_root, tmp_path / name)
        _run(project, "base_training", params)
        folders.append(project / "data/06_models/tiny-phantom-sd")
    first, second = (_weights(f) for f in folders)
    assert len(first) >= 9 and first == second
    a, b = (json.loads((f / "base_lineage.json").read_text()) for f in folders)
    assert a["content_hash"] == b["content_hash"] and a["weights_sha256"] == b["weights_sha256"]
    assert a["trained_on"]["corpus_sha256"] == b["trained_on"]["corpus_sha256"]
    assert a["made_by"]["command"].startswith("kedro run --pipeline base_training")
    assert a["steps"] == {"autoencoder": 4, "base_denoiser": 12} and a["torch_threads"] == 1
