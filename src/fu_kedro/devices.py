"""Which device a process computes on: one rule for synthesis and the classifiers."""
from __future__ import annotations

import torch


def resolve_device(name: str = "auto", setting: str = "device", state=None) -> torch.device:
    """``auto``: this process's CUDA device (its own one under a multi-process launch, from
    accelerate's state) or else the CPU — never another accelerator picked silently. A named
    device is taken as it is; ``cuda`` without a CUDA device is refused, naming ``setting``.
    """
    if name == "auto":
        if state is None:
            from fu_kedro.launch import distributed_state

            state = distributed_state()
        device = state.device
        return device if device.type == "cuda" else torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{setting} is {name!r} but torch sees no CUDA device; use auto or cpu")
    return device
