"""Training arms as data (evaluation.arms): the paper's HB real images are the authors' list as far
as the data has it, ES+SYN and HB share their synthetic images, and every arm draws its real
images as the batching rule says (recorded in each classifier's history)."""
from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import base_params, project_parameters

from fu_kedro.classifiers.sampling import Batching, BatchStream
from fu_kedro.data_sources import generate_phantoms
from fu_kedro.datasets import ImageSet
from fu_kedro.pipelines.evaluation import arms as arm_defs
from fu_kedro.pipelines.evaluation import nodes
from fu_kedro.pipelines.evaluation.params import ArmParams
from fu_kedro.pipelines.ingestion.nodes import read_source_images, split_source_by_patient

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
SPLITS = SHARED / "fu_lora_splits"
CLASSES = base_params("classes")


def _params(**over):
    params = base_params("evaluation")
    params.update(image_size=32, n_seeds=2, metrics={"n_bootstrap": 20, "ci": 0.95}, workers=1,
                  train={**params["train"], "steps": 5, "eval_every": 5, "bn_recalibration_images": 16})
    params.update(over)
    return params


def _phantom_data(n_syn=6, replicates=1):
    src = generate_phantoms("source", n_per_class=12, image_size=32, seed=1,
                            class_proportions={"other": 2601, "brain": 1620, "thorax": 1058, "femur": 516, "abdomen": 353})
    pids = src.meta["patient_id"].unique()
    src.meta["split"] = np.where(src.meta["patient_id"].isin(pids[::5]), "val", "train")
    tgt = generate_phantoms("target", n_per_class=2, image_size=32, seed=2)
    parts = []
    for r in range(replicates):
        s = generate_phantoms("source", n_per_class=n_syn, image_size=32, seed=3 + r)
        parts.append((s.images, pd.DataFrame({"image_id": f"syn{r}_" + s.meta["image_id"], "label": s.meta["label"],
                                              "replicate": r})))
    syn = ImageSet(np.concatenate([p[0] for p in parts]), pd.concat([p[1] for p in parts], ignore_index=True), {})
    return nodes.prepare_classifier_data(src, tgt, syn, _params(), CLASSES)


def test_default_plans_the_four_arms_and_their_decomposition():
    """conf/base: ES, BAL, ES+SYN, HB; the comparisons HB-ES, BAL-ES, HB-BAL, ES+SYN-ES; a phantom
    source with FETAL_PLANES_DB's class shares, so BAL has fewer real images than ES."""
    params = base_params("evaluation")
    arms = arm_defs.parse_arms(params)
    assert [a.name for a in arms] == ["ES", "BAL", "ES_SYN", "HB"]
    assert arm_defs.parse_comparisons(params) == [("HB", "ES"), ("BAL", "ES"), ("HB", "BAL"), ("ES_SYN", "ES")]
    for profile in ("real_cpu", "paper"):
        p = project_parameters(profile)["evaluation"]
        assert [a.name for a in arm_defs.parse_arms(p)] == ["ES", "BAL", "ES_SYN", "HB"], profile
        assert arm_defs.parse_comparisons(p) == arm_defs.parse_comparisons(params)
    data = _phantom_data(replicates=3)
    plan = nodes.plan_experiments(data, _params(), seed=0)
    by_arm = {a: [r for r in plan if r["experiment"] == a] for a in ("ES", "BAL", "ES_SYN", "HB")}
    assert [len(v) for v in by_arm.values()] == [2, 2, 6, 6]  # real-only once per seed; else per replicate x seed
    es, bal = by_arm["ES"][0], by_arm["BAL"][0]
    assert es["n_real"] == len(data["source_train"]) and bal["n_real"] < es["n_real"]
    assert len(set(bal["real_per_class"].values())) == 1  # balanced
    assert bal["real_per_class"]["abdomen"] == min(es["real_per_class"].values())  # as large as the smallest class allows
    assert {r["real_ids"] for r in by_arm["HB"]} == {bal["real_ids"]} and by_arm["ES_SYN"][0]["real_ids"] == es["real_ids"]
    src_counts = pd.Series(data["source_train"].meta["label"]).value_counts()
    assert src_counts.idxmax() == "other" and src_counts.idxmin() == "abdomen"


