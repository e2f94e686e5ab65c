"""Figures and the HTML report of the evaluation pipeline (pure functions: data in, figure/text out).

The page's words are jinja2 templates beside this module (``templates/``, package data):
``report.html.j2`` the report's sections in order, ``page.html.j2`` the page around them (CSS,
banners, title), ``parts.html.j2`` the banners, the answer, the power line and the notes. This
module makes the tables (pandas), the figures (matplotlib) and the numbers they are given.
"""
from __future__ import annotations

import base64
import functools
import io
from datetime import datetime, timezone

import jinja2
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from markupsafe import Markup  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from fu_kedro.lineage import EMBED_KEY, chain_html  # noqa: E402

# the paper's backbone names (paper_table_overall_performance.csv) for ours
PAPER_MODEL_NAMES = {"resnet18": "ResNet18", "densenet169": "DenseNet169", "mobilenet_v2": "MobileNet v2",
                     "efficientnet_b0": "EfficientNet b0", "vit_b_16": "ViT b16"}
PAPER_COLUMNS = ["Data", "Model", "# ES", "# Synthetic", "# Patients", "ACC", "Recall", "Precision", "F-score", "AUC"]


def arm_label(entry: dict) -> str:
    """An experiment's arm as the report names it (its ``label`` in evaluation.arms, else its name)."""
    return str(entry.get("arm_label") or entry["experiment"])


def _pct(entry: dict, protocol: str, metric: str) -> str:
    block = entry[protocol]
    mean, sd = block["mean"].get(metric), block["sd"].get(metric)
    if mean is None:
        return "n/a"
    text = f"{100 * mean:.2f} ± {100 * (sd or 0):.2f}"
    ci = (block.get("ci") or {}).get(metric)
    if ci and ci[0] is not None:
        text += f" [{100 * ci[0]:.1f}, {100 * ci[1]:.1f}]"
    return text


def comparison_table(metrics: dict, protocol: str) -> pd.DataFrame:
    """The paper's layout: Data, Model, #real, #synthetic, ACC, Recall, Precision, F-score, AUC (percent).

    Each cell is mean ± sd over seeds and, where bootstrapped, the patient-level interval.
    ``AUC`` is the one-vs-rest ROC-AUC from probabilities; ``AUC (hard)`` the paper's.
    """
    rows = []
    for key, e in metrics["experiments"].items():
        rows.append(
            {
                "Data": arm_label(e),
                "Model": f"{e['backbone']} ({'DA' if e['augmentation'] else 'no DA'})",
                "#real": e.get("n_real"),
                "#synthetic": e.get("n_synthetic"),
                "ACC": _pct(e, protocol, "accuracy"),
                "Recall": _pct(e, protocol, "recall_macro"),
                "Precision": _pct(e, protocol, "precision_macro"),
                "F-score": _pct(e, protocol, "f1_macro"),
                "AUC": _pct(e, protocol, "roc_auc_macro"),
                "AUC (hard)": _pct(e, protocol, "auc_hard_label"),
                "seeds": len(e["seeds"]),
                "replicates": len(e.get("replicates") or []) or "-",
            }
        )
    return pd.DataFrame(rows)


def differences_table(metrics: dict) -> pd.DataFrame:
    """Experiment - baseline, in percentage points, with the paired patient-bootstrap interval."""
    rows = []
    for name, d in metrics["differences"].items():
        row = {"comparison": name}
        for m, label in (("accuracy", "Δ ACC"), ("f1_macro", "Δ F-score"), ("roc_auc_macro", "Δ AUC"),
                         ("auc_hard_label", "Δ AUC (hard)")):
            v = d["all_classes"][m]
            ci = v.get("ci")
            row[label] = f"{100 * v['mean']:+.2f}" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci and ci[0] is not None else "")
        rows.append(row)
    return pd.DataFrame(rows)


def per_center_table(metrics: dict) -> pd.DataFrame:
    """Accuracy and macro F1 (mean ± sd over seeds, percent) per experiment and target center."""
    rows = []
    for key, e in metrics["experiments"].items():
        for center, v in e["all_classes"]["per_center"].items():
            rows.append(
                {
                    "experiment": key,
                    "center": center,
                    "n": int(v["mean"]["n_images"]),
                    "ACC": f"{100 * v['mean']['accuracy']:.1f} ± {100 * v['sd']['accuracy']:.1f}",
                    "F-score": f"{100 * v['mean']['f1_macro']:.1f} ± {100 * v['sd']['f1_macro']:.1f}",
                }
            )
    return pd.DataFrame(rows)


