"""SD v1.5's exact architecture (published config values, random weights, no download) on CPU.

The paper profile's LoRA step (rank 128, text-encoder LoRA, clip skip 2) runs one
optimiser step at a tiny resolution; the adapter is saved, reloaded with diffusers'
``load_lora_weights`` and used for a 1-step generation; a kohya-ss file for the same
architecture goes through ``adapter_source: file``.
"""
from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from conftest import project_parameters
from safetensors.torch import save_file

from fu_kedro.data_sources import generate_phantoms
from fu_kedro.datasets import LoraAdapterFileDataset
from fu_kedro.models.base_model import BaseModel
from fu_kedro.models.diffusion import SD15_CONFIG, build_pipeline_from_config, pipeline_hash
from fu_kedro.models.lora import read_adapter_file, save_adapter_file
from fu_kedro.pipelines.lora_training.nodes import fit_lora_adapter, generate

RES = 64  # latents 8x8: the full-size UNet at a resolution a CPU test can afford
# every test builds the full-size SD v1.5 architecture (about 1.07 G parameters) on the CPU
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def paper_lora() -> dict:
    """The paper environment's LoRA knobs (conf/paper over conf/base), with a one-step budget at a tiny size."""
    params = project_parameters("paper")["lora_training"]
    params["lora"].update(max_steps=1, batch_size=2, mixed_precision="no")
    params.update(resolution=RES, torch_threads=1)
    return params


@pytest.fixture(scope="module")
def sd15():
    torch.set_num_threads(2)
    pipe = build_pipeline_from_config(SD15_CONFIG, RES, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return BaseModel(pipe, {"kind": "pretrained", "name": "SD v1.5 architecture, random weights (test)", "resolution": RES})


def test_sd15_shapes_match_the_published_architecture(sd15):
    n_unet = sum(p.numel() for p in sd15.pipe.unet.parameters())
    n_te = sum(p.numel() for p in sd15.pipe.text_encoder.parameters())
    n_vae = sum(p.numel() for p in sd15.pipe.vae.parameters())
    # SD v1.5: UNet 859.52 M, CLIP ViT-L/14 text encoder 123.06 M, VAE 83.65 M parameters
    assert round(n_unet / 1e6, 1) == 859.5 and round(n_te / 1e6, 1) == 123.1 and round(n_vae / 1e6, 1) == 83.7


def test_paper_lora_step_save_reload_and_one_step_generation(sd15, paper_lora, tmp_path):
    subset = generate_phantoms("source", 1, 64, seed=3).select([0, 1])
    subset.meta["caption"] = "a photo of fetal " + subset.meta["label"]
    base_hash = pipeline_hash(sd15.pipe)
    adapter, history, _ = fit_lora_adapter(sd15, subset, paper_lora, seed=0)
    assert len(history) == 1 and np.isfinite(history["loss"]).all()
    rank = paper_lora["lora"]["rank"]
    unet_keys = [k for k in adapter.state_dict if k.startswith("unet.")]
    te_keys = [k for k in adapter.state_dict if k.startswith("text_encoder.")]
    # SD v1.5: 16 transformer blocks x 2 attentions x 4 projections x (down, up)
    assert len(unet_keys) == 16 * 2 * 4 * 2
    assert len(te_keys) == (12 * 4 * 2 if paper_lora["lora"]["train_text_encoder"] else 0)
    down = adapter.state_dict["unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight"]
    up = adapter.state_dict["unet.up_blocks.3.attentions.2.transformer_blocks.0.attn2.to_k.lora.up.weight"]
    assert down.shape == (rank, 320) and up.shape == (320, rank)
    path = tmp_path / "paper_lora.safetensors"
    save_adapter_file(adapter, path)

    fresh = build_pipeline_from_config(SD15_CONFIG, RES, seed=0)
    assert pipeline_hash(fresh) == base_hash  # same seed -> same random base
    fresh.set_progress_bar_config(disable=True)
    fresh.load_lora_weights(str(path), adapter_name="paper")  # diffusers' own loader, from the file
    assert fresh.get_list_adapters()["unet"] == ["paper"]
    if te_keys:
        assert fresh.get_list_adapters()["text_encoder"] == ["paper"]
    image = generate(fresh, ["a photo of fetal brain"], [0], RES, 1, 1.0)
    assert image.shape == (1, RES, RES) and image.dtype == np.uint8


def _kohya_name(key: str) -> str:
    """diffusers adapter key -> kohya-ss key (``lora_unet_…`` / ``lora_te_text_model_…``)."""
    module, part = re.split(r"\.(?:lora|lora_linear_layer)\.", key)
    kind = "lora_down" if part.startswith("down") else "lora_up"
    if module.startswith("unet."):
        return "lora_unet_" + module[len("unet.") :].replace(".", "_") + f".{kind}.weight"
    return "lora_te_text_model_" + module[len("text_encoder.") :].replace(".", "_") + f".{kind}.weight"


def test_kohya_file_for_sd15_loads_through_adapter_source_file(sd15, paper_lora, tmp_path):
    gen = torch.Generator().manual_seed(0)
    kohya, expected = {}, {}
    rank, alpha = 8, 4.0
    targets = [
        ("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_v", 768, 640),
        ("unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_out.0", 1280, 1280),
        ("text_encoder.encoder.layers.3.self_attn.q_proj", 768, 768),
    ]
    for module, fan_in, fan_out in targets:
        down = torch.randn(rank, fan_in, generator=gen) * 0.01
        up = torch.randn(fan_out, rank, generator=gen) * 0.01
        sep = ".lora_linear_layer." if module.startswith("text_encoder.") else ".lora."
        kohya[_kohya_name(module + sep + "down.weight")] = down
        kohya[_kohya_name(module + sep + "up.weight")] = up
        kohya[_kohya_name(module + sep + "down.weight").split(".")[0] + ".alpha"] = torch.tensor(alpha)
        expected[module] = (down, up * alpha / rank)
    path = tmp_path / "fu_lora_kohya.safetensors"
    save_file(kohya, str(path), metadata={"ss_network_dim": str(rank), "ss_network_alpha": str(alpha)})

    params = dict(paper_lora) | {"adapter_source": "file", "adapter_file": str(path)}
    adapter, history, summary = fit_lora_adapter(sd15, generate_phantoms("source", 1, 64, seed=1), params, seed=0,
                                                 imported_lora_adapter=LoraAdapterFileDataset(str(path)).load())
    assert history.empty and summary["adapter_source"] == "file"
    assert adapter.metadata["imported_format"] == "kohya" and adapter.metadata["ss_network_dim"] == "8"
    for module, (down, up) in expected.items():
        sep = ".lora_linear_layer." if module.startswith("text_encoder.") else ".lora."
        assert torch.equal(adapter.state_dict[module + sep + "down.weight"], down)
        assert torch.allclose(adapter.state_dict[module + sep + "up.weight"], up)  # alpha/rank folded in
    # and read back from our own file format unchanged
    save_adapter_file(adapter, tmp_path / "converted.safetensors")
    again = read_adapter_file(tmp_path / "converted.safetensors")
    assert again.content_hash == adapter.content_hash
