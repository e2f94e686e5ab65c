"""synthesis: per-image reproducibility, shards, several processes, bad input, the Kedro run.

A small random-weight tiny pipeline (32 px, few sampler steps) with a random LoRA adapter
stands in for the trained models: these tests are about bookkeeping and determinism, not
image quality. One torch thread everywhere (images are pixel-identical for a fixed call
shape *and* thread count, see docs/synthesis.md).
"""
from __future__ import annotations

import json

import errno
import functools
import hashlib
import os
import socket
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from kedro.io.core import DatasetError, Version

from conftest import base_params, run_kedro_session

from fu_kedro.datasets import DiffusionModelDataset, ImageSetDataset, ImageSetShardsDataset, LoraAdapterDataset
from fu_kedro.datasets.image_set import ImageSet
from fu_kedro.models.base_model import BaseModel
from fu_kedro.schema import ParameterError
from fu_kedro.models.diffusion import TINY_CONFIG, build_pipeline_from_config, pipeline_hash
from fu_kedro.datasets.image_set_shards import shard_name
from fu_kedro.models.generation import (
    device_and_dtype,
    file_sha256,
    image_seed,
    prepare_pipeline,
    regenerate,
    shard_indices,
    torch_threads,
)
from fu_kedro.models.lora import LoraAdapter, attach_lora, export_lora
from fu_kedro.pipelines.synthesis.nodes import (
    generate_synthetic_shard,
    merge_synthetic_shards,
    plan_synthetic_batch,
    summarize_synthetic_batch,
    _worker_chunks,
    time_capped_loops,
)

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")
CLASSES = ["abdomen", "brain", "femur"]  # the top-level `classes` of these tests: 3 classes x 3 images

MANIFEST_COLUMNS = {
    "image_id", "label", "prompt", "negative_prompt", "seed", "scheduler", "steps", "guidance", "lora_scale",
    "resolution", "batch_size", "adapter_content_hash", "adapter_file_sha256", "adapter_catalog_version",
    "base_model_name", "base_model_hash", "base_catalog_version", "torch_version", "diffusers_version",
    "peft_version", "torch_threads", "workers", "device", "dtype",
}


@pytest.fixture(autouse=True)
def _one_thread():
    with torch_threads(1):
        yield


# --------------------------------------------------------------------------- models and params
@functools.lru_cache(maxsize=1)
def base_hash() -> str:
    return pipeline_hash(build_pipeline_from_config(TINY_CONFIG, 32, seed=0))


def random_base() -> BaseModel:
    """A fresh random tiny base model (the same weights every call)."""
    pipe = build_pipeline_from_config(TINY_CONFIG, 32, seed=0)
    pipe.set_progress_bar_config(disable=True)
    return BaseModel(pipe, {"kind": "tiny", "name": "random tiny (test)", "resolution": 32, "content_hash": base_hash()})


def random_adapter(seed: int = 2):
    """A rank-4 UNet adapter with random up *and* down weights (peft's init leaves up at 0)."""
    pipe = build_pipeline_from_config(TINY_CONFIG, 32, seed=0)
    attach_lora(pipe, rank=4, alpha=4, seed=1)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)
    return export_lora(pipe, 4, 4, {"base_content_hash": base_hash(), "adapter_source": "train"})


@pytest.fixture(scope="module")
def adapter():
    return random_adapter()


@pytest.fixture(scope="module")
def conf():
    base = base_params("synthesis")
    ingestion = base_params("ingestion")
    return base, ingestion


# conf/base's synthesis block, test-sized: 3 classes x 3 images, 4 steps, batch 4 (a padded last batch),
# one replicate (conf/base's K = 3 replicates from 3 LoRA fits: tests of replicates set their own)
TEST_SIZED = {"images_per_class": 3, "steps": 4, "batch_size": 4, "torch_threads": 1, "replicates": 1,
              "adapter_per_replicate": False, "workers": 1}


@pytest.fixture
def params(conf) -> dict:
    """conf/base's synthesis block with :data:`TEST_SIZED`."""
    return dict(conf[0], **TEST_SIZED)


def plan_for(params, adapter, conf, seed=42, base=None, fits=None, classes=CLASSES):
    return plan_synthetic_batch(base or random_base(), adapter, conf[1]["caption_template"], conf[1]["plane_labels"], params,
                                classes, seed, fits)


