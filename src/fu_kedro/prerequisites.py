"""Before any node runs: everything the run needs is there (the checks behind ``fu_kedro.hooks.PrerequisiteChecks``).

The files a run needs are checked against the resolved parameters of the pipelines about to
run: the data sources (FETAL_PLANES_DB, the African set), the Stable Diffusion v1.5 weights,
a LoRA adapter file, the torchvision ImageNet weight files, and the saved outputs of earlier
pipelines that this run loads (``lora_subset`` from ``ingestion``, ...). Everything missing is
named in one error, with what to download and where to put it, within seconds of ``kedro
run`` — instead of a failure deep inside the run, or after an hour of ingestion. Saved inputs
that come from different runs or splits (``find_mixed_runs``: e.g. a synthetic batch whose
adapter was trained on images that are validation images of the current ``source_images``)
are named with their versions: an error in the paper profile, a warning by default.

The folder layouts are :func:`fu_kedro.data_sources.readers.layout_problem`'s, the pretrained
base is :func:`fu_kedro.models.pretrained.resolve_pretrained_base`'s: the same answers the
readers and the loader give. Heavy libraries are imported inside functions: ``settings.py``
imports this module (through ``hooks``) for every ``kedro`` command.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fu_kedro.datasets.versions import load_version, saved_versions, versioned_path

FU_LORA_HUB_ID = "fangyijie/fu-lora"
DOCS = "docs/paper_profile.md"

# Where the public data of each data-source format come from (their layouts: readers.LAYOUTS).
DATA_SOURCES = {
    "fetal_planes_db": {
        "name": "FETAL_PLANES_DB (Burgos-Artizzu et al. 2020)",
        "get": "download FETAL_PLANES_DB.zip from https://zenodo.org/records/3904280 (about 2 GB) and unzip it",
    },
    "african": {
        "name": "the African fetal planes dataset (Sendra-Balcells et al. 2023)",
        "get": "download it from https://zenodo.org/records/7540448 and unzip it",
    },
    "folders": {
        "name": "a folder of class folders",
        "get": "put your images in one sub-folder per class",
    },
}


class MissingPrerequisitesError(RuntimeError):
    """Files a run needs are missing; the message says which and how to get them."""


@dataclass
class Problem:
    what: str  # the thing that is missing, e.g. "Stable Diffusion v1.5 weights"
    detail: str  # why it counts as missing, and how to get it


# --------------------------------------------------------------------------- checks
def _resolve(path: str | Path) -> Path:
    return Path(path).expanduser().resolve()


def check_data_source(domain: str, fmt: str, path: str | None) -> list[Problem]:
    """The ``source``/``target`` folder of ingestion has the layout its format needs."""
    if fmt == "phantom" or fmt not in DATA_SOURCES:
        return []  # phantoms need no files; an unknown format is ingestion's own error
    from fu_kedro.data_sources.readers import LAYOUTS, layout_problem

    spec = DATA_SOURCES[fmt]
    what = f"{spec['name']} ({domain}_format={fmt}, {domain}_path={path!r})"
    if not path:
        return [Problem(what, f"{domain}_path is not set. {spec['get'].capitalize()} and set {domain}_path to the folder.")]
    root = _resolve(path)
    wrong = layout_problem(fmt, root)
    if wrong is None:
        return []
    layout = LAYOUTS[fmt].format(root=root)
    return [Problem(what, f"{wrong}. {spec['get'].capitalize()} so that there is {layout}.")]


def check_pretrained_base(model_id_or_path: str | None) -> list[Problem]:
    """SD v1.5 (diffusers layout) is in the named folder or, for a hub id, in the local HF cache
    (:func:`fu_kedro.models.pretrained.resolve_pretrained_base`, which the loader uses too)."""
    from fu_kedro.models.pretrained import resolve_pretrained_base

    problem = resolve_pretrained_base(model_id_or_path).problem
    what = f"Stable Diffusion v1.5 weights (lora_training.base_model.pretrained_path={model_id_or_path!r})"
    return [Problem(what, problem)] if problem else []


def check_adapter_file(path: str | None) -> list[Problem]:
    """``adapter_source: file`` names an existing LoRA file (diffusers or kohya-ss safetensors)."""
    what = f"LoRA adapter file (lora_training.adapter_file={path!r})"
    get = (
        f"The published FU-LoRA adapters (kohya-ss format) are on https://huggingface.co/{FU_LORA_HUB_ID}: "
        "fetal_ultrasound_v1.0.safetensors (rank 128), v2.0 (rank 32), v3.0 (rank 8); e.g. "
        f"`hf download {FU_LORA_HUB_ID} fetal_ultrasound_v1.0.safetensors --local-dir models/fu-lora` and set "
        "adapter_file: models/fu-lora/fetal_ultrasound_v1.0.safetensors."
    )
    if not path:
        return [Problem(what, "adapter_source is 'file' but adapter_file is not set. " + get)]
    if not _resolve(path).is_file():
        return [Problem(what, f"{_resolve(path)} does not exist. " + get)]
    return []


def check_backbone_weights(params: dict) -> list[Problem]:
    """Every weights file named for a backbone of the grid exists (absent entry = random init, not checked)."""
    weights = params.get("weights") or {}
    problems = []
    for name in params.get("backbones") or []:
        file = weights.get(name)
        if file and not _resolve(file).is_file():
            make = (
                "On a machine with internet: `python -c \"import torch, torchvision; torch.save(torchvision.models."
                f"get_model('{name}', weights='IMAGENET1K_V1').state_dict(), '{file}')\"` and copy the file here "
                "(saving the state dict this way also gives densenet the key names torchvision's loader expects)."
            )
            problems.append(Problem(f"ImageNet weights of {name} (evaluation.weights.{name}={file!r})",
                                    f"{_resolve(file)} does not exist. {make}"))
    return problems


def _producer(dataset: str) -> str | None:
    """The registered pipeline (other than __default__) whose nodes output ``dataset``."""
    from fu_kedro.pipeline_registry import PIPELINE_ORDER, register_pipelines

    try:
        pipelines = register_pipelines()
    except Exception:  # noqa: BLE001 - a broken pipeline module fails the run on its own, with its own error
        return None
    return next((name for name in PIPELINE_ORDER if name in pipelines and dataset in pipelines[name].all_outputs()), None)


def _latest_info(catalog, name: str) -> dict | None:
    """``info.json`` of the version of an image-set dataset this run loads (None if not one)."""
    from fu_kedro.datasets import ImageSetDataset

    dataset = catalog.get(name)
    if not isinstance(dataset, ImageSetDataset):
        return None
    try:
        return dataset.load_info() or None
    except Exception:  # noqa: BLE001 - unreadable lineage is not this check's business
        return None


def _pinned_version(catalog, name: str) -> tuple[str | None, list[str]]:
    """For an input that is not saved: the version pinned for it (``--load-versions``; unpinned,
    nothing saved means no version to load) and the versions that are saved."""
    try:
        dataset = catalog.get(name)
    except Exception:  # noqa: BLE001 - a broken entry: nothing pinned
        return None, []
    return load_version(dataset), saved_versions(dataset)


def _lineage_mismatch(info: dict, params: dict) -> str | None:
    """How an image set's recorded source differs from this run's data-source parameters."""
    domain = info.get("domain")
    if domain not in ("source", "target"):
        return None
    fmt, path = params.get(f"{domain}_format"), params.get(f"{domain}_path")
    if info.get("format") != fmt:
        return f"it was read from {domain}_format={info.get('format')!r}, but this run has {domain}_format={fmt!r}"
    if fmt != "phantom" and path and info.get("path") and Path(info["path"]) != _resolve(path):
        return f"it was read from {info['path']}, but this run has {domain}_path={str(_resolve(path))!r}"
    return None


# ---------------------------------------------------------------- inputs from different runs
INGESTION_SETS = ("source_images", "target_images", "lora_subset")  # written together by one ingestion run


def _saved_folder(catalog, name: str) -> tuple[str | None, Path | None]:
    """(version, ``<filepath>/<version>/<name>``) this run would load for a versioned dataset."""
    try:
        dataset = catalog.get(name)
    except Exception:  # noqa: BLE001 - not in the catalog
        return None, None
    version = load_version(dataset)
    return version, versioned_path(dataset, version)


def _split_of(folder: Path) -> dict[str, str]:
    """image_id -> split of a saved image set (empty if unreadable)."""
    import pandas as pd

    try:
        meta = pd.read_csv(folder / "metadata.csv", usecols=["image_id", "split"], dtype=str, keep_default_na=False)
    except Exception:  # noqa: BLE001
        return {}
    return dict(zip(meta["image_id"], meta["split"]))


def _adapter_metadata(path: Path) -> dict:
    """An adapter file's metadata (``models.lora.read_adapter_metadata``), values JSON-decoded if
    they are JSON; empty when the file cannot be read."""
    from fu_kedro.models.lora import read_adapter_metadata

    try:
        raw = read_adapter_metadata(path)
    except Exception:  # noqa: BLE001
        return {}
    out = {}
    for k, v in raw.items():
        try:
            out[k] = json.loads(v)
        except (TypeError, ValueError):
            out[k] = v
    return out


def _not_train(ids: list[str], split: dict[str, str]) -> list[str]:
    return [f"{i} ({split.get(i, 'absent')})" for i in ids if split.get(i) != "train"]


def find_mixed_runs(pipeline, catalog) -> list[str]:
    """The run's saved inputs that come from different runs or splits, each naming the versions.

    - ``source_images``, ``target_images``, ``lora_subset``: one ingestion run writes all three
      with one version; different versions mean a mix of ingestion runs.
    - ``lora_subset`` must be source *train* images of the ``source_images`` loaded beside it.
    - ``synthetic_batch``: its adapter (the ``lora_adapter`` version named in the batch's
      info.json) was trained on LoRA subset images that must be *train* images of the
      ``source_images`` loaded beside it; else the synthetic data come from another split
      (possibly from images that are validation images now).
    """
    inputs = set(pipeline.inputs())
    found: list[str] = []
    versions = {n: _saved_folder(catalog, n) for n in INGESTION_SETS if n in inputs}
    versions = {n: v for n, v in versions.items() if v[0]}
    if len({v for v, _ in versions.values()}) > 1:
        found.append("inputs from different ingestion runs: "
                     + ", ".join(f"`{n}` version {v}" for n, (v, _) in sorted(versions.items()))
                     + " (one ingestion run writes them together, with one version)")
    src_version, src_folder = versions.get("source_images", (None, None))
    split = _split_of(src_folder) if src_folder else {}
    if split and "lora_subset" in versions:
        lora_version, lora_folder = versions["lora_subset"]
        bad = _not_train(list(_split_of(lora_folder)), split)
        if bad:
            found.append(f"`lora_subset` version {lora_version} was not drawn from the train side of `source_images` "
                         f"version {src_version}: {len(bad)} of its images are not train images there, e.g. "
                         + ", ".join(bad[:3]))
    if split and "synthetic_batch" in inputs:
        batch_version, batch_folder = _saved_folder(catalog, "synthetic_batch")
        info = {}
        try:
            info = json.loads((batch_folder / "info.json").read_text()) if batch_folder else {}
        except Exception:  # noqa: BLE001
            pass
        adapter_version = str((info.get("adapter") or {}).get("catalog_version") or "")
        adapter_path = None
        if adapter_version:
            try:
                adapter_path = versioned_path(catalog.get("lora_adapter"), adapter_version)
            except Exception:  # noqa: BLE001 - no lora_adapter entry
                adapter_path = None
        meta = _adapter_metadata(adapter_path) if adapter_path and adapter_path.is_file() else {}
        ids = meta.get("lora_subset_image_ids")
        if isinstance(ids, list):
            bad = _not_train([str(i) for i in ids], split)
            if bad:
                found.append(
                    f"`synthetic_batch` version {batch_version} was made by `lora_adapter` version {adapter_version}, "
                    f"trained on `lora_subset` version {meta.get('lora_subset_version') or '?'}, which is not from the "
                    f"split of `source_images` version {src_version}: {len(bad)} of its {len(ids)} LoRA images are not "
                    "train images there, e.g. " + ", ".join(bad[:3]))
    return found


# Free inputs read only under some parameters: name -> does this run use it? (their dataset loads as
# an empty placeholder when nothing is saved, and the node that uses them names what to run).
OPTIONAL_INPUTS = {
    "lora_adapter_fits": lambda params: bool((params.get("synthesis") or {}).get("adapter_per_replicate")),
}
# Files from outside the project whose path is a parameter (catalog entries that no pipeline
# makes): checked above, by check_pretrained_base / check_adapter_file, when the run uses them.
PARAMETER_FILES = ("pretrained_base", "imported_lora_adapter")


def check_upstream_outputs(pipeline, catalog, params: dict, env: str | None) -> tuple[list[Problem], list[str]]:
    """The run's free inputs (outputs of other pipelines) are saved, and come from this run's data sources.

    Returns (problems, warnings): a lineage mismatch is a problem when
    ``prerequisites.on_lineage_mismatch`` is ``fail`` (the paper env), else a warning.
    """
    problems, warnings = [], []
    mismatch_fails = (params.get("prerequisites") or {}).get("on_lineage_mismatch", "warn") == "fail"
    env_flag = f" --env {env}" if env and env != "local" else ""
    for name in sorted(pipeline.inputs()):
        if name == "parameters" or name.startswith("params:"):
            continue
        if name in OPTIONAL_INPUTS and not OPTIONAL_INPUTS[name](params):
            continue  # an input this run's parameters do not use (its node checks it when they do)
        if name in PARAMETER_FILES:
            continue  # not an output of another pipeline: find_missing_prerequisites checks the file
        producer = _producer(name)
        how = (
            f"it is made by the {producer} pipeline: run `kedro run{env_flag} --pipeline {producer}` first"
            if producer else "no registered pipeline makes it"
        )
        try:
            exists = catalog.exists(name)
        except Exception:  # noqa: BLE001 - e.g. a broken dataset config: report it as missing
            exists = False
        if not exists:
            pinned, saved = _pinned_version(catalog, name)
            if pinned:
                listed = ", ".join(saved[-5:]) if saved else "none"
                problems.append(Problem(
                    f"`{name}` (input of this run)",
                    f"version {pinned} is pinned (--load-versions) but not saved; saved versions (latest 5): {listed}.",
                ))
            else:
                problems.append(Problem(f"`{name}` (input of this run)", f"no saved version found; {how}."))
            continue
        info = _latest_info(catalog, name)
        mismatch = _lineage_mismatch(info, params) if info else None
        if mismatch:
            text = f"the latest `{name}` does not come from this run's data: {mismatch}; re-run {producer or 'its pipeline'} with these parameters"
            (problems.append(Problem(f"`{name}` (input of this run)", text + f" (`kedro run{env_flag} --pipeline {producer}`).")) if mismatch_fails
             else warnings.append(text + "."))
    if not problems:
        for text in find_mixed_runs(pipeline, catalog):
            text += ("; re-run the pipelines that make them, or pin matching versions with "
                     "--load-versions <dataset>:<version>")
            (problems.append(Problem("inputs of this run from different runs/splits", text + "."))
             if mismatch_fails else warnings.append(text + "."))
    return problems, warnings


def check_split_files(params: dict) -> list[Problem]:
    """The image lists the arms name (``evaluation.arms.<arm>.real.csv``) and the paper's result
    table (``evaluation.report.paper_table``) exist: a paper run must not learn it at the end."""
    get = ("They are the FU-LoRA authors' split files (their repository, MIT licence; see "
           "docs/paper_profile.md, 'What to download').")
    problems = []
    for name, arm in (params.get("arms") or {}).items():
        real = (arm or {}).get("real") if isinstance(arm, dict) else None
        file = real.get("csv") if isinstance(real, dict) else None
        if file and not _resolve(file).is_file():
            problems.append(Problem(f"the image list of arm {name} (evaluation.arms.{name}.real.csv={file!r})",
                                    f"{_resolve(file)} does not exist. {get}"))
    table = (params.get("report") or {}).get("paper_table")
    if table and not _resolve(table).is_file():
        problems.append(Problem(f"the paper's result table (evaluation.report.paper_table={table!r})",
                                f"{_resolve(table)} does not exist. {get}"))
    return problems


def find_missing_prerequisites(pipeline, catalog, params: dict, env: str | None = None) -> tuple[list[Problem], list[str]]:
    """Everything the pipeline about to run needs and does not find, in the order a user fixes it."""
    nodes = {n.name.rsplit(".", 1)[-1] for n in pipeline.nodes}
    problems: list[Problem] = []
    policy = (params.get("ingestion") or {}).get("on_bad_input")
    if {"read_source_images_node", "read_target_images_node"} & nodes and policy not in ("fail", "skip"):
        problems.append(Problem("a valid ingestion.on_bad_input",
                                f"it is {policy!r}; it must be 'fail' (stop, naming each bad file) or 'skip' "
                                "(quarantine bad files and go on)."))
    if "read_source_images_node" in nodes:
        problems += check_data_source("source", params.get("source_format"), params.get("source_path"))
    if "read_target_images_node" in nodes:
        problems += check_data_source("target", params.get("target_format"), params.get("target_path"))
    lora = params.get("lora_training") or {}
    base = lora.get("base_model") or {}
    inputs = set(pipeline.inputs())
    # base_model is built from pretrained_base here, or loaded from the catalog (which reloads a
    # pretrained base from its path); both paths are the parameters that the catalog entries read
    if base.get("kind") == "pretrained" and {"pretrained_base", "base_model"} & inputs:
        problems += check_pretrained_base(base.get("pretrained_path"))
    if "imported_lora_adapter" in inputs and lora.get("adapter_source") == "file":
        problems += check_adapter_file(lora.get("adapter_file"))
    if "plan_experiments_node" in nodes:
        problems += check_backbone_weights(params.get("evaluation") or {})
        problems += check_split_files(params.get("evaluation") or {})
    upstream, warnings = check_upstream_outputs(pipeline, catalog, params, env)
    return problems + upstream, warnings


def format_problems(problems: list[Problem], env: str | None) -> str:
    env_text = f"--env {env}" if env else "the default env"
    lines = [f"This run cannot start ({env_text}): {len(problems)} thing(s) it needs are missing. Nothing was run."]
    for i, p in enumerate(problems, 1):
        lines.append(f"\n{i}. {p.what}:\n   {p.detail}")
    lines.append(f"\nWhat to download and where to put it: {DOCS}.")
    return "\n".join(lines)
