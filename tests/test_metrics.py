"""Metric code against scikit-learn on hand-made cases; the bootstrap resamples patients."""
import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import (
    accuracy_score,
    balanced_accuracy_score,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)
from sklearn.preprocessing import label_binarize

from fu_kedro.pipelines.evaluation.bootstrap import bootstrap_patient_indices, group_totals, patient_keys, seed_item_interval
from fu_kedro.pipelines.evaluation.metrics import classification_metrics, prob_columns, summarise_zero_shot

CLASSES = ["abdomen", "brain", "femur", "thorax", "other"]
TARGET = CLASSES[:4]


def _hand_case():
    y_true = np.array(["abdomen", "abdomen", "brain", "brain", "femur", "femur", "thorax", "thorax", "brain"], object)
    y_pred = np.array(["abdomen", "other", "brain", "femur", "femur", "femur", "thorax", "abdomen", "brain"], object)
    rng = np.random.default_rng(3)
    proba = rng.random((len(y_true), 5)) * 0.3
    proba[np.arange(len(y_true)), [CLASSES.index(c) for c in y_pred]] += 1.0
    proba /= proba.sum(axis=1, keepdims=True)
    return y_true, y_pred, proba


def test_metrics_match_sklearn_with_other_counted_as_error():
    y_true, y_pred, proba = _hand_case()
    got = classification_metrics(y_true, y_pred, proba, CLASSES, TARGET)
    assert got["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert got["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y_true, y_pred))
    for avg in ("macro", "weighted"):
        assert got[f"precision_{avg}"] == pytest.approx(
            precision_score(y_true, y_pred, labels=TARGET, average=avg, zero_division=0)
        )
        assert got[f"recall_{avg}"] == pytest.approx(recall_score(y_true, y_pred, labels=TARGET, average=avg))
        assert got[f"f1_{avg}"] == pytest.approx(f1_score(y_true, y_pred, labels=TARGET, average=avg))
    onehot = label_binarize(y_true, classes=TARGET)
    per_class_auc = [roc_auc_score(onehot[:, k], proba[:, k]) for k in range(4)]
    assert got["roc_auc_macro"] == pytest.approx(np.mean(per_class_auc))
    hard = [roc_auc_score(onehot[:, k], (y_pred == c).astype(int)) for k, c in enumerate(TARGET)]
    assert got["auc_hard_label"] == pytest.approx(np.mean(hard))
    # the 'other' prediction is a miss: 6 of 9 right
    assert got["accuracy"] == pytest.approx(6 / 9)


def test_auc_uses_only_classes_present_in_labels():
    y_true, y_pred, proba = _hand_case()
    keep = y_true != "thorax"
    got = classification_metrics(y_true[keep], y_pred[keep], proba[keep], CLASSES, TARGET)
    present = ["abdomen", "brain", "femur"]
    onehot = label_binarize(y_true[keep], classes=present)
    cols = [CLASSES.index(c) for c in present]
    assert got["roc_auc_macro"] == pytest.approx(roc_auc_score(onehot, proba[keep][:, cols], average="macro"))