def make_batch(params, adapter, conf, classes=CLASSES) -> ImageSet:
    plan = plan_for(params, adapter, conf, classes=classes)
    shards = generate_synthetic_shard(random_base(), adapter, plan, params)
    return merge_synthetic_shards(shards, plan, params)


@pytest.fixture(scope="module")
def batch(conf, adapter) -> ImageSet:
    torch.set_num_threads(1)
    return make_batch(dict(conf[0], **TEST_SIZED), adapter, conf)


# --------------------------------------------------------------------------- reproducibility
def test_manifest_has_one_row_per_image_with_lineage(batch, adapter):
    meta = batch.meta
    assert MANIFEST_COLUMNS <= set(meta.columns), MANIFEST_COLUMNS - set(meta.columns)
    assert batch.images.shape == (9, 32, 32) and batch.images.dtype == np.uint8
    assert meta["label"].tolist() == ["abdomen"] * 3 + ["brain"] * 3 + ["femur"] * 3
    assert meta["image_id"].is_unique and meta["index"].tolist() == list(range(9))
    assert meta["prompt"].iloc[4] == "a photo of fetal brain"
    assert meta["seed"].tolist() == [image_seed(42, i) for i in range(9)] and meta["seed"].is_unique
    assert set(meta["adapter_content_hash"]) == {adapter.content_hash}
    assert set(meta["base_model_hash"]) == {base_hash()}
    assert set(meta["torch_version"]) == {torch.__version__} and set(meta["torch_threads"]) == {1}
    assert batch.info["per_class"] == {"abdomen": 3, "brain": 3, "femur": 3}
    # class-distinct prompts give different images; different seeds too
    assert len({img.tobytes() for img in batch.images}) == 9
    assert "time_capped" not in batch.info  # no wall-clock cap stopped a loop: the batch says nothing of it


def test_time_capped_loops_come_from_the_base_and_the_adapter():
    base = BaseModel(None, {"content_hash": "x", "time_capped": {"base_denoiser": 120}})  # the tiny base's record
    adapter = LoraAdapter({}, {"time_capped": json.dumps({"lora": 37}), "base_time_capped": json.dumps({"base_denoiser": 120})})
    assert time_capped_loops(base, adapter) == {"base_denoiser": 120, "lora": 37}
    assert time_capped_loops(BaseModel(None, {"content_hash": "x", "time_capped": {}}),
                             LoraAdapter({}, {"time_capped": "{}"})) == {}


def test_three_manifest_rows_regenerated_alone_are_pixel_identical(batch, adapter):
    rows = batch.meta.iloc[[0, 5, 8]]  # first call, middle of the second, the padded last call
    assert rows["lora_fused"].tolist() == [False] * 3 and set(rows["device"]) == {"cpu"}
    pipe = prepare_pipeline(random_base().pipe, adapter, float(rows["lora_scale"].iloc[0]), CPU, torch.float32, False,
                            str(rows["scheduler"].iloc[0]))
    for i, (_, row) in zip([0, 5, 8], rows.iterrows()):
        alone = regenerate(pipe, row.to_frame().T)  # one image, from the row's own fields
        assert np.array_equal(alone[0], batch.images[i]), f"row {i} differs"


def test_clip_skip_follows_the_adapter_changes_images_and_regenerates(params, conf):
    # an adapter trained with clip skip 1 records it; `clip_skip: auto` takes it over
    trained = random_adapter()
    trained.metadata["lora_params"] = json.dumps({"clip_skip": 1})
    params.update(images_per_class=1, steps=3, batch_size=3)
    plan = plan_for(params, trained, conf)
    assert set(plan["clip_skip"]) == {1}
    skipped = merge_synthetic_shards(generate_synthetic_shard(random_base(), trained, plan, params), plan, params)
    plain = merge_synthetic_shards(
        generate_synthetic_shard(random_base(), trained, plan.assign(clip_skip=0), params), plan, params
    )
    assert np.abs(skipped.images.astype(int) - plain.images).mean() > 1.0  # another text layer, other images
    row = skipped.meta.iloc[[1]]
    pipe = prepare_pipeline(random_base().pipe, trained, 1.0, CPU, torch.float32, False, row["scheduler"].iloc[0])
    assert np.array_equal(regenerate(pipe, row)[0], skipped.images[1])
    # an explicit value wins; an adapter that records nothing gets 0
    assert set(plan_for(dict(params, clip_skip=0), trained, conf)["clip_skip"]) == {0}
    assert set(plan_for(params, random_adapter(), conf)["clip_skip"]) == {0}


