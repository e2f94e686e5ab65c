"""Before any node runs: everything the run needs is there (the checks behind ``fu_kedro.hooks.PrerequisiteChecks``).

The files a run needs are checked against the resolved parameters of the pipelines about to
run: the data sources (FETAL_PLANES_DB, the African set), the Stable Diffusion v1.5 weights,
a LoRA adapter file, the torchvision ImageNet weight files, and the saved outputs of earlier
pipelines that this run loads (``lora_subset`` from ``ingestion``, ...). Everything missing is
named in one error, with what to download and where to put it, within seconds of ``kedro
run`` — instead of a failure deep inside the run, or after an hour of ingestion. Saved inputs
that come from different runs, splits or data (``find_mixes``: e.g. a synthetic batch whose
adapter was trained on images that are validation images of the current ``source_images``)
are named with their versions and stop the run, with the two fixes: re-run the upstream
pipelines, or the exact ``--load-versions`` command for saved versions that match
(``prerequisites.on_lineage_mismatch: fail``, every profile). Under ``warn`` the run goes on
and its lineage records, MLflow run and report name the mix.

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
    download: bool = True  # something to download or make; False: a setting or a folder to fix


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
    if root.is_dir() and any(root.iterdir()):  # the data are there, in another layout: nothing to download
        return [Problem(what, f"{wrong}. Arrange the folder so that there is {layout}.", download=False)]
    return [Problem(what, f"{wrong}. {spec['get'].capitalize()} so that there is {layout}.")]


def check_pretrained_base(model_id_or_path: str | None, base_training: dict | None = None,
                          env: str | None = None) -> list[Problem]:
    """The base (diffusers layout) is in the named folder or, for a hub id, in the local HF cache
    (:func:`fu_kedro.models.pretrained.resolve_pretrained_base`, which the loader uses too). A
    folder that ``base_training`` makes (its ``output_path``, or ``models/tiny-phantom-sd``) names
    the command that makes it; any other names what to download (SD v1.5)."""
    from fu_kedro.models.pretrained import resolve_pretrained_base

    problem = resolve_pretrained_base(model_id_or_path).problem
    if not problem:
        return []
    made_here = {str(Path(p)) for p in ((base_training or {}).get("output_path"), SHIPPED_BASE) if p}
    if model_id_or_path and str(Path(model_id_or_path)) in made_here:
        env_flag = f" --env {env}" if env and env != "local" else ""
        where = _resolve(model_id_or_path)
        how = (f"the shipped tiny base is part of the repository: restore it (`git checkout -- {SHIPPED_BASE}`) or "
               f"remake it (`kedro run --pipeline base_training --params base_training.output_path={SHIPPED_BASE}`)"
               if str(Path(model_id_or_path)) == SHIPPED_BASE else
               f"the base_training pipeline makes it: run `kedro run{env_flag} --pipeline with_base_training` "
               f"(or `kedro run{env_flag} --pipeline base_training` first)")
        return [Problem(f"the base model (lora_training.base_model.pretrained_path={model_id_or_path!r})",
                        f"{where} has no model_index.json; {how}.")]
    what = f"Stable Diffusion v1.5 weights (lora_training.base_model.pretrained_path={model_id_or_path!r})"
    return [Problem(what, problem)]


SHIPPED_BASE = "models/tiny-phantom-sd"  # the tiny base in the repository (README)


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
CHECKED_SETS = (*INGESTION_SETS, "synthetic_batch")  # the inputs whose versions the mix check compares
LINEAGE_KEY = "prerequisites.on_lineage_mismatch"
SEARCH_LIMIT = 30  # newest saved versions per dataset searched for a matching set
MIX_PROBLEM = "inputs that do not belong together"


def lineage_policy(params: dict) -> str:
    """``prerequisites.on_lineage_mismatch`` of the run: ``fail`` | ``warn`` (its schema: :mod:`fu_kedro.params`)."""
    return str(params["prerequisites"]["on_lineage_mismatch"])


class Mix(str):
    """One mix among a run's inputs: the text names the versions; ``versions`` holds the inputs
    involved as ``{dataset: version}`` (for the run's lineage records and ``kedro lineage``)."""

    versions: dict[str, str]

    def __new__(cls, text: str, versions: dict[str, str]):
        mix = super().__new__(cls, text)
        mix.versions = {k: v for k, v in versions.items() if v}
        return mix


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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except Exception:  # noqa: BLE001 - unreadable lineage is not this check's business
        return {}


class _Saved:
    """What the catalog's saved versions hold, each file read once per check (a published version
    never changes)."""

    def __init__(self, catalog):
        self.catalog = catalog
        self._cache: dict[tuple, object] = {}

    def dataset(self, name: str):
        try:
            return self.catalog.get(name)
        except Exception:  # noqa: BLE001 - not in the catalog
            return None

    def folder(self, name: str, version: str | None) -> Path | None:
        """``<filepath>/<version>/<name>`` of a saved version."""
        dataset = self.dataset(name)
        return versioned_path(dataset, version) if dataset is not None and version else None

    def _read(self, what: str, path: Path | None, reader):
        if path is None:
            return {}
        key = (what, str(path))
        if key not in self._cache:
            self._cache[key] = reader(path)
        return self._cache[key]

    def split(self, name: str, version: str | None) -> dict[str, str]:
        return self._read("split", self.folder(name, version), _split_of)

    def info(self, name: str, version: str | None) -> dict:
        folder = self.folder(name, version)
        return self._read("info", folder / "info.json" if folder else None, _read_json)

    def adapter_metadata(self, version: str) -> dict:
        path = self.folder("lora_adapter", version)
        return self._read("adapter", path, lambda p: _adapter_metadata(p) if p.is_file() else {})

    def versions(self, inputs: set[str], pinned: dict[str, str] | None = None) -> dict[str, str]:
        """The version each checked input loads (``pinned`` first, else the catalog's load version)."""
        out = {}
        for name in CHECKED_SETS:
            if name in inputs:
                version = (pinned or {}).get(name) or load_version(self.dataset(name))
                if version:
                    out[name] = version
        return out

    def saved(self, name: str) -> list[str]:
        return saved_versions(self.dataset(name))


def _not_train(ids: list[str], split: dict[str, str]) -> list[str]:
    return [f"{i} ({split.get(i, 'absent')})" for i in ids if split.get(i) != "train"]


def _source_mixes(saved: _Saved, inputs: set[str], params: dict, pinned: dict[str, str] | None) -> list[Mix]:
    """Image-set inputs read from other data than this run's ``<domain>_format`` / ``<domain>_path``."""
    from fu_kedro.datasets import ImageSetDataset

    found = []
    for name in sorted(inputs):
        dataset = saved.dataset(name)
        if not isinstance(dataset, ImageSetDataset):
            continue
        version = (pinned or {}).get(name) or load_version(dataset)
        mismatch = _lineage_mismatch(saved.info(name, version), params) if version else None
        if mismatch:
            found.append(Mix(f"`{name}` version {version} does not come from this run's data: {mismatch}",
                             {name: version}))
    return found


def _batch_mix(saved: _Saved, versions: dict[str, str], split: dict[str, str]) -> Mix | None:
    """The synthetic batch's adapter was trained on images that are not train images of ``source_images``."""
    batch_version, src_version = versions["synthetic_batch"], versions.get("source_images")
    info = saved.info("synthetic_batch", batch_version)
    adapter_version = str((info.get("adapter") or {}).get("catalog_version") or "")
    meta = saved.adapter_metadata(adapter_version) if adapter_version else {}
    ids = meta.get("lora_subset_image_ids")
    if not isinstance(ids, list):
        return None
    bad = _not_train([str(i) for i in ids], split)
    if not bad:
        return None
    return Mix(
        f"`synthetic_batch` version {batch_version} was made by `lora_adapter` version {adapter_version}, "
        f"trained on `lora_subset` version {meta.get('lora_subset_version') or '?'}, which is not from the "
        f"split of `source_images` version {src_version}: {len(bad)} of its {len(ids)} LoRA images are not "
        "train images there, e.g. " + ", ".join(bad[:3]),
        {"synthetic_batch": batch_version, "source_images": src_version})


def find_mixes(pipeline, catalog, params: dict | None = None, pinned: dict[str, str] | None = None,
               saved: _Saved | None = None) -> list[Mix]:
    """The run's saved inputs that come from different runs, splits or data, each naming the versions.

    - with ``params``: image sets read from other data than this run's ``<domain>_format`` /
      ``<domain>_path``;
    - ``source_images``, ``target_images``, ``lora_subset``: one ingestion run writes all three
      with one version; different versions mean a mix of ingestion runs;
    - ``lora_subset`` must be source *train* images of the ``source_images`` loaded beside it;
    - ``synthetic_batch``: its adapter (the ``lora_adapter`` version named in the batch's
      info.json) was trained on LoRA subset images that must be *train* images of the
      ``source_images`` loaded beside it; else the synthetic data come from another split
      (possibly from images that are validation images now).

    ``pinned``: versions to check instead of the ones the catalog loads (the search for a
    matching set, :func:`matching_versions`).
    """
    inputs = set(pipeline.inputs())
    saved = saved or _Saved(catalog)
    found = _source_mixes(saved, inputs, params, pinned) if params is not None else []
    versions = saved.versions(inputs, pinned)
    ingestion = {n: v for n, v in versions.items() if n in INGESTION_SETS}
    if len(set(ingestion.values())) > 1:
        found.append(Mix("inputs from different ingestion runs: "
                         + ", ".join(f"`{n}` version {v}" for n, v in sorted(ingestion.items()))
                         + " (one ingestion run writes them together, with one version)", ingestion))
    src_version = versions.get("source_images")
    split = saved.split("source_images", src_version) if src_version else {}
    if split and "lora_subset" in versions:
        lora_version = versions["lora_subset"]
        bad = _not_train(list(saved.split("lora_subset", lora_version)), split)
        if bad:
            found.append(Mix(f"`lora_subset` version {lora_version} was not drawn from the train side of "
                             f"`source_images` version {src_version}: {len(bad)} of its images are not train "
                             "images there, e.g. " + ", ".join(bad[:3]),
                             {"lora_subset": lora_version, "source_images": src_version}))
    if split and "synthetic_batch" in versions:
        mix = _batch_mix(saved, versions, split)
        if mix:
            found.append(mix)
    return found


def find_mixed_runs(pipeline, catalog) -> list[str]:
    """The texts of :func:`find_mixes` without the data-source check."""
    return [str(m) for m in find_mixes(pipeline, catalog)]


def matching_versions(pipeline, catalog, params: dict, saved: _Saved | None = None) -> dict[str, str] | None:
    """Saved versions of the checked inputs (``CHECKED_SETS``) that match each other and this run's
    parameters: one ingestion version for the ingestion sets, a synthetic batch made from its split.
    The set that changes the fewest inputs from what the run would load, then the newest; None when
    no saved versions match (the newest ``SEARCH_LIMIT`` of each are searched)."""
    inputs = set(pipeline.inputs())
    saved = saved or _Saved(catalog)
    ingestion = [n for n in INGESTION_SETS if n in inputs]
    if ingestion:
        common = set.intersection(*(set(saved.saved(n)) for n in ingestion))
        ingestion_versions = sorted(common, reverse=True)[:SEARCH_LIMIT]
    else:
        ingestion_versions = [None]
    batches = sorted(saved.saved("synthetic_batch"), reverse=True)[:SEARCH_LIMIT] if "synthetic_batch" in inputs else [None]
    current = saved.versions(inputs)
    options = []
    for i, ingestion_version in enumerate(ingestion_versions):
        for j, batch in enumerate(batches):
            pins = {n: ingestion_version for n in ingestion if ingestion_version}
            if batch:
                pins["synthetic_batch"] = batch
            options.append((sum(current.get(n) != v for n, v in pins.items()), i + j, pins))
    for _, _, pins in sorted(options, key=lambda o: o[:2]):
        if pins and not find_mixes(pipeline, catalog, params, pins, saved):
            return pins
    return None


def _cli_value(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_cli_value(v) for v in value) + "]"
    return str(value)


def _dotted(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_dotted(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


RUN_OPTIONS = (("from_nodes", "--from-nodes"), ("to_nodes", "--to-nodes"), ("node_names", "--nodes"),
               ("tags", "--tags"), ("from_inputs", "--from-inputs"), ("to_outputs", "--to-outputs"),
               ("namespaces", "--namespaces"))


def kedro_run_command(run_params: dict, pipelines: list[str] | None = None,
                      load_versions: dict[str, str] | None = None) -> str:
    """The ``kedro run`` command of ``run_params`` (a ``before_pipeline_run`` hook's): same env,
    pipelines, node options and ``--params``; ``pipelines`` replaces the pipelines (and drops the
    node options), ``load_versions`` is merged into the run's own."""
    import shlex

    parts = ["kedro", "run"]
    env = run_params.get("env")
    if env and env != "local":
        parts += ["--env", env]
    names = pipelines if pipelines is not None else [
        p for p in run_params.get("pipeline_names") or [] if p and p != "__default__"]
    if len(names) == 1:
        parts += ["--pipeline", names[0]]
    elif names:
        parts += ["--pipelines", ",".join(names)]
    for key, flag in RUN_OPTIONS if pipelines is None else ():
        if run_params.get(key):
            parts += [flag, ",".join(run_params[key])]
    params = _dotted(run_params.get("runtime_params") or {})
    if params:
        parts += ["--params", ",".join(f"{k}={_cli_value(v)}" for k, v in params.items())]
    versions = {**(run_params.get("load_versions") or {}), **(load_versions or {})}
    if versions:
        parts += ["--load-versions", ",".join(f"{k}:{v}" for k, v in sorted(versions.items()))]
    return " ".join(shlex.quote(p) for p in parts)


def mix_fixes(pipeline, catalog, params: dict, run_params: dict, saved: _Saved | None = None) -> list[str]:
    """The two ways out of a mix, as lines: re-run the upstream pipelines, or the exact command
    with ``--load-versions`` pinning saved versions that match (when there are such)."""
    from fu_kedro.pipeline_registry import PIPELINE_ORDER

    running = [p for p in run_params.get("pipeline_names") or [] if p in PIPELINE_ORDER]
    first = min((PIPELINE_ORDER.index(p) for p in running), default=len(PIPELINE_ORDER))
    upstream = list(PIPELINE_ORDER[:first]) if running else []
    lines = ["Two fixes:"]
    if upstream:
        lines += ["(1) re-run the upstream pipelines with this run's parameters, so that its inputs come from one "
                  "chain, then this command again:",
                  "      " + kedro_run_command(run_params, pipelines=upstream)]
    else:
        lines += ["(1) re-run the pipelines that make these inputs with this run's parameters, then this command again."]
    pins = matching_versions(pipeline, catalog, params, saved)
    if pins:
        lines += ["(2) or load saved versions that match each other and this run's parameters:",
                  "      " + kedro_run_command(run_params, load_versions=pins)]
    else:
        lines += [f"(2) --load-versions <dataset>:<version> with versions that match: none found among the saved "
                  f"versions (the latest {SEARCH_LIMIT} of {', '.join(CHECKED_SETS)}); use (1)."]
    return lines


# Free inputs read only under some parameters: name -> does this run use it? (their dataset loads as
# an empty placeholder when nothing is saved, and the node that uses them names what to run).
OPTIONAL_INPUTS = {
    "lora_adapter_fits": lambda params: bool((params.get("synthesis") or {}).get("adapter_per_replicate")),
}
# Files from outside the project whose path is a parameter (catalog entries that no pipeline
# makes): checked above, by check_pretrained_base / check_adapter_file, when the run uses them.
PARAMETER_FILES = ("pretrained_base", "imported_lora_adapter")


def _missing_input(catalog, name: str, how: str) -> Problem | None:
    """The problem of a free input with no saved version (or a pinned one that is not saved)."""
    try:
        exists = catalog.exists(name)
    except Exception:  # noqa: BLE001 - e.g. a broken dataset config: report it as missing
        exists = False
    if exists:
        return None
    pinned, saved = _pinned_version(catalog, name)
    if pinned:
        listed = ", ".join(saved[-5:]) if saved else "none"
        return Problem(f"`{name}` (input of this run)",
                       f"version {pinned} is pinned (--load-versions) but not saved; saved versions (latest 5): {listed}.")
    return Problem(f"`{name}` (input of this run)", f"no saved version found; {how}.")


def check_upstream_outputs(pipeline, catalog, params: dict, env: str | None,
                           run_params: dict | None = None) -> tuple[list[Problem], list[str]]:
    """The run's free inputs (outputs of other pipelines) are saved, and belong together.

    Returns (problems, warnings). Inputs that come from other data, other ingestion runs or
    another split (:func:`find_mixes`) are one problem when ``prerequisites.on_lineage_mismatch``
    is ``fail`` (the default), naming the versions and the fixes (:func:`mix_fixes`); under
    ``warn`` they are warnings: one :class:`Mix` each, then the fixes.
    """
    problems = []
    run_params = run_params or {"env": env}
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
        problem = _missing_input(catalog, name, how)
        if problem:
            problems.append(problem)
    if problems:
        return problems, []
    saved = _Saved(catalog)
    mixes = find_mixes(pipeline, catalog, params, saved=saved)
    if not mixes:
        return [], []
    fixes = mix_fixes(pipeline, catalog, params, run_params, saved)
    if lineage_policy(params) == "warn":
        return [], [*mixes, f"{LINEAGE_KEY} is 'warn': the run goes on; the report and the MLflow run say so. "
                    + "\n".join(fixes)]
    detail = "\n   ".join([*(f"- {m}" for m in mixes), *fixes,
                           f"To run on these inputs anyway (the report and the MLflow run then name the mix): "
                           f"--params {LINEAGE_KEY}=warn."])
    return [Problem(f"{MIX_PROBLEM} ({LINEAGE_KEY}: fail)", detail)], []


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


def check_pinned_outputs(pipeline, load_versions: dict | None) -> list[Problem]:
    """``--load-versions`` pins what a run *reads*; a dataset this run writes cannot be pinned (the
    run would save a new version and its next node read the pinned one back, from this run's staging
    folder, where it is not)."""
    problems = []
    outputs = pipeline.all_outputs()
    for name, version in sorted((load_versions or {}).items()):
        if name not in outputs:
            continue
        makers = [n.name for n in pipeline.nodes if name in n.outputs]
        readers = [n.name for n in pipeline.nodes if name in n.inputs]
        hint = (f"; to read a saved version instead of making one, run only the nodes after it: "
                f"`--from-nodes {readers[0]} --load-versions {name}:{version}`" if readers else "")
        problems.append(Problem(
            f"`{name}` pinned with --load-versions {name}:{version}",
            f"`{name}` is an output of this run (made by {', '.join(makers)}): --load-versions pins only datasets "
            f"a run reads without making them{hint}.", download=False))
    return problems


def find_missing_prerequisites(pipeline, catalog, params: dict, env: str | None = None,
                               run_params: dict | None = None) -> tuple[list[Problem], list[str]]:
    """Everything the pipeline about to run needs and does not find, in the order a user fixes it.
    ``run_params`` (the hook's) make the commands of the fixes repeat the run's options."""
    nodes = {n.name.rsplit(".", 1)[-1] for n in pipeline.nodes}
    problems: list[Problem] = check_pinned_outputs(pipeline, (run_params or {}).get("load_versions"))
    if "read_source_images_node" in nodes:
        problems += check_data_source("source", params.get("source_format"), params.get("source_path"))
    if "read_target_images_node" in nodes:
        problems += check_data_source("target", params.get("target_format"), params.get("target_path"))
    lora = params.get("lora_training") or {}
    base = lora.get("base_model") or {}
    inputs = set(pipeline.inputs())
    # base_model is loaded from pretrained_base here, or from the catalog (which reloads the base
    # from its path); both paths are the parameter that the catalog entry reads
    if {"pretrained_base", "base_model"} & inputs:
        problems += check_pretrained_base(base.get("pretrained_path"), params.get("base_training"), env)
    if "imported_lora_adapter" in inputs and lora.get("adapter_source") == "file":
        problems += check_adapter_file(lora.get("adapter_file"))
    if "plan_experiments_node" in nodes:
        problems += check_backbone_weights(params.get("evaluation") or {})
        problems += check_split_files(params.get("evaluation") or {})
    upstream, warnings = check_upstream_outputs(pipeline, catalog, params, env, run_params)
    return problems + upstream, warnings


def format_problems(problems: list[Problem], env: str | None) -> str:
    env_text = f"--env {env}" if env else "the default env"
    lines = [f"This run cannot start ({env_text}): {len(problems)} thing(s) to fix first. Nothing was run."]
    for i, p in enumerate(problems, 1):
        lines.append(f"\n{i}. {p.what}:\n   {p.detail}")
    if any(p.download and not p.what.startswith(MIX_PROBLEM) for p in problems):
        lines.append(f"\nWhat to download and where to put it: {DOCS}.")
    return "\n".join(lines)