@pytest.mark.skipif(not SPLITS.is_dir(), reason="../shared/data/fu_lora_splits not present")
def test_paper_hb_real_images_are_the_authors_list_present_in_the_data(tmp_path):
    """conf/paper's HB (and BAL) real images: exactly the images of spain_train_1150_balanced.csv that
    the source train split has; the listed ones in source val are counted, never trained on."""
    ingestion = project_parameters("real_cpu")["ingestion"]
    ingestion["image_size"] = 64
    source, _ = read_source_images("fetal_planes_db", str(SHARED / "fetal_planes_db_sample"), 42, ingestion, CLASSES)
    source = split_source_by_patient(source, 42, ingestion)
    listed = set(pd.read_csv(SPLITS / "spain_train_1150_balanced.csv", encoding="utf-8-sig")["Image_name"])
    present = set(source.meta["image_id"]) & listed
    assert len(present) == 32  # 32 of the 100 sample images are on the authors' list
    target = generate_phantoms("target", n_per_class=1, image_size=64, seed=0)
    data = nodes.prepare_classifier_data(source, target, None, _params(), CLASSES)
    paper = copy.deepcopy(project_parameters("paper")["evaluation"])
    assert paper["arms"]["HB"]["real"] == paper["arms"]["BAL"]["real"] == {
        "csv": "data/01_raw/fu_lora_splits/spain_train_1150_balanced.csv"}
    paper["arms"]["HB"]["real"]["csv"] = paper["arms"]["BAL"]["real"]["csv"] = str(SPLITS / "spain_train_1150_balanced.csv")
    hb = next(a for a in arm_defs.parse_arms(paper) if a.name == "HB")
    pos, found = arm_defs.real_positions(hb, data["source_train"], 42, data["source_val"])
    hb_ids = set(data["source_train"].meta["image_id"].iloc[pos])
    in_train = present & set(data["source_train"].meta["image_id"])
    assert hb_ids == in_train and len(hb_ids) > 0
    assert found["csv_in_source_train"] + found["csv_in_source_val"] == 32 and found["csv_listed"] == 1150
    real_only = dict(paper, arms={k: v for k, v in paper["arms"].items() if k in ("ES", "BAL")},
                     comparisons=[["BAL", "ES"]], backbones=["resnet18"], weights={}, image_size=32, n_seeds=1)
    plan = nodes.plan_experiments(data, real_only, seed=42)
    bal = next(r for r in plan if r["experiment"] == "BAL")
    assert bal["n_real"] == len(in_train) and bal["real_found"]["csv_in_source_val"] == 32 - len(in_train)
    with pytest.raises(FileNotFoundError, match="evaluation.arms.HB.real: the image list nowhere.csv does not exist"):
        arm_defs.real_positions(arm_defs._arm("HB", ArmParams(real={"csv": "nowhere.csv"}, synthetic="all")),
                                data["source_train"], 42)


def test_es_syn_and_hb_train_on_the_same_synthetic_images_and_draws_follow_the_rule():
    """fixed_real: every arm draws real_per_batch real images a step; arms with the same real images
    draw each one equally often (and ES+SYN and HB get the very same synthetic images, per
    replicate and seed); the counts are in every classifier's history and info."""
    data = _phantom_data(replicates=2)
    params = _params(batching={"rule": "fixed_real", "real_per_batch": 8, "synthetic_per_batch": 6})
    plan = nodes.plan_experiments(data, params, seed=0)
    run = {(r["experiment"], r["replicate"], r["seed"]): r for r in plan}
    for rep in (0, 1):
        for seed in (0, 1):
            _, syn_a = nodes.arm_images(data, run[("ES_SYN", rep, seed)], params)
            _, syn_b = nodes.arm_images(data, run[("HB", rep, seed)], params)
            assert syn_a.meta["image_id"].tolist() == syn_b.meta["image_id"].tolist()
            assert set(syn_a.meta["replicate"]) == {rep}
    chosen = [run[k] for k in (("ES", -1, 0), ("BAL", -1, 0), ("ES_SYN", 1, 0), ("HB", 1, 0))]
    trained, history = nodes.train_experiments(data, chosen, params)
    counts = {r["experiment"]: trained[nodes.run_key(r)].info["real_draw_counts"] for r in chosen}
    assert counts["ES"] == counts["ES_SYN"]  # the same real images, drawn equally often
    assert counts["BAL"] == counts["HB"]
    steps, per_step = params["train"]["steps"], params["batching"]["real_per_batch"]
    assert {sum(c.values()) for c in counts.values()} == {steps * per_step}  # every arm: the same real draws
    last = history.groupby("run").last()
    assert set(last["real_draws"]) == {steps * per_step}
    assert last.loc[nodes.run_key(run[("ES", -1, 0)]), "synthetic_draws"] == 0
    assert last.loc[nodes.run_key(run[("HB", 1, 0)]), "synthetic_draws"] == steps * params["batching"]["synthetic_per_batch"]
    assert set(counts["HB"]) == set(data["source_train"].meta["image_id"].iloc[
        arm_defs.real_positions(arm_defs.parse_arms(params)[1], data["source_train"], 0)[0]])


def test_pooled_is_the_old_loop_and_fixed_real_keeps_the_real_stream():
    """pooled with no synthetic images draws what the loop always drew; under fixed_real the real
    part of every batch does not depend on the synthetic images beside it."""
    import torch

    from fu_kedro.classifiers.train import batch_indices

    real = _phantom_data()["source_train"]
    syn = _phantom_data(n_syn=3)["synthetic"]
    old = batch_indices(len(real), 16, torch.Generator().manual_seed(4))
    pooled = BatchStream(real, None, Batching("pooled"), 16, 4)
    for _ in range(5):
        idx = next(old)
        x, y = next(pooled)
        assert torch.equal(y, real.labels[idx])
    a = BatchStream(real, None, Batching("fixed_real", 8, 8), 16, 4)
    b = BatchStream(real, syn, Batching("fixed_real", 8, 8), 16, 4)
    for _ in range(5):
        xa, ya = next(a)
        xb, yb = next(b)
        assert torch.equal(xa, xb[:8]) and torch.equal(ya, yb[:8]) and len(yb) == 16
    assert (a.real_draws == b.real_draws).all() and b.synthetic_draws == 40