def _delta(v: dict | None) -> str:
    if not v or v.get("mean") is None:
        return "n/a"
    ci = v.get("ci")
    return f"{100 * v['mean']:+.2f}" + (f" [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}]" if ci and ci[0] is not None else "")


def _configs(metrics: dict) -> list[tuple[str, bool]]:
    return list(dict.fromkeys((e["backbone"], e["augmentation"]) for e in metrics["experiments"].values()))


def _arm_entries(metrics: dict, backbone: str, aug: bool) -> list[tuple[str, dict]]:
    order = (metrics.get("arms") or {}).get("order") or [e["experiment"] for e in metrics["experiments"].values()]
    by_arm = {e["experiment"]: (k, e) for k, e in metrics["experiments"].items()
              if e["backbone"] == backbone and e["augmentation"] == aug}
    return [by_arm[a] for a in order if a in by_arm]


def decomposition_tables(metrics: dict, backbone: str, aug: bool) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(one row per arm: what it trained on and its zero-shot scores; one row per comparison:
    the paired differences with their intervals), for one backbone and augmentation."""
    arms = []
    for _, e in _arm_entries(metrics, backbone, aug):
        per_class = e.get("real_per_class") or {}
        arms.append({
            "arm": arm_label(e), "real images": e.get("real_rule"), "#real": e.get("n_real"),
            "real per class": ", ".join(f"{c} {n}" for c, n in per_class.items()),
            "#patients": e.get("n_real_patients"), "synthetic": e.get("synthetic_rule"), "#synthetic": e.get("n_synthetic"),
            "ACC": _pct(e, "all_classes", "accuracy"), "F-score": _pct(e, "all_classes", "f1_macro"),
            "AUC": _pct(e, "all_classes", "roc_auc_macro"), "seeds": len(e["seeds"]),
            "replicates": len(e.get("replicates") or []) or "-",
        })
    diffs = []
    for d in metrics["differences"].values():
        a, b = metrics["experiments"][d["experiment"]], metrics["experiments"][d["baseline"]]
        if (a["backbone"], a["augmentation"]) != (backbone, aug):
            continue
        acc = d["all_classes"]["accuracy"]
        diffs.append({
            "difference": f"{arm_label(a)} − {arm_label(b)}",
            "Δ ACC [interval]": _delta(acc), "Δ F-score": _delta(d["all_classes"].get("f1_macro")),
            "Δ AUC": _delta(d["all_classes"].get("roc_auc_macro")),
            "paired by": d.get("paired_by", "seed"),
            "per seed (ACC)": ", ".join(_pts(v) for v in acc.get("per_seed", {}).values()),
        })
    return pd.DataFrame(arms), pd.DataFrame(diffs)


def decomposition_identities(metrics: dict, backbone: str, aug: bool) -> list[str]:
    """Each ``X − Z = (Y − Z) + (X − Y)`` the comparisons allow, with the three accuracy differences (points)."""
    acc = {}
    for d in metrics["differences"].values():
        a, b = metrics["experiments"][d["experiment"]], metrics["experiments"][d["baseline"]]
        if (a["backbone"], a["augmentation"]) == (backbone, aug):
            acc[(a["experiment"], b["experiment"])] = (d["all_classes"]["accuracy"]["mean"], arm_label(a), arm_label(b))
    out = []
    for (x, z), (total, lx, lz) in acc.items():
        for (y, z2), (first, ly, _) in acc.items():
            if z2 == z and y != x and (x, y) in acc:
                out.append(f"{lx} − {lz} = ({ly} − {lz}) + ({lx} − {ly}): {_pts(total)} = {_pts(first)} + "
                           f"({_pts(acc[(x, y)][0])}) points")
    return out


def decomposition_html(metrics: dict) -> str:
    """The report's lead: per configuration the arms, then their differences with intervals, and what
    the arms held equal (batching rule, synthetic class mix)."""
    info = metrics.get("arms") or {}
    configs = []
    for backbone, aug in _configs(metrics):
        arms, diffs = decomposition_tables(metrics, backbone, aug)
        configs.append({"name": f"{backbone} ({'DA' if aug else 'no DA'})",
                        "tables": Markup(_table(arms) + _table(diffs)),
                        "identities": decomposition_identities(metrics, backbone, aug)})
    return str(_parts().decomposition(str(info.get("batching", "n/a")), str(info.get("synthetic_class_mix", "n/a")),
                                      configs))


def per_center_differences_table(metrics: dict) -> pd.DataFrame:
    """Per comparison and target center: the paired accuracy difference (points) with its interval."""
    rows = []
    for d in metrics["differences"].values():
        a, b = metrics["experiments"][d["experiment"]], metrics["experiments"][d["baseline"]]
        for center, v in (d.get("per_center") or {}).items():
            rows.append({"difference": f"{arm_label(a)} − {arm_label(b)}",
                         "model": f"{a['backbone']} ({'DA' if a['augmentation'] else 'no DA'})", "center": center,
                         "patients": v["n_patients"], "images": v["n_images"], "Δ ACC [interval]": _delta(v["accuracy"])})
    return pd.DataFrame(rows)


def paper_layout_table(metrics: dict, paper: pd.DataFrame | None) -> pd.DataFrame:
    """Our arms in the paper's table layout (Data, Model, # ES, # Synthetic, # Patients, ACC, Recall,
    Precision, F-score, AUC; percent, seed means; AUC from one-hot predictions as the paper's
    notebook), each of the paper's rows for the same Data and Model beside it."""
    rows = []
    for e in metrics["experiments"].values():
        mean = e["all_classes"]["mean"]
        data = arm_label(e) + ("+DA" if e["augmentation"] else "")
        model = PAPER_MODEL_NAMES.get(e["backbone"], e["backbone"])
        rows.append({"source": "ours", "Data": data, "Model": model, "# ES": e.get("n_real"),
                     "# Synthetic": e.get("n_synthetic"), "# Patients": e.get("n_real_patients"),
                     **{c: None if mean.get(m) is None else round(100 * mean[m], 2) for c, m in (
                         ("ACC", "accuracy"), ("Recall", "recall_macro"), ("Precision", "precision_macro"),
                         ("F-score", "f1_macro"), ("AUC", "auc_hard_label"))}})
        if paper is not None:
            for _, row in paper[(paper["Data"] == data) & (paper["Model"] == model)].iterrows():
                rows.append({"source": "paper", **{c: row[c] for c in PAPER_COLUMNS}})
    return pd.DataFrame(rows)


