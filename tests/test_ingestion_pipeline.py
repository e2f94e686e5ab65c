"""The ingestion pipeline end to end (in memory, phantoms), on the real samples, and its nodes."""
from __future__ import annotations

import logging
import re

import numpy as np
import pytest
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from matplotlib.figure import Figure

from conftest import base_params

from fu_kedro.data_sources import CLASSES
from fu_kedro.data_sources.preprocess import content_box
from fu_kedro.data_sources.readers import read_domain
from fu_kedro.pipelines.ingestion.pipeline import create_pipeline
from fu_kedro.pipelines.ingestion.nodes import draw_lora_subset, split_source_by_patient

CONTRACT_COLUMNS = ["image_id", "patient_id", "label", "domain", "center", "machine", "source_file", "split"]


@pytest.fixture
def small_params(ingestion_params):
    p = ingestion_params
    p["image_size"] = 64
    p["phantom"]["source"]["n_per_class"] = 16
    p["phantom"]["source"]["class_proportions"] = None  # 16 of each class (conf/base's shares leave ~5 abdomen of 80)
    p["phantom"]["target"]["n_per_class"] = 10
    p["lora_per_class"] = 5
    return p


class _KeptDataset(MemoryDataset):
    """A MemoryDataset the runner cannot release, so the test can look at intermediate outputs."""

    def _release(self) -> None:
        pass


def _run(params, **top):
    top = {"seed": 3, "source_format": "phantom", "source_path": None, "target_format": "phantom",
           "target_path": None, "classes": base_params("classes"), **top}
    datasets = {f"params:{k}": MemoryDataset(v) for k, v in top.items()}
    datasets["params:ingestion"] = MemoryDataset(params)
    outputs = ["source_images", "target_images", "lora_subset", "quarantine_report",
               "ingestion_metrics", "ingestion_preview_grid"]
    datasets.update({name: _KeptDataset(copy_mode="assign") for name in outputs})
    catalog = DataCatalog(datasets=datasets)
    SequentialRunner().run(create_pipeline(), catalog)
    return {name: catalog.load(name) for name in outputs}


def test_pipeline_on_phantoms_meets_the_output_contract(small_params):
    out = _run(small_params)
    src, tgt, lora = out["source_images"], out["target_images"], out["lora_subset"]
    for s, domain in ((src, "source"), (tgt, "target")):
        assert s.images.dtype == np.uint8 and s.images.shape[1:] == (64, 64)
        assert set(CONTRACT_COLUMNS) <= set(s.meta.columns)
        assert set(s.meta["domain"]) == {domain}
        assert s.meta["image_id"].is_unique
    assert set(src.meta["split"]) == {"train", "val"} and set(tgt.meta["split"]) == {"test"}
    assert set(src.meta["label"]) == set(CLASSES) and "other" not in set(tgt.meta["label"])
    assert tgt.meta["center"].nunique() == 5
    # LoRA subset: train rows only, balanced, captioned
    assert set(lora.meta["split"]) == {"train"}
    assert set(lora.meta["image_id"]) <= set(src.meta.loc[src.meta["split"] == "train", "image_id"])
    assert lora.meta["label"].value_counts().to_dict() == {c: 5 for c in CLASSES}
    assert (lora.meta["caption"] == "a photo of fetal " + lora.meta["label"]).all()
    # reports
    assert list(out["quarantine_report"].columns) == ["file", "reason", "domain"] and out["quarantine_report"].empty
    m = out["ingestion_metrics"]
    assert m["source.read"] == {"value": 80.0, "step": 0} and m["source.kept"]["value"] == 80.0
    assert m["target.read"]["value"] == 40.0 and m["target.skipped"]["value"] == 0.0
    assert m["lora_subset.brain"]["value"] == 5.0
    assert m["source.split.train"]["value"] + m["source.split.val"]["value"] == 80.0
    assert isinstance(out["ingestion_preview_grid"], Figure)


def test_pipeline_stops_on_bad_input_naming_the_file(small_params, tmp_path):
    (tmp_path / "brain").mkdir()
    (tmp_path / "brain" / "scan.png").write_bytes(b"garbage")
    with pytest.raises(Exception, match="scan.png: not a decodable image"):
        _run(small_params, source_format="folders", source_path=str(tmp_path))