def test_manifest_round_trips_through_the_dataset_and_still_regenerates(batch, adapter, tmp_path):
    ds = ImageSetDataset(str(tmp_path / "synthetic_batch"), version=Version(None, None))
    ds.save(batch)
    loaded = ImageSetDataset(str(tmp_path / "synthetic_batch"), version=Version(None, None)).load()
    assert np.array_equal(loaded.images, batch.images)
    row = loaded.meta.iloc[[7]]
    pipe = prepare_pipeline(random_base().pipe, adapter, float(row["lora_scale"].iloc[0]), CPU, torch.float32, False, row["scheduler"].iloc[0])
    assert np.array_equal(regenerate(pipe, row)[0], batch.images[7])


def test_shards_0_and_1_of_2_equal_the_unsharded_batch(batch, params, adapter, conf, tmp_path):
    params.update(num_shards=2)
    plan = plan_for(params, adapter, conf)
    store = ImageSetShardsDataset(str(tmp_path / "shards"))
    for k in range(2):  # two shard runs, one after the other, each writing only its indices
        shard = generate_synthetic_shard(random_base(), adapter, plan, dict(params, shard_index=k))
        (only,) = shard.values()
        assert only.meta["index"].tolist() == list(shard_indices(9, k, 2))
        store.save(shard)
    merged = merge_synthetic_shards(store.load(), plan, params)
    assert merged.meta["image_id"].tolist() == batch.meta["image_id"].tolist()
    assert np.array_equal(merged.images, batch.images)
    assert merged.meta["shard"].tolist() == ["0-of-2"] * 5 + ["1-of-2"] * 4
    assert merged.info["batch_key"] == batch.info["batch_key"]  # the shard split is not part of the batch's identity


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def random_fits(adapter, k: int):
    """Stand-in for lora_training.lora.fits = k: other random adapters as fits 1..k-1 of ``adapter``."""
    from fu_kedro.models.lora import LoraAdapterFits

    others = [random_adapter(seed=2 + r) for r in range(1, k)]
    return LoraAdapterFits(others, {"fits": k, "fit_of": {"content_hash": adapter.content_hash}})


def _worker(rank: int, world: int, port: int, params: dict, out_dir: str, classes: list[str] = CLASSES) -> None:
    """One of two gloo CPU processes, as `python -m fu_kedro.launch -n 2` would start it."""
    os.environ.update(
        RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), ACCELERATE_USE_CPU="true",
    )
    torch.set_num_threads(1)
    adapter = random_adapter()
    fits = random_fits(adapter, params["replicates"]) if params.get("adapter_per_replicate") else None
    ingestion = base_params("ingestion")
    plan = plan_synthetic_batch(random_base(), adapter, ingestion["caption_template"], ingestion["plane_labels"], params,
                                classes, 42, fits)
    (result,) = generate_synthetic_shard(random_base(), adapter, plan, params, fits).values()
    np.save(Path(out_dir) / f"images_{rank}.npy", result.images)
    result.meta.to_csv(Path(out_dir) / f"meta_{rank}.csv", index=False)


def test_two_gloo_processes_each_return_the_one_process_batch(batch, params, tmp_path):
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), params, str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        images = np.load(tmp_path / f"images_{rank}.npy")
        meta = pd.read_csv(tmp_path / f"meta_{rank}.csv", dtype={"image_id": str})
        assert meta["image_id"].tolist() == batch.meta["image_id"].tolist()
        assert np.array_equal(images, batch.images), f"rank {rank}: pixels differ from the 1-process batch"
        assert meta["process_index"].tolist() == [0] * 5 + [1] * 4 and set(meta["num_processes"]) == {2}


