"""Where each training batch comes from: the rule that makes arms differ only in what they name.

``fixed_real`` (every profile's default): each optimiser step takes ``real_per_batch`` real
images from a real-image stream and, in an arm with synthetic images, ``synthetic_per_batch``
synthetic images from a synthetic stream. The real stream is reshuffled passes over the arm's
real images, ordered by a generator seeded with the classifier seed alone, and the real
images are augmented with their own generator (same seed): arms with the same real images
draw every real image equally often, in the same order, with the same augmentation draws
(common random numbers), whatever synthetic images ride along; arms with different real
images draw the same number of real images per step. The synthetic images have their own
order and augmentation generators. An arm without synthetic images trains on batches of
``real_per_batch`` images; one with them on ``real_per_batch + synthetic_per_batch``.

``pooled`` (the paper's recipe): all of an arm's images shuffled together, ``batch_size``
images a step, the same steps for every arm, so an arm with more images sees each real
image less often.

Either way the stream counts how often each real image was drawn (``real_draws``).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .data import TensorSet, to_model_input

@dataclass(frozen=True)
class Batching:
    """``evaluation.batching`` (checked by its schema, :class:`fu_kedro.pipelines.evaluation.params.Batching`):
    the rule (``fixed_real`` | ``pooled``) and, for ``fixed_real``, the images per step of each kind."""

    rule: str = "pooled"
    real_per_batch: int | None = None       # None: the train block's batch_size
    synthetic_per_batch: int | None = None  # None: the train block's batch_size

    def sizes(self, batch_size: int, n_real: int, n_synthetic: int) -> tuple[int, int]:
        """(real, synthetic) images per step; ``pooled``: (batch, 0) over the pooled set."""
        if self.rule == "pooled":
            return min(batch_size, n_real + n_synthetic), 0
        real = min(self.real_per_batch or batch_size, n_real)
        return real, (min(self.synthetic_per_batch or batch_size, n_synthetic) if n_synthetic else 0)


def index_stream(n: int, batch_size: int, order: torch.Generator):
    """Endless stream of index batches: reshuffled passes over ``n`` images, each cut into full
    batches of ``batch_size`` (the incomplete rest of a pass is dropped; a set smaller than one
    batch is one batch). One item = one optimiser step."""
    while True:
        perm = torch.randperm(n, generator=order)
        if n < batch_size:
            yield perm
            continue
        yield from perm[: n - n % batch_size].split(batch_size)


class BatchStream:
    """Batches for one classifier under a :class:`Batching` rule, counting real-image draws.

    ``real`` and ``synthetic`` live on the training device; ``next(stream)`` gives one step's
    ``(model input, labels)``.
    """

    def __init__(self, real: TensorSet, synthetic: TensorSet | None, rule: Batching, batch_size: int, seed: int,
                 augmentation=None, memory_format: torch.memory_format = torch.contiguous_format):
        self.rule, self.aug, self.memory_format = rule, augmentation, memory_format
        n_syn = 0 if synthetic is None else len(synthetic)
        self.n_real = len(real)
        self.real_draws = np.zeros(self.n_real, dtype=np.int64)
        self.synthetic_draws = 0
        if rule.rule == "pooled":
            self.parts = [TensorSet.concat([real, synthetic]) if n_syn else real]
        else:
            self.parts = [real] + ([synthetic] if n_syn else [])
        real_size, syn_size = rule.sizes(batch_size, len(real), n_syn)
        sizes = [real_size] + ([syn_size] if len(self.parts) > 1 else [])
        # part 0 keeps the generators the loop always had (order: seed, augmentation: seed + 1);
        # the synthetic part gets its own (seed + 2, seed + 3), so it cannot shift the real draws
        self.streams = [index_stream(len(p), s, torch.Generator().manual_seed(seed + 2 * k))
                        for k, (p, s) in enumerate(zip(self.parts, sizes))]
        self.aug_rngs = [torch.Generator().manual_seed(seed + 1 + 2 * k) for k in range(len(self.parts))]
        self.batch_size = sum(min(s, len(p)) for p, s in zip(self.parts, sizes))

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        xs, ys = [], []
        for k, (part, stream) in enumerate(zip(self.parts, self.streams)):
            idx = next(stream)
            real = idx[idx < self.n_real] if k == 0 else idx[:0]
            np.add.at(self.real_draws, real.numpy(), 1)
            self.synthetic_draws += len(idx) - len(real)
            idx = idx.to(part.images.device)
            x = part.images[idx]
            if self.aug is not None:
                x = self.aug(x, self.aug_rngs[k])
            xs.append(x)
            ys.append(part.labels[idx])
        x = xs[0] if len(xs) == 1 else torch.cat(xs)
        y = ys[0] if len(ys) == 1 else torch.cat(ys)
        return to_model_input(x).contiguous(memory_format=self.memory_format), y

    def draws(self) -> dict[str, float]:
        """Cumulative draw counts so far (a history row's columns)."""
        return {"real_draws": int(self.real_draws.sum()), "synthetic_draws": int(self.synthetic_draws),
                "real_draws_min": int(self.real_draws.min()), "real_draws_max": int(self.real_draws.max())}