def plot_confusion_matrices(metrics: dict) -> Figure:
    """One confusion matrix per experiment (all-class protocol, summed over seeds; rows = true target classes)."""
    exps = list(metrics["experiments"].items())
    fig, axes = plt.subplots(1, len(exps), figsize=(4.2 * len(exps), 4.0), squeeze=False)
    target = metrics["target_classes"]
    for ax, (key, e) in zip(axes[0], exps):
        cm = e["all_classes"]["confusion_matrix"]
        labels = cm["labels"]
        mat = np.asarray(cm["matrix"])[[labels.index(c) for c in target]]
        ax.imshow(mat, cmap="Blues")
        for (i, j), v in np.ndenumerate(mat):
            ax.text(j, i, str(v), ha="center", va="center", color="black" if v < mat.max() / 2 else "white", fontsize=9)
        ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
        ax.set_yticks(range(len(target)), target)
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        reps = len(e.get("replicates") or [])
        summed = f"{len(e['seeds'])} seeds × {reps} replicates = {e['n_classifiers']} classifiers" if reps > 1 else \
            f"{len(e['seeds'])} seeds"
        ax.set_title(f"{key}\n({summed} summed)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_training_curves(history: pd.DataFrame) -> Figure:
    """Source-validation loss and accuracy against optimiser steps; one column per configuration
    (replicates of a synthetic arm share a column), one line per run, a dot at the kept step."""
    history = history.copy()
    history["config"] = history["run"].str.rsplit("/seed", n=1).str[0].str.replace(r"/rep\d+$", "", regex=True)
    configs = list(dict.fromkeys(history["config"]))
    fig, axes = plt.subplots(2, len(configs), figsize=(4.2 * len(configs), 6), squeeze=False, sharey="row")
    for col, config in enumerate(configs):
        sub = history[history["config"] == config]
        for i, (run, h) in enumerate(sub.groupby("run", sort=False)):
            color = f"C{i % 10}"
            label = run.removeprefix(config + "/")
            axes[0, col].plot(h["step"], h["train_loss"], color=color, alpha=0.35, lw=0.8)
            axes[0, col].plot(h["step"], h["val_loss"], color=color, label=label)
            axes[1, col].plot(h["step"], h["val_accuracy"], color=color, label=label)
            best = int(h["best_step"].iloc[0])
            axes[1, col].plot(best, h.loc[h["step"] == best, "val_accuracy"], "o", color=color)
        axes[0, col].set_title(config, fontsize=9)
        axes[0, col].set_ylabel("cross-entropy (val solid, train faint)")
        axes[1, col].set_ylabel("source-val accuracy (dot = kept)")
        axes[1, col].set_xlabel("optimiser step")
        axes[1, col].legend(fontsize=6)
    fig.tight_layout()
    return fig


def plot_sample_grid(classifier_data: dict, per_class: int, seed: int) -> Figure:
    """Rows = classes; columns = real source, synthetic, target samples (seeded choice)."""
    rng = np.random.default_rng(seed)
    classes = classifier_data["classes"]
    sets = [("real source", classifier_data["source_train"]), ("synthetic", classifier_data["synthetic"]),
            ("target", classifier_data["target"])]
    sets = [(n, s) for n, s in sets if s is not None]
    fig, axes = plt.subplots(len(classes), per_class * len(sets),
                             figsize=(0.9 * per_class * len(sets), 0.95 * len(classes) + 0.4), squeeze=False)
    for r, c in enumerate(classes):
        for s, (name, data) in enumerate(sets):
            idx = np.flatnonzero(data.labels.numpy() == r)
            idx = rng.choice(idx, min(per_class, len(idx)), replace=False) if len(idx) else idx
            for k in range(per_class):
                ax = axes[r, s * per_class + k]
                ax.axis("off")
                if k < len(idx):
                    ax.imshow(data.images[idx[k], 0].numpy(), cmap="gray", vmin=0, vmax=255)
                if r == 0 and k == 0:
                    ax.set_title(name, fontsize=8, loc="left")
        axes[r, 0].text(-0.1, 0.5, c, transform=axes[r, 0].transAxes, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(wspace=0.05, hspace=0.05, left=0.07)
    return fig


def plot_embedding(embedding: pd.DataFrame) -> Figure:
    """Per-class t-SNE of baseline-classifier features: real source train vs synthetic."""
    classes = list(dict.fromkeys(embedding["class"])) or ["(none)"]
    fig, axes = plt.subplots(1, len(classes), figsize=(3.2 * len(classes), 3.4), squeeze=False)
    for ax, c in zip(axes[0], classes):
        sub = embedding[embedding["class"] == c]
        for kind, marker, color in (("real", "o", "tab:blue"), ("synthetic", "x", "tab:orange")):
            pts = sub[sub["kind"] == kind]
            ax.scatter(pts["x"], pts["y"], s=10, marker=marker, c=color, label=f"{kind} ({len(pts)})", alpha=0.7)
        ax.set_title(c)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.legend(fontsize=7)
    fig.suptitle("t-SNE of baseline-classifier features, per class")
    fig.tight_layout()
    return fig


def plot_per_center(metrics: dict) -> Figure:
    """Zero-shot accuracy per target center and experiment (mean over seeds, sd as error bar)."""
    exps = list(metrics["experiments"].items())
    centers = sorted({c for _, e in exps for c in e["all_classes"]["per_center"]})
    fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(centers) * max(1, len(exps)) / 2, 3.6))
    width = 0.8 / max(1, len(exps))
    for i, (key, e) in enumerate(exps):
        pc = e["all_classes"]["per_center"]
        means = [pc.get(c, {}).get("mean", {}).get("accuracy", np.nan) for c in centers]
        sds = [pc.get(c, {}).get("sd", {}).get("accuracy", 0) or 0 for c in centers]
        ax.bar(np.arange(len(centers)) + i * width, means, width, yerr=sds, label=key, capsize=2)
    ax.set_xticks(np.arange(len(centers)) + width * (len(exps) - 1) / 2, centers)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy (all-class protocol)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def figure_to_data_uri(fig: Figure) -> str:
    """PNG of a figure as a ``data:`` URI, so the HTML report is one self-contained file."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


@functools.lru_cache(maxsize=1)
def _templates() -> jinja2.Environment:
    """The report's templates (``templates/``), HTML-escaping every value that is not already HTML."""
    env = jinja2.Environment(loader=jinja2.PackageLoader(__package__, "templates"), autoescape=True,
                             trim_blocks=True, lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters.update(pts=_pts, sd_pts=lambda v: _pts(v).lstrip("+"), p=_p,
                       pct=lambda v, digits=1: f"{100 * v:.{digits}f}")
    return env


def _parts():
    """The macros of ``templates/parts.html.j2`` (each returns HTML)."""
    return _templates().get_template("parts.html.j2").module


def _table(df: pd.DataFrame) -> str:
    """A table in a box that scrolls sideways when the table is wider than the page: the page
    itself stays within its 1,200 px column (``scripts/journey.py`` checks it in a 1,400 px window)."""
    return str(_parts().table(Markup(df.to_html(index=False, border=0, classes="t", na_rep="n/a"))))


def _stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def render_html(sections: list[tuple[str, str]], title: str, banner: str = "") -> str:
    """Assemble ``(heading, html body)`` sections into one page, ``banner`` (HTML) above everything."""
    return _templates().get_template("page.html.j2").render(
        sections=[(heading, Markup(body)) for heading, body in sections], title=title, banner=Markup(banner),
        stamp=_stamp())


def gate_banner(quality: dict) -> str:
    """The red banner when the synthetic batch failed the fidelity gate, else nothing."""
    gate = quality.get("gate") or {}
    if gate.get("status") != "failed":
        return ""
    return str(_parts().gate_banner(quality.get("fidelity", float("nan")), gate.get("threshold")))


def lineage_mix_banner(metrics: dict) -> str:
    """The red banner when the run went on with inputs that do not belong together (different
    runs, splits or data; ``prerequisites.on_lineage_mismatch: warn``), as its lineage record
    names them (``made_from.run.lineage_mismatch``), else nothing."""
    mixes = (((metrics or {}).get(EMBED_KEY) or {}).get("run") or {}).get("lineage_mismatch") or []
    if not mixes:
        return ""
    return str(_parts().lineage_mix_banner([str(m.get("text")) for m in mixes]))


# the training loops that take the optional wall-clock cap (fu_kedro.models.training.LoopConfig.max_minutes)
LOOP_NAMES = {"autoencoder": "the tiny base's autoencoder (VAE)", "base_denoiser": "the tiny base's denoiser (UNet)",
              "lora": "the LoRA adapter"}


def time_cap_banner(synthetic_info: dict | None) -> str:
    """The red banner when a wall-clock cap stopped a training loop behind the synthetic batch, else nothing."""
    capped = (synthetic_info or {}).get("time_capped") or {}
    if not capped:
        return ""
    return str(_parts().time_cap_banner([(LOOP_NAMES.get(loop, loop), loop, step) for loop, step in capped.items()]))


def _pts(v) -> str:
    return "n/a" if v is None else f"{100 * v:+.1f}"


def _p(v) -> str:
    return "n/a" if v is None else f"{v:.3g}"


def headline_html(metrics: dict, quality: dict) -> str:
    """The question, the answer (hybrid - baseline accuracy, paper protocol) with its interval, what
    the interval covers, the paired per-seed test, and the gate's verdict."""
    boot = metrics["bootstrap"]
    answers = []
    for name, d in metrics["differences"].items():
        acc = d["all_classes"]["accuracy"]
        exp = metrics["experiments"][d["experiment"]]
        base = metrics["experiments"][d["baseline"]]
        ci = acc.get("ci")
        test = acc.get("paired_test") or {}
        tt, wx = test.get("t_test") or {}, test.get("wilcoxon") or {}
        answers.append({
            "name": name, "arm_accuracy": exp["all_classes"]["mean"]["accuracy"],
            "baseline_accuracy": base["all_classes"]["mean"]["accuracy"], "difference": acc["mean"],
            "ci": ci if ci and ci[0] is not None and np.isfinite(ci[0]) else None,
            "n_seeds": exp["n_seeds"], "n_replicates": len(exp.get("replicates") or []) or 1,
            "interval": _interval_fields(acc), "bootstrap_ci": acc.get("ci_hierarchical_bootstrap"),
            "per_seed": acc.get("per_seed", {}), "n_positive": test.get("n_positive", "n/a"),
            "n_tested": test.get("n_seeds", "n/a"), "t_p": tt.get("p_value"), "wilcoxon_p": wx.get("p_value"),
            "smallest_p": wx.get("smallest_possible_p"), "n_nonzero": wx.get("n_nonzero", "n/a"),
            "power": _power_fields(acc), "components": _component_fields(acc),
        })
    gate = quality.get("gate") or {}
    verdict = {"status": str(gate.get("status", "not run")), "message": str(gate.get("message")),
               "threshold": gate.get("threshold"), "fidelity": quality.get("fidelity"),
               "scorer_accuracy": (quality.get("fidelity_reference") or {}).get("accuracy")}
    return str(_parts().headline(answers, _bootstrap_fields(boot, str(boot.get("conditional_on"))),
                                 metrics["n_target_patients"], verdict))


def _bootstrap_fields(boot: dict, conditional_on: str) -> dict:
    return {"ci": boot["ci"], "levels": boot.get("levels", []), "n_resamples": boot.get("n_resamples"),
            "conditional_on": conditional_on}


def _interval_fields(acc: dict) -> dict:
    """How the difference's interval was made (t on its degrees of freedom: ``se``, ``df``, ``half_width``)."""
    iv = acc.get("interval") or {}
    return {k: iv.get(k) for k in ("se", "df", "half_width")}


def _component_fields(acc: dict) -> dict:
    comps = acc.get("variance_components") or {}
    return {k: comps.get(k) for k in ("seed", "replicate", "patients")}


def _power_fields(acc: dict) -> dict | None:
    pw = acc.get("power")
    if not pw:
        return None
    return {**pw, "patients_factor_needed": pw.get("patients_factor_needed")}


def power_html(acc: dict) -> str:
    """The power line: the smallest difference this run detects and what a 5-point effect needs."""
    pw = _power_fields(acc)
    return str(_parts().power(pw, _component_fields(acc))) if pw else ""


def reference_table(metrics: dict) -> pd.DataFrame:
    """Majority-class and uniform-guess rows beside every experiment: accuracy, macro recall/F1, AUC, seeds."""
    rows = []
    for name, r in (metrics.get("reference") or {}).items():
        rows.append({"predictor": f"{name} ({r.get('predicts')})", "ACC": f"{100 * r['accuracy']:.1f}",
                     "Recall": f"{100 * r['recall_macro']:.1f}", "F-score": f"{100 * r['f1_macro']:.1f}",
                     "AUC": "50.0", "seeds": "-"})
    for key, e in metrics["experiments"].items():
        mean = e["all_classes"]["mean"]
        rows.append({"predictor": key, "ACC": f"{100 * mean['accuracy']:.1f}",
                     "Recall": f"{100 * mean['recall_macro']:.1f}", "F-score": f"{100 * mean['f1_macro']:.1f}",
                     "AUC": f"{100 * mean['roc_auc_macro']:.1f}" if mean.get("roc_auc_macro") is not None else "n/a",
                     "seeds": e.get("n_seeds", len(e["seeds"]))})
    return pd.DataFrame(rows)


def per_class_recall_table(metrics: dict) -> pd.DataFrame:
    """Recall per target class (percent) for the reference predictors and every experiment."""
    rows = []
    for name, r in (metrics.get("reference") or {}).items():
        rows.append({"predictor": name, **{c: f"{100 * v:.1f}" for c, v in r.get("per_class_recall", {}).items()}})
    for key, e in metrics["experiments"].items():
        rows.append({"predictor": key,
                     **{c: f"{100 * v:.1f}" for c, v in e["all_classes"].get("per_class_recall", {}).items()}})
    return pd.DataFrame(rows)


def paired_seed_table(metrics: dict) -> pd.DataFrame:
    """Per-seed paired accuracy differences (points) and the paired tests, one row per comparison."""
    rows = []
    for name, d in metrics["differences"].items():
        acc = d["all_classes"]["accuracy"]
        test = acc.get("paired_test") or {}
        comp = acc.get("variance_components") or {}
        rows.append({
            "comparison": name,
            **{f"seed {s}": _pts(v) for s, v in acc.get("per_seed", {}).items()},
            "t-test p": _p((test.get("t_test") or {}).get("p_value")),
            "Wilcoxon p": _p((test.get("wilcoxon") or {}).get("p_value")),
            "sd seeds": _pts(comp.get("seed")).lstrip("+"),
            "sd replicates": _pts(comp.get("replicate")).lstrip("+"),
            "sd patients": _pts(comp.get("patients")).lstrip("+"),
        })
    return pd.DataFrame(rows)


def quality_html(q: dict) -> str:
    """Synthetic-quality numbers, each beside its reference."""
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    ci = lambda v: "" if not v else f" [{fmt(v[0])}, {fmt(v[1])}]"  # noqa: E731
    ref = q.get("fidelity_reference") or {}
    cas_ref = q.get("cas_reference") or {}
    mem = q.get("memorisation") or {}
    ctl = mem.get("controls") or {}
    kid, kid_ref = q.get("kid_to_real_train") or {}, q.get("kid_real_val_reference") or {}
    rows = pd.DataFrame([
        {"measure": "fidelity (real-only scorers label synthetic images as prompted)",
         "value": fmt(q.get("fidelity")) + ci(q.get("fidelity_ci")),
         "reference": f"scorers on real source-val: {fmt(ref.get('accuracy'))}{ci(ref.get('ci'))}"},
        {"measure": "CAS (synthetic-only classifiers on real source-val)",
         "value": fmt(q.get("cas_accuracy")) + ci(q.get("cas_accuracy_ci")),
         "reference": f"real-only, same seeds, same images: {fmt(cas_ref.get('source_val_accuracy'))}"
                      f"{ci(cas_ref.get('source_val_ci'))}"},
        {"measure": "CAS on the target",
         "value": fmt(q.get("cas_accuracy_target")) + ci(q.get("cas_accuracy_target_ci")),
         "reference": f"real-only: {fmt(cas_ref.get('target_accuracy'))}{ci(cas_ref.get('target_ci'))}"},
        {"measure": f"KID-style distance to real train (subsets of {kid.get('subset_size')})",
         "value": fmt(kid.get("mean")), "reference": f"real val vs real train: {fmt(kid_ref.get('mean'))}"},
        {"measure": "Fréchet distance to real train (matched sizes)",
         "value": fmt(q.get("frechet_distance_to_real_train_matched_size")),
         "reference": f"real val vs real train: {fmt(q.get('frechet_distance_real_val_reference'))}"},
        {"measure": "diversity (mean pairwise cosine distance)", "value": fmt(q.get("diversity_synthetic")),
         "reference": f"real train: {fmt(q.get('diversity_real_train'))}"},
        {"measure": f"memorisation: flagged copies at {mem.get('resolution')} px (threshold {fmt(mem.get('threshold'))}, "
                    f"{mem.get('threshold_source')})",
         "value": str(mem.get("n_flagged")),
         "reference": f"controls ({mem.get('space', 'pixels')} space): slipped-in training images and VAE round trips flagged "
                      f"{fmt(ctl.get('positive_flagged'))} (min corr. "
                      f"{fmt(ctl.get('positive_min'))}); real val flagged {fmt(ctl.get('negative_flagged'))} (max corr. "
                      f"{fmt(ctl.get('negative_max'))}); separable: {ctl.get('separable')}"},
    ])
    per_class = pd.DataFrame(
        [{"class": c, **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}}
         for c, d in (q.get("per_class") or {}).items()]
    )
    tables = Markup(_table(rows) + (_table(_classes_as_columns(per_class)) if len(per_class) else ""))
    return str(_parts().quality(q.get("n_images"), q.get("n_replicates", 1), str(q.get("feature_space", "n/a")),
                                str(ref.get("note", "")), tables))


