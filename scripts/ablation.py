"""FU-LoRA's mechanism on the phantom default, one row per variant: does a broad prior + few-shot LoRA help?

    python scripts/ablation.py                      # 5 classifier seeds, the default's replicates
    python scripts/ablation.py --seeds 5 --replicates 2 --out /tmp/ablation.md   # file the table in docs/results/

Runs in a copy of the project (conf + src; its own data/ and MLflow store, so the project's
"latest" versions are untouched): ingestion once, then per variant the pipelines it needs,
each a plain ``kedro run`` with ``--params``:

| variant | base trained on | LoRA | synthesis |
|---|---|---|---|
| broad prior + LoRA (the default) | prior corpus (the shipped models/tiny-phantom-sd) | rank 8 | scale 1.0 |
| broad prior, no LoRA | prior corpus | (fitted, not used) | scale 0.0 |
| ... LoRA scale 0.5 | prior corpus | rank 8 | scale 0.5 |
| ... rank 4 / rank 16 | prior corpus | rank 4 / 16 (refitted on the same base) | scale 1.0 |
| source-only base (the old default) | source train images (``with_base_training``, conf/base's budget) | rank 8 | scale 1.0 |

Every evaluation trains conf/base's arms; the rows use ES (all real images, the "baseline"
columns) and ES+SYN (the same real images + the synthetic batch, the "hybrid" columns), with
the same seeds and schedule; the table shows fidelity, diversity, CAS, both arms' zero-shot
accuracy and hybrid − baseline with the evaluation's hierarchical interval (generator
replicates → classifier seeds → test patients; docs/evaluation.md). Nothing is tuned on the
target: the table reports, it does not select.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_rehearsal import copy_project, latest, run_logged  # noqa: E402

LORA_ONLY = "fit_lora_adapter_node"
SOURCE_BASE = "data/06_models/source-only-base"  # trained in the run (with_base_training), at conf/base's base_training budget
VARIANTS = [
    # name, lora_training params (None = keep the last base and adapter), from-nodes, synthesis params
    ("broad prior + LoRA r8 (default)", {}, None, {}),
    ("broad prior, no LoRA (scale 0)", None, None, {"synthesis.lora_scale": 0.0}),
    ("broad prior + LoRA r8, scale 0.5", None, None, {"synthesis.lora_scale": 0.5}),
    ("broad prior + LoRA r4", {"lora_training.lora.rank": 4, "lora_training.lora.alpha": 4}, LORA_ONLY, {}),
    ("broad prior + LoRA r16", {"lora_training.lora.rank": 16, "lora_training.lora.alpha": 16}, LORA_ONLY, {}),
    ("source-only base + LoRA r8", {"base_training.train_on": "source", "base_training.output_path": SOURCE_BASE,
                                    "lora_training.base_model.pretrained_path": SOURCE_BASE}, None, {}),
]


def kedro(project: Path, pipelines: str, params: dict, log: Path, from_nodes: str | None = None) -> dict:
    cmd = [sys.executable, "-m", "kedro", "run", "--pipelines", pipelines]
    if from_nodes:
        cmd += ["--from-nodes", from_nodes]
    if params:
        cmd += ["--params", ",".join(f"{k}={v}" for k, v in params.items())]
    result = run_logged(project, cmd, log)
    print(f"  {pipelines:28s} exit {result['exit_code']} {result['seconds']:7.1f} s  load {result['load_before']} -> {result['load_after']}",
          flush=True)
    if result["exit_code"]:
        raise SystemExit(f"kedro run failed, see {log}:\n" + "".join(log.read_text().splitlines(keepends=True)[-30:]))
    return result


def _get(d: dict, *path, default=None):
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return default
        d = d[key]
    return d


def row(project: Path, name: str) -> dict:
    """The headline numbers of the latest evaluation in ``project`` (zero_shot_metrics.json, synthetic_quality.json)."""
    metrics = json.loads(latest(project, "data/08_reporting/zero_shot_metrics.json").read_text())
    quality = json.loads(latest(project, "data/08_reporting/synthetic_quality.json").read_text())
    experiments = metrics["experiments"]
    # the synthetic images' own effect: ES+SYN (all real + synthetic) minus ES (all real), same real draws
    base_key = next(k for k in experiments if k.startswith("ES/"))
    hyb_key = next(k for k in experiments if k.startswith("ES_SYN/"))
    diff = next(d for d in metrics["differences"].values() if d["experiment"] == hyb_key)["all_classes"]["accuracy"]
    acc = lambda key: experiments[key]["all_classes"]["mean"]["accuracy"]  # noqa: E731
    return {
        "variant": name,
        "fidelity": quality["fidelity"],
        "fidelity_reference": _get(quality, "fidelity_reference", "accuracy"),
        "diversity": quality.get("diversity_synthetic"),
        "diversity_real": quality.get("diversity_real_train"),
        "cas": quality.get("cas_accuracy"),
        "baseline_acc": acc(base_key),
        "hybrid_acc": acc(hyb_key),
        "difference": diff["mean"],
        "interval": diff.get("ci"),
        "per_seed": diff.get("per_seed"),
        "p_value_t": _get(diff, "paired_test", "t_test", "p_value"),
        "n_seeds": experiments[hyb_key].get("n_seeds"),
        "n_replicates": metrics["bootstrap"].get("n_replicates", 1),
        "majority": _get(metrics, "reference", "majority", "accuracy"),
    }


def markdown(rows: list[dict], seconds: float, seeds: int, replicates: int) -> str:
    head = ("| variant | fidelity | diversity (real: {}) | CAS | baseline ACC | hybrid ACC | hybrid − baseline [95 % interval] | per-seed differences | paired t-test p |\n"
            "|---|---|---|---|---|---|---|---|---|\n").format(
        "–" if not rows or rows[0].get("diversity_real") is None else f"{rows[0]['diversity_real']:.3f}")
    lines = []
    for r in rows:
        f = lambda v, pct=True: "–" if v is None else (f"{100 * v:.1f} %" if pct else f"{v:.3f}")  # noqa: E731
        iv = r["interval"]
        interval = f"[{100 * iv[0]:+.1f}, {100 * iv[1]:+.1f}]" if iv else "[–]"
        lines.append(f"| {r['variant']} | {f(r['fidelity'], False)} | {f(r['diversity'], False)} | {f(r['cas'], False)} | "
                     f"{f(r['baseline_acc'])} | {f(r['hybrid_acc'])} | {100 * r['difference']:+.1f} points {interval} | "
                     + ", ".join(f"{100 * v:+.1f}" for v in (r.get("per_seed") or {}).values())
                     + f" | {'–' if r.get('p_value_t') is None else format(r['p_value_t'], '.2f')} |")
    majority = rows[0].get("majority") if rows else None
    note = (f"\n{seeds} classifier seeds per arm, {replicates} synthetic-batch replicate(s) per variant; "
            + (f"always answering the target's most frequent class scores {100 * majority:.1f} %; " if majority else "")
            + "accuracy = zero-shot on the phantom target, all 5 source classes (paper protocol). "
            + f"Whole ablation: {seconds / 60:.0f} min on this machine.\n")
    return head + "\n".join(lines) + "\n" + note


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seeds", type=int, default=5, help="classifier seeds per arm (evaluation.n_seeds)")
    ap.add_argument("--replicates", type=int, default=None, help="synthesis.replicates (default: the project's)")
    ap.add_argument("--workdir", type=Path, default=None, help="where the project copy goes (default: a temp folder)")
    ap.add_argument("--only", default=None, help="comma-separated variant numbers (1-based) to run, e.g. 1,2")
    ap.add_argument("--out", type=Path, default=None, help="write the markdown table here (and a .json beside it)")
    args = ap.parse_args(argv)

    project = copy_project(args.workdir or Path(tempfile.mkdtemp(prefix="fu_ablation_")) / "project")
    logs = project / "logs"
    logs.mkdir()
    print(f"ablation in {project}", flush=True)
    evaluation = {"evaluation.n_seeds": args.seeds}
    if args.replicates:
        evaluation["synthesis.replicates"] = args.replicates
    start = time.monotonic()
    kedro(project, "ingestion", {}, logs / "ingestion.log")
    chosen = {int(i) for i in args.only.split(",")} if args.only else set(range(1, len(VARIANTS) + 1))
    rows = []
    for i, (name, lora, from_nodes, synthesis) in enumerate(VARIANTS, start=1):
        if i not in chosen:
            continue
        print(f"[{i}] {name}", flush=True)
        if lora is not None and any(k.startswith("base_training.") for k in lora):  # its own base: trained in the run
            kedro(project, "with_base_training", lora | synthesis | evaluation, logs / f"{i}_with_base_training.log")
        else:
            if lora is not None:
                kedro(project, "lora_training", lora, logs / f"{i}_lora_training.log", from_nodes)
            kedro(project, "synthesis,evaluation", synthesis | evaluation, logs / f"{i}_synthesis_evaluation.log")
        rows.append(row(project, name))
        print("   ", json.dumps(rows[-1], default=str), flush=True)
        table = markdown(rows, time.monotonic() - start, args.seeds, rows[0]["n_replicates"])
        if args.out:  # after every variant, so a long ablation leaves its rows as it goes
            args.out.write_text(table)
            args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1, default=str))
    print(table)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
