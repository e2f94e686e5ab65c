"""Project settings. https://docs.kedro.org/en/stable/kedro_project_setup/settings.html

Telemetry: nothing in this project may contact the network at run time. kedro-viz
pulls in kedro-telemetry; the committed ``.telemetry`` file (``consent: false``) turns it
off for the CLI, and the environment variables below turn it off for any session that
imports these settings (notebooks, tests).
"""
import os

os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "1")
# Model hubs are unreachable: never let transformers/diffusers try to download.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")


from fu_kedro.config import ProjectConfigLoader  # noqa: E402
from fu_kedro.hooks import MainProcessWrites, PrerequisiteChecks  # noqa: E402
from fu_kedro.launch import is_main_process  # noqa: E402
from fu_kedro.mlflow_ui import ExperimentChecks  # noqa: E402
from fu_kedro.params import ParameterChecks  # noqa: E402
from fu_kedro.run_status import MlflowStoreLock, RunProcess  # noqa: E402
from fu_kedro.tracking import LineageHooks, RunInterrupts, RunState  # noqa: E402

# OmegaConfigLoader + ${params:<key>} in the catalog: the pretrained base and an imported LoRA
# file are catalog entries whose path is a parameter (fu_kedro.config.ProjectConfigLoader).
CONFIG_LOADER_CLASS = ProjectConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # An env (conf/paper, conf/local) changes single parameters and keeps the rest of each
    # block: conf/paper/parameters_lora_training.yml sets lora.rank without repeating
    # lora.unet_targets. (Kedro's default merge would replace the whole lora_training block.)
    "merge_strategy": {"parameters": "soft"},
}

# Before anything else (last here: Kedro calls the hooks it registered last first): the top-level
# parameters and every block the run reads match their schemas (fu_kedro.params), else one error
# names each bad key. Then, before any node runs: the data, weights and upstream outputs this run needs exist, else
# one error names each missing thing and where to put it. Under `accelerate launch` /
# `python -m fu_kedro.launch`, only the main process writes catalog outputs.
# LineageHooks: what each output was made from (lineage.json + "made_from"), MLflow inputs,
# version tags, run name, artifacts and headline metrics; RunInterrupts: SIGINT/SIGTERM end
# the MLflow run as KILLED (src/fu_kedro/tracking/, docs/lineage.md); they, the pre-run check
# (mixed inputs a run goes on with) and the publishing (output version tags) share one RunState.
# ExperimentChecks: the MLflow experiment opens on its runs table and keeps its artifacts in this
# project (mlflow_ui.py). MlflowStoreLock: two first runs at once create the MLflow store one
# after the other; RunProcess: a run whose process was killed is ended KILLED by the next one
# (src/fu_kedro/run_status.py).
RUN_STATE = RunState()
# ParameterChecks (fu_kedro.params): every parameter block a run reads against its schema, first
# (tryfirst), before any other hook or node.
HOOKS = (MlflowStoreLock(), PrerequisiteChecks(RUN_STATE), MainProcessWrites(RUN_STATE),
         LineageHooks(RUN_STATE), RunInterrupts(RUN_STATE), ExperimentChecks(), RunProcess(), ParameterChecks())

# Under several processes only the main one logs to MLflow (kedro-mlflow) and writes
# kedro-viz's run files; the others never load those plugins' hooks.
if not is_main_process():
    DISABLE_HOOKS_FOR_PLUGINS = ("kedro_mlflow", "kedro-mlflow", "kedro-viz")
