"""Generator variants of a profile, judged on the source side only (docs/results/2026-11-28-real-cpu-choices.md).

For each variant (``--params``-style overrides on top of ``--env``) it trains the tiny base
and the LoRA with the pipelines' own nodes (``train_base_model``, ``fit_lora_adapter``),
makes ``--per-class`` images per class at each guidance scale, with and without the adapter
(LoRA scale 1 and 0), and scores them with fixed real-only scorers: ``--scorers`` resnet18
baselines trained as the evaluation pipeline trains them (``evaluation.train``,
``evaluation.augment``, seeds 42, 43, ...) on the source *train* split. Fidelity = share of
images the scorers label as their prompted class. Also printed: the scorers' accuracy on
real source-val images and on the base VAE's round trips of the train and val images (what
the decoder can render at all), and copies: the pipeline's decoder-space check in short
(every image through the base VAE once; a synthetic image is flagged when its correlation with
some source-train image reaches the threshold calibrated between real source-val images and VAE
round trips of train images). No target image is read.

Needs the ingestion outputs of the same env in the catalog (``kedro run --env <env>
--pipeline ingestion --params source_path=...,target_path=...``). Trained bases and the
scorers are cached under ``--workdir`` (keyed by the base parameters), so guidance or LoRA
variants on one base cost only the LoRA and the sampling. One JSON line per variant is
appended to ``<workdir>/results.jsonl``; sample grids (8 per class) go beside it.

    python scripts/generator_sweep.py --env real_cpu --name repeats4 \\
        --set base_training.source_repeats=4 --guidance 7.5 10 \\
        --params source_path=../shared/data/fetal_planes_db_sample,target_path=../shared/data/african_planes_dev
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PROJECT = Path(__file__).resolve().parents[1]


def _context(env: str, runtime_params: dict):
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(PROJECT)
    with KedroSession.create(project_path=PROJECT, env=env, runtime_params=runtime_params) as session:
        context = session.load_context()
        return context.params, context.catalog.load("source_images"), context.catalog.load("lora_subset")


def _scorers(train, val, params: dict, n: int, path: Path) -> list:
    from fu_kedro.classifiers import train as T
    from fu_kedro.classifiers.backbones import build_classifier
    from fu_kedro.pipelines.evaluation.params import TrainParams

    if path.exists():
        return torch.load(path, weights_only=False)
    cfg, models = T.TrainConfig(**TrainParams.from_any(params["evaluation"]["train"]).model_dump()), []
    for seed in range(42, 42 + n):
        torch.manual_seed(seed)
        model, _ = build_classifier("resnet18", len(params["classes"]), params["evaluation"]["image_size"], None)
        models.append(T.train_classifier(model, train, val, cfg, seed=seed, augmentation=params["evaluation"]["augment"],
                                         run_name=f"scorer{seed}").model.eval())
    torch.save(models, path)
    return models


def _score(models: list, images: np.ndarray, labels: np.ndarray, classes: list[str]) -> dict:
    from fu_kedro.classifiers import train as T
    from fu_kedro.classifiers.data import TensorSet

    data = TensorSet(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(labels), None)
    right = np.stack([T.predict_proba(m, data).argmax(1) == labels for m in models])
    return {"all": round(float(right.mean()), 3),
            **{c: round(float(right[:, labels == i].mean()), 3) for i, c in enumerate(classes) if (labels == i).any()}}


def _copy_check(vae, train: np.ndarray, val: np.ndarray):
    """``check(images)`` -> flagged (bool per image); ``check(None)`` -> the threshold."""
    from fu_kedro.pipelines.evaluation.quality import calibrate_memorisation_threshold, nearest_real_similarity, vae_project

    train_p = vae_project(vae, train)
    positive = nearest_real_similarity(vae_project(vae, train_p), train_p)[0]  # round trips, seen by the decoder
    negative = nearest_real_similarity(vae_project(vae, val), train_p)[0]
    threshold = calibrate_memorisation_threshold(positive, negative)["threshold"]
    return lambda images: threshold if images is None else nearest_real_similarity(vae_project(vae, images), train_p)[0] >= threshold


def _base(source, params: dict, workdir: Path):
    """The tiny base of these parameters: trained by the base_training pipeline's nodes, or from the cache."""
    from fu_kedro.data_sources.prior_corpus import make_prior_corpus
    from fu_kedro.pipelines.base_training.nodes import base_training_corpus, train_base_model

    bt = params["base_training"]
    trained = {k: v for k, v in bt.items() if k not in ("name", "description", "output_path")}
    key = hashlib.sha256(json.dumps([trained, params["seed"]], sort_keys=True, default=str).encode()).hexdigest()[:12]
    path = workdir / f"base_{key}.pt"
    if path.exists():
        return torch.load(path, weights_only=False)[0], key
    prior = make_prior_corpus(bt["prior"], params["classes"], params["seed"])
    corpus = base_training_corpus(prior, source, bt)
    base, history = train_base_model(corpus, bt, params["ingestion"]["caption_template"], params["seed"])
    torch.save((base, history), path)
    return base, key


