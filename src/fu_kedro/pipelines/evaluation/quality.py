"""Synthetic-data quality measures: fidelity, feature-space distance, diversity, memorisation, embedding.

Feature space: the penultimate layer of the baseline classifier (trained on real source
images only, first seed of the first backbone in the plan). It is available offline and
is tuned to the classes being judged, but it is *not* Inception-v3, so the distance here
is a Fréchet distance in that space ("FD-baseline"), not FID, and is comparable only
between runs that use the same baseline classifier. The reference value real-val vs
real-train (two disjoint real samples) tells how large "no difference" looks.
"""
from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import linalg
from sklearn.manifold import TSNE
from sklearn.metrics.pairwise import cosine_distances, cosine_similarity

from .bootstrap import patient_keys, seed_item_interval


def fidelity(prompted: np.ndarray, predicted: np.ndarray, classes: list[str]) -> dict:
    """Share of synthetic images a real-only classifier assigns to the class they were prompted for.

    Returns ``{"overall": share of all images, "per_class": {class: share}, "n_per_class": ...}``;
    classes with no synthetic image are left out of ``per_class``.
    """
    prompted = np.asarray(prompted, dtype=object)
    predicted = np.asarray(predicted, dtype=object)
    per_class, counts = {}, {}
    for c in classes:
        mask = prompted == c
        if mask.any():
            per_class[c] = float(np.mean(predicted[mask] == c))
            counts[c] = int(mask.sum())
    return {"overall": float(np.mean(predicted == prompted)) if len(prompted) else float("nan"),
            "per_class": per_class, "n_per_class": counts}


def frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature samples (rows = samples).

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))``; with fewer samples than
    dimensions the covariances are singular and the value is biased upwards, so compare it
    with a real-vs-real reference of similar sample sizes.
    """
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    mu = a.mean(0) - b.mean(0)
    sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # Tr((Sa Sb)^1/2) = sum of sqrt(eigenvalues of Sa^1/2 Sb Sa^1/2), a symmetric matrix: two
    # symmetric eigendecompositions instead of a general matrix square root (about 10x faster
    # at 512 features, the same value up to rounding; tests/test_evaluation.py)
    w, v = linalg.eigh(sa)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = linalg.eigvalsh(root_a @ sb @ root_a)
    trace_covmean = float(np.sqrt(np.clip(inner, 0, None)).sum())
    return float(mu @ mu + np.trace(sa) + np.trace(sb) - 2.0 * trace_covmean)


def mean_pairwise_cosine_distance(features: np.ndarray) -> float:
    """Within-set diversity: mean cosine distance over all pairs of distinct rows."""
    n = len(features)
    if n < 2:
        return float("nan")
    d = cosine_distances(features)
    return float(d[np.triu_indices(n, k=1)].mean())


def nearest_real_similarity(synthetic: np.ndarray, real: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each synthetic image, the highest pixel correlation with any real image and its index.

    Images are flattened, centred and scaled per image, so the cosine similarity is the
    Pearson correlation of pixel values: 1.0 means a copy up to brightness and contrast.
    """
    def _norm(x: np.ndarray) -> np.ndarray:
        x = x.reshape(len(x), -1).astype(np.float64)
        return x - x.mean(axis=1, keepdims=True)

    sim = cosine_similarity(_norm(synthetic), _norm(real))
    return sim.max(axis=1), sim.argmax(axis=1)


def tsne_embedding(features: np.ndarray, perplexity: float, seed: int) -> np.ndarray:
    """2-D t-SNE of ``features`` (perplexity capped below the sample count)."""
    perplexity = float(min(perplexity, max(2.0, (len(features) - 1) / 3.0)))
    return TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(features)


