"""``scripts/paper_rehearsal.py``: the paper env end to end on CPU with stand-ins for the downloads.

The slow test runs the whole rehearsal (about 20 minutes on 2 idle cores, more under load);
the others check its stand-ins quickly: the data folders pass the paper env's prerequisite
checks and read as real data, and the kohya-ss file it writes imports to the same adapter.
"""
from __future__ import annotations

import json

import pytest
import torch
from conftest import load_script
from safetensors.torch import save_file

from fu_kedro import prerequisites
from fu_kedro.data_sources import read_domain
from fu_kedro.models.diffusion import TINY_CONFIG, build_pipeline_from_config
from fu_kedro.models.lora import attach_lora, export_lora, read_adapter_file


rehearsal = load_script("paper_rehearsal")


def test_stand_in_datasets_pass_the_paper_checks_and_read_as_real_data(tmp_path, fetal_planes_db_sample,
                                                                       african_planes_dev, ingestion_params):
    fpdb, african = tmp_path / "FETAL_PLANES_DB", tmp_path / "african_planes"
    assert rehearsal.write_fetal_planes_db(fetal_planes_db_sample, fpdb, per_class=2) == 10
    assert rehearsal.write_african(african_planes_dev, african, per_center_class=1) == 18  # Ghana, Uganda: no thorax
    assert prerequisites.check_data_source("source", "fetal_planes_db", str(fpdb)) == []
    assert prerequisites.check_data_source("target", "african", str(african)) == []
    cfg = dict(ingestion_params, image_size=64)
    source, _ = read_domain("fetal_planes_db", str(fpdb), "source", 0, cfg)
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


@pytest.mark.slow
@pytest.mark.rehearsal  # 25-60 min on 2 cores: not in the default run (pyproject addopts)
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
    metrics = json.loads(open(summary["contract_files"]["data/08_reporting/zero_shot_metrics.json"]).read())
    backbones = {e["backbone"] for e in metrics["experiments"].values()} if all(
        "backbone" in e for e in metrics["experiments"].values()) else None
    assert backbones in (None, set(rehearsal.BACKBONES))
