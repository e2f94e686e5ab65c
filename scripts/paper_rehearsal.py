"""Rehearse ``kedro run --env paper`` end to end on CPU, with stand-ins for every download.

    python scripts/paper_rehearsal.py                     # temp folder, removed at the end
    python scripts/paper_rehearsal.py --workdir /tmp/reh --keep --json /tmp/reh/summary.json
    python scripts/paper_rehearsal.py --adapter-from-file   # LoRA imported from a kohya file, not trained

What a researcher with a GPU will run is the ``paper`` env (docs/paper_profile.md). This
script runs exactly that configuration, with only the *counts* shrunk, in a temporary copy
of the project, after putting stand-ins where the downloads go:

* ``models/stable-diffusion-v1-5/``: SD v1.5's exact architecture
  (``fu_kedro.models.diffusion.SD15_CONFIG``) with random weights, written with
  ``save_pretrained`` in diffusers layout (fp16 safetensors, as the hub's fp16 files);
* ``data/01_raw/FETAL_PLANES_DB/`` and ``data/01_raw/african_planes/``: a few real images per
  class from ``../shared/data`` in the two datasets' own layouts (CSV + PNGs);
* ``models/torchvision/<backbone>.pth``: random-weight state dicts of the five backbones;
* ``data/01_raw/fu_lora_splits/``: the authors' HB list (``spain_train_1150_balanced.csv``; half
  of the FETAL_PLANES_DB stand-ins are on it) and their result table, from ``../shared/data``.

Then, each as its own ``kedro run --env paper --pipeline <name>`` process (as the docs tell
a user): ``ingestion`` (512 px) -> ``lora_training`` (rank 128, text-encoder LoRA, clip skip
as configured, 512 px) -> ``synthesis`` (512 px) -> ``evaluation`` (224 px, five backbones,
the four arms ES, BAL, ES+SYN, HB, DA on/off). Once more: the trained adapter is written as a kohya-ss file (the
published FU-LoRA files' format) and ``lora_training`` + ``synthesis`` run with
``adapter_source: file`` on it; the imported adapter must equal the trained one.

Overrides (``--params``) are counts only, plus ``lora_training.lora.mixed_precision=no``
(the paper's fp16 autocast needs a GPU). Everything else — resolutions, rank, alpha, learning
rates, clip skip, backbones, augmentation, samplers, guidance — is the paper env's value.

``--adapter-from-file``: all four pipelines, with ``lora_training`` importing a random-weight
kohya file (rank 128, UNet + text encoder) instead of training (the 512-px LoRA fit is left out).

Every stage's wall time, CPU time and peak resident memory (``os.wait4``), the machine load
before and after, each node's and each slow dataset load/save's wall time, CPU time and peak
RSS (a Kedro hook added to the project copy only), what the MLflow runs recorded about how
they ran (device, precision, fused LoRA, memory format, batch sizes), and the output files are
printed and written as JSON (``--json``). Exit code 0 only if every run succeeded, the
contract files exist and the report has its "What ran where" table (and no fixed "nothing ran
on a GPU"). The machine is usually shared: judge by CPU time. Nothing is downloaded; nothing
is written inside the repository.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fu_kedro.models.lora import read_adapter_file

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = (PROJECT_ROOT / ".." / "shared" / "data").resolve()
BACKBONES = ("resnet18", "densenet169", "mobilenet_v2", "efficientnet_b0", "vit_b_16")
FPDB_PLANES = ("Fetal abdomen", "Fetal brain", "Fetal femur", "Fetal thorax", "Other")

# The counts the rehearsal shrinks; nothing else of the paper env is changed.
COUNT_PARAMS = {
    "ingestion.lora_per_class": 1,            # paper 20
    "ingestion.preview.per_class": 1,
    "lora_training.lora.max_steps": 1,        # paper 2000: one step runs the whole loop (forward, backward, AdamW, both LoRAs)
    "lora_training.lora.loss_check_repeats": 1,  # base 4; 1 is the least: still ~1/3 of fit_lora_adapter (2 UNet calls of 5 images at 512 px)
    "lora_training.validation.per_class": 1,  # paper 4
    "lora_training.validation.steps": 1,      # paper 25
    "synthesis.images_per_class": 2,          # paper 1000; CAS holds out 1 per class, so 2 is the least
    "synthesis.batch_size": 1,                # paper 8 (GPU): 5 images at 512 px in one fp32 CPU call took > 12 GB
    "synthesis.steps": 1,                     # paper 25
    "synthesis.preview.per_class": 1,
    "evaluation.n_seeds": 1,                  # paper profile 3
    "evaluation.train.eval_batch_size": 16,
    "evaluation.train.bn_recalibration_images": 8,
    "evaluation.metrics.n_bootstrap": 10,     # base 200
    "evaluation.quality.tsne_perplexity": 2,  # t-SNE needs perplexity < points (a handful here)
    "evaluation.report.samples_per_class": 1,
    "evaluation.quality.memorisation_controls": 1,  # base 20: each is a VAE encode + decode at 512 px (~45 CPU-s)
    # the copy check passes every image it compares (source train + val, synthetic, controls) through
    # the SD VAE (quality.memorisation_space: decoder): at 64 px that is the same code for ~1/64 of
    # the 512-px cost (~45 CPU-s an image there); the 512-px VAE itself runs in LoRA training and synthesis
    "evaluation.quality.memorisation_size": 64,
    "evaluation.train.batch_size": 4,         # paper profile 32 (vit_b_16 at 224 px: ~1.7 TFLOP per step at 32)
}
# The adapter_source: file run ends with synthesis (no evaluation after it): 1 image of 1 class
# (each 512-px image is ~70 CPU-s: a UNet pass with CFG + a VAE decode; the 5 classes run the same code).
FILE_RUN_PARAMS = {"synthesis.images_per_class": 1, "classes": "[brain]"}
# Per pipeline run: the lora_training run's validation grid draws one class (paper: all five). That
# run uses the class list (the top-level `classes`) for the grid and the prior corpus only (empty in
# the paper env: SD v1.5 is the prior); ingestion, synthesis and evaluation runs keep the five.
PIPELINE_PARAMS = {"lora_training": {"classes": "[brain]"}}
# The classifier's training length, whichever budget keys evaluation.train has (steps or epochs).
TRAIN_BUDGET = {"steps": 1, "eval_every": 1, "epochs": 1, "min_steps": 0}
# Not a count: fp16 autocast does not run on a CPU (the paper env's value is for a GPU).
# Quoted: --params values are YAML, and a bare `no` is the boolean false.
CPU_PARAMS = {"lora_training.lora.mixed_precision": "'no'"}
# The paper env's LoRA and synthesis use all cores. Its evaluation trains one classifier at a
# time (conf/paper evaluation.workers: 1, for a GPU); on the CPU the rehearsal trains two at a
# time, each on one thread (conf/base's 2 x 1; same weights as one at a time, bit for bit).
# (evaluation.torch_threads=2, tried before the workers existed, cost 2-3x the CPU time of 1
# thread on the shared machine: the OpenMP threads spin waiting for a busy core.)
THREAD_PARAMS: dict = {"evaluation.workers": 2}

CONTRACT_FILES = (
    "data/08_reporting/zero_shot_predictions.csv",
    "data/08_reporting/zero_shot_metrics.json",
    "data/08_reporting/synthetic_quality.json",
    "data/08_reporting/evaluation_report.html",
)


# --------------------------------------------------------------------------- stand-ins
def copy_project(dest: Path, rev: str | None = None, overlay: list[str] | tuple = ()) -> Path:
    """conf + pyproject + src + .telemetry in ``dest``, MLflow's store inside it (as tests' copy_project).

    From the working tree, or with ``rev`` from that git commit (``git archive``; e.g. HEAD
    to rehearse what is committed while the working tree is being edited), with the files in
    ``overlay`` (paths relative to the repository) taken from the working tree.
    """
    import yaml

    names = ["conf", "src", "models", "pyproject.toml", ".telemetry"]  # models/: the shipped tiny base
    if rev:
        dest.mkdir(parents=True)
        archive = subprocess.run(["git", "-C", str(PROJECT_ROOT), "archive", rev, *names], check=True, capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
        shutil.rmtree(dest / "conf" / "local", ignore_errors=True)
        for name in overlay:  # these files as they are in the working tree (e.g. one's own edits on top of HEAD)
            shutil.copy(PROJECT_ROOT / name, dest / name)
    else:
        shutil.copytree(PROJECT_ROOT / "conf", dest / "conf", ignore=shutil.ignore_patterns("local"))
        for name in ("pyproject.toml", ".telemetry"):
            if (PROJECT_ROOT / name).exists():
                shutil.copy(PROJECT_ROOT / name, dest / name)
        shutil.copytree(PROJECT_ROOT / "src", dest / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
        if (PROJECT_ROOT / "models").is_dir():
            shutil.copytree(PROJECT_ROOT / "models", dest / "models", ignore=shutil.ignore_patterns("stable-diffusion-v1-5", "fu-lora"))
    add_profile_hook(dest)
    (dest / "conf" / "local").mkdir()
    (dest / "conf" / "local" / "mlflow.yml").write_text(
        yaml.safe_dump({"server": {"mlflow_tracking_uri": f"sqlite:///{dest}/mlflow.db"}})
    )
    return dest


PROFILE_HOOK = '''"""Per-node and per-dataset wall time, CPU time and peak RSS, as JSON lines in
$FU_REHEARSAL_PROFILE (written by scripts/paper_rehearsal.py into its project copy only)."""
import json, os, resource, time

from kedro.framework.hooks import hook_impl


def _now():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return time.monotonic(), r.ru_utime + r.ru_stime, r.ru_maxrss * 1024 / 1e9


class RehearsalProfile:
    def __init__(self):
        self._open = {}

    def _start(self, key):
        self._open[key] = _now()

    def _end(self, kind, name, key):
        if key not in self._open or not os.environ.get("FU_REHEARSAL_PROFILE"):
            return
        (w0, c0, _), (w1, c1, rss) = self._open.pop(key), _now()
        with open(os.environ["FU_REHEARSAL_PROFILE"], "a") as f:
            f.write(json.dumps({"kind": kind, "name": name, "seconds": round(w1 - w0, 2), "cpu_seconds": round(c1 - c0, 2),
                                "peak_rss_gb_so_far": round(rss, 2), "load": os.getloadavg()[0]}) + "\\n")

    # One method per Kedro hook spec (kedro/framework/hooks/specs.py), taking the spec's
    # argument names it needs: pluggy passes arguments by name.
    @hook_impl
    def before_node_run(self, node):
        self._start(("node", node.name))

    @hook_impl
    def after_node_run(self, node):
        self._end("node", node.name, ("node", node.name))

    @hook_impl
    def on_node_error(self, node):
        self._end("node_failed", node.name, ("node", node.name))

    @hook_impl
    def before_dataset_loaded(self, dataset_name):
        self._start(("load", dataset_name))

    @hook_impl
    def after_dataset_loaded(self, dataset_name):
        self._end("load", dataset_name, ("load", dataset_name))

    @hook_impl
    def before_dataset_saved(self, dataset_name):
        self._start(("save", dataset_name))

    @hook_impl
    def after_dataset_saved(self, dataset_name):
        self._end("save", dataset_name, ("save", dataset_name))
'''


def add_profile_hook(project: Path) -> None:
    """The copy's settings get one more hook: per-node / per-dataset wall, CPU and peak RSS
    (``$FU_REHEARSAL_PROFILE``). Only in the copy; the repository's settings are untouched."""
    (project / "src" / "fu_kedro" / "rehearsal_profile.py").write_text(PROFILE_HOOK)
    settings = project / "src" / "fu_kedro" / "settings.py"
    settings.write_text(settings.read_text() + "\n\n# scripts/paper_rehearsal.py (this copy only): per-node profile\n"
                        "from fu_kedro.rehearsal_profile import RehearsalProfile  # noqa: E402\n\n"
                        "HOOKS = (*HOOKS, RehearsalProfile())\n")


