"""The pretrained base and an imported LoRA file are catalog entries whose path is a parameter.

``pretrained_base`` (``lora_training.base_model.pretrained_path``) and ``imported_lora_adapter``
(``lora_training.adapter_file``) read their path through ``${params:...}``
(``fu_kedro.config.ProjectConfigLoader``): the parameter — in an env's parameter file or on the
command line — is the one place it is set. The datasets read nothing to load or describe
themselves; the weights / the file are read on first use, and a missing one is named.
"""
from __future__ import annotations

import hashlib

import pytest
import torch
from conftest import base_params, load_script, project_config
from kedro.io import DatasetError
from safetensors.torch import save_file

from fu_kedro.datasets import LoraAdapterFileDataset, PretrainedBaseDataset
from fu_kedro.models.diffusion import TINY_CONFIG, build_pipeline_from_config, pipeline_hash
from fu_kedro.models.lora import attach_lora, export_lora, save_adapter_file
from fu_kedro.pipelines.lora_training.nodes import load_base_model


def _paths(env=None, runtime_params=None) -> tuple:
    catalog = project_config("catalog", env, runtime_params)
    return catalog["pretrained_base"]["model"], catalog["imported_lora_adapter"]["file"]


def test_the_parameter_is_the_one_place_the_catalog_entries_read_their_path():
    assert _paths() == ("models/tiny-phantom-sd", None)  # conf/base: the shipped tiny base, adapter trained here
    assert _paths("paper") == ("models/stable-diffusion-v1-5", None)  # conf/paper's parameter file
    cli = {"lora_training": {"adapter_file": "models/fu-lora/v1.safetensors",
                             "base_model": {"pretrained_path": "/elsewhere/sd15"}}}
    assert _paths("paper", cli) == ("/elsewhere/sd15", "models/fu-lora/v1.safetensors")  # --params wins, as for the nodes
    params = project_config("parameters", "paper", cli)["lora_training"]
    assert (params["base_model"]["pretrained_path"], params["adapter_file"]) == _paths("paper", cli)


def test_a_catalog_reference_to_an_unknown_parameter_is_an_error():
    from fu_kedro.config import _dig

    assert _dig({"a": {"b": None}}, "a.b") is None and _dig({"a": {}}, "a.c", "x") == "x"
    with pytest.raises(KeyError, match="no parameter 'a.c'"):
        _dig({"a": {"b": 1}}, "a.c")