def test_two_worker_processes_make_the_one_process_batch_with_each_rows_fit(params, adapter, conf):
    """synthesis.workers: 2 (one kedro process, the CPU default) cuts each fit's rows into runs of whole
    pipeline calls for two loky workers: the same pixels and manifest as one process."""
    params.update(replicates=3, images_per_class=3, adapter_per_replicate=True)
    two = ["brain", "femur"]
    fits = random_fits(adapter, 3)
    plan = plan_for(params, adapter, conf, fits=fits, classes=two)
    # 6 rows per fit, calls of 4: each fit's rows as one call of 4 and one (padded) of 2
    assert _worker_chunks(plan, list(range(18)), 4, 2) == [[0, 1, 2, 3], [4, 5], [6, 7, 8, 9], [10, 11],
                                                           [12, 13, 14, 15], [16, 17]]
    (one,) = generate_synthetic_shard(random_base(), adapter, plan, params, fits).values()
    (pooled,) = generate_synthetic_shard(random_base(), adapter, plan, dict(params, workers=2), fits).values()
    assert np.array_equal(pooled.images, one.images)
    assert len({img.tobytes() for img in pooled.images}) == 18
    assert set(pooled.meta["workers"]) == {2} and set(one.meta["workers"]) == {1} and pooled.info["workers"] == 2
    assert pooled.meta.drop(columns="workers").equals(one.meta.drop(columns="workers"))


def test_lora_training_generate_is_unchanged_by_the_delegation():
    from fu_kedro.pipelines.lora_training.nodes import generate

    pipe = random_base().pipe
    prompts, seeds = ["a photo of fetal brain", "a photo of fetal femur", "a photo of fetal other"], [3, 4, 5]
    with torch.no_grad():
        old = pipe(prompts, height=32, width=32, num_inference_steps=3, guidance_scale=5.0,
                   generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np").images
    assert np.array_equal(generate(pipe, prompts, seeds, 32, 3, 5.0), (old.mean(axis=-1) * 255).round().clip(0, 255).astype(np.uint8))


def test_fused_adapter_gives_the_same_images_as_peft_layers(adapter):
    """The GPU path fuses the adapter into the weights; on CPU it must match the unfused model closely."""
    prompts, seeds = ["a photo of fetal thorax"] * 2, [1, 2]
    kwargs = dict(resolution=32, steps=4, guidance_scale=5.0, batch_size=2)
    from fu_kedro.models.generation import generate_images

    unfused = generate_images(prepare_pipeline(random_base().pipe, adapter, 0.8, CPU, torch.float32, False, "dpm++_multistep"), prompts, seeds, **kwargs)
    fused_pipe = prepare_pipeline(random_base().pipe, adapter, 0.8, CPU, torch.float32, True, "dpm++_multistep")
    assert not fused_pipe.get_list_adapters().get("unet")  # LoRA layers folded in and removed
    fused = generate_images(fused_pipe, prompts, seeds, **kwargs)
    plain = generate_images(prepare_pipeline(random_base().pipe, None, 1.0, CPU, torch.float32, False, "dpm++_multistep"), prompts, seeds, **kwargs)
    assert np.abs(fused.astype(int) - unfused.astype(int)).max() <= 2
    assert np.abs(plain.astype(int) - unfused.astype(int)).max() > 2  # the adapter does change the images


def test_cpu_default_is_fp32_unfused_and_fp16_on_cpu_is_refused():
    assert device_and_dtype("auto", "auto") == (CPU, torch.float32) or torch.cuda.is_available()
    assert device_and_dtype("cpu", "auto") == (CPU, torch.float32)
    with pytest.raises(ValueError, match="fp16 on CPU"):
        device_and_dtype("cpu", "fp16")


def test_preview_grid_and_metrics(batch, params):
    fig, metrics = summarize_synthetic_batch(batch, params, CLASSES)
    assert len(fig.axes) == 3 and [ax.get_ylabel().split("\n")[0] for ax in fig.axes] == CLASSES
    assert metrics["images"] == {"value": 9.0, "step": 0} and metrics["images_brain"]["value"] == 3.0
    assert all(set(v) == {"value", "step"} for v in metrics.values())


# --------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "change, message",
    [
        ({"images_per_class": 0}, r"synthesis\.images_per_class: 0 in synthesis: Input should be greater than or equal to 1"),
        ({"images_per_class": -5}, r"synthesis\.images_per_class: -5 in synthesis: Input should be greater than"),
        ({"images_per_class": 2.5}, r"synthesis\.images_per_class: 2\.5 in synthesis: Input should be a valid integer"),
        ({"classes": ["brain", "brian"]}, r"classes \['brian'\] are unknown"),
        ({"steps": 0}, r"synthesis\.steps: 0 in synthesis: Input should be greater than or equal to 1"),
        ({"batch_size": -1}, r"synthesis\.batch_size: -1 in synthesis: Input should be greater than"),
        ({"num_shards": 0}, r"synthesis\.num_shards: 0 in synthesis: Input should be greater than"),
        ({"num_shards": 2, "shard_index": 2}, r"synthesis: shard_index=2 is not in \[0, num_shards=2\)"),
        ({"num_shards": 10}, "num_shards=10 is more than the 9 images"),
        ({"scheduler": "euler_ancestral"}, r"synthesis\.scheduler: 'euler_ancestral' in synthesis; allowed values: "),
        ({"resolution": 30}, r"synthesis\.resolution: 30 in synthesis: Input should be a multiple of 8"),
        ({"guidance_scale": -1.0}, r"synthesis\.guidance_scale: -1\.0 in synthesis: Input should be greater than or equal to 0"),
        ({"base_seed": -1}, r"synthesis\.base_seed: -1 in synthesis: Input should be greater than or equal to 0"),
        ({"precision": "fp8"}, r"synthesis\.precision: 'fp8' in synthesis; allowed values: 'auto', 'fp32', 'fp16' or 'bf16'"),
    ],
)
def test_bad_parameters_stop_before_any_image(params, adapter, conf, change, message):
    change = dict(change)
    classes = change.pop("classes", CLASSES)  # the top-level `classes`, checked with the synthesis block
    params.update(change)
    with pytest.raises(ValueError, match=message):
        plan_for(params, adapter, conf, classes=classes)