def write_sd15(folder: Path, dtype: str = "float16") -> dict:
    """SD v1.5's architecture with random weights, saved in diffusers layout at ``folder``.

    Built in a child process: its ~4 GB would otherwise stay in this process and be counted
    in the peak memory of every stage it starts.
    """
    code = (
        "import sys, torch\n"
        "from fu_kedro.models.diffusion import SD15_CONFIG, build_pipeline_from_config\n"
        "pipe = build_pipeline_from_config(SD15_CONFIG, 512, seed=0)\n"
        "pipe.to(getattr(torch, sys.argv[2]))\n"
        "pipe.save_pretrained(sys.argv[1], safe_serialization=True)\n"
    )
    subprocess.run([sys.executable, "-c", code, str(folder), dtype], check=True, capture_output=True)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    return {"path": str(folder), "dtype": dtype, "bytes": size}


def paper_parameters(project: Path) -> dict:
    """The project's parameters as ``kedro run --env paper`` resolves them (soft merge of conf/paper on conf/base)."""
    from kedro.config import OmegaConfigLoader

    from fu_kedro.settings import CONFIG_LOADER_ARGS

    return OmegaConfigLoader(str(project / "conf"), env="paper", **CONFIG_LOADER_ARGS)["parameters"]


def shrunk_counts(paper: dict) -> dict:
    """COUNT_PARAMS plus the classifier's training budget under the keys this project's version has."""
    train = paper["evaluation"]["train"]
    return COUNT_PARAMS | {f"evaluation.train.{k}": v for k, v in TRAIN_BUDGET.items() if k in train}


