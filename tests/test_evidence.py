"""Issue #11's evidence: the hierarchical bootstrap against brute force, the paired test, the copy
check with its controls, and the quality gate (issue #10) on a batch that is not class-faithful."""
import itertools

import numpy as np
import pandas as pd
import pytest
import torch
from scipy import stats
from torch import nn

from fu_kedro.classifiers import TrainedClassifier, prepare_tensors
from fu_kedro.data_sources import generate_phantoms
from fu_kedro.datasets import ImageSet
from fu_kedro.pipelines.evaluation import nodes, quality, report
from fu_kedro.pipelines.evaluation.bootstrap import hierarchical_resample
from fu_kedro.pipelines.evaluation.metrics import (
    design_variance,
    detectable_difference,
    paired_seed_test,
    power_plan,
    replicates_needed,
    seeds_needed,
    t_interval,
    variance_components,
)

from test_evaluation import CLASSES, _params, _sets


# ----------------------------------------------------------------------------- hierarchical bootstrap
def _brute_force(a: np.ndarray, b: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """Every equally likely outcome of the resampling scheme, enumerated: a patient draw, K
    replicates with replacement, S seeds with replacement within each; returns (values, weights)."""
    n_draws, k, s = a.shape
    values = []
    seed_tuples = list(itertools.product(range(s), repeat=s))
    for draw in range(n_draws):
        for reps in itertools.product(range(k), repeat=k):
            for seeds in itertools.product(seed_tuples, repeat=k):
                cells = [a[draw, r, sd] - (b[draw, sd] if b is not None else 0.0)
                         for r, ss in zip(reps, seeds) for sd in ss]
                values.append(np.mean(cells))
    values = np.asarray(values)
    return values, np.full(len(values), 1.0 / len(values))


@pytest.mark.parametrize("paired", [True, False])
def test_hierarchical_bootstrap_matches_brute_force_enumeration(paired):
    # synthetic per-seed scores: 3 patient draws, 2 replicates, 2 seeds, with a replicate effect,
    # a seed effect shared by the arms (what pairing removes) and patient-draw noise
    rng = np.random.default_rng(0)
    seed_effect = np.array([0.05, -0.05])
    a = 0.6 + np.array([0.03, -0.02])[None, :, None] + seed_effect[None, None, :] + rng.normal(0, 0.01, (3, 2, 2))
    b = 0.55 + seed_effect[None, :] + rng.normal(0, 0.01, (3, 2))
    exact, weights = _brute_force(a, b if paired else None)
    boot = hierarchical_resample(a, b if paired else None, 60_000, np.random.default_rng(1))
    assert boot.mean() == pytest.approx(np.average(exact, weights=weights), abs=2e-4)
    assert boot.std() == pytest.approx(np.sqrt(np.average((exact - exact.mean()) ** 2, weights=weights)), rel=0.02)
    # the whole distribution: the bootstrap's CDF is the enumerated one's (Kolmogorov distance)
    grid = np.unique(exact)
    cdf_exact = np.array([weights[exact <= x].sum() for x in grid])
    cdf_boot = np.searchsorted(np.sort(boot), grid, side="right") / len(boot)
    assert np.abs(cdf_boot - cdf_exact).max() < 0.01
    if paired:
        # pairing by seed cancels the shared seed effect: the paired spread is far below the unpaired one
        unpaired = hierarchical_resample(a, None, 20_000, np.random.default_rng(2)) - hierarchical_resample(
            b[:, None, :], None, 20_000, np.random.default_rng(3))
        assert boot.std() < 0.5 * unpaired.std()


def test_interval_widens_with_seed_variance():
    # the same patient-level noise, more seed-to-seed spread: the hierarchical interval must widen,
    # the patients-only interval (models fixed) cannot see it
    rng = np.random.default_rng(4)
    patients = rng.normal(0, 0.01, (200, 1, 1))
    narrow = 0.6 + patients + rng.normal(0, 0.005, (1, 1, 5))
    wide = 0.6 + patients + np.array([-0.1, -0.05, 0.0, 0.05, 0.1])[None, None, :]
    base = np.full((200, 5), 0.55)
    width = lambda x: np.ptp(np.quantile(hierarchical_resample(x, base, 4000, np.random.default_rng(5)), [0.025, 0.975]))  # noqa: E731
    patients_only = np.ptp(np.quantile(wide.mean(axis=(1, 2)) - base.mean(axis=1), [0.025, 0.975]))
    assert width(wide) > 2.5 * width(narrow) and width(wide) > 2.5 * patients_only
    comps = variance_components(wide, base)
    assert comps["seed_within_replicate"] == pytest.approx(np.std([-0.1, -0.05, 0, 0.05, 0.1], ddof=1), rel=0.05)
    assert comps["replicate"] is None and comps["S"] == 5


def test_paired_test_is_scipys_paired_t_test():
    hybrid = {"42": 0.70, "43": 0.61, "44": 0.66, "45": 0.72, "46": 0.58}
    base = {"42": 0.62, "43": 0.60, "44": 0.61, "45": 0.63, "46": 0.60}
    out = paired_seed_test({s: hybrid[s] - base[s] for s in hybrid})
    ref = stats.ttest_rel(list(hybrid.values()), list(base.values()))
    assert out["t_test"]["p_value"] == pytest.approx(ref.pvalue)
    assert out["n_seeds"] == 5 and out["n_positive"] == 4
    assert out["wilcoxon"]["smallest_possible_p"] == pytest.approx(2 / 32)


def test_wilcoxon_floor_counts_only_the_non_zero_differences():
    # scipy drops zero differences before ranking, so four non-zero of five seeds floor at 2 / 2**4
    out = paired_seed_test({"42": 0.05, "43": 0.0, "44": 0.03, "45": 0.02, "46": 0.04})
    assert out["n_nonzero"] == out["wilcoxon"]["n_nonzero"] == 4
    assert out["wilcoxon"]["smallest_possible_p"] == pytest.approx(2 / 16)
    assert out["wilcoxon"]["p_value"] == pytest.approx(out["wilcoxon"]["smallest_possible_p"])  # all four positive
    assert paired_seed_test({"42": 0.0, "43": 0.0})["wilcoxon"] is None


def test_t_interval_with_one_replicate_is_the_paired_t_interval():
    # one replicate, the same value on every patient draw (no patient term): the interval is scipy's
    # one-sample t interval of the five per-seed differences; the percentile bootstrap is narrower
    d = np.array([0.08, 0.01, 0.05, 0.09, -0.02])
    a, b = np.repeat((0.6 + d)[None, None, :], 4, axis=0), np.full((4, 5), 0.6)
    out = t_interval(float(d.mean()), variance_components(a, b), 0.95)
    ref = stats.ttest_1samp(d, 0.0).confidence_interval(0.95)
    assert out["ci"] == pytest.approx([ref.low, ref.high]) and out["df"] == pytest.approx(4)
    boot = np.quantile(hierarchical_resample(a, b, 20_000, np.random.default_rng(0)), [0.025, 0.975])
    assert np.ptp(boot) < 0.8 * (ref.high - ref.low)


def test_variance_components_separate_seed_and_replicate_effects():
    # an additive table (no cell noise): the ANOVA gives the replicate effects' sd exactly and no residual
    seed_effect, rep_effect = np.array([0.04, -0.02, 0.0, 0.03, -0.05]), np.array([0.02, -0.01, -0.01])
    a = (0.6 + rep_effect[:, None] + seed_effect[None, :])[None].repeat(3, axis=0)
    comps = variance_components(a, np.full((3, 5), 0.6))
    assert comps["replicate"] == pytest.approx(np.std(rep_effect, ddof=1))
    assert comps["seed"] == pytest.approx(np.std(seed_effect, ddof=1)) == pytest.approx(comps["seed_shared"])
    assert comps["seed_x_replicate"] == pytest.approx(0.0, abs=1e-12) and comps["patients"] == pytest.approx(0.0)
    var, df = design_variance(comps)
    assert var == pytest.approx(np.var(seed_effect, ddof=1) / 5 + np.var(rep_effect, ddof=1) / 3)
    assert 2 <= df <= 4 + 2  # Welch-Satterthwaite between the replicate (2) and seed (4) degrees of freedom


def test_t_interval_covers_seeds_replicates_and_patients_and_the_percentile_bootstrap_does_not():
    # 400 simulated runs at K = 3 replicates x S = 5 seeds, true difference 0: a seed effect shared
    # by the replicates, a replicate effect, cell noise, and the test patients' sampling error (one
    # error on the estimate, the bootstrap's patient draws spread around it)
    rng = np.random.default_rng(7)
    hits_t = hits_boot = 0
    for _ in range(400):
        cells = rng.normal(0, 0.04, 5)[None, :] + rng.normal(0, 0.02, 3)[:, None] + rng.normal(0, 0.03, (3, 5))
        a = 0.6 + cells[None] + rng.normal(0, 0.015) + rng.normal(0, 0.015, (60, 1, 1))
        b = np.full((60, 5), 0.6)
        ci = t_interval(float(a.mean() - 0.6), variance_components(a, b), 0.95)["ci"]
        hits_t += ci[0] <= 0 <= ci[1]
        lo, hi = np.quantile(hierarchical_resample(a, b, 200, rng), [0.025, 0.975])
        hits_boot += lo <= 0 <= hi
    # nominal 95 %: 0.92 is 2.5 binomial standard errors below it at 400 runs
    assert hits_t / 400 >= 0.92 and hits_boot / 400 < 0.88


def test_power_plan_follows_the_t_test_power_formula():
    # one replicate: detectable = (t(0.975, df) + t(0.8, df)) * sqrt(seed**2 / S + patients**2), with
    # Satterthwaite's df = Var**2 / ((seed**2 / S)**2 / (S - 1)) (the patient term counts as known)
    comps = {"seed": 0.08, "replicate": None, "seed_x_replicate": None, "seed_shared": None, "patients": 0.01,
             "K": 1, "S": 5}
    t = lambda df: stats.t.ppf(0.975, df) + stats.t.ppf(0.8, df)  # noqa: E731
    var = 0.08 ** 2 / 5 + 0.01 ** 2
    assert design_variance(comps) == pytest.approx((var, var ** 2 / ((0.08 ** 2 / 5) ** 2 / 4)))
    plan = power_plan(comps)
    assert plan["detectable_difference"] == pytest.approx(t(var ** 2 / ((0.08 ** 2 / 5) ** 2 / 4)) * np.sqrt(var))
    n = plan["seeds_needed"]
    assert detectable_difference(comps, seeds=n) <= 0.05 < detectable_difference(comps, seeds=n - 1)
    assert plan["replicates_needed"] is None  # one replicate: the replicate term was never measured
    assert seeds_needed({**comps, "patients": 0.03}) is None  # the patient term alone is too large
    # replicates measured: more replicates shrink the cell noise, not the shared seed effect
    crossed = {"seed": 0.05, "replicate": 0.01, "seed_x_replicate": 0.08, "seed_shared": 0.02, "patients": 0.005,
               "K": 2, "S": 5}
    k = replicates_needed(crossed)
    assert k is not None and detectable_difference(crossed, replicates=k) <= 0.05
    assert detectable_difference(crossed, replicates=k - 1) > 0.05


# ----------------------------------------------------------------------------- memorisation
def test_training_images_slipped_into_a_batch_are_flagged_and_real_val_images_are_not():
    src, tgt, syn = _sets(n_src=8, n_tgt=2, n_syn=6)
    # the generator's resolution: synthetic images at 32 px (phantoms at a seed no real image has)
    syn_small = generate_phantoms("source", 6, 32, seed=3)
    train_mask = (src.meta["split"] == "train").to_numpy()
    train_ids = src.meta.loc[train_mask, "image_id"].to_numpy()
    # three training images "reproduced" by the generator: resized to its resolution like its output
    slipped_idx = [0, 5, 11]
    resized = prepare_tensors(src.select(train_mask), CLASSES, 32, "train").images[:, 0].numpy()
    images = np.concatenate([syn_small.images, resized[slipped_idx]])
    meta = pd.DataFrame({"image_id": [f"syn_{i}" for i in range(len(images))],
                         "label": list(syn_small.meta["label"]) + list(src.meta.loc[train_mask, "label"].iloc[slipped_idx])})
    batch = ImageSet(images, meta, {})
    data = nodes.prepare_classifier_data(src, tgt, batch, classes=CLASSES, params=_params())
    mem = data["memorisation_images"]
    assert mem["synthetic"].shape[-1] == mem["source_train"].shape[-1] == 32  # the generator's resolution
    check = quality.memorisation_check(mem["synthetic"], mem["source_train"], mem["source_val"], 10, seed=0)
    flagged = np.flatnonzero(check["flagged"])
    n_fresh = len(syn_small)
    assert set(flagged) >= {n_fresh, n_fresh + 1, n_fresh + 2}  # every slipped-in copy
    assert list(train_ids[check["nearest"][[n_fresh, n_fresh + 1, n_fresh + 2]]]) == list(train_ids[slipped_idx])
    controls = check["controls"]
    assert controls["positive_flagged"] == 1.0 and controls["negative_flagged"] == 0.0 and controls["separable"]
    assert controls["negative_max"] < check["threshold"] <= controls["positive_min"]
    # real validation images (other patients) put through the same check are not flagged
    val_check = quality.memorisation_check(mem["source_val"], mem["source_train"], mem["source_val"], 10, seed=0)
    assert not val_check["flagged"].any()


def _trained_tiny_vae(steps: int = 100):
    """The tiny base's VAE architecture trained briefly (~15 s) on phantoms of other patients
    (a stand-in for the prior corpus: it never saw the source images)."""
    from fu_kedro.models.diffusion import TINY_CONFIG, build_pipeline_from_config
    from fu_kedro.models.training import LoopConfig, to_model_range, train_autoencoder

    torch.set_num_threads(1)
    prior = generate_phantoms("source", n_per_class=10, image_size=32, seed=7)
    vae = build_pipeline_from_config(TINY_CONFIG, 32, 0).vae
    train_autoencoder(vae, to_model_range(prior.images),
                      LoopConfig(max_steps=steps, batch_size=8, learning_rate=3e-3, seed=0), kl_weight=1e-6)
    return vae.eval()


def test_vae_round_trips_of_training_images_are_flagged_and_real_val_images_are_not():
    """The positive control a decoder-made copy needs: training images through the base model's
    own VAE must be flagged (in its decoder space), real validation images of other patients not."""
    from types import SimpleNamespace

    src, tgt, syn = _sets(n_src=8, n_tgt=2, n_syn=1)
    fresh = generate_phantoms("source", 4, 32, seed=3)  # the generator's resolution: 32 px
    vae = _trained_tiny_vae()
    base_model = SimpleNamespace(pipe=SimpleNamespace(vae=vae))
    train_mask = (src.meta["split"] == "train").to_numpy()
    train_ids = src.meta.loc[train_mask, "image_id"].to_numpy()
    train32 = prepare_tensors(src.select(train_mask), CLASSES, 32, "train").images[:, 0].numpy()
    # a batch in which the generator reproduced three training images through its decoder
    copied = [0, 5, 11]
    images = np.concatenate([fresh.images, quality.vae_project(vae, train32[copied])])
    labels = list(fresh.meta["label"]) + list(src.meta.loc[train_mask, "label"].iloc[copied])
    batch = ImageSet(images, pd.DataFrame({"image_id": [f"syn_{i}" for i in range(len(images))], "label": labels}), {})
    data = nodes.prepare_classifier_data(src, tgt, batch, classes=CLASSES, params=_params())
    mem = data["memorisation_images"]
    vae_controls = nodes.make_vae_round_trip_controls(base_model, data, _params(), 0)
    check = quality.memorisation_check(mem["synthetic"], mem["source_train"], mem["source_val"], 20, seed=0,
                                       vae_controls=vae_controls)
    assert check["space"] == "decoder"
    controls = check["controls"]
    round_trips = controls["vae_round_trips"]
    assert round_trips["n"] == 20 and round_trips["flagged"] == 1.0 and round_trips["nearest_is_source"] == 1.0
    assert controls["slipped_copies"]["flagged"] == 1.0 and controls["negative_flagged"] == 0.0
    assert controls["separable"] and controls["negative_max"] < check["threshold"] <= controls["positive_min"]
    assert controls["positive_min"] == min(round_trips["similarity_min"], controls["slipped_copies"]["similarity_min"])
    # the decoder-made copies in the batch are flagged, each with its source image
    n_fresh = len(fresh)
    assert check["flagged"][n_fresh:].all()
    assert list(train_ids[check["nearest"][n_fresh:]]) == list(train_ids[copied])
    # the pixel-space check on the same controls is recorded beside it
    assert controls["pixel_space"]["vae_round_trips"]["n"] == 20
    # real validation images (other patients) as the batch, through the same path: none flagged
    val_controls = quality.decoder_space_images(vae, mem | {"synthetic": mem["source_val"]}, 20, 0)
    val_check = quality.memorisation_check(mem["source_val"], mem["source_train"], mem["source_val"], 20, seed=0,
                                           vae_controls=val_controls)
    assert not val_check["flagged"].any()
    # controls made for other slipped-in images are refused
    with pytest.raises(ValueError, match="other slipped-in controls"):
        quality.memorisation_check(mem["synthetic"], mem["source_train"], mem["source_val"], 20, seed=1,
                                   vae_controls=vae_controls)


def test_memorisation_space_pixels_skips_the_vae_and_other_spaces_are_refused():
    src, tgt, syn = _sets(n_src=2, n_tgt=2, n_syn=1)
    params = _params(quality={**_params()["quality"], "memorisation_space": "pixels"})
    data = nodes.prepare_classifier_data(src, tgt, syn, classes=CLASSES, params=params)
    assert nodes.make_vae_round_trip_controls(None, data, params, 0) == {}  # no base model touched
    mem = data["memorisation_images"]
    check = quality.memorisation_check(mem["synthetic"], mem["source_train"], mem["source_val"], 4, 0, vae_controls={})
    assert check["space"] == "pixels" and check["controls"]["vae_round_trips"].startswith("not run")
    with pytest.raises(ValueError, match=r"evaluation\.quality\.memorisation_space: 'latent' in evaluation\.quality; "
                                         "allowed values: 'decoder' or 'pixels'"):
        nodes.prepare_classifier_data(src, tgt, syn, classes=CLASSES, params=_params(quality={**_params()["quality"],
                                                                      "memorisation_space": "latent"}))


def test_kid_is_near_zero_for_one_distribution_and_grows_with_shift():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(150, 8)), rng.normal(size=(150, 8))
    same = quality.kernel_inception_distance(a, b, subset_size=100, seed=0)["mean"]
    shifted = quality.kernel_inception_distance(a, b + 1.0, subset_size=100, seed=0)["mean"]
    assert abs(same) < 0.05 < shifted


