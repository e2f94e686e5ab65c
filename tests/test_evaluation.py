"""The evaluation pipeline: bad input stops before training; a small run writes contract files whose
metrics can be recomputed from the predictions CSV; synthetic-quality measures on known cases."""
import copy
import json

import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
import yaml
from kedro.io import DataCatalog, MemoryDataset
from kedro.runner import SequentialRunner
from kedro_datasets.json import JSONDataset
from kedro_datasets.pandas import CSVDataset
from sklearn.metrics import accuracy_score, f1_score, recall_score
from conftest import base_params

from fu_kedro.data_sources import generate_phantoms
from fu_kedro.datasets import ImageSet
from fu_kedro.models.base_model import BaseModel
from fu_kedro.schema import ParameterError
from fu_kedro.models.diffusion import TINY_CONFIG, build_pipeline_from_config
from fu_kedro.pipelines.evaluation.pipeline import create_pipeline
from fu_kedro.pipelines.evaluation import nodes, quality

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
CLASSES = base_params("classes")  # the top-level class list of conf/base


def _params(**over):
    params = base_params("evaluation")
    params = copy.deepcopy(params)
    params.update(
        image_size=32, n_seeds=2,
        train={**params["train"], "steps": 6, "eval_every": 3, "batch_size": 32, "bn_recalibration_images": 64},
        metrics={"n_bootstrap": 20, "ci": 0.95},
        quality={**params["quality"], "max_points_per_class": 20},
        report={**params["report"], "samples_per_class": 2},
    )
    params.update(over)
    if "BAL" not in params["arms"]:  # arms without conf/base's scorer arm: the first real-only arm scores
        params["quality"] = {**params["quality"], "scorer_arm": None}
    return params


def _sets(n_src=8, n_tgt=4, n_syn=6):
    src = generate_phantoms("source", n_per_class=n_src, image_size=64, seed=1)
    pids = src.meta["patient_id"].unique()
    src.meta["split"] = np.where(src.meta["patient_id"].isin(pids[::4]), "val", "train")
    tgt = generate_phantoms("target", n_per_class=n_tgt, image_size=64, seed=2)
    syn = generate_phantoms("source", n_per_class=n_syn, image_size=64, seed=3)
    meta = pd.DataFrame({"image_id": "syn_" + syn.meta["image_id"], "label": syn.meta["label"],
                         "prompt": "a photo of fetal " + syn.meta["label"], "seed": np.arange(len(syn))})
    return src, tgt, ImageSet(syn.images, meta, {"adapter_sha256": "test"})


def test_time_cap_banner_names_each_stopped_loop_and_its_step():
    from fu_kedro.pipelines.evaluation.report import time_cap_banner

    assert time_cap_banner({}) == "" and time_cap_banner(None) == "" and time_cap_banner({"time_capped": {}}) == ""
    banner = time_cap_banner({"time_capped": {"base_denoiser": 120, "lora": 37}})
    assert "id='time-capped'" in banner and "not reproducible" in banner and "max_minutes" in banner
    assert "denoiser (UNet) (base_denoiser) stopped at step 120" in banner and "(lora) stopped at step 37" in banner


def test_report_templates_are_package_data_and_escape_what_they_are_given():
    """The report's jinja2 templates ship with the package (a non-editable install has them too),
    and a value reaching a template is HTML-escaped unless it is HTML made by the report itself."""
    import fnmatch
    import tomllib

    from fu_kedro.pipelines.evaluation import report

    folder = ROOT / "src/fu_kedro/pipelines/evaluation/templates"
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"][
        "fu_kedro.pipelines.evaluation"]
    files = sorted(p.relative_to(folder.parent).as_posix() for p in folder.iterdir())
    assert {"templates/page.html.j2", "templates/parts.html.j2", "templates/report.html.j2"} <= set(files)
    assert all(any(fnmatch.fnmatch(f, pat) for pat in patterns) for f in files), (files, patterns)
    banner = report.lineage_mix_banner({"made_from": {"run": {"lineage_mismatch": [{"text": "<script>x</script>"}]}}})
    page = report.render_html([("a <b>", "<p>body</p>")], "t & u", banner)
    assert "&lt;script&gt;" in banner and "<script>" not in page
    assert "<h2>a &lt;b&gt;</h2>\n<p>body</p>" in page and "<title>t &amp; u</title>" in page