def per_class_embedding(
    real_features: np.ndarray,
    real_labels: np.ndarray,
    syn_features: np.ndarray,
    syn_labels: np.ndarray,
    classes: list[str],
    perplexity: float,
    max_per_class: int,
    seed: int,
) -> pd.DataFrame:
    """One t-SNE per class of real (source train) and synthetic features, as a long table.

    Columns: class, kind (real | synthetic), x, y. At most ``max_per_class`` points of each
    kind per class (a seeded random subset) keep t-SNE quick.
    """
    rng = np.random.default_rng(seed)
    frames = []
    for c in classes:
        parts, kinds = [], []
        for feats, labels, kind in ((real_features, real_labels, "real"), (syn_features, syn_labels, "synthetic")):
            idx = np.flatnonzero(np.asarray(labels) == c)
            if len(idx) > max_per_class:
                idx = np.sort(rng.choice(idx, max_per_class, replace=False))
            parts.append(feats[idx])
            kinds += [kind] * len(idx)
        if len(kinds) < 5 or "synthetic" not in kinds:
            continue
        xy = tsne_embedding(np.concatenate(parts), perplexity, seed)
        frames.append(pd.DataFrame({"class": c, "kind": kinds, "x": xy[:, 0], "y": xy[:, 1]}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["class", "kind", "x", "y"])


def kernel_inception_distance(a: np.ndarray, b: np.ndarray, subset_size: int = 100, n_subsets: int = 50,
                              seed: int = 0) -> dict:
    """KID-style distance in a given feature space: unbiased MMD^2 with the cubic polynomial kernel.

    ``k(x, y) = (x.y / d + 1)^3`` (Bińkowski et al. 2018), averaged over ``n_subsets`` random
    subsets of ``min(subset_size, len(a), len(b))`` rows each. Unlike the Fréchet distance it
    is unbiased for small samples, so values from different sample sizes compare. Returns
    ``{"mean", "sd", "subset_size"}`` (NaN below 2 rows).
    """
    m = min(subset_size, len(a), len(b))
    if m < 2:
        return {"mean": float("nan"), "sd": float("nan"), "subset_size": int(m)}
    rng = np.random.default_rng(seed)
    d = a.shape[1]
    values = []
    for _ in range(n_subsets):
        x = a[rng.choice(len(a), m, replace=False)]
        y = b[rng.choice(len(b), m, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / d + 1) ** 3, ((y @ y.T) / d + 1) ** 3, ((x @ y.T) / d + 1) ** 3
        off = ~np.eye(m, dtype=bool)
        values.append(kxx[off].mean() + kyy[off].mean() - 2 * kxy.mean())
    return {"mean": float(np.mean(values)), "sd": float(np.std(values)), "subset_size": int(m)}


def memorisation_controls(
    train: np.ndarray, val: np.ndarray, n_controls: int, seed: int, noise_sd: float = 4.0
) -> dict[str, np.ndarray]:
    """Images whose answer is known, for calibrating the copy check (all at the check's resolution).

    ``positive``: ``n_controls`` training images slipped in as if the generator had made them —
    exact copies, and copies with mild pixel noise (sd ``noise_sd`` grey levels, about what an
    8-bit round trip through a decoder adds), half each; they must be flagged.
    ``negative``: real source-val images (other patients); they must not be.
    Returns ``positive``, ``positive_source`` (train index of each), ``negative``.
    """
    rng = np.random.default_rng([seed, 4])
    pick = rng.choice(len(train), min(n_controls, len(train)), replace=False)
    positive = train[pick].astype(float)
    noisy = np.arange(len(pick)) % 2 == 1
    positive[noisy] += rng.normal(0.0, noise_sd, positive[noisy].shape)
    return {"positive": np.clip(positive, 0, 255).round().astype(np.uint8), "positive_source": pick,
            "negative": val}


def calibrate_memorisation_threshold(positive_sim: np.ndarray, negative_sim: np.ndarray) -> dict:
    """Threshold between the controls: midway between the highest real-val (negative) and the
    lowest positive-control nearest-train correlation; ``separable`` says whether any
    threshold puts every control on its side."""
    neg_max, pos_min = float(np.max(negative_sim)), float(np.min(positive_sim))
    separable = pos_min > neg_max
    threshold = (neg_max + pos_min) / 2.0 if separable else pos_min
    return {"threshold": float(threshold), "separable": bool(separable), "negative_max": neg_max,
            "negative_p99": float(np.quantile(negative_sim, 0.99)), "positive_min": pos_min,
            "positive_median": float(np.median(positive_sim))}


def vae_project(vae, images: np.ndarray) -> np.ndarray:
    """``uint8 (N, S, S)`` images encoded (posterior mean) and decoded by ``vae``, back to
    ``uint8`` grayscale at the same resolution: the image the generator's decoder renders
    for each (what it keeps of it, without what it cannot render)."""
    import torch

    from fu_kedro.models.training import to_model_range

    param = next(vae.parameters())
    # a few images per call at SD's 512 px (the decoder's activations grow with the batch);
    # one call per 256 images at the small default sizes
    chunk = max(1, (16 * 256 * 256) // max(1, int(images.shape[1]) * int(images.shape[2])))
    gray = []
    with torch.no_grad():
        for start in range(0, len(images), chunk):
            x = to_model_range(images[start : start + chunk], channels=int(vae.config.in_channels))
            out = vae.decode(vae.encode(x.to(param.device, param.dtype)).latent_dist.mean).sample.float().clamp(-1, 1)
            gray.append(((out.mean(dim=1) + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy())
    return np.concatenate(gray) if gray else np.empty((0, *images.shape[1:3]), np.uint8)


def vae_round_trips(vae, train: np.ndarray, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` training images encoded and decoded by the generator's own VAE (posterior mean),
    back to ``uint8`` grayscale at the same resolution: what a generator that memorised them
    would output. Returns (round trips, train index of each)."""
    rng = np.random.default_rng([seed, 5])
    pick = np.sort(rng.choice(len(train), min(n, len(train)), replace=False))
    return vae_project(vae, train[pick]), pick


def decoder_space_images(vae, images: dict[str, np.ndarray], n_controls: int, seed: int) -> dict:
    """What the copy check needs from the generator's VAE (:func:`memorisation_check`).

    ``images``: ``source_train``, ``source_val`` and (if any) ``synthetic``, ``uint8`` at the
    check's resolution. Returns each of them through :func:`vae_project` (same keys), the
    slipped-in positive controls of :func:`memorisation_controls` through it (``slipped``,
    ``slipped_source``), and ``n_controls`` VAE round trips of training images
    (``round_trips``, ``round_trip_source``: :func:`vae_round_trips`) with their own
    projection (``round_trips_projected``).
    """
    train, val = images["source_train"], images["source_val"]
    controls = memorisation_controls(train, val, n_controls, seed)
    round_trips, source = vae_round_trips(vae, train, n_controls, seed)
    out = {k: vae_project(vae, v) for k, v in images.items() if k in ("source_train", "source_val", "synthetic")}
    return out | {"slipped": vae_project(vae, controls["positive"]), "slipped_source": controls["positive_source"],
                  "round_trips": round_trips, "round_trip_source": source,
                  "round_trips_projected": vae_project(vae, round_trips)}


def _control_summary(sim: np.ndarray, idx: np.ndarray, source: np.ndarray, threshold: float) -> dict:
    return {"n": int(len(sim)), "flagged": float(np.mean(sim >= threshold)),
            "similarity_min": float(np.min(sim)), "similarity_median": float(np.median(sim)),
            "nearest_is_source": float(np.mean(idx == source))}


def _calibrated_check(synthetic, reference, negative, positives: dict, calibrate_on: tuple, threshold) -> dict:
    """Nearest-reference correlation of the batch (``synthetic``; ``None``: controls only) and
    of each control set, and the threshold calibrated between the negatives and the positive
    sets named in ``calibrate_on``. ``positives``: name -> (images, reference index of the
    image each copies)."""
    sim, nearest = nearest_real_similarity(synthetic, reference) if synthetic is not None else (None, None)
    neg_sim, _ = nearest_real_similarity(negative, reference)
    pos = {k: (*nearest_real_similarity(x, reference), src) for k, (x, src) in positives.items()}
    cal_sim = np.concatenate([pos[k][0] for k in calibrate_on])
    cal_hit = np.concatenate([pos[k][1] == pos[k][2] for k in calibrate_on])
    calibration = calibrate_memorisation_threshold(cal_sim, neg_sim)
    auto = threshold in (None, "auto")
    value = calibration["threshold"] if auto else float(threshold)
    return {"similarity": sim, "nearest": nearest, "flagged": None if sim is None else sim >= value,
            "threshold": float(value),
            "threshold_source": "calibrated from the controls" if auto else "evaluation.quality.memorisation_threshold",
            "calibration": calibration | {
                "n_positive": int(len(cal_sim)), "positive_flagged": float(np.mean(cal_sim >= value)),
                "positive_nearest_is_source": float(np.mean(cal_hit)),
                "n_negative": int(len(neg_sim)), "negative_flagged": float(np.mean(neg_sim >= value))},
            "per_control": {k: _control_summary(s, i, src, value) for k, (s, i, src) in pos.items()}}


SLIPPED = "source-train images slipped into a copy of the batch (half exact, half with pixel noise sd 4)"
ROUND_TRIPS = "source-train images encoded and decoded by the base model's VAE (must be flagged)"
NEGATIVE = "real source-val images (patients not in source train)"
NOT_RUN = "not run: no base model VAE given (or quality.memorisation_space: pixels)"


def memorisation_check(
    synthetic: np.ndarray, train: np.ndarray, val: np.ndarray, n_controls: int, seed: int, threshold="auto",
    vae_controls: dict | None = None,
) -> dict:
    """Flag synthetic images that copy a training image, with the threshold calibrated on controls.

    All three arrays are ``uint8 (N, S, S)`` at the same resolution, made by the same resize
    (the generator's resolution: ``prepare_classifier_data``). Negative controls: real val
    images (other patients); positive controls: training images slipped into a copy of the
    batch (:func:`memorisation_controls`) and, with ``vae_controls``, training images
    through the generator's VAE (:func:`vae_round_trips`). ``threshold="auto"`` puts the
    threshold between them; a number overrides it (the controls still say how it does).

    ``vae_controls`` (:func:`decoder_space_images`, from the base model's VAE): the check
    runs in the **decoder's space**: every image — synthetic, training, validation and
    control — is compared after one encode/decode by that VAE, both sides alike (as both
    sides go through the same resize). The generator can only output what its decoder
    renders, so what the decoder drops (fine speckle) is no difference between a synthetic
    image and a training image, and a real val image is judged as the decoder would render
    that new patient — what a generator that generalised perfectly would output. The VAE
    round trips are then calibration positives beside the slipped copies: a blurrier VAE
    blurs the negatives as much, and the threshold stays above every negative. Without
    ``vae_controls`` (``None`` or ``{}``) the check runs on the pixels themselves (positives:
    slipped copies).
    ``controls.pixel_space`` records the pixel-space check next to the decoder-space one.

    Returns:
        dict: ``similarity`` and ``nearest`` (per synthetic image: highest correlation with
        a training image, and that image's index), ``flagged`` (bool per image),
        ``threshold``, ``threshold_source``, ``space`` (``decoder`` | ``pixels``),
        ``controls`` (calibration, and the share of each control flagged at the threshold used).
    """
    controls = memorisation_controls(train, val, n_controls, seed)
    slipped = (controls["positive"], controls["positive_source"])
    # in decoder space the batch is judged there only (the pixel-space pass is of the controls)
    pixels = _calibrated_check(None if vae_controls else synthetic, train, val, {"slipped": slipped},
                               ("slipped",), threshold)
    if not vae_controls:
        check, space = pixels, "pixels"
        vae_summary = NOT_RUN
        positive = SLIPPED
    else:
        d = vae_controls
        if not np.array_equal(d["slipped_source"], controls["positive_source"]):
            raise ValueError("vae_controls were made for other slipped-in controls (n_controls or seed differ)")
        round_trips_px = nearest_real_similarity(d["round_trips"], train)
        check = _calibrated_check(
            d["synthetic"], d["source_train"], d["source_val"],
            {"slipped": (d["slipped"], d["slipped_source"]),
             "round_trips": (d["round_trips_projected"], d["round_trip_source"])},
            ("slipped", "round_trips"), threshold)
        space, positive = "decoder", f"{SLIPPED}; {ROUND_TRIPS.removesuffix(' (must be flagged)')}"
        vae_summary = check["per_control"]["round_trips"] | {"what": ROUND_TRIPS, "used_for_calibration": True}
        pixels["per_control"]["round_trips"] = _control_summary(*round_trips_px, d["round_trip_source"],
                                                                pixels["threshold"])
    return {
        "similarity": check["similarity"],
        "nearest": check["nearest"],
        "flagged": check["flagged"],
        "threshold": check["threshold"],
        "threshold_source": check["threshold_source"],
        "space": space,
        "controls": check["calibration"] | {
            "positive": positive,
            "negative": NEGATIVE,
            "slipped_copies": check["per_control"]["slipped"],
            "vae_round_trips": vae_summary,
            "pixel_space": {"threshold": pixels["threshold"], **{k: pixels["calibration"][k] for k in (
                "separable", "negative_max", "positive_min", "negative_flagged")},
                "slipped_copies": pixels["per_control"]["slipped"],
                "vae_round_trips": pixels["per_control"].get("round_trips", NOT_RUN),
                "what": "the same check on the pixels themselves (no decoder), for reference"},
        },
    }


# --------------------------------------------------------------------------- the synthetic_quality.json content
def _per_class_quality(classes: list[str], views: dict, names: dict, gate: dict, copies: dict,
                       rng: np.random.Generator, seed: int) -> dict:
    """Every measure per prompted class (``rng`` draws the matched-size subsets, in class order)."""
    cas_val_pc = [fidelity(names["val"], p, classes)["per_class"] for p in views["cas_pred_val"]]
    cas_tgt_pc = [fidelity(names["target"], p, classes)["per_class"] for p in views["cas_pred_target"]]
    f_real, f_val, f_syn = views["f_real"], views["f_val"], views["f_syn"]
    sim, threshold = copies["similarity"], copies["threshold"]
    out = {}
    for c in classes:
        s_mask, r_mask, v_mask = names["prompted"] == c, names["real_train"] == c, names["val"] == c
        if not s_mask.any():
            continue
        # Fréchet distance at matched sizes: as many synthetic images as real train images
        syn_idx = np.flatnonzero(s_mask)
        matched = rng.choice(syn_idx, min(len(syn_idx), int(r_mask.sum())), replace=False)
        div_syn = mean_pairwise_cosine_distance(f_syn[s_mask])
        div_real = mean_pairwise_cosine_distance(f_real[r_mask])
        out[c] = {
            "n_images": int(s_mask.sum()),
            "fidelity": gate.get("per_class", {}).get(c),
            "cas_recall_source_val": float(np.mean([pc.get(c, np.nan) for pc in cas_val_pc])),
            "cas_recall_target": float(np.mean([pc.get(c, np.nan) for pc in cas_tgt_pc])) if c in set(
                names["target"]) else None,
            "frechet_distance_to_real_train": frechet_distance(f_syn[s_mask], f_real[r_mask]),
            "frechet_distance_to_real_train_matched_size": frechet_distance(f_syn[matched], f_real[r_mask]),
            "frechet_distance_real_val_reference": frechet_distance(f_val[v_mask], f_real[r_mask]),
            "kid_to_real_train": kernel_inception_distance(f_syn[s_mask], f_real[r_mask], seed=seed)["mean"],
            "kid_real_val_reference": kernel_inception_distance(f_val[v_mask], f_real[r_mask], seed=seed)["mean"],
            "diversity_synthetic": div_syn,
            "diversity_real_train": div_real,
            "diversity_ratio": div_syn / div_real if div_real and np.isfinite(div_real) else None,
            "max_nearest_real_correlation": float(sim[s_mask].max()),
            "n_flagged_copies": int(np.sum(sim[s_mask] >= threshold)),
        }
    return out


def _fidelity_fields(gate: dict) -> dict:
    """The gate's verdict and fidelity, with the scorers' own accuracy on real images as its reference."""
    return {
        "gate": {k: gate.get(k) for k in ("status", "threshold", "action", "message")},
        "fidelity": gate.get("fidelity"),
        "fidelity_ci": gate.get("fidelity_ci"),
        "fidelity_per_seed": gate.get("fidelity_per_seed"),
        "fidelity_per_replicate": gate.get("fidelity_per_replicate"),
        "fidelity_scorer": gate.get("scorer"),
        "fidelity_reference": {
            "what": "the fidelity scorers' own accuracy on real held-out source-val images (train-real/test-real)",
            "accuracy": gate.get("scorer_accuracy_source_val"),
            "ci": gate.get("scorer_accuracy_source_val_ci"),
            "per_seed": gate.get("scorer_accuracy_source_val_per_seed"),
            "note": gate.get("note"),
        },
    }


def _cas_fields(views: dict, groups: dict, gate: dict, cas_info: list[dict], n_boot: int, seed: int) -> dict:
    """Classification accuracy score: synthetic-only classifiers on real images, beside real-only ones."""
    cas_val, cas_tgt, real_tgt = views["cas_val"], views["cas_target"], views["real_target"]
    return {
        "cas_accuracy": float(cas_val.mean()),
        "cas_accuracy_ci": seed_item_interval(cas_val, groups["val"], n_boot, seed),
        "cas_accuracy_per_seed": {str(c["seed"]): float(v.mean()) for c, v in zip(cas_info, cas_val)},
        "cas_accuracy_target": float(cas_tgt.mean()),
        "cas_accuracy_target_ci": seed_item_interval(cas_tgt, groups["target"], n_boot, seed),
        "cas_reference": {
            "what": "real-only (baseline) classifiers of the same seeds on the same images (train-real/test-real)",
            "source_val_accuracy": gate.get("scorer_accuracy_source_val"),
            "source_val_ci": gate.get("scorer_accuracy_source_val_ci"),
            "target_accuracy": float(real_tgt.mean()),
            "target_ci": seed_item_interval(real_tgt, groups["target"], n_boot, seed),
        },
        "cas_classifier": {k: cas_info[0].get(k) for k in ("backbone", "augmentation", "weights",
                                                          "n_train", "n_val", "steps")}
        | {"seeds": [c["seed"] for c in cas_info], "best_steps": [c["best_step"] for c in cas_info],
           "selection": "held-out synthetic images"},
    }


def _feature_space_fields(views: dict, rng: np.random.Generator, seed: int) -> dict:
    """Distances and diversity of the whole batch in the scorer's feature space (after the per-class draws)."""
    f_real, f_val, f_syn = views["f_real"], views["f_val"], views["f_syn"]
    kid = kernel_inception_distance(f_syn, f_real, seed=seed)
    kid_ref = kernel_inception_distance(f_val, f_real, seed=seed)
    return {
        "frechet_distance_to_real_train": frechet_distance(f_syn, f_real),
        "frechet_distance_to_real_train_matched_size": frechet_distance(
            f_syn[rng.choice(len(f_syn), min(len(f_syn), len(f_real)), replace=False)], f_real),
        "frechet_distance_real_val_reference": frechet_distance(f_val, f_real),
        "kid_to_real_train": kid,
        "kid_real_val_reference": kid_ref,
        "diversity_synthetic": mean_pairwise_cosine_distance(f_syn),
        "diversity_real_train": mean_pairwise_cosine_distance(f_real),
    }


def _memorisation_fields(copies: dict, resolution: int, synthetic_ids: pd.Series, train_ids: pd.Series) -> dict:
    sim, nn_idx, calibration = copies["similarity"], copies["nearest"], copies["controls"]
    flagged = np.flatnonzero(copies["flagged"])
    decoder = copies.get("space") == "decoder"
    return {
        "method": (f"max Pearson correlation of pixels with any real source-train image at {resolution} "
                   "px (the generator's resolution; real and synthetic images through the same antialiased resize"
                   + ("; then every image, synthetic, real and control, through one encode/decode by the base "
                      "model's VAE: compared as the generator's decoder renders them)" if decoder else ")")),
        "space": copies.get("space", "pixels"),
        "resolution": int(resolution),
        "threshold": float(copies["threshold"]),
        "threshold_source": copies["threshold_source"],
        "controls": calibration,
        "real_val_reference_max_correlation": calibration["negative_max"],
        "real_val_reference_p99": calibration["negative_p99"],
        "n_flagged": int(len(flagged)),
        "flagged": [
            {
                "image_id": str(synthetic_ids.iloc[i]),
                "nearest_real_image_id": str(train_ids.iloc[nn_idx[i]]),
                "correlation": float(sim[i]),
            }
            for i in flagged
        ],
    }


def synthetic_quality_report(classifier_data: dict, views: dict, gate: dict, copies: dict, cas_info: list[dict],
                             scorer: dict, params: dict, seed: int) -> tuple[dict, pd.DataFrame]:
    """The ``synthetic_quality.json`` content and the t-SNE table, from what the classifiers made of the images.

    Args:
        classifier_data: output of ``prepare_classifier_data``.
        views: the classifiers' outputs (``nodes._classifier_views``): correct-matrices
            ``cas_val``, ``cas_target``, ``real_target``; CAS predictions ``cas_pred_val``,
            ``cas_pred_target``; scorer features ``f_real``, ``f_val``, ``f_syn``.
        gate: output of ``check_synthetic_fidelity``.
        copies: output of :func:`memorisation_check`.
        cas_info: per CAS classifier, its ``info`` with its ``best_step``.
        scorer: the feature-space scorer: ``run`` (its key), ``backbone``, ``weights``.
        params: ``evaluation`` parameters (``quality``, ``metrics``).
        seed: seeds subsampling, t-SNE and intervals.
    """
    classes = classifier_data["classes"]
    synthetic, val, target = classifier_data["synthetic"], classifier_data["source_val"], classifier_data["target"]
    real_train = classifier_data["source_train"]
    class_names = np.asarray(classes, dtype=object)
    names = {"prompted": class_names[synthetic.labels.numpy()], "real_train": class_names[real_train.labels.numpy()],
             "val": class_names[val.labels.numpy()], "target": class_names[target.labels.numpy()]}
    groups = {"val": val.meta["patient_id"].astype(str).to_numpy() if "patient_id" in val.meta else None,
              "target": patient_keys(target.meta)}
    q = params["quality"]
    n_boot = max(int(params["metrics"]["n_bootstrap"]), 1)
    rng = np.random.default_rng([seed, 5])
    per_class = _per_class_quality(classes, views, names, gate, copies, rng, seed)
    report = {
        "n_images": int(len(synthetic)),
        "n_replicates": int(synthetic.meta["replicate"].nunique()),
        "feature_space": (
            f"penultimate layer ({views['f_real'].shape[1]} features) of the baseline classifier {scorer['run']} "
            f"({scorer['backbone']}, {scorer['weights']}, trained on real source train images, "
            f"{classifier_data['image_size']} px); distances in this space are not FID/KID on Inception features"
        ),
        **_fidelity_fields(gate),
        **_cas_fields(views, groups, gate, cas_info, n_boot, seed),
        **_feature_space_fields(views, rng, seed),
        "memorisation": _memorisation_fields(copies, classifier_data["memorisation_images"]["synthetic"].shape[-1],
                                             synthetic.meta["image_id"], real_train.meta["image_id"]),
        "per_class": per_class,
        "lineage": classifier_data["info"].get("synthetic_info", {}),
    }
    embedding = per_class_embedding(
        views["f_real"], names["real_train"], views["f_syn"], names["prompted"], classes,
        perplexity=float(q["tsne_perplexity"]), max_per_class=int(q["max_points_per_class"]), seed=int(seed),
    )
    return report, embedding