def test_the_old_synthesis_classes_key_is_an_unknown_key(params, adapter, conf):
    """The class list moved to the top-level ``classes`` (CHANGELOG.md); the old key is refused like any typo."""
    with pytest.raises(ParameterError, match=r"synthesis\.classes: unknown key in synthesis; allowed keys: images_per_class"):
        plan_for(dict(params, classes=["brain"]), adapter, conf)


def test_adapter_of_another_base_model_is_refused(params, adapter, conf):
    other = type(adapter)(adapter.state_dict, dict(adapter.metadata, base_content_hash="f" * 64, base_catalog_version="2020-01-01T00.00.00.000Z"))
    with pytest.raises(ValueError, match=r"trained on base model ffffffffffff.*--load-versions base_model:2020-01-01T00.00.00.000Z"):
        plan_for(params, other, conf)


def test_merge_names_missing_shards_and_the_command(params, adapter, conf):
    params.update(num_shards=3)
    plan = plan_for(params, adapter, conf)
    shard = generate_synthetic_shard(random_base(), adapter, plan, dict(params, shard_index=1))
    with pytest.raises(ValueError, match=r"shard\(s\) \[0, 2\] of 3 not found.*--tags synthesis_shard"):
        merge_synthetic_shards(shard, plan, params)


def test_merge_refuses_a_shard_of_another_plan(params, adapter, conf):
    plan = plan_for(params, adapter, conf)
    shard = generate_synthetic_shard(random_base(), adapter, plan, params)
    (name, part), = shard.items()
    part.meta.loc[2, "seed"] += 1
    with pytest.raises(ValueError, match="do not match the plan's rows.*'seed'"):
        merge_synthetic_shards({name: part}, plan, params)


def disk_full_after(n: int):
    """A ``PIL.Image.Image.save`` that fails with ENOSPC from the ``n+1``-th image on."""
    from PIL import Image

    real, calls = Image.Image.save, []

    def save(image, *args, **kwargs):
        calls.append(1)
        if len(calls) > n:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(image, *args, **kwargs)

    return save


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_write_error_mid_batch_leaves_no_batch_that_looks_complete(batch, tmp_path, monkeypatch):
    from PIL import Image

    root = tmp_path / "synthetic_batch"
    ImageSetDataset(str(root), version=Version(None, None)).save(batch)  # an earlier, complete version
    before = _tree(root)
    monkeypatch.setattr(Image.Image, "save", disk_full_after(4))
    with pytest.raises(DatasetError, match="No space left on device"):  # Kedro wraps the OSError
        ImageSetDataset(str(root), version=Version(None, "2099-01-01T00.00.00.000Z")).save(batch)
    monkeypatch.undo()
    assert _tree(root) == before  # nothing half-written beside the earlier version, which is untouched
    assert not [p for p in root.rglob("*") if ".partial-" in p.name]
    latest = ImageSetDataset(str(root), version=Version(None, None))
    assert latest.resolve_load_version() != "2099-01-01T00.00.00.000Z" and len(latest.load()) == 9