# ----------------------------------------------------------------------------- bad input
def test_target_label_outside_source_space_stops_before_training():
    src, tgt, syn = _sets(n_src=2, n_tgt=2, n_syn=1)
    tgt.meta.loc[0, "label"] = "cervix"
    with pytest.raises(ValueError, match=r"target_images: labels \['cervix'\] are outside"):
        nodes.prepare_classifier_data(src, tgt, syn, _params(), CLASSES)


def test_hybrid_without_synthetic_images_is_refused():
    src, tgt, syn = _sets(n_src=2, n_tgt=2, n_syn=1)
    empty = syn.select(np.zeros(len(syn), bool))
    data = nodes.prepare_classifier_data(src, tgt, empty, _params(), CLASSES)
    with pytest.raises(ValueError, match=r"arms \['ES_SYN', 'HB'\] need synthetic images"):
        nodes.plan_experiments(data, _params(), seed=0)
    real_only = _params(arms={"ES": {"real": "all", "synthetic": "none"}}, comparisons=[])
    assert len(nodes.plan_experiments(data, real_only, seed=0)) == 2


def test_unknown_backbone_and_mismatched_weights_are_refused(tmp_path):
    src, tgt, syn = _sets(n_src=2, n_tgt=2, n_syn=1)
    data = nodes.prepare_classifier_data(src, tgt, syn, _params(), CLASSES)
    with pytest.raises(ValueError, match="'resnet_18' is not a torchvision classification model"):
        nodes.plan_experiments(data, _params(backbones=["resnet_18"]), seed=0)
    path = tmp_path / "shufflenet.pth"
    torch.save(torchvision.models.shufflenet_v2_x0_5().state_dict(), path)
    with pytest.raises(ValueError, match="does not match backbone 'resnet18'"):
        nodes.plan_experiments(data, _params(weights={"resnet18": str(path)}), seed=0)


def test_source_without_validation_patients_is_refused():
    src, tgt, syn = _sets(n_src=2, n_tgt=2, n_syn=1)
    src.meta["split"] = "train"
    with pytest.raises(ValueError, match="no 'val' images"):
        nodes.prepare_classifier_data(src, tgt, syn, _params(), CLASSES)


def test_synthetic_ratio_sweep_draws_stratified_subsets():
    src, tgt, syn = _sets(n_src=8, n_tgt=2, n_syn=6)
    data = nodes.prepare_classifier_data(src, tgt, syn, _params(), CLASSES)
    ratio = {"ES": {"real": "all", "synthetic": "none"}, "ES_half": {"real": "all", "synthetic": {"ratio": 0.5}}}
    params = _params(arms=ratio, comparisons=None, n_seeds=1)
    plan = nodes.plan_experiments(data, params, seed=3)
    run = [r for r in plan if r["experiment"] == "ES_half"][0]
    assert run["n_synthetic"] == round(0.5 * len(data["source_train"]))
    train = nodes.training_set(data, run, params)
    assert len(train) == run["n_real"] + run["n_synthetic"]
    counts = train.meta.iloc[run["n_real"]:]["label"].value_counts()
    assert counts.max() - counts.min() <= 1  # synthetic_class_mix: uniform
    with pytest.raises(ValueError, match=r"ES_x5.synthetic \(5 x the arm's real images, uniform class mix\) needs"):
        nodes.plan_experiments(data, _params(arms={**ratio, "ES_x5": {"real": "all", "synthetic": {"ratio": 5}}},
                                             comparisons=None), seed=0)
    with pytest.raises(ParameterError, match=r"evaluation\.training_sets: unknown key in evaluation; allowed keys: "
                                             "image_size, arms"):  # the old key (CHANGELOG.md): arms now
        nodes.prepare_classifier_data(src, tgt, syn, _params(training_sets=["baseline"]), CLASSES)


