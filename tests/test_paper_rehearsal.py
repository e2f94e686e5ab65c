"""``scripts/paper_rehearsal.py``: the paper env end to end on CPU with stand-ins for the downloads.

The slow tests run the rehearsal (the full one: 38 CPU-minutes, 1.5 h of wall time on 2 shared
cores, est. under 20 min on 2 idle ones; ``--adapter-from-file``: see docs/paper_profile.md);
the others check its stand-ins quickly: the data folders pass the paper env's prerequisite
checks and read as real data, and the kohya-ss file it writes imports to the same adapter.
"""
from __future__ import annotations

import hashlib
import json

import pytest
import torch
from conftest import load_script, project_parameters
from safetensors.torch import save_file

from fu_kedro import prerequisites
from fu_kedro.data_sources import read_domain
from fu_kedro.models.diffusion import TINY_CONFIG, build_pipeline_from_config
from fu_kedro.models.lora import attach_lora, export_lora, read_adapter_file


rehearsal = load_script("paper_rehearsal")


def test_stand_in_datasets_pass_the_paper_checks_and_read_as_real_data(tmp_path, fetal_planes_db_sample,
                                                                       african_planes_dev, ingestion_params):
    fpdb, african = tmp_path / "FETAL_PLANES_DB", tmp_path / "african_planes"
    listed = rehearsal.authors_hb_list(rehearsal.SHARED_DATA / "fu_lora_splits")
    assert len(listed) == 1150
    assert rehearsal.write_fetal_planes_db(fetal_planes_db_sample, fpdb, per_class=2, listed=listed) == 10
    names = [p.stem for p in (fpdb / "Images").glob("*.png")]
    assert sum(n in listed for n in names) == 5  # one per class on the authors' HB list, one not
    assert rehearsal.write_african(african_planes_dev, african, per_center_class=1) == 18  # Ghana, Uganda: no thorax
    assert prerequisites.check_data_source("source", "fetal_planes_db", str(fpdb)) == []
    assert prerequisites.check_data_source("target", "african", str(african)) == []
    cfg = dict(ingestion_params, image_size=64)
    source, _ = read_domain("fetal_planes_db", str(fpdb), "source", 0, cfg, required=project_parameters("paper")["classes"])
    target, _ = read_domain("african", str(african), "target", 0, cfg)
    assert len(source) == 10 and sorted(source.meta["label"].unique()) == ["abdomen", "brain", "femur", "other", "thorax"]
    assert len(target) == 18 and target.meta["center"].nunique() == 5


def test_backbone_stand_ins_are_state_dicts_of_the_five(tmp_path):
    files = rehearsal.write_backbone_weights(tmp_path / "torchvision")
    assert [p.rsplit("/", 1)[1] for p in files] == [f"{n}.pth" for n in rehearsal.BACKBONES]
    assert prerequisites.check_backbone_weights({"backbones": list(rehearsal.BACKBONES),
                                         "weights": dict(zip(rehearsal.BACKBONES, files))}) == []
    state = torch.load(files[0], weights_only=True)
    assert "fc.weight" in state and state["fc.weight"].shape == (1000, 512)  # ImageNet head, as IMAGENET1K_V1


def test_kohya_file_of_a_trained_adapter_imports_to_the_same_adapter(tmp_path):
    pipe = build_pipeline_from_config(TINY_CONFIG, 32, seed=0)
    attach_lora(pipe, rank=4, alpha=4.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0"), train_text_encoder=True, seed=0)
    with torch.no_grad():  # peft starts lora_B at 0; make every tensor non-trivial
        for p in list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters()):
            if p.requires_grad:
                p.normal_(0, 0.02)
    adapter = export_lora(pipe, 4, 4.0, {})
    tensors, metadata = rehearsal.kohya_state_dict(adapter)
    assert all(k.startswith(("lora_unet_", "lora_te_text_model_")) for k in tensors)
    save_file(tensors, str(tmp_path / "kohya.safetensors"), metadata=metadata)
    imported = read_adapter_file(tmp_path / "kohya.safetensors")
    assert imported.metadata["imported_format"] == "kohya"
    assert set(imported.state_dict) == set(adapter.state_dict)
    for key, tensor in adapter.state_dict.items():
        assert torch.allclose(imported.state_dict[key], tensor), key