def write_fetal_planes_db(src: Path, dest: Path, per_class: int, listed: set[str] = frozenset()) -> int:
    """``per_class`` images per plane from the FETAL_PLANES_DB sample, in its own layout: half of
    them (rounded up) from ``listed`` (the authors' HB list), so conf/paper's HB and BAL arms have
    real images, the others not, so they differ from ES."""
    import pandas as pd

    df = pd.read_csv(src / "FETAL_PLANES_DB_data.csv", sep=";", dtype=str, keep_default_na=False)
    df = df[df["Plane"].isin(FPDB_PLANES)]
    on_list = df["Image_name"].isin(listed)
    picked = pd.concat([df[on_list].groupby("Plane", sort=True).head((per_class + 1) // 2),
                        df[~on_list].groupby("Plane", sort=True).head(per_class // 2)])
    picked = pd.concat([picked, df.drop(picked.index).groupby("Plane", sort=True).head(per_class)])
    picked = picked.groupby("Plane", sort=True).head(per_class).sort_index()
    (dest / "Images").mkdir(parents=True)
    picked.to_csv(dest / "FETAL_PLANES_DB_data.csv", sep=";", index=False)  # keeps the 'Train ' header
    for name in picked["Image_name"]:
        shutil.copy(src / "Images" / f"{name}.png", dest / "Images" / f"{name}.png")
    return len(picked)


def write_fu_lora_splits(src: Path, dest: Path) -> list[str]:
    """The FU-LoRA authors' split lists and result table where conf/paper reads them (data/01_raw/fu_lora_splits/)."""
    dest.mkdir(parents=True)
    names = ["spain_train_1150_balanced.csv", "paper_table_overall_performance.csv"]
    for name in names:
        shutil.copy(src / name, dest / name)
    return [str(dest / n) for n in names]


def authors_hb_list(src: Path) -> set[str]:
    """The image names of the authors' HB real images (spain_train_1150_balanced.csv)."""
    import pandas as pd

    return set(pd.read_csv(src / "spain_train_1150_balanced.csv", dtype=str, encoding="utf-8-sig")["Image_name"])


def write_african(src: Path, dest: Path, per_center_class: int) -> int:
    """``per_center_class`` images per (center, plane) from the African dev set, in its layout."""
    import pandas as pd

    [csv] = sorted(src.glob("*.csv"))
    df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    picked = df.groupby(["Center", "Plane"], sort=True).head(per_center_class)
    dest.mkdir(parents=True)
    picked.to_csv(dest / "African_test.csv", index=False)
    for name in picked["Image_name"]:
        shutil.copy(src / f"{name}.png", dest / f"{name}.png")
    return len(picked)


def write_backbone_weights(folder: Path) -> list[str]:
    """Random-weight state dicts of the five backbones, as ``torch.save(model.state_dict())`` files."""
    import torch
    import torchvision

    folder.mkdir(parents=True)
    for name in BACKBONES:
        torch.manual_seed(0)
        torch.save(torchvision.models.get_model(name, weights=None).state_dict(), folder / f"{name}.pth")
    return [str(folder / f"{n}.pth") for n in BACKBONES]


def kohya_state_dict(adapter) -> tuple[dict, dict]:
    """A diffusers-format adapter as a kohya-ss file (``lora_unet_*`` / ``lora_te_text_model_*``
    keys, ``.alpha`` = rank so the scale is 1), the format of the published FU-LoRA files."""
    import torch

    out: dict = {}
    for key, tensor in adapter.state_dict.items():
        module, part = re.split(r"\.(?:lora|lora_linear_layer)\.", key)
        kind = "lora_down" if part.startswith("down") else "lora_up"
        if module.startswith("unet."):
            stem = "lora_unet_" + module[len("unet."):].replace(".", "_")
        else:
            stem = "lora_te_text_model_" + module[len("text_encoder."):].replace(".", "_")
        out[f"{stem}.{kind}.weight"] = tensor.contiguous()
        if kind == "lora_down":
            out[f"{stem}.alpha"] = torch.tensor(float(tensor.shape[0]))
    rank = next(t.shape[0] for k, t in out.items() if k.endswith("lora_down.weight"))
    return out, {"ss_network_dim": str(rank), "ss_network_alpha": str(rank), "ss_network_module": "networks.lora"}


def write_random_kohya(path: Path, rank: int = 128, seed: int = 0) -> None:
    """A kohya-ss file for SD v1.5's architecture with random LoRA weights (rank ``rank``, UNet
    attention + text encoder), as the published FU-LoRA files are laid out. Child process
    (the SD v1.5 model is built to know every module's shape)."""
    code = (
        "import sys, torch\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "from safetensors.torch import save_file\n"
        "from paper_rehearsal import kohya_state_dict\n"
        "from fu_kedro.models.diffusion import SD15_CONFIG, build_pipeline_from_config\n"
        "from fu_kedro.models.lora import attach_lora, export_lora\n"
        "rank, seed = int(sys.argv[2]), int(sys.argv[3])\n"
        "pipe = build_pipeline_from_config(SD15_CONFIG, 512, seed=seed)\n"
        "attach_lora(pipe, rank=rank, alpha=float(rank), unet_targets=('to_q', 'to_k', 'to_v', 'to_out.0'), "
        "train_text_encoder=True, seed=seed)\n"
        "with torch.no_grad():\n"
        "    for p in [*pipe.unet.parameters(), *pipe.text_encoder.parameters()]:\n"
        "        if p.requires_grad: p.normal_(0, 1e-3)\n"
        "tensors, metadata = kohya_state_dict(export_lora(pipe, rank, float(rank), {}))\n"
        "save_file(tensors, sys.argv[1], metadata=metadata)\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-c", code, str(path), str(rank), str(seed)], check=True, capture_output=True)


# --------------------------------------------------------------------------- runs
def _cpu_seconds() -> float:
    """CPU time of this process and of every child it has waited for (user + system)."""
    import resource

    return sum(r.ru_utime + r.ru_stime for r in (resource.getrusage(resource.RUSAGE_SELF),
                                                 resource.getrusage(resource.RUSAGE_CHILDREN)))


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def run_logged(cwd: Path, cmd: list[str], log_file: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` in ``cwd`` with its output in ``log_file``: exit code, wall time, peak RSS, CPU time, load."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", KEDRO_DISABLE_TELEMETRY="1", COLUMNS="200", PYTHONUNBUFFERED="1",
               TQDM_DISABLE="1") | (env or {})
    load_before = _load()
    start = time.monotonic()
    with open(log_file, "w") as log:
        log.write("$ " + " ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS and CPU time
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "exit_code": proc.returncode,
        "seconds": round(time.monotonic() - start, 1),
        "peak_rss_gb": round(usage.ru_maxrss * 1024 / 1e9, 2),  # Linux: kB
        "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
        "load_before": load_before,
        "load_after": _load(),
        "log": str(log_file),
    }


def kedro_run(project: Path, pipeline: str, params: dict, log_file: Path) -> dict:
    """``kedro run --env paper --pipeline <pipeline> --params ...`` (plus ``PIPELINE_PARAMS[pipeline]``) as a child process."""
    params = params | PIPELINE_PARAMS.get(pipeline, {})
    cli_params = ",".join(f"{k}={v}" for k, v in params.items())
    cmd = [sys.executable, "-m", "kedro", "run", "--env", "paper", "--pipeline", pipeline, "--params", cli_params]
    profile_file = Path(log_file).with_suffix(".profile.jsonl")
    profile_file.unlink(missing_ok=True)
    result = {"pipeline": pipeline} | run_logged(project, cmd, log_file, {"FU_REHEARSAL_PROFILE": str(profile_file)})
    result["profile"] = read_profile(profile_file)
    print(f"  {pipeline:14s} exit {result['exit_code']}  {result['seconds']:7.1f} s  peak RSS {result['peak_rss_gb']:.2f} GB  "
          f"CPU {result['cpu_seconds']:.0f} s  load {result['load_before']} -> {result['load_after']}", flush=True)
    for item in result["profile"]:
        print(f"      {item['kind']:5s} {item['name'][:44]:44s} {item['seconds']:7.1f} s  CPU {item['cpu_seconds']:6.1f} s  "
              f"peak RSS so far {item['peak_rss_gb_so_far']:.2f} GB  load {item['load']:.2f}", flush=True)
    if result["exit_code"]:
        print("".join(Path(log_file).read_text().splitlines(keepends=True)[-40:]), file=sys.stderr)
    return result


def read_profile(path: Path, min_cpu_seconds: float = 1.0) -> list[dict]:
    """The per-node / per-dataset profile lines of one run; dataset loads/saves under ``min_cpu_seconds`` CPU dropped."""
    if not path.is_file():
        return []
    items = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [i for i in items if i["kind"].startswith("node") or max(i["cpu_seconds"], i["seconds"]) >= min_cpu_seconds]


def latest(project: Path, relative: str) -> Path | None:
    """The file of the latest version of a versioned catalog entry (``<filepath>/<version>/<name>``)."""
    folder = project / relative
    versions = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
    return versions[-1] / folder.name if versions else None


def outputs(project: Path) -> list[str]:
    """Every file the runs wrote under data/ (relative), without the raw stand-ins."""
    data = project / "data"
    return sorted(str(p.relative_to(project)) for p in data.rglob("*")
                  if p.is_file() and not p.is_relative_to(data / "01_raw"))


def read_as_kohya(log_file: Path) -> bool:
    """The ``adapter_source: file`` run read its file as kohya-ss (its log says so)."""
    return bool(re.search(r"LoRA adapter: read \S+ \(kohya format\)", Path(log_file).read_text(errors="ignore")))


def lineage_names(project: Path, kohya_file: Path) -> bool:
    """The latest ``lora_lineage.json`` says the adapter was imported from ``kohya_file``, a
    kohya-format file with that sha256 (not the diffusers-format catalog copy it was re-read from)."""
    import hashlib

    lineage = latest(project, "data/08_reporting/lora_lineage.json")
    if lineage is None:
        return False
    meta = json.loads(lineage.read_text())["adapter"]["metadata"]
    return (meta.get("adapter_source"), meta.get("imported_format"), meta.get("imported_sha256"),
            Path(str(meta.get("imported_from"))).name) == (
        "file", "kohya", hashlib.sha256(kohya_file.read_bytes()).hexdigest(), kohya_file.name)


def check_imported(project: Path, kohya_file: Path, log_file: Path) -> dict:
    """The saved ``lora_adapter`` is the kohya file's adapter: read as kohya, same tensors."""
    saved = read_adapter_file(latest(project, "data/06_models/lora_adapter.safetensors"))
    source = read_adapter_file(kohya_file)
    same = set(saved.state_dict) == set(source.state_dict) and all(
        (saved.state_dict[k].float() - source.state_dict[k].float()).abs().max() <= 1e-6 + 1e-3 * float(source.state_dict[k].abs().max())
        for k in source.state_dict)
    kohya, lineage = read_as_kohya(log_file), lineage_names(project, kohya_file)
    return {"path": str(kohya_file), "tensors": len(source.state_dict), "read_as_kohya": kohya,
            "saved_equals_file": bool(same), "lineage_names_kohya_file": lineage, "ok": bool(kohya and same and lineage)}


def recorded_ran_on(project: Path) -> dict[str, dict]:
    """What the MLflow runs recorded about how they ran: ``*ran_on*`` tags and the device /
    precision parameters, per run (``<run name> <run id[:8]>``), from the copy's ``mlflow.db``."""
    import sqlite3

    db = project / "mlflow.db"
    if not db.is_file():
        return {}
    con = sqlite3.connect(db)
    try:
        names = dict(con.execute("SELECT run_uuid, value FROM tags WHERE key = 'mlflow.runName'").fetchall())
        rows = con.execute("SELECT run_uuid, key, value FROM tags WHERE key LIKE '%ran_on%' UNION ALL "
                           "SELECT run_uuid, key, value FROM params WHERE key LIKE '%mixed_precision' OR key LIKE '%.device' "
                           "OR key LIKE '%.precision' OR key LIKE '%fuse_lora' OR key LIKE '%batch_size' "
                           "OR key LIKE '%torch_threads'").fetchall()
        starts = dict(con.execute("SELECT run_uuid, start_time FROM runs").fetchall())
    finally:
        con.close()
    out: dict[str, dict] = {}
    for run_id, key, value in sorted(rows, key=lambda r: (starts.get(r[0], 0), r[1])):
        out.setdefault(f"{names.get(run_id, '?')} {run_id[:8]}", {})[key] = value
    return out


def check_report(project: Path) -> dict:
    """The report says what ran, from the runs (its 'What ran where' table), and no fixed 'nothing ran on a GPU'."""
    report = latest(project, "data/08_reporting/evaluation_report.html")
    if report is None:
        return {"path": None, "problems": []}  # missing contract files are reported on their own
    text = report.read_text() if report.is_file() else "".join(f.read_text(errors="ignore") for f in report.rglob("*.html"))
    problems = []
    if "What ran where" not in text:
        problems.append("no 'What ran where' table")
    if "The decomposition" not in text or "beside the paper's table" not in text:
        problems.append("no decomposition table or no paper rows beside ours")
    if re.search(r"nothing ran on a GPU", text, re.IGNORECASE):
        problems.append("says 'nothing ran on a GPU' (fixed text)")
    return {"path": str(report), "problems": problems}


# --------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workdir", type=Path, default=None, help="folder for the project copy (default: a new temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the workdir (default: removed when everything passed)")
    ap.add_argument("--json", type=Path, default=None, help="also write the summary here")
    ap.add_argument("--source-per-class", type=int, default=4, help="FETAL_PLANES_DB images per class (paper: all)")
    ap.add_argument("--target-per-center-class", type=int, default=1, help="African images per center and class")
    ap.add_argument("--sd-dtype", choices=["float16", "float32"], default="float16",
                    help="dtype of the stand-in SD v1.5 files (hub: fp32 files, fp16 variant)")
    ap.add_argument("--skip-file-run", action="store_true", help="skip the adapter_source: file run")
    ap.add_argument("--file-run-only", action="store_true",
                    help="only ingestion, then lora_training + synthesis with adapter_source: file on a kohya file with "
                         "random weights (rank 128, UNet + text encoder); runs beside a --skip-file-run rehearsal")
    ap.add_argument("--adapter-from-file", action="store_true",
                    help="all four pipelines, but lora_training imports a kohya file with random weights (rank 128, "
                         "UNet + text encoder; adapter_source: file) instead of training: the 512-px LoRA fit "
                         "(~270 CPU-s at the rehearsal's counts, a third of it the denoising loss before/after) is left out")
    ap.add_argument("--params", default="", help="more --params for every run (key=value,...)")
    ap.add_argument("--from-git", default=None, metavar="REV",
                    help="rehearse this commit (e.g. HEAD) instead of the working tree")
    ap.add_argument("--overlay", default="", metavar="PATHS",
                    help="with --from-git: these files (comma-separated, relative) from the working tree instead")
    ap.add_argument("--shared-data", type=Path, default=SHARED_DATA, help="the real samples (default ../shared/data)")
    args = ap.parse_args(argv)

    t_start = time.monotonic()
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fu_paper_rehearsal_")).resolve()
    if workdir.is_relative_to(PROJECT_ROOT):
        ap.error("--workdir must be outside the repository")
    project = copy_project(workdir / "project", args.from_git, [x for x in args.overlay.split(",") if x])
    logs = workdir / "logs"
    logs.mkdir()
    summary: dict = {"workdir": str(workdir), "load_start": _load(), "cores": len(os.sched_getaffinity(0)), "runs": []}
    print(f"paper rehearsal in {workdir} ({summary['cores']} cores, load {summary['load_start']})", flush=True)

    t0, cpu0 = time.monotonic(), _cpu_seconds()
    summary["stand_ins"] = {
        "sd15": write_sd15(project / "models" / "stable-diffusion-v1-5", args.sd_dtype),
        "fu_lora_splits": write_fu_lora_splits(args.shared_data / "fu_lora_splits",
                                               project / "data" / "01_raw" / "fu_lora_splits"),
        "fetal_planes_db_images": write_fetal_planes_db(args.shared_data / "fetal_planes_db_sample",
                                                        project / "data" / "01_raw" / "FETAL_PLANES_DB", args.source_per_class,
                                                        authors_hb_list(args.shared_data / "fu_lora_splits")),
        "african_images": write_african(args.shared_data / "african_planes_dev", project / "data" / "01_raw" / "african_planes",
                                        args.target_per_center_class),
        "backbone_weights": write_backbone_weights(project / "models" / "torchvision"),
        "seconds": round(time.monotonic() - t0, 1),
        "cpu_seconds": round(_cpu_seconds() - cpu0, 1),  # this process + the child that writes SD v1.5
    }
    print(f"  stand-ins      {summary['stand_ins']['seconds']:.1f} s, CPU {summary['stand_ins']['cpu_seconds']:.0f} s "
          f"(SD v1.5 random weights "
          f"{summary['stand_ins']['sd15']['bytes'] / 1e9:.2f} GB {args.sd_dtype}, "
          f"{summary['stand_ins']['fetal_planes_db_images']} FETAL_PLANES_DB + {summary['stand_ins']['african_images']} "
          "African images, 5 backbone state dicts)", flush=True)

    extra = dict(item.split("=", 1) for item in args.params.split(",") if item)
    params = shrunk_counts(paper_parameters(project)) | CPU_PARAMS | THREAD_PARAMS | extra
    summary["params"] = params
    ok = True
    if args.adapter_from_file:
        kohya_file = project / "models" / "fu-lora" / "rehearsal_random_kohya.safetensors"
        t0 = time.monotonic()
        write_random_kohya(kohya_file)
        summary["kohya_file_seconds"] = round(time.monotonic() - t0, 1)
        file_params = params | {"lora_training.adapter_source": "file",
                                "lora_training.adapter_file": str(kohya_file.relative_to(project))}
        for pipeline in ("ingestion", "lora_training", "synthesis", "evaluation"):
            run = kedro_run(project, pipeline, params if pipeline == "ingestion" else file_params,
                            logs / f"{pipeline}{'' if pipeline == 'ingestion' else '_adapter_file'}.log")
            summary["runs"].append(run | ({} if pipeline == "ingestion" else {"adapter_source": "file"}))
            if run["exit_code"]:
                ok = False
                break
        if ok:
            summary["kohya_file"] = check_imported(project, kohya_file, logs / "lora_training_adapter_file.log")
            ok = summary["kohya_file"]["ok"]
        return finish(summary, ok, args, workdir, logs, t_start)
    if args.file_run_only:
        summary["runs"].append(kedro_run(project, "ingestion", params, logs / "ingestion.log"))
        kohya_file = project / "models" / "fu-lora" / "rehearsal_random_kohya.safetensors"
        write_random_kohya(kohya_file)
        file_params = params | FILE_RUN_PARAMS | {"lora_training.adapter_source": "file",
                                                  "lora_training.adapter_file": str(kohya_file.relative_to(project))}
        for pipeline in ("lora_training", "synthesis"):
            if summary["runs"][-1]["exit_code"]:
                break
            summary["runs"].append(kedro_run(project, pipeline, file_params, logs / f"{pipeline}_adapter_file.log")
                                   | {"adapter_source": "file"})
        ok = not any(r["exit_code"] for r in summary["runs"])
        if ok:
            summary["kohya_file"] = check_imported(project, kohya_file, logs / "lora_training_adapter_file.log")
            ok = summary["kohya_file"]["ok"]
        return finish(summary, ok, args, workdir, logs, t_start)
    for pipeline in ("ingestion", "lora_training", "synthesis", "evaluation"):
        run = kedro_run(project, pipeline, params, logs / f"{pipeline}.log")
        summary["runs"].append(run)
        if run["exit_code"]:
            ok = False
            break
    summary["contract_files"] = {name: str(latest(project, name)) for name in CONTRACT_FILES}
    ok = ok and all(latest(project, name) and latest(project, name).is_file() for name in CONTRACT_FILES)

    if ok and not args.skip_file_run:
        from safetensors.torch import save_file

        trained = read_adapter_file(latest(project, "data/06_models/lora_adapter.safetensors"))
        tensors, metadata = kohya_state_dict(trained)
        kohya_file = project / "models" / "fu-lora" / "rehearsal_kohya.safetensors"
        kohya_file.parent.mkdir(parents=True)
        save_file(tensors, str(kohya_file), metadata=metadata)
        file_params = params | FILE_RUN_PARAMS | {"lora_training.adapter_source": "file",
                                                  "lora_training.adapter_file": str(kohya_file.relative_to(project))}
        for pipeline in ("lora_training", "synthesis"):
            run = kedro_run(project, pipeline, file_params, logs / f"{pipeline}_adapter_file.log")
            run["adapter_source"] = "file"
            summary["runs"].append(run)
            if run["exit_code"]:
                ok = False
                break
        if ok:
            imported = read_adapter_file(latest(project, "data/06_models/lora_adapter.safetensors"))
            same = read_as_kohya(logs / "lora_training_adapter_file.log") and set(imported.state_dict) == set(trained.state_dict) and all(
                (imported.state_dict[k].float() - trained.state_dict[k].float()).abs().max() <= 1e-3 * max(1.0, float(trained.state_dict[k].abs().max()))
                for k in trained.state_dict)
            lineage = lineage_names(project, kohya_file)
            summary["kohya_file"] = {"path": str(kohya_file), "tensors": len(tensors), "imported_equals_trained": bool(same),
                                     "lineage_names_kohya_file": lineage}
            print(f"  kohya file: {len(tensors)} tensors; imported adapter equals the trained one: {same}; "
                  f"lineage names the kohya file (path, sha256): {lineage}", flush=True)
            ok = ok and same and lineage

    return finish(summary, ok, args, workdir, logs, t_start)


def finish(summary: dict, ok: bool, args, workdir: Path, logs: Path, t_start: float) -> int:
    """Summary printed and written; the workdir removed if everything passed and it was a temp folder."""
    project = workdir / "project"
    summary["contract_files"] = {name: str(latest(project, name)) for name in CONTRACT_FILES}
    summary["contract_files_missing"] = [n for n in CONTRACT_FILES if not (latest(project, n) and latest(project, n).is_file())]
    summary["outputs"] = outputs(project)
    summary["ran_on"] = recorded_ran_on(project)
    summary["cpu_seconds_kedro_runs"] = round(sum(r["cpu_seconds"] for r in summary["runs"]), 1)
    summary["cpu_seconds_total"] = round(_cpu_seconds(), 1)  # everything: stand-ins, kohya file, runs, checks
    summary["report_check"] = check_report(project)
    if summary["runs"] and not args.file_run_only:
        ok = ok and not summary["contract_files_missing"] and not summary["report_check"]["problems"]
    summary["seconds_total"] = round(time.monotonic() - t_start, 1)
    summary["peak_rss_gb"] = max((r["peak_rss_gb"] for r in summary["runs"]), default=None)
    summary["load_end"] = _load()
    summary["ok"] = bool(ok)
    print(f"paper rehearsal {'passed' if ok else 'FAILED'}: {summary['seconds_total']:.0f} s in total, "
          f"CPU time {summary['cpu_seconds_total']:.0f} s (kedro runs {summary['cpu_seconds_kedro_runs']:.0f} s), "
          f"peak RSS of one stage {summary['peak_rss_gb']} GB, load {summary['load_start']} -> {summary['load_end']}")
    for name, path in summary["contract_files"].items():
        print(f"  {name}: {path}")
    for run_name, tags in summary["ran_on"].items():
        print(f"  MLflow {run_name}: " + ", ".join(f"{k}={v}" for k, v in sorted(tags.items())))
    for problem in summary["report_check"]["problems"]:
        print(f"  report: {problem}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))
    if ok and not args.keep and args.workdir is None:
        shutil.rmtree(workdir, ignore_errors=True)
    elif not ok:
        print(f"logs kept in {logs}", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
