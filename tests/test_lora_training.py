"""lora_training: the adapter matters, bad inputs stop with clear messages, the Kedro run's outputs.

The SD v1.5-architecture checks live in test_sd15_architecture.py.
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from conftest import base_params, run_kedro_session
from diffusers import StableDiffusionPipeline

from fu_kedro.data_sources import generate_phantoms
from fu_kedro.datasets import LoraAdapterFileDataset, PretrainedBaseDataset
from fu_kedro.datasets.image_set import ImageSet
from fu_kedro.models.base_model import BaseModel
from fu_kedro.models.diffusion import TINY_CONFIG, build_pipeline_from_config, pipeline_hash
from fu_kedro.models.generation import torch_threads
from fu_kedro.models.lora import LoraAdapter, apply_lora, save_adapter_file
from fu_kedro.models.training import NonFiniteLossError, denoising_loss, encode_to_latents, tokenize
from fu_kedro.pipelines.lora_training.nodes import (
    fit_lora_adapter,
    generate,
    adapter_lineage,
    load_base_model,
    plot_loss_curves,
    render_validation_grid,
    resize_images,
    training_metrics,
)

CAPTION = "a photo of fetal {plane}"
CLASSES = ["abdomen", "brain", "femur", "thorax", "other"]


@pytest.fixture(autouse=True)
def _threads():
    with torch_threads(2):
        yield


@pytest.fixture
def params() -> dict:
    """conf/base's lora_training block with CPU-test budgets (tiny step counts)."""
    p = base_params("lora_training")
    p["lora"].update(max_steps=60, batch_size=16, caption_dropout=0.0, fits=1)  # one fit (conf/base: 3); the fits tests set theirs
    p["validation"].update(per_class=2, steps=4)
    return p


@pytest.fixture(scope="module")
def lora_subset() -> ImageSet:
    """4 captioned phantom images per class (like ingestion's LoRA subset) at 64 px."""
    src = generate_phantoms("source", 4, 64, seed=11)
    src.meta["caption"] = [CAPTION.format(plane=p) for p in src.meta["label"]]
    src.meta["split"] = "train"
    return src


def _random_base(seed: int = 0) -> BaseModel:
    pipe = build_pipeline_from_config(TINY_CONFIG, 32, seed)
    pipe.set_progress_bar_config(disable=True)
    return BaseModel(pipe, {"kind": "tiny", "name": "random tiny (test)", "resolution": 32, "content_hash": "x"})


def test_adapter_changes_pixels_and_lowers_denoising_loss_on_its_images(params, lora_subset):
    adapter, history, summary = fit_lora_adapter(_random_base(), lora_subset, params, seed=5)
    assert isinstance(adapter, LoraAdapter) and len(history) == 60
    assert all(k.startswith("unet.") and (".lora.down." in k or ".lora.up." in k) for k in adapter.state_dict)
    assert adapter.metadata["rank"] == "8" and json.loads(adapter.metadata["lora_subset_image_ids"]) == list(
        lora_subset.meta["image_id"]
    )
    # lower loss on the LoRA images with the adapter than without (fresh base, same weights)
    base = _random_base().pipe
    x = resize_images(lora_subset, 32)
    latents = encode_to_latents(base.vae, x)
    ids = tokenize(base, lora_subset.meta["caption"].tolist())
    without = denoising_loss(base, latents, ids, seed=99)
    seeds, prompts = [1, 2, 3], [CAPTION.format(plane=c) for c in ("brain", "femur", "other")]
    pixels_without = generate(base, prompts, seeds, 32, 4, 3.0)
    apply_lora(base, adapter, 1.0)
    with_adapter = denoising_loss(base, latents, ids, seed=99)
    pixels_with = generate(base, prompts, seeds, 32, 4, 3.0)
    assert with_adapter < 0.97 * without, (without, with_adapter)
    assert summary["denoising_loss_with_adapter"] < summary["denoising_loss_without_adapter"]
    assert np.abs(pixels_with.astype(int) - pixels_without).mean() > 1.0
    # same seed, same adapter -> same pixels
    assert np.array_equal(pixels_with, generate(base, prompts, seeds, 32, 4, 3.0))