def test_write_error_in_a_shard_keeps_the_old_shard_whole(batch, tmp_path, monkeypatch):
    from PIL import Image

    store = ImageSetShardsDataset(str(tmp_path / "shards"))
    store.save({"k/shard-00000-of-00001": batch})
    before = _tree(tmp_path / "shards")
    monkeypatch.setattr(Image.Image, "save", disk_full_after(3))
    with pytest.raises(DatasetError, match="No space left on device"):
        store.save({"k/shard-00000-of-00001": batch})
    monkeypatch.undo()
    assert _tree(tmp_path / "shards") == before
    assert list(store.load()) == ["k/shard-00000-of-00001"]


# --------------------------------------------------------------------------- the Kedro run
# Nested, not dotted: KedroSession.create(runtime_params=...) does not split "a.b" keys (the CLI's --params does)
RUN_PARAMS = {"classes": ["femur", "thorax"],
              "synthesis": {"images_per_class": 2, "steps": 3, "batch_size": 4, "torch_threads": 1,
                            "replicates": 1, "adapter_per_replicate": False}}  # one replicate (conf/base: 3 from 3 fits)


def _seed_models(project: Path, adapter) -> tuple[str, str]:
    """A random tiny base and adapter saved as catalog versions of the copied project."""
    version = "2026-01-01T00.00.00.000Z"
    base = random_base()
    DiffusionModelDataset(str(project / "data/06_models/base_model"), version=Version(None, version)).save(base)
    LoraAdapterDataset(str(project / "data/06_models/lora_adapter.safetensors"), version=Version(None, version)).save(adapter)
    return version, version


def _kedro_run(project: Path, **kwargs):
    return run_kedro_session(project, "synthesis", RUN_PARAMS, **kwargs)


@pytest.mark.slow
def test_kedro_run_writes_a_new_version_each_run_and_leaves_the_first_untouched(project_copy, adapter):
    import mlflow

    project = project_copy
    base_version, adapter_version = _seed_models(project, adapter)
    batches = project / "data/07_model_output/synthetic_batch"
    _kedro_run(project)
    (first,) = sorted(batches.iterdir())
    first_files = _tree(first)
    _kedro_run(project)
    versions = sorted(batches.iterdir())
    assert len(versions) == 2 and versions[0] == first
    assert _tree(first) == first_files  # the first batch is untouched
    loaded = ImageSetDataset(str(batches), version=Version(None, None)).load()
    assert np.array_equal(loaded.images, ImageSetDataset(str(batches), version=Version(first.name, None)).load().images)
    meta = loaded.meta
    assert MANIFEST_COLUMNS <= set(meta.columns) and len(meta) == 4
    assert set(meta["adapter_catalog_version"]) == {adapter_version} and set(meta["base_catalog_version"]) == {base_version}
    assert len(list((project / "data/08_reporting/synthetic_preview_grid.png").glob("*/synthetic_preview_grid.png"))) == 2
    # MLflow: parameters, counts, the grid and the manifest
    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    client = mlflow.MlflowClient()
    run = client.search_runs([e.experiment_id for e in client.search_experiments()], order_by=["start_time DESC"])[0]
    assert run.data.params["synthesis.images_per_class"] == "2" and run.data.metrics["synthesis.images"] == 4.0
    assert run.data.metrics["synthesis.images_thorax"] == 2.0
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "synthesis")}
    assert {"synthesis/synthetic_preview_grid.png", "synthesis/synthetic_manifest.csv"} <= artifacts
    # a pinned adapter version that does not exist: the run stops, naming it, and writes nothing
    with pytest.raises(Exception, match="lora_adapter") as error:
        _kedro_run(project, load_versions={"lora_adapter": "2001-01-01T00.00.00.000Z"})
    assert len(list(batches.iterdir())) == 2, error.value