def test_no_patient_on_both_sides_of_the_split(ingestion_params):
    from fu_kedro.data_sources import generate_phantoms

    src = generate_phantoms("source", 40, 32, seed=7)  # ~45 patients: enough for the share to be near 0.2
    out = split_source_by_patient(src, 11, ingestion_params)
    train = set(out.meta.loc[out.meta["split"] == "train", "patient_id"])
    val = set(out.meta.loc[out.meta["split"] == "val", "patient_id"])
    assert train and val and not train & val
    share = (out.meta["split"] == "val").mean()
    assert 0.1 < share < 0.35, share
    again = split_source_by_patient(src, 11, ingestion_params)
    assert again.meta["split"].equals(out.meta["split"])
    other = split_source_by_patient(src, 12, ingestion_params)
    assert not other.meta["split"].equals(out.meta["split"])


def test_val_fraction_zero_keeps_everything_in_train(small_phantom_sets, ingestion_params):
    src, _ = small_phantom_sets
    ingestion_params["val_fraction"] = 0
    assert set(split_source_by_patient(src, 1, ingestion_params).meta["split"]) == {"train"}


def test_lora_subset_small_class_gives_all_with_warning(small_phantom_sets, ingestion_params, caplog):
    src, _ = small_phantom_sets
    split = split_source_by_patient(src, 1, ingestion_params)
    ingestion_params["caption_template"] = "fetal ultrasound, {plane} plane"
    n_train = split.meta[split.meta["split"] == "train"]["label"].value_counts()
    with caplog.at_level(logging.WARNING):
        lora = draw_lora_subset(split, 1, ingestion_params, CLASSES)  # 20 wanted, at most 12 exist
    assert lora.meta["label"].value_counts().to_dict() == n_train.to_dict()
    for c in CLASSES:
        assert f"class '{c}' has only {n_train[c]} source train image(s)" in caplog.text
    assert lora.meta.loc[0, "caption"] == f"fetal ultrasound, {lora.meta.loc[0, 'label']} plane"
    assert draw_lora_subset(split, 1, ingestion_params, CLASSES).meta["image_id"].equals(lora.meta["image_id"])


def test_lora_subset_covers_the_top_level_classes_only(small_phantom_sets, ingestion_params):
    """Issue #27: ``classes=[brain]`` narrows the LoRA subset (it drew all five labels)."""
    src, _ = small_phantom_sets
    split = split_source_by_patient(src, 1, ingestion_params)
    ingestion_params["lora_per_class"] = 3
    lora = draw_lora_subset(split, 1, ingestion_params, ["brain"])
    assert lora.meta["label"].tolist() == ["brain"] * 3 and lora.info["classes"] == ["brain"]
    two = draw_lora_subset(split, 1, ingestion_params, ["femur", "brain"])
    assert two.meta["label"].value_counts().to_dict() == {"femur": 3, "brain": 3}


@pytest.mark.parametrize("value", [0, -2, 2.5, "20", None])
def test_lora_per_class_must_be_a_positive_whole_number(small_phantom_sets, ingestion_params, value):
    """``ingestion.lora_per_class=0`` published an empty subset without a word: now an error naming the
    key, before any image is read (read_source_images) and in the draw itself."""
    from fu_kedro.pipelines.ingestion.nodes import read_source_images

    src, _ = small_phantom_sets
    split = split_source_by_patient(src, 1, ingestion_params)
    ingestion_params["lora_per_class"] = value
    with pytest.raises(ValueError, match=rf"ingestion\.lora_per_class: {re.escape(repr(value))} in ingestion: Input should be"):
        draw_lora_subset(split, 1, ingestion_params, CLASSES)
    with pytest.raises(ValueError, match=r"ingestion\.lora_per_class"):
        read_source_images("folders", "/nonexistent/never/read", 1, ingestion_params, CLASSES)