def test_loss_check_repeats_changes_the_check_not_the_adapter(params, lora_subset):
    """``lora.loss_check_repeats`` only sets how many passes the before/after loss check makes
    (the paper rehearsal uses 1 at 512 px): the trained weights are the same bits."""
    params["lora"].update(max_steps=4)
    one = fit_lora_adapter(_random_base(), lora_subset, params | {"lora": params["lora"] | {"loss_check_repeats": 1}}, seed=5)
    four = fit_lora_adapter(_random_base(), lora_subset, params, seed=5)  # conf/base: 4
    assert params["lora"]["loss_check_repeats"] == 4
    assert one[0].state_dict.keys() == four[0].state_dict.keys()
    assert all(torch.equal(one[0].state_dict[k], four[0].state_dict[k]) for k in four[0].state_dict)
    assert one[2]["denoising_loss_without_adapter"] != four[2]["denoising_loss_without_adapter"]


def test_a_saved_base_loads_its_weights_only_when_pipe_is_used(tmp_path, params, lora_subset, monkeypatch):
    """``adapter_lineage_node`` needs only ``BaseModel.info``: loading ``base_model`` reads
    ``reference.json``, the weights wait for the first use of ``pipe``."""
    from kedro.io.core import Version

    import fu_kedro.datasets.diffusion as D

    base = _random_base()
    ds = D.DiffusionModelDataset(str(tmp_path / "base_model"), version=Version(None, "2026-01-01T00.00.00.000Z"))
    ds.save(base)
    reads = []
    real = D._load_pipe
    monkeypatch.setattr(D, "_load_pipe", lambda *a: reads.append(a) or real(*a))
    loaded = D.DiffusionModelDataset(str(tmp_path / "base_model"), version=Version(None, None)).load()
    assert loaded.info["catalog_version"] == "2026-01-01T00.00.00.000Z" and loaded.info["content_hash"] == "x"
    adapter = LoraAdapter({}, {"rank": "8"})
    record = adapter_lineage(loaded, adapter, {"steps": 0})
    assert record["base_model"]["content_hash"] == "x" and reads == []  # info only: no weights read
    assert pipeline_hash(loaded.pipe) == pipeline_hash(base.pipe) and len(reads) == 1
    assert loaded.pipe is loaded.pipe and len(reads) == 1  # read once


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda p: p["lora"].update(rank=0), r"lora_training\.lora\.rank: 0 in lora_training\.lora: Input should be "
                                              "greater than or equal to 1"),
        (lambda p: p.update(resolution=30), "the VAE cannot take it"),
        (lambda p: p.update(adapter_source="download"), r"lora_training\.adapter_source: 'download' in lora_training; "
                                                        "allowed values: 'train' or 'file'"),
    ],
)
def test_bad_lora_parameters_stop_with_a_clear_message(params, lora_subset, change, message):
    change(params)
    with pytest.raises(ValueError, match=message):
        fit_lora_adapter(_random_base(), lora_subset, params, seed=0)


def test_empty_lora_subset_is_an_error(params, lora_subset):
    with pytest.raises(ValueError, match="LoRA subset is empty"):
        fit_lora_adapter(_random_base(), lora_subset.select(np.zeros(len(lora_subset), bool)), params, seed=0)


def test_missing_pretrained_base_names_what_to_download(params, tmp_path):
    path = str(tmp_path / "stable-diffusion-v1-5")
    params["base_model"].update(pretrained_path=path)
    pretrained = PretrainedBaseDataset(path).load()  # the catalog entry pretrained_base: nothing read yet
    # the same words as the pre-run check (fu_kedro.models.pretrained): what is missing, the download command
    with pytest.raises(FileNotFoundError, match="no model_index.json.*hf download stable-diffusion-v1-5/stable-diffusion-v1-5"):
        load_base_model(pretrained, params)
    # no path: the entry loads None, the node says which parameter is not set
    with pytest.raises(ValueError, match="base_model.pretrained_path is not set"):
        load_base_model(PretrainedBaseDataset(None).load(), params)


