"""The ``paper`` env: its resolved values, and the prerequisite checks of ``fu_kedro.prerequisites``.

The first two tests run the real CLI (``kedro run --env paper ...``) and time it: on a
machine without the SD v1.5 weights / the datasets / the ImageNet files, the run must stop
within seconds, before any node runs, naming what to download and where to put it.
"""
from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time

import pytest
from conftest import copy_project, project_parameters
from kedro.io import DataCatalog, MemoryDataset
from kedro.pipeline import Node, Pipeline

from fu_kedro import hooks, prerequisites
from fu_kedro.data_sources import generate_phantoms
from fu_kedro.datasets import ImageSetDataset

# "Fails in seconds" is asserted by behaviour, not by the clock: the run stops before the first
# node (no "Running node", no data/, no MLflow run). The wall time is printed; a clock limit
# failed under load (85-100 s at load 9 for ~10 s of CLI start-up on idle cores).


def _kedro(args: list[str], cwd, timeout: int = 300) -> tuple[int, str, float]:
    """Run ``kedro <args>`` in ``cwd``; return (exit code, stdout+stderr with whitespace collapsed, seconds)."""
    env = dict(os.environ, COLUMNS="200", KEDRO_DISABLE_TELEMETRY="1")
    start = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kedro", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    return proc.returncode, " ".join((proc.stdout + proc.stderr).split()), time.monotonic() - start


def _paper_params(project_root, runtime_params: dict | None = None) -> dict:
    return project_parameters("paper", runtime_params)


# --------------------------------------------------------------------------- the real CLI
@pytest.fixture(scope="module")
def clean_project(project_root, tmp_path_factory):
    """The project as a fresh clone has it: conf, src, pyproject; no models/, no data/, own MLflow store."""
    return copy_project(project_root, tmp_path_factory.mktemp("clean_project"))


def test_paper_lora_training_without_sd15_fails_in_seconds_naming_the_download(clean_project):
    code, out, seconds = _kedro(["run", "--env", "paper", "--pipeline", "lora_training"], clean_project)
    print(f"kedro run --env paper --pipeline lora_training: exit {code} after {seconds:.1f} s")
    assert code != 0
    assert "MissingPrerequisitesError" in out and "Nothing was run" in out
    assert "Stable Diffusion v1.5 weights" in out
    assert "hf download stable-diffusion-v1-5/stable-diffusion-v1-5" in out  # what to download
    assert "runwayml/stable-diffusion-v1-5" in out
    assert f"put the folder at {clean_project / 'models' / 'stable-diffusion-v1-5'}" in out  # where to put it
    # ingestion's outputs are missing too: named, with the command that makes them
    assert "`lora_subset` (input of this run)" in out and "kedro run --env paper --pipeline ingestion" in out
    assert "docs/paper_profile.md" in out
    assert "Running node" not in out  # stopped before the first node
    assert not (clean_project / "data").exists()  # nothing written
    if (clean_project / "mlflow.db").exists():  # kedro-mlflow may have created its store, but no run
        with sqlite3.connect(clean_project / "mlflow.db") as db:
            assert db.execute("select count(*) from runs").fetchone()[0] == 0


def test_paper_ingestion_and_evaluation_name_the_datasets_and_imagenet_files(clean_project):
    code, out, seconds = _kedro(["run", "--env", "paper", "--pipelines", "ingestion,evaluation"], clean_project)
    print(f"kedro run --env paper --pipelines ingestion,evaluation: exit {code} after {seconds:.1f} s")
    raw = clean_project / "data" / "01_raw"
    assert code != 0 and "Running node" not in out
    assert "FETAL_PLANES_DB" in out and "https://zenodo.org/records/3904280" in out
    assert str(raw / "FETAL_PLANES_DB") in out and "FETAL_PLANES_DB_data.csv" in out
    assert "African fetal planes dataset" in out and "https://zenodo.org/records/7540448" in out
    assert str(raw / "african_planes") in out
    for backbone in ("resnet18", "densenet169", "mobilenet_v2", "efficientnet_b0", "vit_b_16"):
        assert f"ImageNet weights of {backbone}" in out and f"models/torchvision/{backbone}.pth" in out
    assert "`synthetic_batch` (input of this run)" in out  # made by the synthesis pipeline
    assert "the image list of arm HB" in out and "fu_lora_splits/spain_train_1150_balanced.csv" in out


