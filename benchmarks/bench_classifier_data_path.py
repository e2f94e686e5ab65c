"""Classifier training throughput: our data path vs the FU-LoRA notebook's, same images/backbone/resolution.

* notebook path: a ``Dataset`` that opens every PNG from disk with PIL in every epoch and
  runs torchvision transforms (Resize, the paper's augmentation, ToTensor, Normalize),
  ``DataLoader(num_workers=0, shuffle=True)``;
* our path (``fu_kedro.classifiers``): images decoded and resized once into one ``uint8``
  tensor, each batch augmented and normalised in memory.

Both feed the same model, optimiser and batch size, in one process, one after the other.
Printed figures: images/second of whole training epochs (data + forward/backward/step)
and of the data path alone (batches produced, no model), and their ratios (ours /
notebook). The one-time decode of our path is timed separately and also folded into an
"including preparation" figure.

Usage (from the project root)::

    python benchmarks/bench_classifier_data_path.py [--images DIR] [--size 32] [--epochs 2]

Default images: the 100 real FETAL_PLANES_DB sample PNGs in ../shared/data (full size,
as the notebook reads them); without them, phantoms written to a temporary folder.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms

from fu_kedro.classifiers import build_augmentation, build_classifier, prepare_tensors, to_model_input
from fu_kedro.classifiers.data import IMAGENET_MEAN, IMAGENET_STD, augment_batch
from fu_kedro.datasets import ImageSet

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_IMAGES = ROOT.parent / "shared" / "data" / "fetal_planes_db_sample" / "Images"


class NotebookDataset(Dataset):
    """Decode from disk on every access, as the paper's notebook does."""

    def __init__(self, files: list[Path], labels: list[int], tf):
        self.files, self.labels, self.tf = files, labels, tf

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as im:
            return self.tf(im.convert("RGB")), self.labels[i]


def _files(folder: Path | None, tmp: Path) -> list[Path]:
    if folder is not None and folder.is_dir():
        files = sorted(folder.glob("*.png"))
        if files:
            return files
    from fu_kedro.data_sources import generate_phantoms

    phantoms = generate_phantoms("source", n_per_class=20, image_size=128, seed=0)
    out = []
    for image_id, img in zip(phantoms.meta["image_id"], phantoms.images):
        path = tmp / f"{image_id}.png"
        Image.fromarray(img).save(path)
        out.append(path)
    return out


def _train_epochs(model, batches_fn, epochs: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        for x, y in batches_fn():
            loss = torch.nn.functional.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return time.perf_counter() - start


def _drain(batches_fn, epochs: int) -> float:
    start = time.perf_counter()
    for _ in range(epochs):
        for _batch in batches_fn():
            pass
    return time.perf_counter() - start


def main() -> None:
    params = yaml.safe_load((ROOT / "conf/base/parameters_evaluation.yml").read_text())["evaluation"]
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=Path, default=DEFAULT_IMAGES)
    ap.add_argument("--size", type=int, default=int(params["image_size"]))
    ap.add_argument("--backbone", default=params["backbones"][0])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    aug_cfg = params["augment"]
    torch.manual_seed(0)

    with tempfile.TemporaryDirectory() as tmp:
        files = _files(args.images, Path(tmp))
        labels = [i % 5 for i in range(len(files))]  # throughput only: labels do not matter
        n = len(files)
        print(f"{n} images from {files[0].parent}, backbone {args.backbone}, {args.size} px, "
              f"{args.epochs} epochs, batch {args.batch_size}, torch threads {torch.get_num_threads()}")

        notebook_tf = transforms.Compose([
            transforms.Resize((args.size, args.size)),
            transforms.RandomRotation(aug_cfg["rotation_degrees"]),
            transforms.RandomResizedCrop(args.size, scale=tuple(aug_cfg["crop_scale"]), ratio=tuple(aug_cfg["crop_ratio"])),
            transforms.RandomHorizontalFlip(aug_cfg["hflip_p"]),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ])
        loader = DataLoader(NotebookDataset(files, labels, notebook_tf), batch_size=args.batch_size,
                            shuffle=True, num_workers=0)

        # ours: decode once (what the catalog does when it loads an ImageSet), then tensors
        t0 = time.perf_counter()
        decoded = [np.asarray(Image.open(f).convert("L").resize((args.size, args.size), Image.BILINEAR)) for f in files]
        images = ImageSet(np.stack(decoded), pd.DataFrame({"image_id": [f.stem for f in files],
                                                            "label": [str(label) for label in labels]}))
        data = prepare_tensors(images, [str(i) for i in range(5)], args.size, "benchmark")
        prep_s = time.perf_counter() - t0
        aug = build_augmentation(aug_cfg, args.size)
        gen = torch.Generator().manual_seed(0)

        def ours():
            for idx in torch.randperm(len(data), generator=gen).split(args.batch_size):
                yield to_model_input(augment_batch(data.images[idx], aug)), data.labels[idx]

        # data path alone
        nb_data_s = _drain(lambda: loader, args.epochs)
        our_data_s = _drain(ours, args.epochs)
        # whole training epochs (same architecture, fresh weights for each path)
        model_nb, _ = build_classifier(args.backbone, 5, args.size)
        model_ours, _ = build_classifier(args.backbone, 5, args.size)
        _train_epochs(model_ours, ours, 1)  # warm-up (allocator, oneDNN kernels) outside the timing
        nb_train_s = _train_epochs(model_nb, lambda: loader, args.epochs)
        our_train_s = _train_epochs(model_ours, ours, args.epochs)

    seen = n * args.epochs
    rows = [
        ("data path only", seen / nb_data_s, seen / our_data_s),
        ("training epochs", seen / nb_train_s, seen / our_train_s),
        ("training incl. one-time decode", seen / nb_train_s, seen / (our_train_s + prep_s)),
    ]
    print(f"one-time decode + resize of our path: {prep_s:.2f} s ({n / prep_s:.0f} images/s)")
    print(f"{'measure':34s} {'notebook img/s':>15s} {'ours img/s':>12s} {'ratio':>7s}")
    for name, nb, ours_ in rows:
        print(f"{name:34s} {nb:15.1f} {ours_:12.1f} {ours_ / nb:6.1f}x")


if __name__ == "__main__":
    main()