def test_the_old_tiny_base_keys_are_unknown_keys(params):
    """``base_model.kind`` / ``base_model.tiny`` (the base once trained inside lora_training; CHANGELOG.md)
    stop the run naming the one key the block has, before any weights are read."""
    from fu_kedro.schema import ParameterError

    never = BaseModel(info={"kind": "pretrained"}, load=lambda: pytest.fail("the base's weights were read"))
    for old in ({"kind": "tiny"}, {"tiny": {"denoiser": {"max_steps": 3}}}):
        block = params | {"base_model": params["base_model"] | old}
        with pytest.raises(ParameterError, match=r"lora_training\.base_model\.(kind|tiny): unknown key in "
                                                 r"lora_training\.base_model; allowed keys: pretrained_path"):
            load_base_model(never, block)


def test_corrupt_and_mismatched_adapter_files_are_named(params, lora_subset, tmp_path):
    bad = tmp_path / "broken.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    params.update(adapter_source="file")
    with pytest.raises(ValueError, match="broken.safetensors.*not a readable safetensors"):
        fit_lora_adapter(_random_base(), lora_subset, params, seed=0,
                         imported_lora_adapter=LoraAdapterFileDataset(str(bad)).load())
    with pytest.raises(ValueError, match="adapter_source is 'file' but lora_training.adapter_file is not set"):
        fit_lora_adapter(_random_base(), lora_subset, params, seed=0, imported_lora_adapter=None)
    # a LoRA made for another architecture (wider UNet) does not fit the tiny base
    other = copy.deepcopy(TINY_CONFIG)
    other["unet"]["block_out_channels"] = [64, 128, 256]
    wide = build_pipeline_from_config(other, 32, 0)
    from fu_kedro.models.lora import attach_lora, export_lora

    attach_lora(wide, rank=4, alpha=4)
    path = tmp_path / "wide.safetensors"
    save_adapter_file(export_lora(wide, 4, 4, {}), path)
    with pytest.raises(ValueError, match="wide.safetensors.*does not fit the base model"):
        fit_lora_adapter(_random_base(), lora_subset, params, seed=0,
                         imported_lora_adapter=LoraAdapterFileDataset(str(path)).load())


def test_nan_loss_names_the_step_and_last_finite_loss(params, lora_subset):
    params["lora"].update(learning_rate=1.0e12, max_steps=40)
    with pytest.raises(NonFiniteLossError, match=r"at step \d+; last finite loss was [0-9.]+"):
        fit_lora_adapter(_random_base(), lora_subset, params, seed=0)


def _kedro_run(project, pipeline, params, **kwargs):
    from omegaconf import OmegaConf

    # dotted keys as on the command line (``--params a.b=1``) -> nested dict, as Kedro's CLI does
    nested = OmegaConf.to_container(OmegaConf.from_dotlist([f"{k}={v}" for k, v in params.items()]))
    return run_kedro_session(project, pipeline, nested, **kwargs)


TEST_RUN_PARAMS = {
    "ingestion.phantom.source.n_per_class": 12,
    "ingestion.phantom.target.n_per_class": 4,
    "ingestion.lora_per_class": 4,
    "ingestion.image_size": 64,
    "lora_training.lora.max_steps": 10,
    "lora_training.validation.per_class": 1,
    "lora_training.validation.steps": 2,
}