def test_replicates_are_independent_batches_in_one_manifest(params, adapter, conf):
    params.update(replicates=3)
    plan = plan_for(params, adapter, conf)
    one = plan_for(dict(params, replicates=1), adapter, conf)
    assert len(plan) == 3 * len(one) and plan["image_id"].is_unique and plan["seed"].is_unique
    assert plan["replicate"].tolist() == [0] * 9 + [1] * 9 + [2] * 9
    # replicate 0 is the one-replicate batch; replicate r samples from base seed + r, every row traced
    first = plan[plan["replicate"] == 0].reset_index(drop=True)
    assert first[["image_id", "label", "prompt", "seed"]].equals(one[["image_id", "label", "prompt", "seed"]])
    for r in (1, 2):
        rows = plan[plan["replicate"] == r]
        assert set(rows["base_seed"]) == {42 + r}
        assert rows["seed"].tolist() == [image_seed(42 + r, i) for i in range(9)]
        assert rows["label"].tolist() == one["label"].tolist()
    with pytest.raises(ValueError, match=r"synthesis\.replicates: 0 in synthesis: Input should be greater than or equal to 1"):
        plan_for(dict(params, replicates=0), adapter, conf)


# --------------------------------------------------------------------------- one LoRA fit per replicate
@pytest.fixture(scope="module")
def two_fits(tmp_path_factory):
    """lora_training.lora.fits = 2 on the random tiny base (3 LoRA steps: bookkeeping, not quality),
    fit 0 and fits 1.. through their catalog datasets, as synthesis loads them."""
    from fu_kedro.data_sources import generate_phantoms
    from fu_kedro.datasets import LoraAdapterFitsDataset
    from fu_kedro.pipelines.lora_training.nodes import fit_lora_adapter, fit_lora_adapter_refits

    lora_params = base_params("lora_training")
    lora_params["torch_threads"] = 1
    lora_params["lora"].update(max_steps=3, batch_size=8, loss_check_repeats=1, fits=2)
    subset = generate_phantoms("source", 2, 64, seed=11)
    subset.meta["caption"] = [f"a photo of fetal {p}" for p in subset.meta["label"]]
    root, version = tmp_path_factory.mktemp("fits"), "2026-01-01T00.00.00.000Z"
    fit0, _, _ = fit_lora_adapter(random_base(), subset, lora_params, 42)
    LoraAdapterDataset(str(root / "lora_adapter.safetensors"), version=Version(None, version)).save(fit0)
    fit0 = LoraAdapterDataset(str(root / "lora_adapter.safetensors"), version=Version(version, None)).load()
    fits = fit_lora_adapter_refits(random_base(), subset, fit0, lora_params, 42)
    fits_ds = LoraAdapterFitsDataset(str(root / "lora_adapter_fits"), version=Version(None, version))
    fits_ds.save(fits)
    one = fit_lora_adapter_refits(random_base(), subset, fit0, dict(lora_params, lora=dict(lora_params["lora"], fits=1)), 42)
    return fit0, LoraAdapterFitsDataset(str(root / "lora_adapter_fits"), version=Version(version, None)).load(), one