def _classes_as_columns(per_class: pd.DataFrame) -> pd.DataFrame:
    """One row per measure, one column per class (a class has a dozen measures: as columns they
    made the page 2,385 px wide)."""
    return per_class.set_index("class").T.rename_axis("measure").reset_index()


def ran_on_table(history: pd.DataFrame, synthetic) -> pd.DataFrame:
    """Device-derived values as they were when each stage ran: classifier runs (from their
    history) and the synthetic batch (from its manifest)."""
    rows = []
    cols = [c for c in ("device", "autocast", "memory_format", "torch_threads", "batch_size", "steps") if c in history]
    if cols:
        for values, sub in history.groupby(cols, sort=False):
            rows.append({"stage": f"classifiers ({sub['run'].nunique()} runs)",
                         **dict(zip(cols, map(str, values if isinstance(values, tuple) else (values,))))})
    meta = getattr(synthetic, "meta", None)
    if meta is not None:
        keep = [c for c in ("device", "dtype", "lora_fused", "torch_threads", "batch_size", "num_processes") if c in meta]
        if keep:
            for values, sub in meta.groupby(keep, sort=False):
                row = dict(zip(keep, map(str, values if isinstance(values, tuple) else (values,))))
                row["autocast"] = row.pop("dtype", "")
                rows.append({"stage": f"synthesis ({len(sub)} images)", **row})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- the whole page
