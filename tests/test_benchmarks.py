"""Every script under benchmarks/ runs end to end at tiny sizes (so a refactor cannot leave one broken).

Each runs as ``python benchmarks/<script>.py <args>`` would (``runpy`` with ``__main__`` and
``sys.argv``), in this process, with the smallest arguments that still go through every
part; the figures they print are not checked (they are meaningless at these sizes), only
that the script finishes and prints its result lines.
"""
from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest
from conftest import PROJECT_ROOT

from fu_kedro.models.generation import torch_threads

BENCHMARKS = PROJECT_ROOT / "benchmarks"


def _run(script: str, args: list[str], capsys, monkeypatch) -> str:
    monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / script), *args])
    with torch_threads(1):  # restored afterwards: a script may set the count (--threads)
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    return capsys.readouterr().out


def test_every_benchmark_script_has_a_smoke_test():
    scripts = {p.name for p in BENCHMARKS.glob("*.py")}
    tested = {"bench_phantom.py", "bench_synthesis.py", "bench_sd15.py", "bench_classifier_data_path.py",
              "bench_seed_noise.py"}
    assert scripts == tested, f"benchmark scripts without a smoke test here: {sorted(scripts - tested)}"


def test_bench_phantom(capsys, monkeypatch):
    out = _run("bench_phantom.py", ["10", "32", "--no-default-sets"], capsys, monkeypatch)
    assert "phantom source: 10 images at 32 px" in out


@pytest.mark.parametrize("model", ["random", "catalog"])
def test_bench_synthesis(capsys, monkeypatch, model, tmp_path):
    """``random``: no file read; ``catalog``: the catalog's latest base + adapter, or the shipped base."""
    out = _run("bench_synthesis.py", ["--model", model, "--per-class", "1", "--batch-size", "2", "--steps", "2",
                                      "--threads", "1"], capsys, monkeypatch)
    assert "generator (batch 2):" in out and "loop (1 image per call):" in out and "ratio:" in out
    assert "model: random tiny model" in out if model == "random" else "model: " in out


def test_bench_sd15(capsys, monkeypatch, tmp_path):
    """The script's whole path (paper env's LoRA knobs, training loop, synthesis) on the tiny architecture."""
    out = _run("bench_sd15.py", ["--architecture", "tiny", "--resolution", "32", "--steps", "2", "--train-steps", "1",
                                 "--images", "1", "--threads", "1", "--json", str(tmp_path / "r.json")], capsys, monkeypatch)
    assert "LoRA training (rank 128" in out and "synthesis (2 steps" in out and (tmp_path / "r.json").is_file()


def test_bench_classifier_data_path(capsys, monkeypatch, fetal_planes_db_sample):
    out = _run("bench_classifier_data_path.py", ["--path", str(fetal_planes_db_sample), "--epochs", "1",
                                                  "--image-size", "16", "--batch-size", "50", "--threads", "1"],
               capsys, monkeypatch)
    assert "epoch 1/1" in out and "target >= 5x, steady state" in out


def test_bench_seed_noise(capsys, monkeypatch):
    """Three recipes (old: no weight averaging, val_loss; new: EMA; another backbone) on tiny phantom sets, 2 seeds, 2 steps."""
    out = _run("bench_seed_noise.py", ["--project", str(PROJECT_ROOT), "--tiny", "4", "--seeds", "2", "--steps", "2",
                                       "--new", "weight_averaging=ema", "--extra", "small:backbone=shufflenet_v2_x0_5"],
               capsys, monkeypatch)
    assert "== old recipe {'weight_averaging': 'none'" in out and "== new recipe {'weight_averaging': 'ema'}" in out
    assert "== small recipe {'backbone': 'shufflenet_v2_x0_5'}: HB - ES on shufflenet_v2_x0_5 " in out
    assert "== old recipe {'weight_averaging': 'none', 'selection_metric': 'val_loss', 'lr_schedule': 'cosine'}: HB - ES on resnet18 " in out
    assert out.count("per-seed sd of the difference: source val") == 3