def _tiny_pipe():
    pipe = build_pipeline_from_config(TINY_CONFIG, 32, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_pretrained_base_loads_a_local_sd_folder_on_first_use_only(tmp_path):
    pipe = _tiny_pipe()
    folder = tmp_path / "tiny-sd"
    pipe.save_pretrained(folder, safe_serialization=True)
    dataset = PretrainedBaseDataset(str(folder))
    assert dataset._describe() == {"model": str(folder)} and dataset.exists()
    base = dataset.load()
    assert base.info == {"kind": "pretrained", "name": str(folder), "model": str(folder)}
    assert "not loaded" in repr(base)  # loading (and describing) read no weights
    made = load_base_model(base, base_params("lora_training") | {"base_model": {"pretrained_path": str(folder)}, "resolution": 32})
    assert made.info["content_hash"] == pipeline_hash(pipe) and made.info["resolution"] == 32
    assert PretrainedBaseDataset(None).load() is None and not PretrainedBaseDataset(None).exists()
    with pytest.raises(DatasetError, match="read-only"):
        dataset.save(made)


def test_a_missing_pretrained_base_is_named_on_first_use(tmp_path):
    missing = tmp_path / "stable-diffusion-v1-5"
    base = PretrainedBaseDataset(str(missing)).load()  # nothing read yet: a run that does not use it never fails
    assert not PretrainedBaseDataset(str(missing)).exists()
    with pytest.raises(FileNotFoundError, match=f"{missing}.*no model_index.json"):
        base.pipe


def _adapter():
    pipe = _tiny_pipe()
    attach_lora(pipe, rank=4, alpha=4.0, seed=0)
    with torch.no_grad():  # peft starts lora_B at 0: make every tensor non-trivial
        for p in pipe.unet.parameters():
            if p.requires_grad:
                p.normal_(0, 0.02)
    return export_lora(pipe, 4, 4.0, {"note": "test"})


def test_imported_adapter_reads_a_diffusers_file_on_first_use_with_its_sha256(tmp_path):
    adapter = _adapter()
    path = tmp_path / "adapter.safetensors"
    save_adapter_file(adapter, path)
    dataset = LoraAdapterFileDataset(str(path))
    assert dataset._describe() == {"file": str(path)} and dataset.exists()
    imported = dataset.load()
    assert imported.path == str(path) and "not read" in repr(imported)
    assert imported.adapter.content_hash == adapter.content_hash
    assert imported.adapter.metadata["imported_format"] == "diffusers" and imported.adapter.metadata["note"] == "test"
    assert imported.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert LoraAdapterFileDataset(None).load() is None
    with pytest.raises(DatasetError, match="read-only"):
        dataset.save(imported)


def test_imported_adapter_reads_a_kohya_file(tmp_path):
    adapter = _adapter()
    tensors, metadata = load_script("paper_rehearsal").kohya_state_dict(adapter)
    path = tmp_path / "fu_lora_kohya.safetensors"
    save_file(tensors, str(path), metadata=metadata)
    imported = LoraAdapterFileDataset(str(path)).load()
    assert imported.adapter.metadata["imported_format"] == "kohya"
    assert imported.adapter.metadata["imported_from"] == str(path)
    assert set(imported.adapter.state_dict) == set(adapter.state_dict)
    for key, tensor in adapter.state_dict.items():
        assert torch.allclose(imported.adapter.state_dict[key], tensor), key
    assert imported.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_missing_adapter_file_is_named_on_first_use(tmp_path):
    missing = tmp_path / "models" / "fu-lora" / "absent.safetensors"
    dataset = LoraAdapterFileDataset(str(missing))
    imported = dataset.load()  # nothing read yet (adapter_source: train never reads it)
    assert not dataset.exists()
    with pytest.raises(FileNotFoundError, match=f"LoRA adapter file '{missing}' does not exist"):
        imported.adapter


def test_the_pre_run_check_names_the_files_and_not_the_entries_as_missing_outputs(tmp_path):
    """Before any node runs: a missing file is named by its parameter; the two entries are not
    reported as outputs of another pipeline (no pipeline makes them)."""
    from kedro.io import DataCatalog

    from fu_kedro.pipelines.lora_training.pipeline import create_pipeline
    from fu_kedro.prerequisites import find_missing_prerequisites

    absent = str(tmp_path / "absent.safetensors")
    cli = {"lora_training": {"adapter_source": "file", "adapter_file": absent,
                             "base_model": {"pretrained_path": str(tmp_path / "sd15")}}}
    catalog = DataCatalog.from_config(project_config("catalog", None, cli))
    assert catalog.get("imported_lora_adapter").load().path == absent  # --params reached the entry
    problems, _ = find_missing_prerequisites(create_pipeline(), catalog, project_config("parameters", None, cli))
    text = "\n".join(f"{p.what}: {p.detail}" for p in problems)
    assert f"LoRA adapter file (lora_training.adapter_file={absent!r})" in text
    assert "Stable Diffusion v1.5 weights (lora_training.base_model.pretrained_path=" in text
    assert "`imported_lora_adapter`" not in text and "`pretrained_base`" not in text


def test_a_run_keeps_the_path_as_the_parameter_gives_it(project_copy):
    """Through a real Kedro context (which makes ``filepath``/``path`` keys absolute): a relative
    folder and a hub id reach the datasets unchanged, as the pre-run check and the lineage read them."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project_copy)
    for given in ("models/stable-diffusion-v1-5", "stable-diffusion-v1-5/stable-diffusion-v1-5"):
        cli = {"lora_training": {"base_model": {"pretrained_path": given}, "adapter_file": "models/fu-lora/v1.safetensors"}}
        with KedroSession.create(project_path=project_copy, env="paper", runtime_params=cli) as session:
            catalog = session.load_context().catalog
            assert catalog.get("pretrained_base").load().info["model"] == given
            assert catalog.get("imported_lora_adapter").load().path == "models/fu-lora/v1.safetensors"