def main() -> None:  # long: one linear sweep (train, sample, score, record), easier to read in one piece
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--env", default="real_cpu")
    ap.add_argument("--name", required=True)
    ap.add_argument("--params", default="", help="kedro-style key=value,... (e.g. source_path, target_path)")
    ap.add_argument("--set", nargs="*", default=[], help="the variant: key=value overrides (values may hold spaces)")
    ap.add_argument("--guidance", nargs="+", type=float, default=None, help="default: synthesis.guidance_scale")
    ap.add_argument("--per-class", type=int, default=40)
    ap.add_argument("--scorers", type=int, default=3)
    ap.add_argument("--workdir", default=str(PROJECT / "data" / "generator_sweep"))
    a = ap.parse_args()
    os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
    from fu_kedro.classifiers.data import prepare_tensors
    from fu_kedro.config import nested_params
    from fu_kedro.models.base_model import BaseModel
    from fu_kedro.models.generation import generate_images, image_seed, prepare_pipeline
    from fu_kedro.pipelines.evaluation.quality import vae_project
    from fu_kedro.pipelines.lora_training.nodes import fit_lora_adapter

    workdir = Path(a.workdir)
    (workdir / a.name).mkdir(parents=True, exist_ok=True)
    overrides = [p for p in a.params.split(",") if p] + a.set
    params, source, subset = _context(a.env, nested_params(overrides))
    torch.set_num_threads(int(params["lora_training"].get("torch_threads") or 1))
    classes, size, seed = list(params["classes"]), params["evaluation"]["image_size"], params["seed"]
    split = source.meta["split"].astype(str).to_numpy()
    tensors = prepare_tensors(source, classes, size, "source")
    train, val = tensors.subset(split == "train"), tensors.subset(split == "val")
    scorers = _scorers(train, val, params, a.scorers, workdir / f"scorers_{a.env}_{size}_{a.scorers}.pt")
    start = time.process_time()
    base, key = _base(source, params, workdir)
    row = {"name": a.name, "env": a.env, "set": a.set, "base": key,
           "scorers_source_val": _score(scorers, val.images.squeeze(1).numpy(), val.labels.numpy(), classes)["all"]}
    for name, part in (("train", train), ("val", val)):
        trips = vae_project(base.pipe.vae, part.images.squeeze(1).numpy())
        row[f"vae_round_trip_{name}"] = _score(scorers, trips, part.labels.numpy(), classes)["all"]
    copies = _copy_check(base.pipe.vae, train.images.squeeze(1).numpy(), val.images.squeeze(1).numpy())
    row["copy_threshold"] = round(copies(None), 3)
    pristine = copy.deepcopy(base.pipe)  # the LoRA loop attaches its layers to the pipe it gets
    adapter, _, _ = fit_lora_adapter(BaseModel(copy.deepcopy(pristine), dict(base.info)), subset,
                                     params["lora_training"], seed)
    syn = params["synthesis"]
    prompts = [params["ingestion"]["caption_template"].format(plane=c) for c in classes for _ in range(a.per_class)]
    labels = np.repeat(np.arange(len(classes)), a.per_class)
    seeds = [image_seed(seed, i) for i in range(len(prompts))]
    for scale in (0.0, 1.0):
        pipe = prepare_pipeline(copy.deepcopy(pristine), adapter if scale else None, scale, torch.device("cpu"),
                                torch.float32, False, syn["scheduler"])
        for g in a.guidance or [float(syn["guidance_scale"])]:
            images = generate_images(pipe, prompts, seeds, resolution=syn["resolution"] or size, steps=syn["steps"],
                                     guidance_scale=g, batch_size=syn["batch_size"])
            row[f"fidelity_lora{scale:g}_g{g:g}"] = fid = _score(scorers, images, labels, classes)
            flagged = copies(images)
            fid["copies"] = {c: int(flagged[labels == i].sum()) for i, c in enumerate(classes)} | {"all": int(flagged.sum())}
            print(a.name, f"LoRA scale {scale:g}, guidance {g:g}:", fid, flush=True)
            side = images.shape[1]
            grid = images.reshape(len(classes), a.per_class, side, side)[:, :8].transpose(0, 2, 1, 3)
            Image.fromarray(grid.reshape(len(classes) * side, -1)).save(workdir / a.name / f"grid_lora{scale:g}_g{g:g}.png")
    row["cpu_seconds"] = round(time.process_time() - start)
    with open(workdir / "results.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps(row))


if __name__ == "__main__":
    main()