@pytest.mark.slow
def test_kedro_run_writes_loadable_versioned_outputs_and_reuses_the_base(project_copy):
    import mlflow

    project = project_copy
    _kedro_run(project, "ingestion", TEST_RUN_PARAMS)
    _kedro_run(project, "lora_training", TEST_RUN_PARAMS)
    adapters = sorted((project / "data/06_models/lora_adapter.safetensors").iterdir())
    bases = sorted((project / "data/06_models/base_model").iterdir())
    assert len(adapters) == 1 and len(bases) == 1
    adapter_file = adapters[0] / "lora_adapter.safetensors"
    # the file is diffusers' LoRA format: StableDiffusionPipeline.load_lora_weights(<file>) takes it
    # the base is the shipped folder: the version holds its reference (path + hash), not a copy of the weights
    reference = json.loads((bases[0] / "base_model" / "reference.json").read_text())
    assert reference["kind"] == "pretrained" and reference["model"] == "models/tiny-phantom-sd"
    assert reference["resolution"] == 32 and not (bases[0] / "base_model" / "model").exists()
    shipped = json.loads((project / "models/tiny-phantom-sd/base_lineage.json").read_text())
    assert reference["content_hash"] == shipped["content_hash"] and reference["trained_by"]["cpu_capability"]
    base = StableDiffusionPipeline.from_pretrained(project / reference["model"], local_files_only=True)
    base.load_lora_weights(str(adapter_file), adapter_name="check")
    assert "check" in base.get_list_adapters()["unet"]
    for name in ("lora_validation_grid.png", "lora_loss_curves.png", "lora_lineage.json"):
        assert len(list((project / "data/08_reporting" / name).glob(f"*/{name}"))) == 1
    lineage = json.loads(next((project / "data/08_reporting/lora_lineage.json").glob("*/lora_lineage.json")).read_text())
    assert lineage["adapter"]["catalog_version"] == adapters[0].name
    assert lineage["base_model"]["catalog_version"] == bases[0].name
    # MLflow: parameters, loss history, curve and grid artifacts
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    client = mlflow.MlflowClient()
    run = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"])[0]
    assert "lora_training.lora.rank" in run.data.params
    assert len(client.get_metric_history(run.info.run_id, "lora_training.lora_loss")) == 10
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "lora_training")}
    assert {"lora_training/lora_loss_curves.png", "lora_training/lora_validation_grid.png"} <= artifacts
    # reuse the trained base: skip its node, the catalog's latest base is loaded, a new adapter written
    _kedro_run(project, "lora_training", TEST_RUN_PARAMS, from_nodes=["fit_lora_adapter_node"])
    assert len(list((project / "data/06_models/base_model").iterdir())) == 1
    assert len(list((project / "data/06_models/lora_adapter.safetensors").iterdir())) == 2


def test_denoiser_lr_schedule_is_diffusers_constant_with_warmup():
    """``get_scheduler("constant_with_warmup")``: the learning rate itself at every step without
    warm-up (every shipped config), 0 -> lr linearly over ``warmup_steps`` with it."""
    from accelerate import Accelerator

    from fu_kedro.models.training import LoopConfig, _optimisation

    def lrs(warmup: int) -> list[float]:
        p = torch.nn.Parameter(torch.zeros(2))
        cfg = LoopConfig(max_steps=6, batch_size=1, learning_rate=1e-3, seed=0, warmup_steps=warmup)
        opt, sched, _ = _optimisation([p], [], cfg, Accelerator(cpu=True))
        out = []
        for _ in range(6):
            out.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        return out

    assert lrs(0) == [1e-3] * 6
    assert lrs(4) == pytest.approx([0.0, 2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])


def test_one_lora_fit_trains_nothing_and_bad_fits_stop(params, lora_subset, tmp_path):
    from kedro.io.core import Version

    from fu_kedro.datasets import LoraAdapterFitsDataset
    from fu_kedro.pipelines.lora_training.nodes import fit_lora_adapter_refits

    fit0 = LoraAdapter({"unet.a.to_q.lora.down.weight": torch.ones(1, 2)}, {"catalog_version": "v0"})
    never = BaseModel(info={"kind": "tiny", "content_hash": "x"}, load=lambda: pytest.fail("the base's weights were read"))
    fits = fit_lora_adapter_refits(never, lora_subset, fit0, params, 42)  # lora_training.lora.fits: 1 (the fixture's)
    assert len(fits) == 0 and fits.fits == 1
    assert fits.info["fit_of"] == {"content_hash": fit0.content_hash, "catalog_version": "v0"}
    # the catalog entry: nothing saved yet loads as an empty set that says so; an empty set round-trips
    root = str(tmp_path / "lora_adapter_fits")
    assert LoraAdapterFitsDataset(root, version=Version(None, None)).load().missing
    LoraAdapterFitsDataset(root, version=Version(None, "2026-01-01T00.00.00.000Z")).save(fits)
    loaded = LoraAdapterFitsDataset(root, version=Version(None, None)).load()
    assert loaded.missing is None and loaded.fits == 1 and loaded.info["catalog_version"] == "2026-01-01T00.00.00.000Z"
    for lora, extra, message in (
        ({"fits": 0}, {}, r"lora_training\.lora\.fits: 0 in lora_training\.lora: Input should be greater than or equal to 1"),
        ({"fits": 2}, {"adapter_source": "file"}, "lora_training: lora.fits=2 needs adapter_source: train"),
    ):
        with pytest.raises(ValueError, match=message):
            fit_lora_adapter_refits(never, lora_subset, fit0, dict(params, lora=dict(params["lora"], **lora), **extra), 42)