def test_profile_hook_is_added_to_the_copy_only_and_records_nodes(tmp_path, monkeypatch):
    project = rehearsal.copy_project(tmp_path / "project")
    settings = (project / "src" / "fu_kedro" / "settings.py").read_text()
    assert "RehearsalProfile()" in settings and "RehearsalProfile" not in (rehearsal.PROJECT_ROOT / "src" / "fu_kedro" / "settings.py").read_text()
    namespace: dict = {}
    exec(compile((project / "src" / "fu_kedro" / "rehearsal_profile.py").read_text(), "rehearsal_profile", "exec"), namespace)
    profile_file = tmp_path / "p.jsonl"
    monkeypatch.setenv("FU_REHEARSAL_PROFILE", str(profile_file))
    hook = namespace["RehearsalProfile"]()

    class Node:
        name = "fit_lora_adapter_node"

    hook.before_dataset_loaded("base_model")
    sum(range(2_000_000))
    hook.after_dataset_loaded("base_model")
    hook.before_node_run(Node())
    hook.after_node_run(Node())
    hook.before_node_run(Node())
    hook.on_node_error(Node())
    items = rehearsal.read_profile(profile_file, min_cpu_seconds=0)
    assert [(i["kind"], i["name"]) for i in items] == [("load", "base_model"), ("node", Node.name), ("node_failed", Node.name)]
    assert all(i["seconds"] >= 0 and i["cpu_seconds"] >= 0 and i["peak_rss_gb_so_far"] > 0 for i in items)
    assert [i["kind"] for i in rehearsal.read_profile(profile_file)] == ["node", "node_failed"]  # short loads dropped
    assert rehearsal.read_profile(tmp_path / "absent.jsonl") == []
    # as Kedro calls them: through pluggy, by the hook specs' argument names
    from kedro.framework.hooks.manager import _create_hook_manager

    profile_file.unlink()
    manager = _create_hook_manager()
    manager.register(namespace["RehearsalProfile"]())
    manager.hook.before_node_run(node=Node(), catalog=None, inputs={}, is_async=False, run_id="r")
    manager.hook.after_node_run(node=Node(), catalog=None, inputs={}, outputs={}, is_async=False, run_id="r")
    manager.hook.before_dataset_saved(dataset_name="lora_adapter", data=None, node=Node())
    manager.hook.after_dataset_saved(dataset_name="lora_adapter", data=None, node=Node())
    manager.hook.before_dataset_loaded(dataset_name="base_model", node=Node())
    manager.hook.after_dataset_loaded(dataset_name="base_model", data=None, node=Node())
    items = rehearsal.read_profile(profile_file, min_cpu_seconds=0)
    assert [(i["kind"], i["name"]) for i in items] == [("node", Node.name), ("save", "lora_adapter"), ("load", "base_model")]


def test_report_check_wants_the_what_ran_table_and_no_fixed_gpu_sentence(tmp_path):
    folder = tmp_path / "data" / "08_reporting" / "evaluation_report.html" / "2026-11-28T00.00.00.000Z"
    folder.mkdir(parents=True)
    (folder / "evaluation_report.html").write_text("<h2>The decomposition: the arms</h2><h2>Our arms beside the "
                                                   "paper's table</h2><h2>What ran where (recorded from the runs)</h2>")
    assert rehearsal.check_report(tmp_path)["problems"] == []
    (folder / "evaluation_report.html").write_text("<p>Nothing ran on a GPU.</p>")
    assert len(rehearsal.check_report(tmp_path)["problems"]) == 3
    assert rehearsal.check_report(tmp_path / "none") == {"path": None, "problems": []}


def test_recorded_ran_on_reads_the_mlflow_tags_and_device_params(tmp_path):
    import sqlite3

    con = sqlite3.connect(tmp_path / "mlflow.db")
    con.executescript(
        "CREATE TABLE tags (key TEXT, value TEXT, run_uuid TEXT); CREATE TABLE params (key TEXT, value TEXT, run_uuid TEXT);"
        "CREATE TABLE runs (run_uuid TEXT, start_time INT);"
        "INSERT INTO runs VALUES ('aaaaaaaaaa', 1), ('bbbbbbbbbb', 2);"
        "INSERT INTO tags VALUES ('mlflow.runName', 'synthesis', 'aaaaaaaaaa'), ('synthesis.ran_on.device', 'cpu', 'aaaaaaaaaa'),"
        "('mlflow.runName', 'evaluation', 'bbbbbbbbbb'), ('evaluation.ran_on.memory_format', 'contiguous', 'bbbbbbbbbb'),"
        "('other', 'x', 'bbbbbbbbbb');"
        "INSERT INTO params VALUES ('lora_training.lora.mixed_precision', 'no', 'aaaaaaaaaa'), ('seed', '42', 'aaaaaaaaaa');")
    con.commit()
    con.close()
    assert rehearsal.recorded_ran_on(tmp_path) == {
        "synthesis aaaaaaaa": {"lora_training.lora.mixed_precision": "no", "synthesis.ran_on.device": "cpu"},
        "evaluation bbbbbbbb": {"evaluation.ran_on.memory_format": "contiguous"}}
    assert rehearsal.recorded_ran_on(tmp_path / "none") == {}