def test_plan_names_the_lora_fit_of_each_hybrid_replicate():
    src, tgt, syn = _sets(n_src=2, n_tgt=2, n_syn=2)
    half = len(syn) // 2
    syn.meta["replicate"] = [0] * half + [1] * (len(syn) - half)
    off = nodes.plan_experiments(nodes.prepare_classifier_data(src, tgt, syn, _params(), CLASSES), _params(n_seeds=1), seed=0)
    assert not any("adapter_fit" in run for run in off)  # synthesis.adapter_per_replicate: false
    syn.meta["adapter_fit"] = syn.meta["replicate"]
    syn.meta["adapter_content_hash"] = np.where(syn.meta["replicate"] == 0, "fit0hash", "fit1hash")
    plan = nodes.plan_experiments(nodes.prepare_classifier_data(src, tgt, syn, _params(), CLASSES), _params(n_seeds=1), seed=0)
    hybrid = {run["replicate"]: (run["adapter_fit"], run["adapter_content_hash"]) for run in plan if run["replicate"] >= 0}
    assert hybrid == {0: (0, "fit0hash"), 1: (1, "fit1hash")}
    assert all("adapter_fit" not in run for run in plan if run["replicate"] < 0)  # the baseline has no adapter


# ----------------------------------------------------------------------------- quality measures
def test_fidelity_is_per_class_recall_of_prompted_labels():
    prompted = np.array(["brain", "brain", "femur", "femur", "femur", "other"], object)
    predicted = np.array(["brain", "femur", "femur", "femur", "thorax", "brain"], object)
    fid = quality.fidelity(prompted, predicted, CLASSES)
    assert fid["overall"] == pytest.approx(accuracy_score(prompted, predicted))
    present = ["brain", "femur", "other"]
    recalls = recall_score(prompted, predicted, labels=present, average=None)
    assert [fid["per_class"][c] for c in present] == pytest.approx(list(recalls))
    assert "abdomen" not in fid["per_class"]


def test_memorisation_check_flags_copies_only():
    rng = np.random.default_rng(0)
    real = rng.integers(0, 255, (10, 16, 16)).astype(np.uint8)
    copy_of_3 = np.clip(real[3].astype(float) * 0.8 + 20, 0, 255).astype(np.uint8)  # brightness/contrast change
    fresh = rng.integers(0, 255, (2, 16, 16)).astype(np.uint8)
    sim, idx = quality.nearest_real_similarity(np.stack([copy_of_3, *fresh]), real)
    assert sim[0] > 0.99 and idx[0] == 3
    assert (sim[1:] < 0.5).all()


def test_frechet_distance_equals_the_matrix_square_root_formula():
    import warnings

    from scipy import linalg

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(60, 32)), rng.normal(size=(50, 32)) * 1.5 + 0.3
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    mu = a.mean(0) - b.mean(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        covmean = np.real(linalg.sqrtm(sa @ sb))
    expected = mu @ mu + np.trace(sa) + np.trace(sb) - 2 * np.trace(covmean)
    assert quality.frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_grows_with_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 4)), rng.normal(size=(200, 4))
    assert quality.frechet_distance(a, b) < quality.frechet_distance(a, b + 2.0)
    assert quality.frechet_distance(a, b + 2.0) == pytest.approx(16.0, rel=0.2)