# ----------------------------------------------------------------------------- quality gate
class _Constant(nn.Module):
    """A 'classifier' that answers one class whatever the image (a real-only scorer stand-in)."""

    def __init__(self, n_classes: int, answer: int):
        super().__init__()
        self.bias = nn.Parameter(torch.nn.functional.one_hot(torch.tensor(answer), n_classes).float() * 5)

    def forward(self, x):
        return self.bias.expand(len(x), -1)


def _gate_inputs(answer_by_seed):
    src, tgt, syn = _sets(n_src=4, n_tgt=2, n_syn=4)
    params = _params(n_seeds=len(answer_by_seed))
    data = nodes.prepare_classifier_data(src, tgt, syn, classes=CLASSES, params=params)
    plan = nodes.plan_experiments(data, params, seed=42)
    scorers = {nodes.run_key(r): TrainedClassifier(_Constant(5, answer_by_seed[r["seed"] - 42]), pd.DataFrame(), 1)
               for r in plan if r["experiment"] == params["quality"]["scorer_arm"]}  # conf/base: BAL scores the batch
    return data, plan, params, scorers


def test_gate_fails_a_batch_that_is_not_class_faithful_and_the_report_says_so():
    # scorers that always answer 'brain': only the brain fifth of the batch counts as faithful
    data, plan, params, scorers = _gate_inputs([1, 1])
    gate = nodes.check_synthetic_fidelity(data, scorers, plan, params, seed=0)
    assert gate["status"] == "failed" and gate["fidelity"] == pytest.approx(0.2)
    assert gate["per_class"]["brain"] == 1.0 and gate["per_class"]["femur"] == 0.0
    assert "not class-faithful" in gate["message"]
    quality_json = {"gate": gate, "fidelity": gate["fidelity"]}
    banner = report.gate_banner(quality_json)
    assert "hybrid numbers say nothing about the method" in banner
    page = report.render_html([("x", "body")], "title", banner)
    assert page.index("low-fidelity") < page.index("<h1>")  # at the top of the report
    with pytest.raises(ValueError, match="not class-faithful.*on_low_fidelity: fail"):
        nodes.check_synthetic_fidelity(data, scorers, plan, dict(params, on_low_fidelity="fail"), seed=0)