# --------------------------------------------------------------------------- resolved values
def test_paper_env_overrides_single_values_and_keeps_the_rest_of_each_block(project_root):
    p = _paper_params(project_root)
    lora = p["lora_training"]
    assert lora["resolution"] == 512 and lora["base_model"] == {"pretrained_path": "models/stable-diffusion-v1-5"}
    assert lora["lora"]["rank"] == 128 and lora["lora"]["alpha"] is None  # alpha = rank
    assert lora["lora"]["learning_rate"] == 1e-4 and lora["lora"]["text_encoder_learning_rate"] == 5e-5
    assert lora["lora"]["clip_skip"] == 1  # kohya's "clip skip 2" in diffusers' count
    assert lora["lora"]["train_text_encoder"] is True
    # from conf/base, kept by the soft merge
    assert lora["lora"]["unet_targets"] == ["to_q", "to_k", "to_v", "to_out.0"]
    assert p["classes"] == ["abdomen", "brain", "femur", "thorax", "other"]  # the top-level class list, from conf/base
    assert p["base_training"]["name"] == "tiny-phantom-sd"  # conf/base's, unused by the paper env
    ev = p["evaluation"]
    assert ev["image_size"] == 224 and ev["augmentation"] == [True, False]
    assert list(ev["arms"]) == ["ES", "BAL", "ES_SYN", "HB"]  # conf/base's names; HB's real images: the authors' list
    assert ev["arms"]["HB"]["real"] == {"csv": "data/01_raw/fu_lora_splits/spain_train_1150_balanced.csv"}
    assert ev["arms"]["ES"] == {"real": "all", "synthetic": "none"} and ev["arms"]["HB"]["synthetic"] == "all"
    assert set(ev["weights"]) == set(ev["backbones"]) == {"resnet18", "densenet169", "mobilenet_v2", "efficientnet_b0", "vit_b_16"}
    assert ev["metrics"]["n_bootstrap"] == 200  # from conf/base
    assert p["ingestion"]["lora_per_class"] == 20 and p["ingestion"]["image_size"] == 512
    assert p["ingestion"]["plane_labels"]["Fetal brain"] == "brain"  # from conf/base
    assert (p["source_format"], p["target_format"]) == ("fetal_planes_db", "african")
    assert p["seed"] == 42


CLASS_WORDS = {"abdomen", "brain", "femur", "thorax", "other"}
# the nodes that take the class list, each as the input `params:classes` (issue #16: one home)
CLASS_NODES = {"read_source_images_node", "draw_lora_subset_node", "make_prior_corpus_node", "render_validation_grid_node",
               "plan_synthetic_batch_node", "summarize_synthetic_batch_node", "prepare_classifier_data_node",
               "compute_zero_shot_metrics_node"}


def _class_lists(value, where: str = ""):
    """(dotted key, value) of every `classes` key and every list of >= 2 class words under ``value``."""
    if isinstance(value, dict):
        for key, item in value.items():
            path = f"{where}.{key}" if where else str(key)
            if key == "classes":
                yield path, item
            else:
                yield from _class_lists(item, path)
    elif isinstance(value, list):
        if len(value) >= 2 and all(isinstance(v, str) and v in CLASS_WORDS for v in value):
            yield where, value
        for i, item in enumerate(value):
            yield from _class_lists(item, f"{where}[{i}]")


def test_the_class_list_has_one_home_in_conf(project_root):
    """Exactly one class list in conf/ (every env, every file): the top-level `classes` of
    conf/base/parameters.yml. No block keeps a copy (`evaluation.classes`, `synthesis.classes`,
    `lora_training.validation.classes`, `...prior.classes`, `ingestion.required_classes.source`)."""
    import yaml

    found = []
    for path in sorted((project_root / "conf").rglob("*.yml")):
        found += [(str(path.relative_to(project_root)), key) for key, _ in _class_lists(yaml.safe_load(path.read_text()) or {})]
    assert found == [("conf/base/parameters.yml", "classes")], found
    for env in ("base", "paper", "real_cpu"):
        p = project_parameters(env)
        assert p["classes"] == ["abdomen", "brain", "femur", "thorax", "other"], env
        assert [key for key, _ in _class_lists(p)] == ["classes"], env


@pytest.mark.parametrize("env", ["base", "paper", "real_cpu"])
def test_a_runtime_classes_override_reaches_every_node_that_uses_the_class_list(project_root, env):
    """`kedro run --params classes=[brain]` (or `--config` with a list): every node that uses the
    class list gets the override through its `params:classes` input, and no node reads a class
    list from any other parameter (no `classes` key in any `params:` input it takes)."""
    from fu_kedro.pipeline_registry import register_pipelines

    override = ["brain", "femur"]
    params = project_parameters(env, {"classes": override})
    assert params["classes"] == override

    def resolve(dotted: str):
        value = params
        for part in dotted.split("."):
            value = value[part]
        return value

    takers = set()
    for node in register_pipelines()["with_base_training"].nodes:  # __default__ + base_training
        for name in node.inputs:
            if not name.startswith("params:"):
                continue
            key = name.removeprefix("params:")
            value = resolve(key)
            if key == "classes":
                takers.add(node.name)
                assert value == override, node.name
            else:
                assert not list(_class_lists(value)), f"{node.name} reads a class list from {name}"
    assert takers == CLASS_NODES