def test_counts_only_are_shrunk(tmp_path):
    """The rehearsal's overrides are counts (and batch sizes), never a resolution, rank, backbone or sampler."""
    keys = set(rehearsal.COUNT_PARAMS) | set(rehearsal.FILE_RUN_PARAMS) | {k for p in rehearsal.PIPELINE_PARAMS.values() for k in p}
    for forbidden in ("image_size", "resolution", "rank", "alpha", "backbones", "augmentation", "clip_skip",
                      "guidance_scale", "learning_rate", "weights"):
        assert not any(k.split(".")[-1] == forbidden for k in keys), forbidden
    assert set(rehearsal.CPU_PARAMS) == {"lora_training.lora.mixed_precision"}
    # no thread override (the paper env's threads); only how many single-thread classifiers train at a time
    assert rehearsal.THREAD_PARAMS == {"evaluation.workers": 2}


def test_lineage_check_wants_the_kohya_file_by_name_and_sha256(tmp_path):
    kohya = tmp_path / "models" / "fu-lora" / "k.safetensors"
    kohya.parent.mkdir(parents=True)
    kohya.write_bytes(b"kohya")
    folder = tmp_path / "data" / "08_reporting" / "lora_lineage.json" / "2026-11-28T00.00.00.000Z"
    folder.mkdir(parents=True)
    meta = {"adapter_source": "file", "imported_format": "kohya", "imported_from": "models/fu-lora/k.safetensors",
            "imported_sha256": hashlib.sha256(b"kohya").hexdigest()}
    (folder / "lora_lineage.json").write_text(json.dumps({"adapter": {"metadata": meta}}))
    assert rehearsal.lineage_names(tmp_path, kohya)
    (folder / "lora_lineage.json").write_text(json.dumps({"adapter": {"metadata": meta | {"imported_format": "diffusers"}}}))
    assert not rehearsal.lineage_names(tmp_path, kohya)
    (folder / "lora_lineage.json").write_text(json.dumps({"adapter": {"metadata": meta | {"imported_sha256": "0" * 64}}}))
    assert not rehearsal.lineage_names(tmp_path, kohya)
    assert not rehearsal.lineage_names(tmp_path / "none", kohya)


