"""Check the GPU code paths on a machine with one CUDA GPU, in one command (about 10 minutes).

    python scripts/gpu_check.py                 # on the GPU machine, from the project root
    python scripts/gpu_check.py --quick         # smaller counts (the tiny runs prove the path, not the outcome)
    python scripts/gpu_check.py --json out.json

Needs no internet and no Stable Diffusion weights. The steps, each reported in one summary
table (ok / FAIL / skipped, seconds, what was measured):

1. ``cuda``: torch sees a CUDA device (name, memory, bf16 support, torch/CUDA versions).
2. ``tiny_cpu``: the offline default (``kedro run``: phantoms, tiny base, LoRA, synthesis,
   evaluation) with fixed step budgets in a temporary project copy, CUDA hidden: the reference.
3. ``tiny_gpu``: the same run on the GPU, with what the GPU turns on: bf16 autocast (fp16
   where the GPU has no bf16) for the tiny base denoiser and the LoRA, fp16 synthesis with
   the adapter fused into the weights, classifiers with autocast and channels-last. Checks
   that the run recorded what actually ran (synthesis manifest: device, dtype, fused).
4. ``tiny_compare``: the GPU run's outcome equals the CPU run's within tolerance — LoRA
   denoising loss (relative), synthetic-image fidelity and CAS, zero-shot accuracy (absolute).
   Bits differ between devices; the outcome must not.
5. ``bench_sd15``: ``benchmarks/bench_sd15.py`` on the GPU at 512 px (SD v1.5's architecture,
   random weights): LoRA steps/s at batch 1 (rank 128, the paper env's knobs), images/s at
   25 steps, peak memory.
6. ``bench_classifier``: ``benchmarks/bench_classifier_data_path.py --device cuda`` (our data
   path vs the notebook's, on the GPU) on ``../shared/data/fetal_planes_db_sample``.

Without a CUDA device every step but ``cuda`` is reported as skipped (the CPU reference
too: there is nothing to compare it with) and the exit code is 0, within seconds.
``--device cpu`` runs the "GPU" steps on the CPU instead, at ``--quick`` counts (for the
tests: every branch runs, with CPU-sized settings). Exit code 1 if any step that ran failed.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_rehearsal import PROJECT_ROOT, copy_project, latest, run_logged  # noqa: E402

SHARED_FPDB = (PROJECT_ROOT / ".." / "shared" / "data" / "fetal_planes_db_sample").resolve()

# The tiny default with smaller counts. Its loops run fixed step budgets (no wall-clock cap),
# so both devices train the same number of steps.
TINY_PARAMS = {
    "full": {
        "ingestion.phantom.source.n_per_class": 60,
        "ingestion.phantom.target.n_per_class": 20,
        "lora_training.lora.max_steps": 100,
        "synthesis.images_per_class": 40,
        "evaluation.n_seeds": 1,
    },
    "quick": {
        "ingestion.phantom.source.n_per_class": 12,
        "ingestion.phantom.target.n_per_class": 4,
        "ingestion.lora_per_class": 4,
        "ingestion.image_size": 64,
        "lora_training.lora.max_steps": 4,
        "lora_training.validation.per_class": 1,
        "lora_training.validation.steps": 2,
        "synthesis.images_per_class": 2,
        "synthesis.steps": 2,
        "synthesis.batch_size": 2,
        "synthesis.preview.per_class": 1,
        "evaluation.n_seeds": 1,
        "evaluation.metrics.n_bootstrap": 10,
    },
}
# Outcome tolerances GPU vs CPU: relative for the LoRA denoising loss, absolute for rates.
TOLERANCES = {"lora_denoising_loss": 0.3, "fidelity": 0.15, "cas_accuracy": 0.15, "zero_shot_accuracy": 0.15}


@dataclass
class Step:
    name: str
    status: str = "skipped"  # ok | FAIL | skipped
    seconds: float = 0.0
    detail: str = ""
    values: dict = field(default_factory=dict)


def gpu_params(device: str, bf16: bool) -> dict:
    """What the GPU run turns on (``device=cpu``: the same code paths at CPU-safe precision)."""
    if device == "cpu":
        return {"synthesis.device": "cpu", "synthesis.precision": "fp32", "synthesis.fuse_lora": True,
                "evaluation.train.device": "cpu", "evaluation.train.mixed_precision": "'no'"}  # quoted: YAML no = false
    amp = "bf16" if bf16 else "fp16"
    return {
        "lora_training.lora.mixed_precision": amp,
        "synthesis.device": device,
        "synthesis.precision": "auto",   # fp16 on CUDA
        "synthesis.fuse_lora": "auto",   # fused on CUDA
        "synthesis.torch_threads": "null",
        "evaluation.train.device": device,
        "evaluation.train.mixed_precision": "auto",  # bf16 where supported, else fp16 + loss scaling; channels-last
    }


def check_cuda(step: Step) -> bool:
    import torch

    if not torch.cuda.is_available():
        step.status, step.detail = "skipped", f"no CUDA device visible to torch {torch.__version__} (CUDA build {torch.version.cuda})"
        return False
    props = torch.cuda.get_device_properties(0)
    step.values = {"name": props.name, "memory_gb": round(props.total_memory / 1e9, 1),
                   "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported(),
                   "torch": torch.__version__, "cuda": torch.version.cuda, "devices": torch.cuda.device_count()}
    step.status = "ok"
    step.detail = (f"{props.name}, {step.values['memory_gb']} GB, sm {step.values['capability']}, bf16 {step.values['bf16']}, "
                   f"torch {torch.__version__} / CUDA {torch.version.cuda}")
    return True


def tiny_run(step: Step, workdir: Path, params: dict, hide_cuda: bool, rev: str | None = None) -> Path | None:
    """``kedro run`` (the default pipelines) in a project copy; the outcome figures in ``step.values``."""
    project = copy_project(workdir / step.name, rev)
    env = {"CUDA_VISIBLE_DEVICES": ""} if hide_cuda else {}
    cmd = [sys.executable, "-m", "kedro", "run", "--params", ",".join(f"{k}={v}" for k, v in params.items())]
    run = run_logged(project, cmd, workdir / f"{step.name}.log", env)
    step.seconds = run["seconds"]
    if run["exit_code"]:
        step.status, step.detail = "FAIL", f"kedro run exit {run['exit_code']}; log {run['log']}"
        return None
    step.values = outcome(project) | {"peak_rss_gb": run["peak_rss_gb"]}
    step.status = "ok"
    step.detail = describe_outcome(step.values)
    return project


def outcome(project: Path) -> dict:
    """The figures two runs of the same command must agree on, and how the synthesis ran."""
    summary = json.loads(latest(project, "data/08_reporting/lora_training_summary.json").read_text())
    quality = json.loads(latest(project, "data/08_reporting/synthetic_quality.json").read_text())
    pred = pd.read_csv(latest(project, "data/08_reporting/zero_shot_predictions.csv"))
    manifest = pd.read_csv(latest(project, "data/07_model_output/synthetic_batch") / "metadata.csv")
    ran = {col: sorted(map(str, manifest[col].unique())) for col in ("device", "dtype", "lora_fused") if col in manifest}
    return {
        "lora_denoising_loss": float(summary["denoising_loss_with_adapter"]),
        "fidelity": float(quality["fidelity"]),
        "cas_accuracy": float(quality["cas_accuracy"]),
        "zero_shot_accuracy": float((pred["label"] == pred["prediction"]).mean()),
        "synthesis_ran_on": ran,
    }


def describe_outcome(v: dict) -> str:
    return (f"LoRA loss {v['lora_denoising_loss']:.4f}, fidelity {v['fidelity']:.3f}, CAS {v['cas_accuracy']:.3f}, "
            f"zero-shot ACC {v['zero_shot_accuracy']:.3f}; synthesis {v['synthesis_ran_on']}")


def compare_outcomes(cpu: dict, gpu: dict, tolerances: dict = TOLERANCES) -> tuple[bool, list[str]]:
    """GPU vs CPU outcome, each figure within its tolerance (relative for the loss)."""
    lines, ok = [], True
    for key, tol in tolerances.items():
        a, b = cpu[key], gpu[key]
        diff = abs(b - a) / max(abs(a), 1e-12) if key == "lora_denoising_loss" else abs(b - a)
        good = diff <= tol
        ok &= good
        lines.append(f"{key} cpu {a:.4f} gpu {b:.4f} diff {diff:.3f} {'<=' if good else '>'} {tol}")
    return ok, lines


def check_ran_as_asked(values: dict, device: str) -> list[str]:
    """Problems with what the 'GPU' run recorded about itself (device, dtype, fused adapter)."""
    ran = values.get("synthesis_ran_on", {})
    want = {"device": [device.split(":")[0]], "dtype": ["float32"] if device == "cpu" else ["float16"], "lora_fused": ["True"]}
    return [f"synthesis {k} {ran.get(k)} (expected {v})" for k, v in want.items() if ran.get(k) != v]


def bench(step: Step, workdir: Path, cmd: list[str], parse) -> None:
    run = run_logged(PROJECT_ROOT, cmd, workdir / f"{step.name}.log", {})
    step.seconds = run["seconds"]
    if run["exit_code"]:
        step.status, step.detail = "FAIL", f"exit {run['exit_code']}; log {run['log']}"
        return
    step.values, step.detail = parse(Path(run["log"]).read_text())
    step.status = "ok"


def parse_sd15(json_file: Path):
    def parse(_log: str):
        r = json.loads(json_file.read_text())
        lo, sy = r["lora"], r["synthesis"]
        return r, (f"{r['device']} {r['resolution']} px: LoRA {lo['steps_per_s']} steps/s (batch 1, rank {lo['rank']}, "
                   f"{lo['mixed_precision']}), peak {lo['peak_memory_gb']} GB; synthesis {sy['images_per_s']} images/s "
                   f"({sy['steps']} steps, {sy['dtype']}), peak {sy['peak_memory_gb']} GB")
    return parse


def parse_classifier(log: str):
    lines = [ln for ln in log.splitlines() if ln.startswith(("ratio over interleaved", "device ", "ours, steady state"))]
    return {"lines": lines}, "; ".join(" ".join(ln.split()) for ln in lines)


def table(steps: list[Step]) -> str:
    rows = [("step", "status", "seconds", "result")] + [(s.name, s.status, f"{s.seconds:.0f}", s.detail) for s in steps]
    w = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:>{w[2]}}  {r[3]}" for r in rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny counts for the kedro runs (default without a GPU)")
    ap.add_argument("--device", default="cuda", help="device of the GPU steps (cuda, cuda:1; cpu = the tests' dry run)")
    ap.add_argument("--sd-resolution", type=int, default=512, help="bench_sd15 resolution (paper: 512)")
    ap.add_argument("--sd-steps", type=int, default=25, help="bench_sd15 sampling steps per image")
    ap.add_argument("--sd-args", default="", help="more bench_sd15 arguments, e.g. '--train-steps 1 --images 1'")
    ap.add_argument("--classifier-args", default="--epochs 5 --image-size 224 --batch-size 32",
                    help="bench_classifier_data_path arguments besides --device")
    ap.add_argument("--skip", default="", help="steps to skip, comma-separated (e.g. bench_sd15)")
    ap.add_argument("--from-git", default=None, metavar="REV", help="run the tiny default of this commit (e.g. HEAD)")
    ap.add_argument("--workdir", type=Path, default=None, help="folder for project copies and logs (default: temp, removed)")
    ap.add_argument("--json", type=Path, default=None, help="also write the steps as JSON")
    args = ap.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fu_gpu_check_")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    names = ["cuda", "tiny_cpu", "tiny_gpu", "tiny_compare", "bench_sd15", "bench_classifier"]
    steps = {n: Step(n) for n in names}
    skip = set(filter(None, args.skip.split(",")))
    start = time.monotonic()

    cuda = check_cuda(steps["cuda"])
    on_device = cuda or args.device == "cpu"  # the GPU steps run (on the GPU, or on the CPU as a dry run)
    if args.device == "cpu":
        steps["cuda"].detail += " (--device cpu: the GPU steps run on the CPU)"
    reason = "skipped: no CUDA device (run on a machine with one, or --device cpu for a dry run)"
    quick = args.quick or args.device == "cpu"
    counts = TINY_PARAMS["quick" if quick else "full"]
    bf16 = bool(steps["cuda"].values.get("bf16"))

    if not on_device:  # nothing to compare against: the CPU reference is not run either
        for n in ("tiny_cpu", "tiny_gpu", "tiny_compare", "bench_sd15", "bench_classifier"):
            steps[n].detail = reason
    else:
        if "tiny_cpu" not in skip:
            tiny_run(steps["tiny_cpu"], workdir, counts, hide_cuda=True, rev=args.from_git)
        if "tiny_gpu" not in skip:
            project = tiny_run(steps["tiny_gpu"], workdir, counts | gpu_params(args.device, bf16), hide_cuda=False,
                               rev=args.from_git)
            if project is not None:
                problems = check_ran_as_asked(steps["tiny_gpu"].values, args.device)
                if problems:
                    steps["tiny_gpu"].status = "FAIL"
                    steps["tiny_gpu"].detail += "; recorded: " + "; ".join(problems)
        cpu_v, gpu_v = steps["tiny_cpu"].values, steps["tiny_gpu"].values
        if "tiny_compare" in skip or not (cpu_v and gpu_v):
            steps["tiny_compare"].detail = "skipped: needs both tiny runs"
        else:
            good, lines = compare_outcomes(cpu_v, gpu_v)
            steps["tiny_compare"].status = "ok" if good else "FAIL"
            steps["tiny_compare"].detail = "; ".join(lines) + ("" if not quick else " (quick counts: informative only)")
            if quick and not good:
                steps["tiny_compare"].status = "ok"  # a handful of steps/images: the figures are noise
            steps["tiny_compare"].values = {"within_tolerance": good, "lines": lines}
        if "bench_sd15" not in skip:
            out = workdir / "bench_sd15.json"
            cmd = [sys.executable, "benchmarks/bench_sd15.py", "--device", args.device, "--resolution", str(args.sd_resolution),
                   "--steps", str(args.sd_steps), "--json", str(out), *args.sd_args.split()]
            bench(steps["bench_sd15"], workdir, cmd, parse_sd15(out))
        if "bench_classifier" not in skip:
            cmd = [sys.executable, "benchmarks/bench_classifier_data_path.py", "--device", args.device,
                   "--path", str(SHARED_FPDB), *args.classifier_args.split()]
            bench(steps["bench_classifier"], workdir, cmd, parse_classifier)
    for n in skip & set(names):
        steps[n].status, steps[n].detail = "skipped", "skipped: --skip"

    total = time.monotonic() - start
    print()
    print(table(list(steps.values())))
    failed = [s.name for s in steps.values() if s.status == "FAIL"]
    keep = bool(failed) or args.workdir is not None
    print(f"total {total:.0f} s" + (f"; logs in {workdir}" if keep else ""))
    if args.json:
        args.json.write_text(json.dumps({"seconds": round(total, 1), "steps": [asdict(s) for s in steps.values()]}, indent=2))
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