def test_gate_passes_a_faithful_batch_without_banner():
    data, plan, params, scorers = _gate_inputs([1, 1])
    syn = data["synthetic"]
    data["synthetic"] = nodes.TensorSet(syn.images, torch.ones_like(syn.labels), syn.meta)  # all prompted 'brain'
    gate = nodes.check_synthetic_fidelity(data, scorers, plan, params, seed=0)
    assert gate["status"] == "passed" and gate["fidelity"] == 1.0
    assert report.gate_banner({"gate": gate, "fidelity": 1.0}) == ""


def test_the_scorer_arm_is_the_named_real_only_arm_or_the_first_one_with_null():
    data, plan, params, _ = _gate_inputs([1, 1])
    assert params["quality"]["scorer_arm"] == "BAL"
    assert nodes._reference_arm(plan, params) == "BAL"
    assert nodes._reference_arm(plan, dict(params, quality={**params["quality"], "scorer_arm": None})) == "ES"
    for wrong in ("HB", "ESS"):  # an arm with synthetic images, an arm that is not there
        with pytest.raises(ValueError, match=f"evaluation.quality.scorer_arm: '{wrong}' is not a real-only arm"):
            nodes._reference_arm(plan, dict(params, quality={**params["quality"], "scorer_arm": wrong}))


def test_misspelt_keys_stop_the_evaluation_naming_them():
    from fu_kedro.schema import ParameterError

    src, tgt, syn = _sets(n_src=2, n_tgt=2, n_syn=1)
    params = _params()
    params["train"] = {**params["train"], "step": 10}
    with pytest.raises(ParameterError, match=r"evaluation\.train\.step: unknown key in evaluation\.train"):
        nodes.prepare_classifier_data(src, tgt, syn, classes=CLASSES, params=params)
    with pytest.raises(ParameterError, match=r"evaluation\.n_seed: unknown key in evaluation; allowed keys"):
        nodes.prepare_classifier_data(src, tgt, syn, classes=CLASSES, params=dict(_params(), n_seed=3))
    with pytest.raises(ParameterError) as error:
        nodes.prepare_classifier_data(src, tgt, syn, classes=CLASSES, params=_params(train={"epochs": 4, "patience": 2}))
    for line in ("evaluation.train.epochs: unknown key in evaluation.train", "evaluation.train.patience: unknown key",
                 "evaluation.train.steps: missing in evaluation.train"):
        assert line in str(error.value), str(error.value)