def _tiny_lora_case(project_root):
    """A random tiny base, 1 phantom image per class and conf/base's lora_training block (1 step)."""
    from conftest import base_params

    from fu_kedro.data_sources import generate_phantoms
    from fu_kedro.models.base_model import BaseModel

    params = base_params("lora_training")  # resolved through Kedro's config loader, not the raw YAML
    params["lora"].update(max_steps=1, batch_size=2, loss_check_repeats=1, rank=4, train_text_encoder=True,
                          fits=1)  # one fit (conf/base: 3), as the paper profile and an imported file have
    subset = generate_phantoms("source", 1, 64, seed=11)
    subset.meta["caption"] = [f"a photo of fetal {p}" for p in subset.meta["label"]]
    pipe = build_pipeline_from_config(TINY_CONFIG, 32, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return BaseModel(pipe, {"kind": "tiny", "name": "random tiny (test)", "resolution": 32, "content_hash": "x"}), subset, params


def test_lora_training_records_what_ran_in_mlflow_tags_and_its_summary(project_root, monkeypatch):
    """Like the evaluation's and synthesis' ``ran_on`` tags: device, precision, fused LoRA,
    memory format, optimiser, batch size, processes, threads, from what actually ran."""
    import mlflow

    from fu_kedro.pipelines.lora_training.nodes import fit_lora_adapter

    tags: dict = {}
    monkeypatch.setattr(mlflow, "active_run", lambda: object())
    monkeypatch.setattr(mlflow, "set_tags", tags.update)
    base, subset, params = _tiny_lora_case(project_root)
    _, _, summary = fit_lora_adapter(base, subset, params, seed=0)
    assert summary["ran_on"] == {"device": "cpu", "mixed_precision": "no", "lora_fused": False, "memory_format": "contiguous",
                                 "optimiser": "AdamW (fused)", "gradient_checkpointing": False, "batch_size": 2,
                                 "num_processes": 1, "torch_threads": summary["torch_threads"]}
    assert tags == {f"lora_training.ran_on.{k}": str(v) for k, v in summary["ran_on"].items()}


def test_imported_kohya_file_is_named_in_the_lineage_after_the_catalog_round_trip(project_root, tmp_path):
    """``adapter_source: file`` on a kohya-ss file: the lineage (made from the saved, diffusers-format
    catalog version) says it was imported from that kohya file, with its path and sha256."""

    from fu_kedro.datasets import LoraAdapterDataset, LoraAdapterFileDataset
    from fu_kedro.pipelines.lora_training.nodes import adapter_lineage, fit_lora_adapter

    base, subset, params = _tiny_lora_case(project_root)
    pipe = build_pipeline_from_config(TINY_CONFIG, 32, seed=0)
    attach_lora(pipe, rank=4, alpha=4.0, unet_targets=("to_q", "to_k", "to_v", "to_out.0"), train_text_encoder=True, seed=0)
    tensors, metadata = rehearsal.kohya_state_dict(export_lora(pipe, 4, 4.0, {}))
    kohya = tmp_path / "fu_lora_kohya.safetensors"
    save_file(tensors, str(kohya), metadata=metadata)
    sha256 = hashlib.sha256(kohya.read_bytes()).hexdigest()
    imported = LoraAdapterFileDataset(str(kohya)).load()  # the catalog entry imported_lora_adapter
    adapter, _, summary = fit_lora_adapter(base, subset, params | {"adapter_source": "file"}, seed=0,
                                           imported_lora_adapter=imported)
    assert {k: summary[k] for k in ("imported_from", "imported_format", "imported_sha256", "file_sha256")} == {
        "imported_from": str(kohya), "imported_format": "kohya", "imported_sha256": sha256, "file_sha256": sha256}
    dataset = LoraAdapterDataset(str(tmp_path / "lora_adapter.safetensors"))
    dataset.save(adapter)
    saved = dataset.load()  # what the lineage node gets: the diffusers-format copy
    meta = adapter_lineage(base, saved, summary)["adapter"]["metadata"]
    assert (meta["adapter_source"], meta["imported_format"], meta["imported_from"], meta["imported_sha256"]) == (
        "file", "kohya", str(kohya), sha256)
    assert meta["file"] != str(kohya)  # the copy that was read is named apart
    # a trained adapter, saved and loaded, still reads as what it is (its own file, diffusers format)
    trained, _, _ = fit_lora_adapter(base, subset, params, seed=0)
    other = LoraAdapterDataset(str(tmp_path / "trained.safetensors"))
    other.save(trained)
    again = other.load()
    assert again.metadata["adapter_source"] == "train" and again.metadata["imported_format"] == "diffusers"


@pytest.mark.slow
@pytest.mark.rehearsal  # ~38 CPU-minutes (1.5 h on 2 shared cores): not in the default run (pyproject addopts)
def test_paper_rehearsal_runs_every_pipeline_and_the_adapter_file_path(tmp_path):
    summary_file = tmp_path / "summary.json"
    code = rehearsal.main(["--workdir", str(tmp_path / "work"), "--json", str(summary_file)])
    summary = json.loads(summary_file.read_text())
    print(json.dumps({k: summary[k] for k in ("seconds_total", "peak_rss_gb", "load_start", "load_end")}))
    assert code == 0, [r for r in summary["runs"] if r["exit_code"]]
    assert [r["pipeline"] for r in summary["runs"]] == [
        "ingestion", "lora_training", "synthesis", "evaluation", "lora_training", "synthesis"]
    for name, path in summary["contract_files"].items():
        assert path != "None", name
    assert summary["kohya_file"]["imported_equals_trained"]
    assert not summary["contract_files_missing"] and summary["report_check"]["problems"] == []
    metrics = json.loads(open(summary["contract_files"]["data/08_reporting/zero_shot_metrics.json"]).read())
    backbones = {e["backbone"] for e in metrics["experiments"].values()} if all(
        "backbone" in e for e in metrics["experiments"].values()) else None
    assert backbones in (None, set(rehearsal.BACKBONES))
    # the four paper arms; HB's and BAL's real images: the stand-ins on the authors' list that are in source train
    assert {e["experiment"] for e in metrics["experiments"].values()} == {"ES", "BAL", "ES_SYN", "HB"}
    for e in metrics["experiments"].values():
        if e["experiment"] in ("BAL", "HB"):
            assert e["real_found"]["csv_in_source_train"] == e["n_real"] > 0
            assert e["real_found"]["csv_listed"] == 1150


@pytest.mark.slow
@pytest.mark.rehearsal  # tens of minutes on 2 cores: not in the default run
def test_paper_rehearsal_with_an_imported_adapter_runs_all_four_pipelines(tmp_path):
    summary_file = tmp_path / "summary.json"
    code = rehearsal.main(["--workdir", str(tmp_path / "work"), "--json", str(summary_file), "--adapter-from-file"])
    summary = json.loads(summary_file.read_text())
    assert code == 0, [r for r in summary["runs"] if r["exit_code"]]
    assert [r["pipeline"] for r in summary["runs"]] == ["ingestion", "lora_training", "synthesis", "evaluation"]
    # the script's own check of the import (read as kohya, same tensors, the lineage names the file)
    kohya = summary["kohya_file"]
    assert kohya["read_as_kohya"] and kohya["saved_equals_file"] and kohya["lineage_names_kohya_file"] and kohya["ok"]
    assert not summary["contract_files_missing"]
    assert summary["report_check"]["problems"] == []
