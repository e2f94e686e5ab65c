"""Same command, same result: a shortened default run gives the same bits on an idle and a busy machine.

Every training loop runs a fixed number of steps (no wall-clock budget decides how much a
model trains), every random draw is seeded and every stage runs a fixed, recorded number of
torch threads — so two CPU-burning processes beside the run slow it down but change nothing.
Also: a misspelt training key stops the run naming the key; ``max_minutes: null`` means no cap.
"""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import TINY_EVAL_PARAMS, TINY_RUN_PARAMS, copy_project
from PIL import Image

# a few more steps than the tiniest run, so the LoRA really trains (on the shipped base); still ~1 min per run
RUN_PARAMS = ",".join(TINY_RUN_PARAMS + TINY_EVAL_PARAMS + [
    "lora_training.lora.max_steps=12",
])


def _kedro_run(project: Path, params: str, timeout: int = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kedro", "run", "--params", params], cwd=project,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "KEDRO_DISABLE_TELEMETRY": "1", "TQDM_DISABLE": "1"})


def _only(pattern: str, root: Path) -> Path:
    found = sorted(root.glob(pattern))
    assert len(found) == 1, f"expected one {pattern} under {root}, found {found}"
    return found[0]


def _adapter_sha256(path: Path) -> str:
    """sha256 of the adapter's weights (every tensor, in key order) and of its training metadata.

    The file's own bytes differ between runs by design: its header carries the lineage record
    (`made_from`: the run's session id, MLflow run id, save time). Everything that makes the
    adapter — weights, rank, alpha, parameters, LoRA image ids — must be identical.
    """
    from safetensors import safe_open

    digest = hashlib.sha256()
    with safe_open(str(path), "pt") as f:
        metadata = dict(f.metadata() or {})
        for key in sorted(f.keys()):
            digest.update(key.encode())
            digest.update(f.get_tensor(key).numpy().tobytes())
    # versions are save timestamps: they name *when*, the content hashes say *what*
    for key in sorted(set(metadata) - {"made_from", "catalog_version", "base_catalog_version", "lora_subset_version",
                                       "file", "published_file"}):
        digest.update(f"{key}={metadata[key]}".encode())
    return digest.hexdigest()


def _fingerprints(project: Path) -> dict[str, object]:
    """sha256 of the adapter (weights + training metadata), of each synthetic image's pixels, and of the predictions CSV."""
    data = project / "data"
    adapter = _only("06_models/lora_adapter.safetensors/*/lora_adapter.safetensors", data)
    batch = _only("07_model_output/synthetic_batch/*/synthetic_batch", data)
    images = {p.name: hashlib.sha256(np.asarray(Image.open(p)).tobytes()).hexdigest()
              for p in sorted((batch / "images").glob("*.png"))}
    predictions = _only("08_reporting/zero_shot_predictions.csv/*/zero_shot_predictions.csv", data)
    return {
        "adapter": _adapter_sha256(adapter),
        "synthetic_images": images,
        "predictions": hashlib.sha256(predictions.read_bytes()).hexdigest(),
    }


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_same_bits_idle_and_under_load(project_root, tmp_path):
    idle = copy_project(project_root, tmp_path / "idle")
    busy = copy_project(project_root, tmp_path / "busy")

    first = _kedro_run(idle, RUN_PARAMS)
    assert first.returncode == 0, (first.stdout + first.stderr)[-4000:]

    burners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        second = _kedro_run(busy, RUN_PARAMS)
    finally:
        for b in burners:
            b.kill()
            b.wait()
    assert second.returncode == 0, (second.stdout + second.stderr)[-4000:]

    a, b = _fingerprints(idle), _fingerprints(busy)
    assert len(a["synthetic_images"]) > 0
    assert a["adapter"] == b["adapter"], "LoRA adapter differs between the idle and the busy run"
    differing = [k for k in a["synthetic_images"] if a["synthetic_images"][k] != b["synthetic_images"].get(k)]
    assert not differing and a["synthetic_images"].keys() == b["synthetic_images"].keys(), differing[:5]
    assert a["predictions"] == b["predictions"], "zero_shot_predictions.csv differs between the idle and the busy run"


def test_misspelt_training_key_stops_the_run_naming_it(project_copy):
    run = _kedro_run(project_copy, ",".join(TINY_RUN_PARAMS + ["lora_training.lora.max_step=5"]), timeout=300)
    assert run.returncode != 0
    out = run.stdout + run.stderr
    assert "max_step" in out and "lora_training.lora" in out and "max_steps" in out  # the key, the block, the allowed ones


def test_max_minutes_null_means_no_cap(small_phantom_sets):
    """``max_minutes: null`` trains exactly ``max_steps`` steps; a cap that is hit is recorded."""
    import torch
    from fu_kedro.models.diffusion import TINY_CONFIG, build_pipeline_from_config
    from fu_kedro.models.training import time_capped_at, to_model_range, train_autoencoder
    from fu_kedro.pipelines.base_training.nodes import loop_config
    from fu_kedro.pipelines.base_training.params import AutoencoderParams

    source, _ = small_phantom_sets
    x = to_model_range(source.images[:16, ::2, ::2])
    torch.set_num_threads(1)
    block = {"max_steps": 3, "max_minutes": None, "batch_size": 4, "learning_rate": 1e-3, "kl_weight": 1e-6}
    cfg = loop_config(AutoencoderParams.from_any(block), 0)
    assert cfg.max_minutes is None
    vae = build_pipeline_from_config(TINY_CONFIG, 32, 0).vae
    history = train_autoencoder(vae, x, cfg, kl_weight=1e-6)
    assert len(history) == 3 and time_capped_at(history) is None
    # a cap of zero minutes stops after the first step, and the history says so
    cfg = loop_config(AutoencoderParams.from_any(block | {"max_steps": 50, "max_minutes": 0.0}), 0)
    history = train_autoencoder(build_pipeline_from_config(TINY_CONFIG, 32, 0).vae, x, cfg, kl_weight=1e-6)
    assert len(history) == 1 and time_capped_at(history) == 1


def test_a_training_block_without_max_steps_is_refused():
    from fu_kedro.pipelines.base_training.params import DenoiserParams
    from fu_kedro.schema import ParameterError

    with pytest.raises(ParameterError, match=r"base_training\.denoiser\.max_steps: missing in base_training\.denoiser \(its keys: max_steps, max_minutes"):
        DenoiserParams.from_any({"batch_size": 4, "learning_rate": 1e-3, "max_minutes": 3, "caption_dropout": 0.1,
                                 "ema_decay": None, "min_snr_gamma": None, "weight_decay": 0.01})