def _predictions(n_patients=30, images_per_patient=1, experiments=("baseline", "hybrid"), seeds=(1, 2), seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.choice(TARGET, n_patients)
    rows = []
    for exp in experiments:
        for s in seeds:
            logits = rng.normal(size=(n_patients, 5))
            logits[np.arange(n_patients), [CLASSES.index(c) for c in labels]] += 1.0 if exp == "baseline" else 2.0
            proba = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
            for rep in range(images_per_patient):
                df = pd.DataFrame(
                    {
                        "experiment": exp, "backbone": "resnet18", "augmentation": True, "seed": s,
                        "image_id": [f"img{p:03d}_{rep}" for p in range(n_patients)],
                        "patient_id": [f"p{p:03d}" for p in range(n_patients)],
                        "center": [f"c{p % 3}" for p in range(n_patients)],
                        "label": labels,
                        "prediction": np.asarray(CLASSES, object)[proba.argmax(1)],
                    }
                )
                df[prob_columns(CLASSES)] = proba
                rows.append(df)
    return pd.concat(rows, ignore_index=True)


def test_bootstrap_draws_whole_patients():
    frame = pd.DataFrame({"center": ["a"] * 6 + ["b"] * 3, "patient_id": ["1", "1", "1", "2", "2", "3", "1", "1", "4"]})
    keys = patient_keys(frame)
    sizes = pd.Series(keys).value_counts()
    assert sizes["a::1"] == 3 and sizes["b::1"] == 2  # same id in two centers = two patients
    for idx in bootstrap_patient_indices(keys, 50, seed=1):
        counts = pd.Series(keys[idx]).value_counts()
        for patient, c in counts.items():
            assert c % sizes[patient] == 0, "a patient's images must be drawn together"
        assert sum(c // sizes[p] for p, c in counts.items()) == len(sizes)  # as many draws as patients


def test_group_totals_sum_each_patient_s_images():
    scores = np.arange(12, dtype=float).reshape(6, 2)  # 6 images, 2 classifiers
    keys, sums, counts = group_totals(scores, np.array(["b", "a", "b", "c", "a", "b"]))
    assert keys.tolist() == ["a", "b", "c"] and counts.tolist() == [2.0, 3.0, 1.0]
    assert sums.tolist() == [[2 + 8, 3 + 9], [0 + 4 + 10, 1 + 5 + 11], [6, 7]]


def test_seed_item_interval_draws_a_patient_s_images_together():
    # 8 patients of 6 images each; every image of a patient scored alike: drawn as whole patients
    # the interval is wider than with images drawn one by one
    correct = np.repeat(np.array([[1, 0, 1, 1, 0, 1, 0, 1]] * 3, dtype=float), 6, axis=1)
    patients = np.repeat(np.arange(8), 6)
    lo_p, hi_p = seed_item_interval(correct, patients, 2000, seed=0)
    lo_i, hi_i = seed_item_interval(correct, None, 2000, seed=0)
    assert lo_p < correct.mean() < hi_p and lo_i < correct.mean() < hi_i
    assert hi_p - lo_p > 1.5 * (hi_i - lo_i)
    assert seed_item_interval(np.ones((3, 10)), None, 50, seed=0) == [1.0, 1.0]


def test_interval_depends_on_patients_not_images():
    one = summarise_zero_shot(_predictions(images_per_patient=1), CLASSES, n_bootstrap=40, ci=0.95, seed=5)
    four = summarise_zero_shot(_predictions(images_per_patient=4), CLASSES, n_bootstrap=40, ci=0.95, seed=5)
    key = "hybrid/resnet18/aug"
    assert four["n_target_images"] == 4 * one["n_target_images"]
    assert four["n_target_patients"] == one["n_target_patients"]
    # copies of an image inside its patient add no information: identical intervals
    for m in ("accuracy", "f1_macro", "roc_auc_macro"):
        assert four["experiments"][key]["all_classes"]["ci"][m] == pytest.approx(one["experiments"][key]["all_classes"]["ci"][m])
        lo, hi = one["experiments"][key]["all_classes"]["ci"][m]
        assert lo < hi


def test_vectorised_bootstrap_equals_scikit_learn_on_the_resampled_rows():
    # every resample's metrics from weighted counts == scikit-learn on the drawn rows themselves,
    # including ties in the probabilities (ranked one half) and a class absent from some resamples
    from fu_kedro.pipelines.evaluation.metrics import _bootstrap, _core_metrics

    rng = np.random.default_rng(0)
    n, classes = 60, ["a", "b", "c"]
    y_true = np.array(["a"] * 30 + ["b"] * 26 + ["c"] * 4, dtype=object)
    y_pred = np.where(rng.random(n) < 0.6, y_true, rng.choice(classes + ["z"], n)).astype(object)
    proba = np.round(rng.dirichlet(np.ones(3), n), 1)  # rounded: many ties
    patients = np.repeat(np.arange(20), 3)
    boot_idx = bootstrap_patient_indices(patients.astype(str), 40, seed=1)
    assert any(not np.any(y_true[idx] == "c") for idx in boot_idx)  # a resample without class c
    values = _bootstrap([(y_true, y_pred, proba, classes)], boot_idx, classes)
    space = classes + ["z"]
    t, p = np.array([space.index(v) for v in y_true]), np.array([space.index(v) for v in y_pred])
    for b, idx in enumerate(boot_idx):
        present = [c for c in range(3) if np.any(t[idx] == c)]
        expected = _core_metrics(t[idx], p[idx], proba[idx][:, present], present, full=False)
        for m, v in expected.items():
            assert values[m][b, 0] == pytest.approx(v, rel=1e-12, abs=1e-12), (m, b)
        assert values["accuracy"][b, 0] == expected["accuracy"]  # counts: exactly


def test_summary_means_sd_and_differences():
    pred = _predictions()
    res = summarise_zero_shot(pred, CLASSES, n_bootstrap=30, ci=0.9, seed=0)
    per_seed = {}
    for (exp, s), f in pred.groupby(["experiment", "seed"]):
        per_seed.setdefault(exp, []).append(accuracy_score(f["label"], f["prediction"]))
    for exp in ("baseline", "hybrid"):
        e = res["experiments"][f"{exp}/resnet18/aug"]["all_classes"]
        assert e["mean"]["accuracy"] == pytest.approx(np.mean(per_seed[exp]))
        assert e["sd"]["accuracy"] == pytest.approx(np.std(per_seed[exp], ddof=1))
    d = res["differences"]["hybrid/resnet18/aug - baseline/resnet18/aug"]["all_classes"]["accuracy"]
    assert d["mean"] == pytest.approx(np.mean(per_seed["hybrid"]) - np.mean(per_seed["baseline"]))
    assert d["ci"][0] <= d["mean"] <= d["ci"][1]


def test_target_class_protocol_ignores_other():
    pred = _predictions(experiments=("baseline",), seeds=(1,))
    # make 'other' the top class everywhere, with the true class second
    probs = pred[prob_columns(CLASSES)].to_numpy()
    for i, lab in enumerate(pred["label"]):
        probs[i] = 0.05
        probs[i, CLASSES.index(lab)] = 0.3
        probs[i, 4] = 0.5
    pred[prob_columns(CLASSES)] = probs / probs.sum(1, keepdims=True)
    pred["prediction"] = "other"
    res = summarise_zero_shot(pred, CLASSES, n_bootstrap=0, ci=0.95, seed=0)["experiments"]["baseline/resnet18/aug"]
    assert res["all_classes"]["mean"]["accuracy"] == 0.0
    assert res["target_classes"]["mean"]["accuracy"] == 1.0


def test_labels_outside_label_space_are_rejected():
    pred = _predictions()
    pred.loc[0, "label"] = "cervix"
    with pytest.raises(ValueError, match="cervix"):
        summarise_zero_shot(pred, CLASSES, n_bootstrap=0, ci=0.95, seed=0)


# ----------------------------------------------------------------------------- edge cases (issue #11)
def test_a_center_with_two_classes_gets_a_one_vs_rest_auc():
    # label_binarize gives one column for two classes; the AUC must still be the two-class mean
    y_true = np.array(["brain", "brain", "femur", "femur", "femur"], object)
    y_pred = np.array(["brain", "femur", "femur", "other", "femur"], object)
    proba = np.random.default_rng(0).dirichlet(np.ones(5), len(y_true))
    got = classification_metrics(y_true, y_pred, proba, CLASSES, TARGET)
    aucs = [roc_auc_score(y_true == c, proba[:, CLASSES.index(c)]) for c in ("brain", "femur")]
    assert got["roc_auc_macro"] == pytest.approx(np.mean(aucs))
    hard = [roc_auc_score(y_true == c, y_pred == c) for c in ("brain", "femur")]
    assert got["auc_hard_label"] == pytest.approx(np.mean(hard))
    # and in the per-center table of a whole summary: center c0 below has only two classes
    pred = _predictions(n_patients=12, seeds=(1, 2))
    in_c0 = pred["center"] == "c0"
    pred.loc[in_c0, "label"] = np.where(pred.loc[in_c0, "patient_id"].str[-1].astype(int) % 2, "brain", "femur")
    res = summarise_zero_shot(pred, CLASSES, n_bootstrap=5, ci=0.95, seed=0)
    c0 = res["experiments"]["hybrid/resnet18/aug"]["all_classes"]["per_center"]["c0"]["mean"]
    assert np.isfinite(c0["roc_auc_macro"]) and np.isfinite(c0["auc_hard_label"])


def test_a_class_never_predicted_scores_zero_recall_and_counts_in_the_macro_mean():
    y_true = np.array(["abdomen", "brain", "femur", "thorax"] * 3, object)
    y_pred = np.where(y_true == "thorax", "femur", y_true).astype(object)  # thorax never predicted
    proba = np.full((len(y_true), 5), 0.2)
    got = classification_metrics(y_true, y_pred, proba, CLASSES, TARGET)
    assert got["recall_macro"] == pytest.approx(recall_score(y_true, y_pred, labels=TARGET, average="macro"))
    assert got["recall_macro"] == pytest.approx(0.75)
    assert got["precision_macro"] == pytest.approx(
        precision_score(y_true, y_pred, labels=TARGET, average="macro", zero_division=0))
    from fu_kedro.pipelines.evaluation.metrics import per_class_recall

    assert per_class_recall(y_true, y_pred, TARGET)["thorax"] == 0.0


def test_other_predicted_on_a_four_class_target_is_an_error_not_a_fifth_class():
    y_true = np.array(["abdomen", "brain", "femur", "thorax"] * 2, object)
    y_pred = y_true.copy()
    y_pred[[0, 5]] = "other"
    proba = np.full((len(y_true), 5), 0.2)
    got = classification_metrics(y_true, y_pred, proba, CLASSES, TARGET)
    assert got["accuracy"] == pytest.approx(6 / 8)
    # macro averages run over the four target classes only: 'other' adds no zero-precision column
    assert got["precision_macro"] == pytest.approx(
        precision_score(y_true, y_pred, labels=TARGET, average="macro", zero_division=0))
    assert got["precision_macro"] == pytest.approx(1.0)


def test_chance_rows_majority_and_uniform():
    pred = _predictions(experiments=("baseline",), seeds=(1,))
    res = summarise_zero_shot(pred, CLASSES, n_bootstrap=0, ci=0.95, seed=0)
    labels = pred["label"]
    majority = res["reference"]["majority"]
    assert majority["predicts"] == labels.value_counts().idxmax()
    assert majority["accuracy"] == pytest.approx(labels.value_counts().max() / len(labels))
    assert majority["recall_macro"] == pytest.approx(1 / len(res["target_classes"]))
    # a uniform guess over 5 classes is right 1 time in 5 on average
    assert res["reference"]["uniform"]["accuracy"] == pytest.approx(0.2, abs=0.03)
    assert res["experiments"]["baseline/resnet18/aug"]["n_seeds"] == 1


def test_replicates_are_averaged_and_paired_with_the_baseline_by_seed():
    base = _predictions(experiments=("baseline",), seeds=(1, 2, 3), seed=1)
    base["replicate"] = -1
    reps = []
    for r in (0, 1):
        h = _predictions(experiments=("hybrid",), seeds=(1, 2, 3), seed=10 + r)
        h["replicate"] = r
        reps.append(h)
    pred = pd.concat([base, *reps], ignore_index=True)
    res = summarise_zero_shot(pred, CLASSES, n_bootstrap=50, ci=0.95, seed=0)
    hyb = res["experiments"]["hybrid/resnet18/aug"]
    assert hyb["replicates"] == [0, 1] and hyb["n_classifiers"] == 6 and hyb["n_seeds"] == 3
    acc = {(r, s): accuracy_score(f["label"], f["prediction"]) for (r, s), f in
           pred[pred["experiment"] == "hybrid"].groupby(["replicate", "seed"])}
    assert hyb["all_classes"]["mean"]["accuracy"] == pytest.approx(np.mean(list(acc.values())))
    assert hyb["all_classes"]["per_seed"]["2"]["accuracy"] == pytest.approx((acc[(0, 2)] + acc[(1, 2)]) / 2)
    d = res["differences"]["hybrid/resnet18/aug - baseline/resnet18/aug"]["all_classes"]["accuracy"]
    base_acc = {s: accuracy_score(f["label"], f["prediction"]) for s, f in base.groupby("seed")}
    assert d["per_seed"]["3"] == pytest.approx((acc[(0, 3)] + acc[(1, 3)]) / 2 - base_acc[3])
    assert d["variance_components"]["K"] == 2 and d["variance_components"]["replicate"] is not None
    assert "2 synthetic batches" in res["bootstrap"]["conditional_on"]
    assert "LoRA adapter" in res["bootstrap"]["conditional_on"] and "replicate_lora_fits" not in res["bootstrap"]
    # replicates from independent LoRA fits (synthesis.adapter_per_replicate): same numbers, the coverage says so
    refit = summarise_zero_shot(pred, CLASSES, n_bootstrap=50, ci=0.95, seed=0, replicate_fits=True)
    assert refit["bootstrap"]["replicate_lora_fits"] is True and "own independent LoRA fit" in refit["bootstrap"]["conditional_on"]
    assert refit["differences"] == res["differences"] and "LoRA fit" in refit["bootstrap"]["levels"][0]
