"""Run ``kedro`` in several processes, on GPUs or on CPU cores, with one command.

    python -m fu_kedro.launch --num_processes 4 run --env paper --pipeline lora_training

starts ``accelerate launch --multi_gpu --num_processes 4 -m kedro run --env paper
--pipeline lora_training``: one complete Kedro session per process (torchrun underneath),
one process per GPU. On a machine without a GPU the same command runs the processes on
CPU cores with the gloo backend (it sets ``ACCELERATE_USE_CPU=true``); plain
``accelerate launch --cpu --num_processes N`` would start a single process there, because
accelerate runs several CPU processes only through MPI.

On GPUs ``accelerate launch --num_processes N -m kedro run ...`` works as well (and takes
``accelerate config`` defaults, e.g. for several machines); this wrapper adds the CPU case
and prints the command it runs.

What the processes share and split (see docs/deployment.md, section 3):

* the diffusion training loops (:mod:`fu_kedro.models.training`) split every batch
  between the processes (DDP; same global batch, same result as one process);
* the evaluation grid is split run by run and gathered back
  (``fu_kedro.pipelines.evaluation.nodes.train_experiments``);
* only the main process writes catalog outputs and logs to MLflow
  (:mod:`fu_kedro.hooks`, ``fu_kedro.settings``).

This module is imported by ``settings.py``: keep its top level free of heavy imports.
"""
from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys

# The variables launchers set for the global rank (torchrun / accelerate, then MPI flavours).
RANK_VARIABLES = ("RANK", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "MV2_COMM_WORLD_RANK")


def process_rank() -> int:
    """This process's global rank under a multi-process launcher, 0 otherwise (no torch import)."""
    for name in RANK_VARIABLES:
        value = os.environ.get(name)
        if value not in (None, ""):
            return int(value)
    return 0


def is_main_process() -> bool:
    """True for a plain ``kedro run`` and for rank 0 of ``accelerate launch`` / this launcher."""
    return process_rank() == 0


def distributed_state():
    """accelerate's ``PartialState`` for this process.

    CPU processes (``ACCELERATE_USE_CPU``, set by this launcher on machines without a GPU)
    must ask for ``cpu=True``; otherwise accelerate finds no GPU and treats each process
    as a separate single-process run.
    """
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def build_command(num_processes: int, program: list[str], cpu: bool | None = None) -> tuple[list[str], dict]:
    """The ``accelerate launch`` command line and environment that run ``program`` N times.

    ``program`` is what follows ``python``: ``["-m", "kedro", "run", ...]`` or
    ``["script.py", ...]``. ``cpu=None`` decides from the machine: CPU processes (gloo)
    when torch sees no CUDA device.
    """
    if cpu is None:
        import torch

        cpu = not torch.cuda.is_available()
    env = dict(os.environ)
    launcher = shutil.which("accelerate")
    command = [launcher, "launch"] if launcher else [sys.executable, "-m", "accelerate.commands.launch"]
    if num_processes > 1:
        command.append("--multi_gpu")  # accelerate's multi-process launcher (torchrun); gloo on CPU
    command += ["--num_processes", str(num_processes), "--num_machines", "1", "--dynamo_backend", "no"]
    if cpu:
        env["ACCELERATE_USE_CPU"] = "true"
        command += ["--mixed_precision", "no"]
    return command + list(program), env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fu_kedro.launch",
        description="Run a kedro command in several processes (GPUs, or CPU cores when there is no GPU).",
        epilog="Example: python -m fu_kedro.launch --num_processes 2 run --pipeline lora_training",
    )
    parser.add_argument("--num_processes", "-n", type=int, required=True, help="processes to start (one per GPU)")
    parser.add_argument("--cpu", action="store_true", help="use CPU processes even if a GPU is present")
    parser.add_argument("kedro_args", nargs=argparse.REMAINDER, help="the kedro command, e.g. run --pipeline lora_training")
    args = parser.parse_args(argv)
    if args.num_processes < 1:
        parser.error("--num_processes must be >= 1")
    if not args.kedro_args:
        parser.error("give the kedro command to run, e.g. run --pipeline lora_training")
    command, env = build_command(args.num_processes, ["-m", "kedro", *args.kedro_args], cpu=True if args.cpu else None)
    prefix = "ACCELERATE_USE_CPU=true " if env.get("ACCELERATE_USE_CPU") == "true" else ""
    print(f"fu_kedro.launch: {prefix}{shlex.join(command)}", file=sys.stderr, flush=True)
    return subprocess.call(command, env=env)


if __name__ == "__main__":
    sys.exit(main())