# ----------------------------------------------------------------------------- whole pipeline
@pytest.mark.slow
def test_pipeline_writes_contract_files_and_metrics_recompute_from_csv(tmp_path):
    src, tgt, syn = _sets()
    # as synthesis records it when a wall-clock cap (max_minutes) stopped the LoRA loop at step 37
    syn.info["time_capped"] = {"lora": 37}
    params = _params()
    catalog_conf = yaml.safe_load((ROOT / "conf/base/catalog_evaluation.yml").read_text())
    csv_conf = catalog_conf["zero_shot_predictions"]
    csv = CSVDataset(filepath=str(tmp_path / "zero_shot_predictions.csv"),
                     save_args=csv_conf["save_args"], load_args=csv_conf["load_args"])
    catalog = DataCatalog(
        {
            "source_images": MemoryDataset(src), "target_images": MemoryDataset(tgt),
            "synthetic_batch": MemoryDataset(syn), "params:evaluation": MemoryDataset(params),
            "params:seed": MemoryDataset(11), "params:classes": MemoryDataset(CLASSES), "zero_shot_predictions": csv,
            "zero_shot_metrics": JSONDataset(filepath=str(tmp_path / "zero_shot_metrics.json")),
            "synthetic_quality": JSONDataset(filepath=str(tmp_path / "synthetic_quality.json")),
            "evaluation_plan": JSONDataset(filepath=str(tmp_path / "evaluation_plan.json")),
            "classifier_training_history": CSVDataset(filepath=str(tmp_path / "history.csv")),
            # an untrained tiny base: its VAE's round trips are the memorisation check's second positive control
            "base_model": MemoryDataset(BaseModel(build_pipeline_from_config(TINY_CONFIG, 32, 0), {"kind": "tiny"})),
        }
    )
    pipeline = create_pipeline()
    outputs = SequentialRunner().run(pipeline, catalog)
    # the metrics node reads the CSV back, so JSON == f(CSV) by construction; check it independently too
    pred = csv.load()
    expected_cols = ["experiment", "backbone", "augmentation", "seed", "image_id", "patient_id", "center",
                     "label", "prediction"] + [f"prob_{c}" for c in CLASSES]
    # contract columns first, in order; added columns after them
    assert list(pred.columns)[: len(expected_cols)] == expected_cols
    assert list(pred.columns)[len(expected_cols):] == ["replicate"]
    assert set(pred["experiment"]) == {"ES", "BAL", "ES_SYN", "HB"}  # conf/base's four arms
    assert len(pred) == 4 * 2 * len(tgt)
    assert set(pred.loc[pred["experiment"].isin(["ES", "BAL"]), "replicate"]) == {-1}

    metrics = json.loads((tmp_path / "zero_shot_metrics.json").read_text())
    plan = json.loads((tmp_path / "evaluation_plan.json").read_text())
    # every figure in the JSON, intervals included, follows from the CSV (and the seed)
    assert nodes.compute_zero_shot_metrics(pred, plan, params, CLASSES, 11) == metrics
    target_classes = metrics["target_classes"]
    for (exp, seed), f in pred.groupby(["experiment", "seed"]):
        got = metrics["experiments"][f"{exp}/resnet18/aug"]["all_classes"]["per_seed"][str(seed)]
        assert got["accuracy"] == pytest.approx(accuracy_score(f["label"], f["prediction"]))
        assert got["f1_macro"] == pytest.approx(
            f1_score(f["label"], f["prediction"], labels=target_classes, average="macro", zero_division=0))
        argmax = f[[f"prob_{c}" for c in CLASSES]].to_numpy().argmax(1)
        assert (np.asarray(CLASSES)[argmax] == f["prediction"].to_numpy()).all()
    assert list(metrics["differences"]) == [f"{a}/resnet18/aug - {b}/resnet18/aug"
                                            for a, b in (("HB", "ES"), ("BAL", "ES"), ("HB", "BAL"), ("ES_SYN", "ES"))]
    diff = metrics["differences"]["HB/resnet18/aug - ES/resnet18/aug"]["all_classes"]["accuracy"]
    assert set(diff) >= {"mean", "ci", "per_seed", "paired_test", "variance_components", "ci_test_patients_only"}
    # the decomposition holds exactly for the means: HB - ES = (BAL - ES) + (HB - BAL)
    d = {k.split(" - ")[0].split("/")[0] + "-" + k.split(" - ")[1].split("/")[0]: v["all_classes"]["accuracy"]["mean"]
         for k, v in metrics["differences"].items()}
    assert d["HB-ES"] == pytest.approx(d["BAL-ES"] + d["HB-BAL"])
    centers = metrics["differences"]["HB/resnet18/aug - ES/resnet18/aug"]["per_center"]
    assert set(centers) == set(tgt.meta["center"]) and all(len(c["accuracy"]["ci"]) == 2 for c in centers.values())
    assert metrics["experiments"]["ES/resnet18/aug"]["n_seeds"] == 2
    assert set(metrics["reference"]) == {"majority", "uniform"}
    assert "this one synthetic batch" in metrics["bootstrap"]["conditional_on"]  # one replicate
    # every arm had the same schedule, recorded in the plan
    assert {r["steps"] for r in plan} == {6}
    # fixed_real: up to real_per_batch real images a step in every arm, + synthetic_per_batch in synthetic arms
    batching = params["batching"]
    assert all(r["batch_size"] == min(batching["real_per_batch"], r["n_real"])
               + (min(batching["synthetic_per_batch"], r["n_synthetic"]) if r["n_synthetic"] else 0) for r in plan)
    assert all(r["torch_threads"] == params["torch_threads"] for r in plan)

    quality_json = json.loads((tmp_path / "synthetic_quality.json").read_text())
    for key in ("fidelity", "cas_accuracy", "n_images", "feature_space", "per_class", "fidelity_reference",
                "cas_reference", "gate", "fidelity_ci", "cas_accuracy_ci", "kid_to_real_train"):
        assert key in quality_json
    assert quality_json["memorisation"]["controls"]["positive_flagged"] == 1.0
    vae_control = quality_json["memorisation"]["controls"]["vae_round_trips"]
    assert vae_control["n"] == min(params["quality"]["memorisation_controls"], (src.meta["split"] == "train").sum())
    assert 0.0 <= vae_control["flagged"] <= 1.0 and -1.0 <= vae_control["similarity_min"] <= 1.0
    assert 0.0 <= quality_json["fidelity"] <= 1.0 and quality_json["n_images"] == len(syn)

    report = outputs["evaluation_report"].load()
    assert "Zero-shot comparison" in report and "data:image/png;base64," in report
    assert report.index("The decomposition") < report.index("The question and the answer")
    assert "HB − ES = (BAL − ES) + (HB − BAL)" in report and "ES+SYN − ES" in report
    assert "nothing ran on a GPU" not in report and "What ran where" in report
    # the gate: the banner is there exactly when fidelity is below the threshold (the report's own numbers)
    assert ("id='low-fidelity'" in report) == (quality_json["fidelity"] < params["min_fidelity"])
    assert quality_json["gate"]["status"] == ("failed" if quality_json["fidelity"] < params["min_fidelity"] else "passed")
    assert report.index("The question and the answer") < report.index("Zero-shot comparison")
    # a capped training loop behind the batch: the report says the result is not reproducible, which loop, which step
    assert "id='time-capped'" in report and "not reproducible" in report
    assert "the LoRA adapter (lora) stopped at step 37" in report
    history = catalog.load("classifier_training_history")
    assert set(history.groupby("run")["step"].max()) == {6}  # every run, both arms, 6 optimiser steps
    # the curves go to MLflow through the catalog: <run with dots>.<metric>, step = optimiser step
    curves = outputs["classifier_curve_metrics"].load()
    for run, hist in history.groupby("run"):
        points = curves[f"{run.replace('/', '.')}.val_accuracy"]
        assert [p["step"] for p in points] == hist["step"].tolist()
        assert [p["value"] for p in points] == pytest.approx(hist["val_accuracy"].tolist())
    assert {k.rsplit(".", 1)[1] for k in curves} == {"train_loss", "train_accuracy", "val_loss", "val_accuracy"}
    assert any(k.startswith("cas.synthetic_only.seed") for k in curves)
    for name in ("evaluation_confusion_matrices", "evaluation_training_curves", "evaluation_sample_grid",
                 "synthetic_embedding_plot", "evaluation_per_center"):
        assert outputs[name].load().axes, name


