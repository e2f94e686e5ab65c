"""Classifier training throughput: our data path vs the FU-LoRA notebook's, on the same original images.

Both paths train the same backbone (one random init, copied), at the same resolution, with
the same batch size, number of epochs, optimiser and training step (``make_optimiser`` and
``train_step`` of ``fu_kedro.classifiers.train``, the ones ``train_classifier`` uses), in one
process on the CPU. Only where the batches come from differs:

* **notebook** (the paper's): a ``Dataset`` that opens the original PNG with PIL in every
  ``__getitem__`` (so every epoch), converts it to RGB and applies the notebook's torchvision
  transforms ``Resize((S, S)), ToTensor(), Normalize(ImageNet)``;
  ``DataLoader(shuffle=True, num_workers=0)``. With ``--augment`` the paper's augmentation
  (``RandomRotation``, ``RandomResizedCrop``, ``RandomHorizontalFlip`` on the PIL image) is
  inserted after the resize, where it is cheapest.
* **ours** (``fu_kedro``): the originals are read once by the project's reader
  (``fu_kedro.data_sources.read_domain``: decode, validate, crop the black border, pad square,
  Lanczos resize to the ingestion size), ``prepare_tensors`` resizes them once to ``S`` and keeps
  one ``uint8`` tensor; every epoch's batches come from ``training_batches``, the generator
  ``train_classifier`` uses (shuffle, batch augmentation, normalisation, all in memory).
  That one-time preparation is timed and charged to our path.

Epochs are interleaved (notebook epoch 1, ours epoch 1, notebook epoch 2, ...) so that load
from other jobs on the machine hits both paths alike: absolute figures are noisy on a shared
CPU, the ratio is the result. Both models first get an untimed forward/backward on every
batch shape. Printed: images/second over whole training epochs (data + forward + backward +
optimiser step), for our path once including the one-time preparation and once per epoch
(steady state); the headline ratio is the median over interleaved epoch pairs, with each
path's median epoch, the sum of all epochs and each path's fastest epoch (the nearest to an
idle machine) beside it; and where the time per image goes
(data vs model step, the notebook's data split into PNG decode and transforms).

Usage (from anywhere; a relative ``--path`` is resolved against the project root)::

    nice -n 19 python benchmarks/bench_classifier_data_path.py            # parameters_evaluation.yml defaults
    nice -n 19 python benchmarks/bench_classifier_data_path.py --augment --threads 1

Figures measured here: ``benchmarks/RESULTS_classifier.md``.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("TQDM_DISABLE", "1")  # the reader's progress bar would interleave with the table

import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

from fu_kedro.classifiers import TrainConfig, build_augmentation, build_classifier, prepare_tensors  # noqa: E402
from fu_kedro.classifiers.data import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from fu_kedro.classifiers.train import DevicePlan, device_plan, make_optimiser, train_step, training_batches  # noqa: E402
from fu_kedro.data_sources import read_domain  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 5.0


class NotebookDataset(Dataset):
    """The notebook's dataset: decode the original PNG from disk on every access.

    ``decode_s`` / ``transform_s`` add up the time spent in PIL decoding (open + convert to
    RGB, which forces the full decode) and in the torchvision transforms.
    """

    def __init__(self, files: list[str], labels: list[int], transform):
        self.files, self.labels, self.transform = files, labels, transform
        self.decode_s = self.transform_s = 0.0

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        t0 = time.perf_counter()
        with Image.open(self.files[i]) as im:
            rgb = im.convert("RGB")
        t1 = time.perf_counter()
        x = self.transform(rgb)
        self.decode_s += t1 - t0
        self.transform_s += time.perf_counter() - t1
        return x, self.labels[i]


def notebook_transform(size: int, aug: dict | None) -> transforms.Compose:
    steps = [transforms.Resize((size, size))]
    if aug:
        steps += [
            transforms.RandomRotation(aug["rotation_degrees"]),
            transforms.RandomResizedCrop(size, scale=tuple(aug["crop_scale"]), ratio=tuple(aug["crop_ratio"])),
            transforms.RandomHorizontalFlip(aug["hflip_p"]),
        ]
    return transforms.Compose(steps + [transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


@dataclass
class EpochTimes:
    """Per-epoch wall times of one path: whole epoch, waiting for batches, model steps."""

    epoch_s: list[float] = field(default_factory=list)
    data_s: list[float] = field(default_factory=list)
    step_s: list[float] = field(default_factory=list)
    images: list[int] = field(default_factory=list)


def run_epoch(model, optimiser, batches, times: EpochTimes, plan: DevicePlan | None = None, scaler=None) -> None:
    """One training epoch over ``batches`` with ``train_step``, timed (on ``plan``'s device;
    host-to-device copies count as data time, GPU work is synchronised into the step time)."""
    model.train()
    step_s, n = 0.0, 0
    cuda = plan is not None and plan.device.type == "cuda"
    start = time.perf_counter()
    for x, y in batches:  # the time between steps is the data path's
        if plan is not None:
            x, y = x.to(plan.device, memory_format=plan.memory_format), y.to(plan.device)
        t0 = time.perf_counter()
        train_step(model, optimiser, x, y, plan.amp_dtype if plan else None, scaler)
        if cuda:
            torch.cuda.synchronize(plan.device)
        step_s += time.perf_counter() - t0
        n += len(y)
    times.epoch_s.append(time.perf_counter() - start)
    times.step_s.append(step_s)
    times.data_s.append(times.epoch_s[-1] - step_s)
    times.images.append(n)


def warm_up(model, batch_sizes: list[int], size: int, device: torch.device = torch.device("cpu")) -> None:
    """Untimed forward/backward per batch shape (oneDNN primitives, allocator); no weight update."""
    model.train()
    for b in batch_sizes:
        out = model(torch.randn(b, 3, size, size, device=device))
        torch.nn.functional.cross_entropy(out, torch.zeros(b, dtype=torch.long, device=device)).backward()
        model.zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> None:
    params = yaml.safe_load((ROOT / "conf/base/parameters_evaluation.yml").read_text())["evaluation"]
    ingestion = yaml.safe_load((ROOT / "conf/base/parameters_ingestion.yml").read_text())["ingestion"]
    classes = yaml.safe_load((ROOT / "conf/base/parameters.yml").read_text())["classes"]  # the one class list
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--path", default="../shared/data/fetal_planes_db_sample", help="FETAL_PLANES_DB folder")
    ap.add_argument("--image-size", type=int, default=int(params["image_size"]), help="classifier input px")
    ap.add_argument("--backbone", default=params["backbones"][0])
    ap.add_argument("--epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=int(params["train"]["batch_size"]))
    ap.add_argument("--augment", action="store_true", help="the paper's augmentation in both paths")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default="cpu",
                    help="cpu | cuda | auto: the model step on this device with evaluation's autocast and memory format "
                         "(fu_kedro.classifiers.train.device_plan: channels-last and bf16/fp16 autocast on CUDA)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    size, classes, b = args.image_size, list(classes), args.batch_size
    known = {k: v for k, v in params["train"].items() if k in TrainConfig.__dataclass_fields__}  # budget keys differ
    cfg = TrainConfig(**dict(known, batch_size=b, device=args.device))
    plan = device_plan(cfg)
    aug_cfg = params["augment"] if args.augment else None
    folder = Path(args.path).expanduser()
    folder = folder if folder.is_absolute() else (ROOT / folder).resolve()
    load_before = os.getloadavg()

    # ---- ours, one-time preparation: read the originals once, resize once ------------------
    # read at the ingestion size (as the pipeline stores them), or at the classifier's if larger
    ing = dict(ingestion, image_size=max(int(ingestion["image_size"]), size))
    t0 = time.perf_counter()
    image_set, _ = read_domain("fetal_planes_db", str(folder), "source", 0, ing, required=classes)
    t1 = time.perf_counter()
    data = prepare_tensors(image_set, classes, size, "benchmark")
    read_s, tensor_s = t1 - t0, time.perf_counter() - t1
    prep_s, n = read_s + tensor_s, len(data)
    aug = build_augmentation(aug_cfg) if aug_cfg else None
    order, augment_rng = torch.Generator().manual_seed(0), torch.Generator().manual_seed(1)

    # ---- notebook: the same files (those the reader kept), decoded every epoch --------------
    files = list(image_set.meta["source_file"])
    sides = [Image.open(f).size for f in files]
    nb_set = NotebookDataset(files, data.labels.tolist(), notebook_transform(size, aug_cfg))
    loader = DataLoader(nb_set, batch_size=b, shuffle=True, num_workers=0, generator=torch.Generator().manual_seed(0))

    # ---- one random init, copied; the same optimiser and step ------------------------------
    torch.manual_seed(0)
    model = build_classifier(args.backbone, len(classes), size)[0]
    model = model.to(plan.device, memory_format=plan.memory_format)
    models = {"notebook": model, "ours": copy.deepcopy(model)}
    opts = {k: make_optimiser(m, cfg) for k, m in models.items()}
    scalers = {k: torch.amp.GradScaler(plan.device.type) if plan.grad_scaling else None for k in models}  # fp16 only
    shapes = sorted({min(b, n), n % b} - {0, 1}, reverse=True)
    for m in models.values():
        warm_up(m, shapes, size, plan.device)

    nb, us = EpochTimes(), EpochTimes()
    nb_decode, nb_transform = [], []  # per notebook epoch
    for epoch in range(args.epochs):  # interleaved: notebook, ours, notebook, ours, ...
        d0, t0 = nb_set.decode_s, nb_set.transform_s
        run_epoch(models["notebook"], opts["notebook"], loader, nb, plan, scalers["notebook"])
        nb_decode.append(nb_set.decode_s - d0)
        nb_transform.append(nb_set.transform_s - t0)
        run_epoch(models["ours"], opts["ours"], training_batches(data, b, order, aug, augment_rng), us, plan, scalers["ours"])
        print(f"  epoch {epoch + 1}/{args.epochs}: notebook {nb.epoch_s[-1]:6.2f} s, ours {us.epoch_s[-1]:6.2f} s,"
              f" ratio {nb.epoch_s[-1] / us.epoch_s[-1]:4.1f}x", flush=True)
    load_after = os.getloadavg()

    # ---- figures ---------------------------------------------------------------------------
    # Ways to turn per-epoch times into a ratio for E epochs. The headline is the median over
    # the interleaved pairs (each notebook epoch against the epoch of ours right after it, so
    # both saw about the same load). Beside it: each path's median epoch, the sum of all
    # epochs, and each path's fastest epoch (the closest this run gets to an idle machine).
    # The one measured preparation is charged in all of them.
    assert nb.images == us.images, (nb.images, us.images)
    E, per_epoch, med = args.epochs, us.images[0], statistics.median
    seen = E * per_epoch
    estimators = {"median epoch": lambda t: E * med(t), "all epochs summed": sum, "fastest epoch": lambda t: E * min(t)}
    rows = {  # label -> seconds for E epochs per estimator
        "notebook (decode every epoch, num_workers=0)": {k: f(nb.epoch_s) for k, f in estimators.items()},
        "ours, including one-time preparation": {k: f(us.epoch_s) + prep_s for k, f in estimators.items()},
        "ours, steady state (per epoch)": {k: f(us.epoch_s) for k, f in estimators.items()},
    }
    notebook = rows["notebook (decode every epoch, num_workers=0)"]
    w, h = zip(*sides)
    print()
    print(f"{n} FETAL_PLANES_DB originals from {folder} ({min(w)}-{max(w)} x {min(h)}-{max(h)} px, median "
          f"{int(med(w))} x {int(med(h))}); backbone {args.backbone} (random init), {size} px, batch {b}, {E} epochs "
          f"of {per_epoch} images, AdamW (fused), augmentation {'on' if aug else 'off'}")
    print(f"device {plan.device} (autocast {plan.amp_dtype or 'no'}, {'channels-last' if plan.memory_format == torch.channels_last else 'contiguous'}), "
          f"torch {torch.__version__}, {torch.get_num_threads()} torch threads, {os.cpu_count()} CPUs "
          f"({platform.machine()}), python {platform.python_version()}, load average {load_before[0]:.1f} before, "
          f"{load_after[0]:.1f} after")
    print(f"our one-time preparation {prep_s:.2f} s ({1e3 * prep_s / n:.1f} ms/image): read_domain {read_s:.2f} s "
          f"(decode, border crop, pad, resize to {ing['image_size']} px), prepare_tensors {tensor_s:.3f} s")
    print()
    print(f"{'images/s (ratio to the notebook)':46s}" + "".join(f"{k:>22s}" for k in estimators))
    for label, secs in rows.items():
        print(f"{label:46s}" + "".join(f"{seen / secs[k]:12.1f} ({notebook[k] / secs[k]:5.2f}x)" for k in estimators))
    pairs = {
        "steady state": [a / c for a, c in zip(nb.epoch_s, us.epoch_s)],
        "including one-time preparation": [E * a / (E * c + prep_s) for a, c in zip(nb.epoch_s, us.epoch_s)],
    }
    for label, r in pairs.items():
        print(f"ratio over interleaved epoch pairs, {label}: median {med(r):.2f}x (min {min(r):.2f}x, "
              f"max {max(r):.2f}x)")
    print()
    print("where the time goes (ms per training image):")
    fastest_nb, fastest_us = nb.epoch_s.index(min(nb.epoch_s)), us.epoch_s.index(min(us.epoch_s))
    for which, pick_nb, pick_us in (("median epoch", med, med), ("fastest epoch", lambda t: t[fastest_nb],
                                                                 lambda t: t[fastest_us])):
        ms_nb = lambda t: 1e3 * pick_nb(t) / per_epoch  # noqa: E731
        ms_us = lambda t: 1e3 * pick_us(t) / per_epoch  # noqa: E731
        print(f"  {which}:")
        print(f"    notebook: data {ms_nb(nb.data_s):.2f} (PNG decode {ms_nb(nb_decode):.2f} + transforms "
              f"{ms_nb(nb_transform):.2f} + loader) + model step {ms_nb(nb.step_s):.2f} = {ms_nb(nb.epoch_s):.2f}")
        print(f"    ours:     data {ms_us(us.data_s):.2f} + model step {ms_us(us.step_s):.2f} = "
              f"{ms_us(us.epoch_s):.2f}")
    nb_data, us_data = 1e3 * med(nb.data_s) / per_epoch, 1e3 * med(us.data_s) / per_epoch
    print(f"  one-time preparation {1e3 * prep_s / n:.2f} ms per image = {1e3 * prep_s / n / (nb_data - us_data):.1f} "
          f"epochs of the notebook's data cost (median); data path alone: ours {nb_data / us_data:.0f}x faster")
    need = (nb_data - TARGET_RATIO * us_data) / (TARGET_RATIO - 1)
    print(f"  the model step is the same code in both paths; with one step cost x for both, the steady-state "
          f"ratio is (notebook data + x) / (our data + x): >= {TARGET_RATIO:.0f}x needs x <= {need:.2f} ms/image")
    print()
    for label, row in (("including one-time preparation", "ours, including one-time preparation"),
                       ("steady state", "ours, steady state (per epoch)")):
        r = med(pairs[label])
        others = ", ".join(f"{notebook[k] / rows[row][k]:.2f}x {k}" for k in estimators)
        print(f"target >= {TARGET_RATIO:.0f}x, {label}: {r:.2f}x (median of pairs) -> "
              f"{'MET' if r >= TARGET_RATIO else 'NOT MET'}   ({others})")

if __name__ == "__main__":
    main()
