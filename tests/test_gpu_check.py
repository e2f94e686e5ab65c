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
    assert gpu_check.gpu_params("cuda", bf16=False)["lora_training.lora.mixed_precision"] == "fp16"
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


# --------------------------------------------------------------------------- main's branches, fast
# The orchestration in main() with the heavy work stubbed: a pretend GPU (check_cuda), kedro runs
# and benchmarks that pass or fail on demand. Every branch of main runs in seconds.
def _fake_gpu(monkeypatch, *, tiny_fails=(), bench_fails=(), gpu_recorded=None, gpu_outcome=None):
    calls = []

    def check_cuda(step):
        step.status, step.detail, step.values = "ok", "Fake GPU, 24 GB", {"bf16": True, "name": "Fake GPU"}
        return True

    def tiny_run(step, workdir, params, hide_cuda, rev=None):
        calls.append((step.name, dict(params), hide_cuda))
        if step.name in tiny_fails:
            step.status, step.detail = "FAIL", "kedro run exit 1; log x"
            return None
        values = dict(CPU) if hide_cuda else dict(gpu_outcome or CPU)
        values["synthesis_ran_on"] = ({"device": ["cpu"], "dtype": ["float32"], "lora_fused": ["False"]} if hide_cuda
                                      else gpu_recorded or {"device": ["cuda"], "dtype": ["float16"], "lora_fused": ["True"]})
        step.values, step.status, step.detail = values, "ok", gpu_check.describe_outcome(values)
        return workdir

    def bench(step, workdir, cmd, parse):
        calls.append((step.name, cmd, None))
        if step.name in bench_fails:
            step.status, step.detail = "FAIL", "exit 1; log x"
        else:
            step.status, step.detail = "ok", "measured"

    monkeypatch.setattr(gpu_check, "check_cuda", check_cuda)
    monkeypatch.setattr(gpu_check, "tiny_run", tiny_run)
    monkeypatch.setattr(gpu_check, "bench", bench)
    return calls


def _steps(tmp_path):
    return {s["name"]: s for s in json.loads((tmp_path / "steps.json").read_text())["steps"]}


def test_with_a_gpu_every_step_runs_and_passes(monkeypatch, tmp_path, capsys):
    calls = _fake_gpu(monkeypatch)
    assert gpu_check.main(["--workdir", str(tmp_path / "w"), "--json", str(tmp_path / "steps.json")]) == 0
    steps = _steps(tmp_path)
    assert all(s["status"] == "ok" for s in steps.values()), steps
    (cpu_name, cpu_params, hidden), (gpu_name, gpu_params, shown) = calls[:2]
    assert (cpu_name, hidden, gpu_name, shown) == ("tiny_cpu", True, "tiny_gpu", False)
    assert cpu_params == gpu_check.TINY_PARAMS["full"]  # no --quick: the full counts on a GPU
    assert gpu_params["lora_training.lora.mixed_precision"] == "bf16" and gpu_params["synthesis.fuse_lora"] == "auto"
    sd_cmd = calls[2][1]
    assert calls[2][0] == "bench_sd15" and sd_cmd[sd_cmd.index("--resolution") + 1] == "512" and "cuda" in sd_cmd
    assert calls[3][0] == "bench_classifier" and "--device" in calls[3][1]
    assert "within" not in steps["tiny_compare"]["detail"] and "quick" not in steps["tiny_compare"]["detail"]
    assert "total" in capsys.readouterr().out


def test_gpu_outcome_outside_tolerance_fails_the_check(monkeypatch, tmp_path):
    _fake_gpu(monkeypatch, gpu_outcome=CPU | {"zero_shot_accuracy": 0.2})
    assert gpu_check.main(["--workdir", str(tmp_path / "w"), "--json", str(tmp_path / "steps.json")]) == 1
    steps = _steps(tmp_path)
    assert steps["tiny_compare"]["status"] == "FAIL" and not steps["tiny_compare"]["values"]["within_tolerance"]


def test_quick_counts_make_the_comparison_informative_only(monkeypatch, tmp_path):
    calls = _fake_gpu(monkeypatch, gpu_outcome=CPU | {"zero_shot_accuracy": 0.2})
    assert gpu_check.main(["--quick", "--workdir", str(tmp_path / "w"), "--json", str(tmp_path / "steps.json")]) == 0
    steps = _steps(tmp_path)
    assert calls[0][1] == gpu_check.TINY_PARAMS["quick"]
    assert steps["tiny_compare"]["status"] == "ok" and "informative only" in steps["tiny_compare"]["detail"]
    assert steps["tiny_compare"]["values"]["within_tolerance"] is False