def test_classifier_curves_reach_mlflow_under_their_run_names(tmp_path):
    """The catalog entry logs ``<run>.<metric>`` as the training loop used to; kedro-mlflow puts the
    entry's name before metric names only when ``prefix`` is unset (None), so it is set to ""."""
    import mlflow
    from kedro.io import DataCatalog

    conf = yaml.safe_load((ROOT / "conf/base/catalog_evaluation.yml").read_text())["classifier_curve_metrics"]
    assert conf["prefix"] == ""
    dataset = DataCatalog.from_config({"classifier_curve_metrics": conf}).get("classifier_curve_metrics")
    history = pd.DataFrame({"run": "baseline/resnet18/aug/seed42", "step": [2, 4], "train_loss": [1.5, 1.0],
                            "train_accuracy": [0.5, 0.75], "val_loss": [1.2, 0.9], "val_accuracy": [0.4, 0.6]})
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlflow.db")
    try:
        # a run made by the client in its own experiment: the fluent API's cached active
        # experiment (left by an earlier test in this process, in another store) is not used
        client = mlflow.tracking.MlflowClient()
        made = client.create_run(client.create_experiment("classifier-curves"))
        with mlflow.start_run(run_id=made.info.run_id) as run:
            dataset.save(nodes.classifier_curve_metrics(history, None))
        points = client.get_metric_history(run.info.run_id, "baseline.resnet18.aug.seed42.val_accuracy")
        assert [(p.step, p.value) for p in points] == [(2, 0.4), (4, 0.6)]
        assert len(client.get_run(run.info.run_id).data.metrics) == 4
    finally:
        mlflow.set_tracking_uri(None)