@pytest.mark.slow
def test_lora_fits_in_two_worker_processes_have_the_weights_of_one_process(params, lora_subset):
    # lora_training.workers: 2 (the CPU default) trains fits 2 and 3 side by side in loky workers
    from fu_kedro.pipelines.lora_training.nodes import fit_lora_adapter_refits

    params["lora"].update(max_steps=6, fits=3, loss_check_repeats=1)
    fit0 = LoraAdapter({"unet.a.to_q.lora.down.weight": torch.ones(1, 2)}, {"catalog_version": "v0"})
    one = fit_lora_adapter_refits(_random_base(), lora_subset, fit0, dict(params, workers=1), 42)
    two = fit_lora_adapter_refits(_random_base(), lora_subset, fit0, dict(params, workers=2), 42)
    assert len(one) == len(two) == 2
    fits_one, fits_two = [one.adapter(r) for r in (1, 2)], [two.adapter(r) for r in (1, 2)]
    assert len({a.content_hash for a in fits_one}) == 2  # two different fits ...
    for a, b in zip(fits_one, fits_two):  # ... each the same, tensor for tensor
        assert a.state_dict.keys() == b.state_dict.keys()
        assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)
        assert a.metadata == b.metadata
    assert one.info == two.info


def test_kedro_run_with_two_lora_fits_makes_each_replicate_with_its_fit(project_copy):
    import pandas as pd

    project = project_copy
    tiny = dict(TEST_RUN_PARAMS, **{"lora_training.lora.max_steps": 3, "lora_training.lora.fits": 2})
    _kedro_run(project, "ingestion", tiny)
    _kedro_run(project, "lora_training", tiny)
    (fits_version,) = (project / "data/06_models/lora_adapter_fits").iterdir()
    folder = fits_version / "lora_adapter_fits"
    index = json.loads((folder / "fits.json").read_text())
    assert index["fits"] == 2 and (folder / "fit-01.safetensors").is_file()
    assert {i["dataset"] for i in json.loads((fits_version / "lineage.json").read_text())["inputs"]} >= {
        "base_model", "lora_subset", "lora_adapter"}
    synthesis = {"synthesis.images_per_class": 1, "synthesis.steps": 2, "synthesis.batch_size": 2,
                 "synthesis.replicates": 2, "synthesis.adapter_per_replicate": True}
    _kedro_run(project, "synthesis", dict(tiny, **synthesis))
    batch = next((project / "data/07_model_output/synthetic_batch").glob("*/synthetic_batch"))
    manifest = pd.read_csv(batch / "metadata.csv")
    by_replicate = manifest.groupby("replicate").first()
    assert by_replicate["adapter_fit"].tolist() == [0, 1]
    assert by_replicate["adapter_dataset"].tolist() == ["lora_adapter", "lora_adapter_fits"]
    assert by_replicate["adapter_content_hash"].iloc[1] == index["fits_summary"][0]["content_hash"]
    assert by_replicate["adapter_catalog_version"].iloc[1] == fits_version.name
    assert by_replicate["adapter_seed"].tolist() == [42, index["fits_summary"][0]["seed"]]
    upstream = json.loads((batch / "info.json").read_text())["made_from"]["upstream"]
    assert {(u.get("dataset"), u.get("version")) for u in upstream} >= {("lora_adapter_fits", fits_version.name)}