REPORT_TITLE = "FU-LoRA evaluation: zero-shot classification and synthetic-data quality"


def _describe(info: dict) -> str:
    if not info:
        return "n/a"
    keep = {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool)) and len(str(v)) < 80}
    return ", ".join(f"{k}={v}" for k, v in list(keep.items())[:8]) or "n/a"


def report_figures(classifier_data: dict, training_history: pd.DataFrame, zero_shot_metrics: dict,
                   synthetic_embedding: pd.DataFrame, samples_per_class: int, seed: int) -> dict[str, Figure]:
    return {
        "confusion": plot_confusion_matrices(zero_shot_metrics),
        "curves": plot_training_curves(training_history),
        "samples": plot_sample_grid(classifier_data, samples_per_class, seed),
        "embedding": plot_embedding(synthetic_embedding),
        "per_center": plot_per_center(zero_shot_metrics),
    }


def plan_tables(experiment_plan: list[dict]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(what each configuration trained on and from which weights, the schedule every arm shared)."""
    runs = pd.DataFrame(experiment_plan)
    if "replicate" not in runs:
        runs["replicate"] = -1
    weights = (
        runs.groupby(["experiment", "backbone", "augmentation"], sort=False)
        .agg(seeds=("seed", lambda s: ", ".join(map(str, sorted(set(s))))),
             replicates=("replicate", lambda r: ", ".join(str(x) for x in sorted(set(r)) if x >= 0) or "-"),
             weights=("weights", "first"), n_real=("n_real", "first"), n_synthetic=("n_synthetic", "first"))
        .reset_index()
    )
    schedule = (
        runs.groupby(["experiment", "backbone", "augmentation"], sort=False)
        .agg(steps=("steps", "first"), batch=("batch_size", "first"), lr=("learning_rate", "first"),
             schedule=("lr_schedule", "first"), eval_every=("eval_every", "first"),
             passes=("passes_over_training_set", "first"))
        .reset_index()
        if "steps" in runs else pd.DataFrame()
    )
    return weights, schedule


def data_table(info: dict) -> pd.DataFrame:
    """The four image sets: how many images each, and where they came from."""
    syn_info = info.get("synthetic_info") or {}
    return pd.DataFrame(
        [
            {"set": "source train (real)", "images": info["n_source_train"], "from": _describe(info["source_info"])},
            {"set": "source val (real, checkpoint selection)", "images": info["n_source_val"], "from": _describe(info["source_info"])},
            {"set": "target (zero-shot test only)", "images": info["n_target"], "from": _describe(info["target_info"])},
            {"set": "synthetic batch", "images": info["n_synthetic"], "from": _describe(syn_info)},
        ]
    )


def _interval_note(m: dict) -> str:
    boot = _bootstrap_fields(m["bootstrap"], str(m["bootstrap"].get("conditional_on", "")))
    return str(_parts().interval_note(boot, m["n_target_patients"], m["n_target_images"], m["target_classes"]))


def evaluation_report(classifier_data: dict, experiment_plan: list[dict], training_history: pd.DataFrame,
                      zero_shot_metrics: dict, synthetic_quality: dict, synthetic_embedding: pd.DataFrame,
                      samples_per_class: int, seed: int, paper_table: pd.DataFrame | None = None):
    """The evaluation report (one self-contained HTML page) and its figures (see ``nodes.build_report``)."""
    figs = report_figures(classifier_data, training_history, zero_shot_metrics, synthetic_embedding,
                          samples_per_class, seed)
    img = {k: _parts().figure(figure_to_data_uri(f)) for k, f in figs.items()}
    weights, schedule = plan_tables(experiment_plan)
    best = training_history.groupby("run", sort=False)[["best_step", "best_epoch"]].first().reset_index()
    q, m = synthetic_quality, zero_shot_metrics
    tables = {
        "reference": reference_table(m), "comparison_all": comparison_table(m, "all_classes"),
        "comparison_target": comparison_table(m, "target_classes"),
        "paper_layout": paper_layout_table(m, paper_table) if paper_table is not None else None,
        "differences": differences_table(m), "paired_seed": paired_seed_table(m),
        "per_class_recall": per_class_recall_table(m), "schedule": schedule, "best_steps": best,
        "per_center": per_center_table(m), "per_center_differences": per_center_differences_table(m),
        "data": data_table(classifier_data["info"]), "weights": weights,
        "ran_on": ran_on_table(training_history, classifier_data.get("synthetic")),
    }
    banners = lineage_mix_banner(m) + time_cap_banner(classifier_data["info"].get("synthetic_info")) + gate_banner(q)
    page = _templates().get_template("report.html.j2").render(
        title=REPORT_TITLE, banner=Markup(banners), stamp=_stamp(), images=img,
        image_size=classifier_data["image_size"],
        tables={k: None if t is None else Markup(_table(t)) for k, t in tables.items()},
        decomposition=Markup(decomposition_html(m)), headline=Markup(headline_html(m, q)),
        interval_note=Markup(_interval_note(m)), quality=Markup(quality_html(q)),
        lineage=Markup(chain_html(m, heading=False)),
    )
    return page, figs["confusion"], figs["curves"], figs["samples"], figs["embedding"], figs["per_center"]