@pytest.mark.parametrize("old", ["evaluation.classes", "synthesis.classes", "lora_training.validation.classes",
                                 "lora_training.base_model.tiny", "base_training.prior.classes",
                                 "ingestion.required_classes.source"])
def test_an_old_class_list_key_stops_the_run_as_an_unknown_key(project_root, old):
    """Set by an old command line or env file, an old per-block class list would be ignored
    silently: the parameters' schema refuses it before any node, naming the key and its block's keys
    (where the lists went: CHANGELOG.md)."""
    from fu_kedro.params import check_parameters
    from fu_kedro.schema import ParameterError

    runtime: dict = {}
    leaf = runtime
    *parents, last = old.split(".")
    for part in parents:
        leaf = leaf.setdefault(part, {})
    leaf[last] = ["brain"]
    with pytest.raises(ParameterError, match=rf"{old}: unknown key in {'.'.join(parents)}; allowed keys: "):
        check_parameters(project_parameters("base", runtime))
    check_parameters(project_parameters("base", {"classes": ["brain"]}))  # the new key is fine


def test_rank_sweep_override_changes_the_rank_only(project_root):
    # `kedro run --env paper --params lora_training.lora.rank=32` reaches the loader as a nested dict
    p = _paper_params(project_root, {"lora_training": {"lora": {"rank": 32}}})
    lora = p["lora_training"]["lora"]
    assert lora["rank"] == 32 and lora["alpha"] is None and lora["learning_rate"] == 1e-4
    assert lora["unet_targets"] == ["to_q", "to_k", "to_v", "to_out.0"]


# --------------------------------------------------------------------------- the checks, one by one
def test_pretrained_folder_with_model_index_passes_and_a_missing_one_is_named(tmp_path):
    folder = tmp_path / "sd15"
    (folder).mkdir()
    problem = prerequisites.check_pretrained_base(str(folder))
    assert len(problem) == 1 and str(folder) in problem[0].detail and "model_index.json" in problem[0].detail
    (folder / "model_index.json").write_text("{}")
    assert prerequisites.check_pretrained_base(str(folder)) == []
    [unset] = prerequisites.check_pretrained_base(None)
    assert "pretrained_path is not set" in unset.detail


def test_data_source_layouts_are_checked(tmp_path):
    fpdb = tmp_path / "fpdb"
    [p] = prerequisites.check_data_source("source", "fetal_planes_db", str(fpdb))
    assert "does not exist" in p.detail and "zenodo.org/records/3904280" in p.detail
    fpdb.mkdir()
    (fpdb / "FETAL_PLANES_DB_data.csv").write_text("Image_name;Patient_num;Plane\n")
    [p] = prerequisites.check_data_source("source", "fetal_planes_db", str(fpdb))
    assert "no Images/ folder" in p.detail
    (fpdb / "Images").mkdir()
    assert prerequisites.check_data_source("source", "fetal_planes_db", str(fpdb)) == []
    african = tmp_path / "african"
    african.mkdir()
    [p] = prerequisites.check_data_source("target", "african", str(african))
    assert "0 CSV files" in p.detail and "zenodo.org/records/7540448" in p.detail
    assert prerequisites.check_data_source("source", "phantom", None) == []


def test_weight_and_adapter_files_are_checked(tmp_path):
    present = tmp_path / "resnet18.pth"
    present.write_bytes(b"x")
    params = {"backbones": ["resnet18", "vit_b_16", "mobilenet_v2"],
              "weights": {"resnet18": str(present), "vit_b_16": str(tmp_path / "vit_b_16.pth")}}
    [p] = prerequisites.check_backbone_weights(params)  # mobilenet_v2 without a file = random init, not an error
    assert "vit_b_16" in p.what and "IMAGENET1K_V1" in p.detail
    [p] = prerequisites.check_adapter_file(str(tmp_path / "fu_lora.safetensors"))
    assert "huggingface.co/fangyijie/fu-lora" in p.detail and "fetal_ultrasound_v1.0.safetensors" in p.detail