def test_real_fetal_planes_db_sample(fetal_planes_db_sample, ingestion_params, caplog):
    src, report = read_domain("fetal_planes_db", str(fetal_planes_db_sample), "source", 42, ingestion_params,
                              required=base_params("classes"))
    assert report.empty and len(src) == 100
    assert src.meta["label"].value_counts().to_dict() == {c: 20 for c in CLASSES}
    assert set(src.meta["machine"]) == {"Voluson E6", "Voluson S10", "Aloka", "Other"}
    assert src.images.shape == (100, 128, 128)
    assert (src.meta["source_file"].str.endswith(".png")).all()
    split = split_source_by_patient(src, 42, ingestion_params)
    train = split.meta[split.meta["split"] == "train"]
    val = split.meta[split.meta["split"] == "val"]
    assert not set(train["patient_id"]) & set(val["patient_id"])
    with caplog.at_level(logging.WARNING):
        lora = draw_lora_subset(split, 42, ingestion_params, CLASSES)
    counts = train["label"].value_counts()
    short = [c for c in CLASSES if counts[c] < 20]
    assert short  # 100 images, 20% held out: some class is short of 20
    for c in short:
        assert f"class '{c}' has only {counts[c]}" in caplog.text
    assert len(lora) == int(np.minimum(counts, 20).sum())


def test_real_african_dev_set(african_planes_dev, ingestion_params):
    tgt, report = read_domain("african", str(african_planes_dev), "target", 42, ingestion_params)
    assert report.empty and len(tgt) == 217
    assert sorted(tgt.meta["center"].unique()) == ["Algeria", "Egypt", "Ghana", "Malawi", "Uganda"]
    assert set(tgt.meta["label"]) == {"abdomen", "brain", "femur", "thorax"}
    assert not ((tgt.meta["center"].isin(["Ghana", "Uganda"])) & (tgt.meta["label"] == "thorax")).any()
    assert tgt.info["conversions"] == {"RGB to grayscale": 48}


def test_border_crop_keeps_the_fan_and_drops_margin_text():
    img = np.zeros((200, 300), np.uint8)
    yy, xx = np.mgrid[:200, :300]
    fan = ((xx - 150) ** 2 + (yy + 20) ** 2 < 170 ** 2) & (np.abs(xx - 150) < (yy + 20) * 0.8) & (yy > 20)
    rng = np.random.default_rng(0)
    img[fan] = rng.integers(60, 200, fan.sum())
    img[5:12, 5:60] = 255  # patient name / machine text in the black margin
    img[190:196, 250:295] = 255
    t, b, l, r = content_box(img, 12, 0.05)
    rows, cols = np.flatnonzero(fan.any(1)), np.flatnonzero(fan.any(0))
    assert abs(t - rows[0]) <= 3 and abs(b - rows[-1] - 1) <= 3
    assert abs(l - cols[0]) <= 3 and abs(r - cols[-1] - 1) <= 3


def test_catalog_entries_match_the_output_contract(project_root, tmp_path, monkeypatch):
    import yaml
    from kedro.io import AbstractVersionedDataset

    from fu_kedro.datasets import ImageSetDataset

    monkeypatch.chdir(tmp_path)  # relative filepaths resolve here; nothing is written
    conf = yaml.safe_load((project_root / "conf" / "base" / "catalog_ingestion.yml").read_text())
    catalog = DataCatalog.from_config(conf)
    outputs = create_pipeline().all_outputs()
    assert {"source_images", "target_images", "lora_subset", "quarantine_report", "ingestion_preview_grid",
            "ingestion_metrics"} <= outputs
    for name, folder in (("source_images", "data/03_primary/source_images"),
                         ("target_images", "data/03_primary/target_images"),
                         ("lora_subset", "data/05_model_input/lora_subset")):
        ds = catalog.get(name)
        assert isinstance(ds, ImageSetDataset) and ds._version is not None
        assert str(ds._filepath).endswith(folder)
    for name in ("quarantine_report", "ingestion_preview_grid"):
        ds = catalog.get(name)
        assert isinstance(ds, AbstractVersionedDataset) and ds._version is not None
        assert "data/08_reporting" in str(ds._filepath)