def test_two_lora_fits_make_two_traced_replicates_and_replicate_0_is_unchanged(two_fits, params, conf, tmp_path):
    from fu_kedro.models.lora import lora_fit_seed

    fit0, fits, one = two_fits
    assert len(one) == 0 and one.fits == 1  # lora_training.lora.fits = 1 (the default): nothing trained
    assert fits.fits == 2 and fits.info["fit_of"]["content_hash"] == fit0.content_hash
    fit1 = fits.adapter(1)
    assert fit1.content_hash != fit0.content_hash and fit1.content_hash == fits.info["fits_summary"][0]["content_hash"]
    assert fit1.metadata["seed"] == str(lora_fit_seed(42, 1)) != fit0.metadata["seed"] == "42"
    assert fit1.metadata["lora_subset_image_ids"] == fit0.metadata["lora_subset_image_ids"]  # same subset, same base
    assert fit1.metadata["base_content_hash"] == fit0.metadata["base_content_hash"]

    params.update(replicates=2, images_per_class=3)  # 2 classes: 6 per replicate: batch 2 of 4 mixes both
    two = ["brain", "femur"]
    off = make_batch(params, fit0, conf, classes=two)  # default: both replicates from fit 0
    on = dict(params, adapter_per_replicate=True)
    plan = plan_for(on, fit0, conf, fits=fits, classes=two)
    (result,) = generate_synthetic_shard(random_base(), fit0, plan, on, fits).values()
    batch = merge_synthetic_shards({shard_name(plan["batch_key"].iloc[0], 0, 1): result}, plan, on)
    meta = batch.meta
    rep = meta["replicate"].to_numpy()
    # every row names its adapter: content hash, fit index and seed, catalog entry and version
    for r, adapter, dataset in ((0, fit0, "lora_adapter"), (1, fit1, "lora_adapter_fits")):
        rows = meta[rep == r]
        assert set(rows["adapter_content_hash"]) == {adapter.content_hash} and set(rows["adapter_fit"]) == {r}
        assert set(rows["adapter_seed"]) == {int(adapter.metadata["seed"])} and set(rows["adapter_dataset"]) == {dataset}
        assert set(rows["adapter_catalog_version"]) == {"2026-01-01T00.00.00.000Z"}
        assert set(rows["adapter_file_sha256"]) == {file_sha256(adapter.metadata["file"])}
    assert [a["fit"] for a in batch.info["adapter_per_replicate"]] == [0, 1]
    # replicate 0 is pixel-identical to the single-adapter batch; replicate 1 changes with its own fit
    assert np.array_equal(batch.images[rep == 0], off.images[off.meta["replicate"].to_numpy() == 0])
    assert not np.array_equal(batch.images[rep == 1], off.images[off.meta["replicate"].to_numpy() == 1])
    assert meta[["image_id", "seed"]].equals(off.meta[["image_id", "seed"]])
    # the option off leaves the manifest as it was: no fit columns
    assert "adapter_fit" not in off.meta.columns and "adapter_per_replicate" not in off.info
    # shards (each row with its replicate's fit) give the same batch
    store = ImageSetShardsDataset(str(tmp_path / "shards"))
    for k in range(3):
        store.save(generate_synthetic_shard(random_base(), fit0, plan, dict(on, num_shards=3, shard_index=k), fits))
    merged = merge_synthetic_shards(store.load(), plan, dict(on, num_shards=3))
    assert np.array_equal(merged.images, batch.images)
    # a row regenerated alone with its fit's adapter is the same image
    row = meta.iloc[[len(meta) - 1]]
    pipe = prepare_pipeline(random_base().pipe, fit1, 1.0, CPU, torch.float32, False, row["scheduler"].iloc[0])
    assert np.array_equal(regenerate(pipe, row)[0], batch.images[-1])


def test_too_few_lora_fits_stop_the_plan_naming_both_parameters(two_fits, params, conf):
    from fu_kedro.models.lora import LoraAdapterFits

    fit0, fits, one = two_fits
    on = dict(params, replicates=3, adapter_per_replicate=True)
    message = r"synthesis.replicates=3.*holds 2 \(lora_training.lora.fits=2\).*lora_training.lora.fits=3"
    with pytest.raises(ValueError, match=message):
        plan_for(on, fit0, conf, fits=fits)
    missing = LoraAdapterFits([], {"fits": 1}, missing="Did not find any versions")
    with pytest.raises(ValueError, match=r"adapter_per_replicate.*no lora_adapter_fits is saved"):
        plan_for(dict(on, replicates=2), fit0, conf, fits=missing)
    # fits of another adapter (another run) are refused; the option off never reads them
    with pytest.raises(ValueError, match="not of lora_adapter version"):
        plan_for(dict(on, replicates=2), random_adapter(), conf, fits=fits)
    plan_for(dict(params, replicates=3), fit0, conf, fits=missing)


def test_two_gloo_processes_use_each_rows_lora_fit(params, adapter, conf, tmp_path):
    """Under fu_kedro.launch each process makes its share of the rows, each row with its replicate's fit."""
    params.update(replicates=3, images_per_class=1, adapter_per_replicate=True)
    two = ["brain", "femur"]
    fits = random_fits(adapter, 3)
    plan = plan_for(params, adapter, conf, fits=fits, classes=two)
    (one,) = generate_synthetic_shard(random_base(), adapter, plan, params, fits).values()
    torch.multiprocessing.spawn(_worker, args=(2, _free_port(), params, str(tmp_path), two), nprocs=2, join=True)
    for rank in range(2):
        meta = pd.read_csv(tmp_path / f"meta_{rank}.csv", dtype={"image_id": str})
        assert np.array_equal(np.load(tmp_path / f"images_{rank}.npy"), one.images), f"rank {rank}"
        assert meta["process_index"].tolist() == [0, 0, 0, 1, 1, 1]  # each process spans two fits
        assert meta["adapter_fit"].tolist() == [0, 0, 1, 1, 2, 2]
    single = make_batch(dict(params, adapter_per_replicate=False), adapter, conf, classes=two).images
    assert np.array_equal(one.images[:2], single[:2]) and not np.array_equal(one.images[2:], single[2:])