def test_split_files_of_the_paper_arms_are_checked_before_the_run(project_root, tmp_path):
    """conf/paper's HB/BAL image list and the paper's table are prerequisites (not a failure after hours of LoRA)."""
    ev = _paper_params(project_root)["evaluation"]
    problems = prerequisites.check_split_files(ev)
    assert sorted(p.what.split(" (")[0] for p in problems) == ["the image list of arm BAL", "the image list of arm HB",
                                                               "the paper's result table"]
    assert all("FU-LoRA authors' split files" in p.detail for p in problems)
    listed = tmp_path / "list.csv"
    listed.write_text("Image_name\nx\n")
    ev["arms"]["HB"]["real"]["csv"] = ev["arms"]["BAL"]["real"]["csv"] = str(listed)
    ev["report"]["paper_table"] = str(listed)
    assert prerequisites.check_split_files(ev) == []


def _two_stage_pipeline() -> Pipeline:
    """A stand-in for lora_training: reads ingestion's lora_subset, writes an adapter."""
    return Pipeline([Node(lambda subset, params: subset, ["lora_subset", "params:lora_training"], "lora_adapter",
                          name="fit_lora_adapter_node")])


def test_missing_upstream_output_names_the_pipeline_that_makes_it(tmp_path):
    catalog = DataCatalog({"lora_subset": ImageSetDataset(str(tmp_path / "lora_subset"), version=None)})
    params = {"lora_training": {"adapter_source": "train"}, "source_format": "phantom"}
    problems, _ = prerequisites.find_missing_prerequisites(_two_stage_pipeline(), catalog, params, env="paper")
    [p] = problems
    assert "lora_subset" in p.what and "kedro run --env paper --pipeline ingestion" in p.detail


def test_a_pinned_version_that_is_not_saved_is_named_with_the_saved_ones(tmp_path):
    from kedro.io import Version

    subset = generate_phantoms("source", 1, 64, seed=0)
    ImageSetDataset(str(tmp_path / "lora_subset"), version=Version(None, "2026-01-01T00.00.00.000Z")).save(subset)
    pinned = ImageSetDataset(str(tmp_path / "lora_subset"), version=Version("2020-05-05T00.00.00.000Z", None))
    params = {"lora_training": {"adapter_source": "train"}, "source_format": "phantom"}
    [p], _ = prerequisites.find_missing_prerequisites(_two_stage_pipeline(), DataCatalog({"lora_subset": pinned}), params, env=None)
    assert "version 2020-05-05T00.00.00.000Z is pinned" in p.detail and "2026-01-01T00.00.00.000Z" in p.detail


def test_upstream_output_from_other_data_fails_and_warns_when_told(tmp_path):
    from kedro.io import Version

    subset = generate_phantoms("source", 1, 64, seed=0)
    subset.info.update({"format": "phantom", "domain": "source"})
    ImageSetDataset(str(tmp_path / "lora_subset"), version=Version(None, "2026-01-01T00.00.00.000Z")).save(subset)
    catalog = DataCatalog({"lora_subset": ImageSetDataset(str(tmp_path / "lora_subset"), version=Version(None, None))})
    params = {"lora_training": {}, "source_format": "fetal_planes_db", "source_path": str(tmp_path),
              "prerequisites": {"on_lineage_mismatch": "warn"}}
    problems, warnings = prerequisites.find_missing_prerequisites(_two_stage_pipeline(), catalog, params, env=None)
    assert problems == [] and "source_format='phantom'" in warnings[0]
    params["prerequisites"] = {"on_lineage_mismatch": "fail"}  # every profile's
    problems, _ = prerequisites.find_missing_prerequisites(_two_stage_pipeline(), catalog, params, env="paper")
    assert "does not come from this run's data" in problems[0].detail
    params["source_format"] = "phantom"  # matching lineage: nothing to report
    assert prerequisites.find_missing_prerequisites(_two_stage_pipeline(), catalog, params, env="paper") == ([], [])


def test_only_the_main_process_writes(tmp_path, monkeypatch):
    inputs = ImageSetDataset(str(tmp_path / "lora_subset"))
    output = ImageSetDataset(str(tmp_path / "lora_adapter"))
    catalog = DataCatalog({"lora_subset": inputs, "lora_adapter": output})
    monkeypatch.setenv("RANK", "0")
    hooks.MainProcessWrites().before_pipeline_run({}, _two_stage_pipeline(), catalog)
    assert catalog.get("lora_adapter") is output
    monkeypatch.setenv("RANK", "1")
    hooks.MainProcessWrites().before_pipeline_run({}, _two_stage_pipeline(), catalog)
    assert isinstance(catalog.get("lora_adapter"), MemoryDataset)  # rank 1 keeps its output in memory
    assert catalog.get("lora_subset") is inputs  # and still reads its inputs from disk
