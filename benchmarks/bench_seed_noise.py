"""Per-seed sd of the hybrid - baseline difference, old vs new classifier recipe, from one run's data.

Loads a finished run's ``source_images``, ``target_images`` and ``synthetic_batch`` (the latest
versions in the catalog of ``--project``), trains the two arms of the first
``evaluation.comparisons`` pair (HB - ES on the default; the synthetic arm on replicate 0 only)
for ``--seeds`` seeds with each recipe through the evaluation pipeline's own nodes
(``prepare_classifier_data``, ``plan_experiments``, ``train_experiments``), and prints, per
recipe, each arm's accuracy and the per-seed sd of the paired difference, on the **source
validation** patients (what a recipe is chosen on) and on the target (reported, never used to
choose).

    python benchmarks/bench_seed_noise.py --project . --seeds 5
    python benchmarks/bench_seed_noise.py --old weight_averaging=none,selection_metric=val_loss --new ''

``--old`` / ``--new``: ``evaluation.train`` keys set on top of the project's conf (``--new ''`` =
the conf as it is), and ``backbone=<torchvision name>`` for another classifier backbone. Defaults: old = the recipe before weight averaging
(:data:`OLD_RECIPE`), new = the conf.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import pandas as pd

OLD_RECIPE = {"weight_averaging": "none", "selection_metric": "val_loss", "lr_schedule": "cosine"}


def parse_recipe(text: str) -> dict:
    """``key=value,key=value`` -> dict (numbers and booleans parsed by YAML rules)."""
    import yaml

    out = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        key, _, value = item.partition("=")
        out[key.strip()] = yaml.safe_load(value)
    return out


def _accuracy(model, data) -> float:
    from fu_kedro.classifiers.train import predict_proba

    return float((predict_proba(model, data).argmax(axis=1) == data.labels.numpy()).mean())


def recipe_noise(source, target, synthetic, params: dict, classes: list[str], seed: int, recipe: dict,
                 n_seeds: int, comparison: tuple[str, str] | None = None) -> pd.DataFrame:
    """One row per seed: each arm's accuracy on source val and on the target, and their differences.

    ``comparison``: ``(arm, minus arm)`` of ``evaluation.arms`` (default: the first of
    ``evaluation.comparisons``, HB - ES on the default); only those two arms train, the synthetic
    one on replicate 0."""
    from fu_kedro.pipelines.evaluation import nodes

    arm, minus = comparison or tuple(params["comparisons"][0])
    p = copy.deepcopy(params)
    p.update(arms={a: params["arms"][a] for a in (arm, minus)}, comparisons=[[arm, minus]], n_seeds=n_seeds)
    p["backbones"], p["augmentation"] = p["backbones"][:1], p["augmentation"][:1]
    p["quality"] = {**p["quality"], "scorer_arm": None}  # the first real-only arm of the pair
    recipe = dict(recipe)
    if "backbone" in recipe:  # not a train key: the classifier's torchvision backbone
        p["backbones"] = [recipe.pop("backbone")]
    p["train"] = {**p["train"], **recipe}
    data = nodes.prepare_classifier_data(source, target, synthetic, p, classes)
    plan = [run for run in nodes.plan_experiments(data, p, seed) if int(run.get("replicate", 0)) <= 0]
    trained, _ = nodes.train_experiments(data, plan, p)
    rows = {}
    for run in plan:
        model = trained[nodes.run_key(run)].model
        row = rows.setdefault(int(run["seed"]), {"seed": int(run["seed"])})
        name = "hybrid" if run["experiment"] == arm else "baseline"
        row[f"{name}_val"], row[f"{name}_target"] = _accuracy(model, data["source_val"]), _accuracy(model, data["target"])
    out = pd.DataFrame(list(rows.values())).sort_values("seed").reset_index(drop=True)
    for where in ("val", "target"):
        out[f"difference_{where}"] = out[f"hybrid_{where}"] - out[f"baseline_{where}"]
    out.attrs["comparison"] = f"{arm} - {minus}"
    out.attrs["backbone"] = p["backbones"][0]
    return out


def summary(table: pd.DataFrame) -> dict:
    """Per-seed sd (points, ddof 1) of each arm and of the difference, and the mean difference, on val and target."""
    out = {}
    for where in ("val", "target"):
        for col in ("baseline", "hybrid", "difference"):
            out[f"sd_{col}_{where}"] = 100 * float(table[f"{col}_{where}"].std(ddof=1))
        out[f"mean_difference_{where}"] = 100 * float(table[f"difference_{where}"].mean())
    return out


def compare(source, target, synthetic, params, classes, seed, recipes: dict[str, dict], n_seeds: int) -> dict:
    """``{recipe name: (per-seed table, summary, seconds)}`` for every recipe, on the same data and seeds."""
    results = {}
    for name, recipe in recipes.items():
        start = time.perf_counter()
        table = recipe_noise(source, target, synthetic, params, classes, seed, recipe, n_seeds)
        results[name] = (table, summary(table), time.perf_counter() - start)
    return results


def report(results: dict, recipes: dict[str, dict]) -> str:
    """The printed comparison: recipe, then per-seed sd of the difference on source val and target."""
    lines = []
    for name, (table, s, seconds) in results.items():
        lines.append(f"== {name} recipe {recipes[name] or '(conf as is)'}: {table.attrs.get('comparison')} on "
                     f"{table.attrs.get('backbone')} "
                     f"('hybrid' = the first arm, 'baseline' = the second), {len(table)} seeds, {seconds:.0f} s")
        lines.append(table.round(3).to_string(index=False))
        lines.append(
            f"per-seed sd of the difference: source val {s['sd_difference_val']:.1f} points, target "
            f"{s['sd_difference_target']:.1f} points (mean difference val {s['mean_difference_val']:+.1f}, "
            f"target {s['mean_difference_target']:+.1f}); arm sds source val {s['sd_baseline_val']:.1f} / "
            f"{s['sd_hybrid_val']:.1f}, target {s['sd_baseline_target']:.1f} / {s['sd_hybrid_target']:.1f}")
    return "\n".join(lines)


def _tiny_sets(n_per_class: int):
    """Phantom source (a quarter of its patients held out for validation), target and synthetic sets
    of ``n_per_class`` images per class: the smoke test's stand-in for a run's data."""
    from fu_kedro.data_sources import generate_phantoms
    from fu_kedro.datasets import ImageSet

    src = generate_phantoms("source", n_per_class=n_per_class, image_size=64, seed=1)
    pids = src.meta["patient_id"].unique()
    src.meta["split"] = np.where(src.meta["patient_id"].isin(pids[::4]), "val", "train")
    tgt = generate_phantoms("target", n_per_class=n_per_class, image_size=64, seed=2)
    syn = generate_phantoms("source", n_per_class=n_per_class, image_size=64, seed=3)
    meta = pd.DataFrame({"image_id": "syn_" + syn.meta["image_id"], "label": syn.meta["label"],
                         "prompt": "a photo of fetal " + syn.meta["label"], "seed": np.arange(len(syn))})
    return src, tgt, ImageSet(syn.images, meta, {"adapter_sha256": "phantom stand-in"})


def _load(project: Path, tiny: int):
    """The run's three image sets (or ``tiny`` phantom ones) and the project's evaluation parameters."""
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)
    with KedroSession.create(project_path=project) as session:
        context = session.load_context()
        names = ("source_images", "target_images", "synthetic_batch")
        data = _tiny_sets(tiny) if tiny else [context.catalog.load(name) for name in names]
        return (*data, dict(context.params["evaluation"]), list(context.params["classes"]), int(context.params["seed"]))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--project", type=Path, default=Path("."))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--old", default=",".join(f"{k}={v}" for k, v in OLD_RECIPE.items()))
    parser.add_argument("--new", default="")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME:KEY=VALUE,...",
                        help="a further recipe to compare (repeatable)")
    parser.add_argument("--steps", type=int, default=None, help="evaluation.train.steps for every recipe")
    parser.add_argument("--tiny", type=int, default=0, metavar="N",
                        help="smoke test: N phantom images per class instead of the run's data")
    args = parser.parse_args(argv)
    source, target, synthetic, params, classes, seed = _load(args.project.resolve(), args.tiny)
    if args.steps:
        params["train"] = {**params["train"], "steps": args.steps, "eval_every": min(args.steps, params["train"]["eval_every"])}
    if args.tiny:  # tiny sets: one process, small batches
        params.update(workers=1)
        params["train"] = {**params["train"], "batch_size": 8, "bn_recalibration_images": 16}
        params["batching"] = {**params.get("batching", {}), "real_per_batch": 4, "synthetic_per_batch": 4}
    recipes = {"old": parse_recipe(args.old), "new": parse_recipe(args.new)}
    recipes.update({spec.partition(":")[0]: parse_recipe(spec.partition(":")[2]) for spec in args.extra})
    from fu_kedro.pipelines.evaluation.nodes import stage_threads

    with stage_threads(params):
        results = compare(source, target, synthetic, params, classes, seed, recipes, args.seeds)
    print(report(results, recipes))
    return results


if __name__ == "__main__":
    main()
