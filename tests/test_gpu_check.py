"""``scripts/gpu_check.py`` on a CPU machine: every branch runs, the CUDA steps are reported as
skipped and the exit code is 0; ``--device cpu`` runs the GPU steps' code on the CPU."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from conftest import PROJECT_ROOT, load_script


gpu_check = load_script("gpu_check")

CPU = {"lora_denoising_loss": 0.20, "fidelity": 0.90, "cas_accuracy": 0.80, "zero_shot_accuracy": 0.60}


def test_outcomes_within_tolerance_pass_and_outside_fail():
    ok, lines = gpu_check.compare_outcomes(CPU, CPU | {"lora_denoising_loss": 0.24, "fidelity": 0.80})
    assert ok and len(lines) == 4 and all("<=" in line for line in lines)
    ok, lines = gpu_check.compare_outcomes(CPU, CPU | {"zero_shot_accuracy": 0.30})
    assert not ok and any(line.startswith("zero_shot_accuracy") and ">" in line.split("diff")[1] for line in lines)
    ok, _ = gpu_check.compare_outcomes(CPU, CPU | {"lora_denoising_loss": 0.40})  # relative: 100 % off
    assert not ok


def test_what_the_gpu_run_recorded_is_checked():
    good = {"synthesis_ran_on": {"device": ["cuda"], "dtype": ["float16"], "lora_fused": ["True"]}}
    assert gpu_check.check_ran_as_asked(good, "cuda") == []
    assert gpu_check.check_ran_as_asked(good, "cuda:1") == []
    bad = {"synthesis_ran_on": {"device": ["cpu"], "dtype": ["float32"], "lora_fused": ["False"]}}
    assert len(gpu_check.check_ran_as_asked(bad, "cuda")) == 3
    assert gpu_check.check_ran_as_asked(bad | {"synthesis_ran_on": {"device": ["cpu"], "dtype": ["float32"],
                                                                     "lora_fused": ["True"]}}, "cpu") == []


def test_gpu_params_turn_on_autocast_fused_lora_and_the_device():
    p = gpu_check.gpu_params("cuda", bf16=True)
    assert p["lora_training.lora.mixed_precision"] == "bf16" and p["synthesis.fuse_lora"] == "auto"
    assert p["evaluation.train.mixed_precision"] == "auto" and p["evaluation.train.device"] == "cuda"
    assert gpu_check.gpu_params("cuda", bf16=False)["lora_training.base_model.tiny.denoiser.mixed_precision"] == "fp16"
    cpu = gpu_check.gpu_params("cpu", bf16=False)
    assert cpu["synthesis.fuse_lora"] is True and cpu["synthesis.precision"] == "fp32"


def test_summary_table_lists_every_step():
    steps = [gpu_check.Step("cuda", "skipped", 0, "no CUDA"), gpu_check.Step("bench_sd15", "ok", 12.3, "x steps/s")]
    text = gpu_check.table(steps)
    assert text.splitlines()[0].split() == ["step", "status", "seconds", "result"]
    assert "bench_sd15" in text and "skipped" in text and "12" in text


def test_classifier_benchmark_lines_are_parsed():
    log = "noise\ndevice cuda:0 (autocast torch.bfloat16, channels-last), torch 2.x\nratio over interleaved epoch pairs, steady state: median 4.00x\n"
    values, detail = gpu_check.parse_classifier(log)
    assert len(values["lines"]) == 2 and "channels-last" in detail and "4.00x" in detail


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU branch")
def test_cuda_step_is_skipped_without_a_gpu():
    step = gpu_check.Step("cuda")
    assert gpu_check.check_cuda(step) is False and step.status == "skipped" and "no CUDA device" in step.detail


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU branch")
def test_on_a_cpu_machine_the_command_runs_reports_cuda_steps_skipped_and_exits_0(tmp_path):
    """``python scripts/gpu_check.py`` as a user runs it here: a real process, exit 0, every step skipped."""
    proc = subprocess.run([sys.executable, str(PROJECT_ROOT / "scripts" / "gpu_check.py"), "--json", str(tmp_path / "steps.json")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = {s["name"]: s for s in json.loads((tmp_path / "steps.json").read_text())["steps"]}
    assert list(steps) == ["cuda", "tiny_cpu", "tiny_gpu", "tiny_compare", "bench_sd15", "bench_classifier"]
    for name, step in steps.items():
        assert step["status"] == "skipped", step
    assert "no CUDA device" in steps["cuda"]["detail"]
    assert proc.stdout.count("skipped") >= 6 and "step" in proc.stdout


@pytest.mark.slow
@pytest.mark.rehearsal  # the GPU branch dry-run on CPU: several tiny runs, not in the default run
def test_device_cpu_runs_every_gpu_step_on_the_cpu(tmp_path):
    """The GPU branch end to end (tiny run with fused LoRA, comparison, both benchmarks), CPU-sized."""
    code = gpu_check.main([
        "--device", "cpu", "--workdir", str(tmp_path),
        "--sd-resolution", "64", "--sd-steps", "2", "--sd-args", "--train-steps 1 --images 1 --threads 2",
        "--classifier-args", "--epochs 1 --image-size 32 --batch-size 16", "--json", str(tmp_path / "steps.json"),
    ])
    steps = {s["name"]: s for s in json.loads((tmp_path / "steps.json").read_text())["steps"]}
    assert code == 0, steps
    for name in ("tiny_cpu", "tiny_gpu", "tiny_compare", "bench_sd15", "bench_classifier"):
        assert steps[name]["status"] == "ok", steps[name]
    assert steps["tiny_gpu"]["values"]["synthesis_ran_on"]["lora_fused"] == ["True"]
    assert steps["bench_sd15"]["values"]["lora"]["rank"] == 128 and steps["bench_sd15"]["values"]["resolution"] == 64
    assert any("ratio over interleaved" in line for line in steps["bench_classifier"]["values"]["lines"])
