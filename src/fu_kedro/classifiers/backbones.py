"""torchvision classification backbones with a new head, optionally from a local ImageNet weights file.

Nothing is downloaded: ImageNet weights come only from a file the user names (a torchvision
state dict such as ``resnet18-f37072fd.pth``); without one the backbone starts from random
initialisation. The returned description says which, so every experiment records it.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torchvision
from torch import nn

# The FU-LoRA paper's five backbones; any torchvision classification model name works.
PAPER_BACKBONES = ("resnet18", "densenet169", "mobilenet_v2", "efficientnet_b0", "vit_b_16")
IMAGENET_CLASSES = 1000


def classification_backbones() -> list[str]:
    """Names of torchvision's image-classification models (``torchvision.models.list_models``)."""
    return torchvision.models.list_models(module=torchvision.models)


def _model_kwargs(name: str, image_size: int) -> dict:
    kwargs: dict = {}
    if name.startswith("vit_"):
        patch = int(name.rsplit("_", 1)[1])
        if image_size % patch:
            raise ValueError(f"backbone {name} needs an image size divisible by its patch size {patch}, got {image_size}")
        kwargs["image_size"] = image_size
    if name in ("googlenet", "inception_v3"):
        # auxiliary heads only matter for ImageNet training recipes; one logit tensor keeps one loop
        kwargs["aux_logits"] = False
        kwargs["init_weights"] = True
    return kwargs


def check_backbone(name: str) -> None:
    """Raise ``ValueError`` naming the backbone if torchvision has no classification model of that name."""
    known = classification_backbones()
    if name not in known:
        raise ValueError(
            f"backbone {name!r} is not a torchvision classification model; "
            f"the paper's are {list(PAPER_BACKBONES)}, all available: {known}"
        )


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - re-raised with the file named
        raise ValueError(f"weights file {path} is not a readable torch state dict: {exc}") from exc
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"weights file {path} does not hold a state dict of tensors")
    return state


def load_imagenet_weights(model: nn.Module, name: str, path: Path, image_size: int) -> None:
    """Copy every weight of an ImageNet ``path`` into ``model`` except its classifier head.

    The file must load *strictly* into the same backbone with torchvision's 1000-class head
    (so a resnet50 file for a resnet18 fails here, naming missing/unexpected keys); the head
    is the set of tensors whose shape depends on the number of classes.
    """
    state = _read_state_dict(path)
    kwargs = _model_kwargs(name, image_size)
    if name.startswith("vit_"):
        kwargs["image_size"] = 224  # ImageNet files hold 224-px position embeddings
    reference = torchvision.models.get_model(name, weights=None, num_classes=IMAGENET_CLASSES, **kwargs)
    try:
        reference.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ValueError(f"weights file {path} does not match backbone {name!r}: {exc}") from exc
    ref_state = reference.state_dict()
    if name.startswith("vit_") and image_size != 224:
        from torchvision.models.vision_transformer import interpolate_embeddings

        ref_state = interpolate_embeddings(image_size, int(name.rsplit("_", 1)[1]), ref_state)
    own = model.state_dict()
    body = {k: v for k, v in ref_state.items() if k in own and own[k].shape == v.shape}
    head = sorted(set(own) - set(body))
    model.load_state_dict(body, strict=False)
    if not head:
        raise ValueError(f"could not tell the classifier head of {name!r} from its body")


def build_classifier(
    name: str, num_classes: int, image_size: int, weights_path: str | None = None
) -> tuple[nn.Module, str]:
    """A torchvision backbone with a ``num_classes`` head, and a description of its initial weights.

    Args:
        name: torchvision model name (``resnet18``, ``vit_b_16``, ...).
        num_classes: size of the new classification head.
        image_size: input side in pixels (only ViTs need it at build time).
        weights_path: local ImageNet state dict for this backbone, or ``None`` for random init.

    Returns:
        (model, "ImageNet weights from <file>" or "random init").
    """
    check_backbone(name)
    model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **_model_kwargs(name, image_size))
    if not weights_path:
        return model, "random init"
    path = Path(weights_path)
    load_imagenet_weights(model, name, path, image_size)
    return model, f"ImageNet weights from {path}"
