"""kedro-viz: layers in data-flow order in every pipeline's view, and typed previews.

kedro-viz orders a pipeline's layer bands by its edges and, where no edge decides, by name
(``kedro_viz.services.layers.sort_layers``). The catalog names layers after the ``data/``
folders (``01_raw`` ... ``08_reporting``), so both orders are the data flow.
"""
from __future__ import annotations

import inspect
import re
from types import SimpleNamespace

import pytest
from kedro.framework.project import pipelines, settings
from kedro.framework.startup import bootstrap_project

from conftest import PROJECT_ROOT

LAYERS = ["01_raw", "02_intermediate", "03_primary", "05_model_input", "06_models", "07_model_output",
          "08_reporting"]


@pytest.fixture(scope="module")
def catalog_conf() -> dict:
    bootstrap_project(PROJECT_ROOT)
    loader = settings.CONFIG_LOADER_CLASS(conf_source=str(PROJECT_ROOT / "conf"), env="base",
                                          **settings.CONFIG_LOADER_ARGS)
    return loader["catalog"]


def _layer(conf: dict, name: str) -> str | None:
    return ((conf.get(name) or {}).get("metadata") or {}).get("kedro-viz", {}).get("layer")


def test_layer_names_sort_in_data_flow_order():
    assert sorted(LAYERS) == LAYERS


def test_every_dataset_has_a_layer_and_a_saved_one_the_layer_of_its_folder(catalog_conf):
    used = {d for p in pipelines.values() for d in p.datasets() if d != "parameters" and not d.startswith("params:")}
    missing = sorted(d for d in used if _layer(catalog_conf, d) not in LAYERS)
    assert not missing, f"datasets without a known layer: {missing}"
    wrong = []
    for name, entry in catalog_conf.items():
        folder = re.match(r"data/(\d\d_[a-z_]+)/", str(entry.get("filepath", "")))
        if folder and _layer(catalog_conf, name) != folder.group(1):
            wrong.append(f"{name}: layer {_layer(catalog_conf, name)}, saved in {folder.group(1)}")
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("pipeline", ["__default__", "ingestion", "lora_training", "synthesis", "evaluation"])
def test_kedro_viz_orders_each_pipelines_layers_by_the_data_flow(catalog_conf, pipeline):
    from kedro_viz.services.layers import sort_layers

    pipe = pipelines[pipeline]
    nodes, deps = {}, {}
    for n in pipe.nodes:
        nodes[n.name], deps[n.name] = SimpleNamespace(layer=None), set(n.outputs)
        for d in n.inputs + n.outputs:
            if not d.startswith("params:") and d != "parameters":
                nodes[d] = SimpleNamespace(layer=_layer(catalog_conf, d))
                deps.setdefault(d, set())
        for d in n.inputs:
            if d in deps:
                deps[d].add(n.name)
    for n in pipe.nodes:  # every edge goes down (or stays in its band)
        ins = [LAYERS.index(_layer(catalog_conf, d)) for d in n.inputs if d in nodes]
        outs = [LAYERS.index(_layer(catalog_conf, d)) for d in n.outputs]
        assert not ins or not outs or max(ins) <= min(outs), f"{n.name}: an edge goes up a layer"
    shown = sort_layers(nodes, deps)
    assert shown == sorted(shown) and shown, f"{pipeline}: kedro-viz draws {shown}"


def test_every_image_set_and_model_preview_is_typed():
    """kedro-viz reads ``preview``'s return annotation as the preview type ("_empty" without one)."""
    from fu_kedro import datasets as D

    expected = {D.ImageSetDataset: "ImagePreview", D.DiffusionModelDataset: "ImagePreview",
                D.LoraAdapterDataset: "ImagePreview", D.LoraAdapterFitsDataset: "JSONPreview",
                D.PretrainedBaseDataset: "JSONPreview", D.LoraAdapterFileDataset: "JSONPreview"}
    for cls, kind in expected.items():
        annotation = inspect.signature(cls.preview).return_annotation
        assert getattr(annotation, "__name__", str(annotation)) == kind, cls.__name__


def test_a_pretrained_base_card_reads_its_architecture_from_the_folder(tmp_path):
    """The card of a loaded pretrained base (no ``architecture`` in its reference) shows the
    UNet's channels and the text encoder's size from the diffusers folder it names."""
    import json

    from conftest import PROJECT_ROOT

    from fu_kedro.datasets.previews import _folder_architecture

    folder = PROJECT_ROOT / "models" / "tiny-phantom-sd"
    arch = _folder_architecture(str(folder))
    assert arch["unet"]["block_out_channels"] == json.loads((folder / "unet/config.json").read_text())["block_out_channels"]
    assert arch["text_encoder"]["num_hidden_layers"] >= 1
    assert _folder_architecture(str(tmp_path / "nowhere")) == {} and _folder_architecture(None) == {}