def test_gpu_run_that_did_not_record_the_gpu_settings_fails(monkeypatch, tmp_path):
    _fake_gpu(monkeypatch, gpu_recorded={"device": ["cpu"], "dtype": ["float32"], "lora_fused": ["False"]})
    assert gpu_check.main(["--workdir", str(tmp_path / "w"), "--json", str(tmp_path / "steps.json")]) == 1
    detail = _steps(tmp_path)["tiny_gpu"]["detail"]
    assert _steps(tmp_path)["tiny_gpu"]["status"] == "FAIL" and "recorded: synthesis device" in detail


def test_a_failed_run_skips_the_comparison_and_failed_benchmarks_fail(monkeypatch, tmp_path):
    _fake_gpu(monkeypatch, tiny_fails=("tiny_gpu",), bench_fails=("bench_sd15",))
    assert gpu_check.main(["--workdir", str(tmp_path / "w"), "--json", str(tmp_path / "steps.json")]) == 1
    steps = _steps(tmp_path)
    assert steps["tiny_gpu"]["status"] == "FAIL" and steps["bench_sd15"]["status"] == "FAIL"
    assert steps["tiny_compare"]["status"] == "skipped" and "needs both" in steps["tiny_compare"]["detail"]
    assert steps["bench_classifier"]["status"] == "ok"


def test_skip_option_skips_the_named_steps(monkeypatch, tmp_path):
    calls = _fake_gpu(monkeypatch)
    assert gpu_check.main(["--skip", "tiny_cpu,bench_sd15", "--workdir", str(tmp_path / "w"),
                           "--json", str(tmp_path / "steps.json")]) == 0
    steps = _steps(tmp_path)
    assert [c[0] for c in calls] == ["tiny_gpu", "bench_classifier"]
    for name in ("tiny_cpu", "bench_sd15"):
        assert steps[name]["status"] == "skipped" and steps[name]["detail"] == "skipped: --skip"
    assert steps["tiny_compare"]["status"] == "skipped"


def test_temp_workdir_is_removed_when_everything_passed_and_kept_on_failure(monkeypatch, tmp_path):
    made = []
    real_mkdtemp = gpu_check.tempfile.mkdtemp
    monkeypatch.setattr(gpu_check.tempfile, "mkdtemp", lambda prefix: made.append(real_mkdtemp(prefix=prefix, dir=tmp_path)) or made[-1])
    _fake_gpu(monkeypatch)
    assert gpu_check.main([]) == 0 and not gpu_check.Path(made[-1]).exists()
    _fake_gpu(monkeypatch, bench_fails=("bench_classifier",))
    assert gpu_check.main([]) == 1 and gpu_check.Path(made[-1]).exists()


def test_run_helpers_report_failures_from_the_exit_code(monkeypatch, tmp_path):
    """tiny_run / bench themselves: a non-zero exit is FAIL naming the log; a zero exit is parsed."""
    failed = {"exit_code": 1, "seconds": 1.0, "log": str(tmp_path / "x.log"), "peak_rss_gb": 0.1}
    monkeypatch.setattr(gpu_check, "copy_project", lambda dest, rev=None: dest)
    monkeypatch.setattr(gpu_check, "run_logged", lambda *a, **k: failed)
    step = gpu_check.Step("tiny_cpu")
    assert gpu_check.tiny_run(step, tmp_path, {}, hide_cuda=True) is None
    assert step.status == "FAIL" and "exit 1" in step.detail
    step = gpu_check.Step("bench_classifier")
    gpu_check.bench(step, tmp_path, ["true"], gpu_check.parse_classifier)
    assert step.status == "FAIL" and "x.log" in step.detail
    (tmp_path / "ok.log").write_text("device cpu (no autocast)\nratio over interleaved epoch pairs: 2.0x\n")
    monkeypatch.setattr(gpu_check, "run_logged", lambda *a, **k: failed | {"exit_code": 0, "log": str(tmp_path / "ok.log")})
    step = gpu_check.Step("bench_classifier")
    gpu_check.bench(step, tmp_path, ["true"], gpu_check.parse_classifier)
    assert step.status == "ok" and "2.0x" in step.detail


def test_sd15_benchmark_json_is_summarised(tmp_path):
    result = {"device": "cuda", "resolution": 512,
              "lora": {"steps_per_s": 2.5, "rank": 128, "mixed_precision": "fp16", "peak_memory_gb": 9.1},
              "synthesis": {"images_per_s": 0.8, "steps": 25, "dtype": "float16", "peak_memory_gb": 4.2}}
    (tmp_path / "r.json").write_text(json.dumps(result))
    values, detail = gpu_check.parse_sd15(tmp_path / "r.json")("")
    assert values == result and "2.5 steps/s" in detail and "0.8 images/s" in detail and "rank 128" in detail
