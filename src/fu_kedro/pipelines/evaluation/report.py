"""Figures and the HTML report of the evaluation pipeline (pure functions: data in, figure/text out)."""
from __future__ import annotations

import base64
import html
import io
from datetime import datetime, timezone

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

DATA_NAMES = {"baseline": "Real", "hybrid": "Real + synthetic"}


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
        data = DATA_NAMES.get(e["experiment"], e["experiment"].replace("hybrid_x", "Real + synthetic x"))
        rows.append(
            {
                "Data": data,
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
        ax.set_title(f"{key}\n({len(e['seeds'])} seeds summed)", fontsize=9)
    fig.tight_layout()
    return fig


def plot_training_curves(history: pd.DataFrame) -> Figure:
    """Train/val loss and val accuracy per epoch; one column per experiment, one line per seed."""
    history = history.copy()
    history["config"] = history["run"].str.rsplit("/seed", n=1).str[0]
    configs = list(dict.fromkeys(history["config"]))
    fig, axes = plt.subplots(2, len(configs), figsize=(4.2 * len(configs), 6), squeeze=False)
    for col, config in enumerate(configs):
        sub = history[history["config"] == config]
        for seed, h in sub.groupby("seed"):
            line = axes[0, col].plot(h["epoch"], h["train_loss"], label=f"train s{seed}")[0]
            axes[0, col].plot(h["epoch"], h["val_loss"], "--", color=line.get_color(), label=f"val s{seed}")
            axes[1, col].plot(h["epoch"], h["val_accuracy"], color=line.get_color(), label=f"seed {seed}")
            best = int(h["best_epoch"].iloc[0])
            axes[1, col].plot(best, h.loc[h["epoch"] == best, "val_accuracy"], "o", color=line.get_color())
        axes[0, col].set_title(config, fontsize=9)
        axes[0, col].set_ylabel("cross-entropy")
        axes[1, col].set_ylabel("source-val accuracy (dot = kept)")
        axes[1, col].set_xlabel("epoch")
        axes[0, col].legend(fontsize=6)
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


def _table(df: pd.DataFrame) -> str:
    return df.to_html(index=False, border=0, classes="t", na_rep="n/a")


def render_html(sections: list[tuple[str, str]], title: str) -> str:
    """Assemble ``(heading, html body)`` sections into one page."""
    style = (
        "body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222}"
        "table.t{border-collapse:collapse;font-size:13px;margin:0.5em 0}"
        "table.t td,table.t th{border:1px solid #ccc;padding:3px 7px;text-align:right}"
        "table.t th{background:#eee} img{max-width:100%} .note{color:#555;font-size:13px}"
    )
    body = "".join(f"<h2>{html.escape(h)}</h2>\n{b}\n" for h, b in sections)
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p class='note'>generated {stamp}</p>\n{body}</body></html>"
    )
