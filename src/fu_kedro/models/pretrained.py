"""Where a pretrained base (Stable Diffusion v1.5, diffusers layout) is, and what to download when it is not.

One answer for both callers: the pre-run check (:mod:`fu_kedro.prerequisites`) and the
loader (:func:`fu_kedro.models.diffusion.load_pretrained_pipeline`). Runs never download:
the weights must be in a local folder or in the local Hugging Face cache. Light imports
only (the pre-run check imports this for every ``kedro run``).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

SD15_HUB_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"  # was runwayml/stable-diffusion-v1-5 until 2024
DEFAULT_FOLDER = "models/stable-diffusion-v1-5"


@dataclass(frozen=True)
class PretrainedBase:
    """``pretrained_path`` resolved: what ``from_pretrained`` reads, or why there is nothing to read."""

    requested: str | None
    source: str | None  # a local folder or a hub id in the local cache; None when not available
    problem: str | None  # why it is not available and how to get it; None when it is


def download_advice(dest: str) -> str:
    return (
        f"On a machine with internet, download the diffusers folder of {SD15_HUB_ID} (formerly "
        f"runwayml/stable-diffusion-v1-5; about 5 GB): `hf download {SD15_HUB_ID} --local-dir {dest} "
        '--include "*.json" --include "*.txt" --include "unet/diffusion_pytorch_model.safetensors" '
        '--include "vae/diffusion_pytorch_model.safetensors" --include "text_encoder/model.safetensors"` '
        "(older huggingface_hub: `huggingface-cli download` with the same arguments)"
    )


def hub_cached(model_id: str) -> bool:
    """A hub id whose ``model_index.json`` is in the local Hugging Face cache."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(model_id, "model_index.json"), str)
    except Exception:  # noqa: BLE001 - not a valid repo id, or no hub library: not cached
        return False


def resolve_pretrained_base(model_id_or_path: str | None) -> PretrainedBase:
    """A folder with ``model_index.json``, or a hub id (``owner/name``) in the local cache; else the problem."""
    if not model_id_or_path:
        return PretrainedBase(None, None, (
            f"pretrained_path is not set. {download_advice(DEFAULT_FOLDER)}, put the folder at "
            f"{Path(DEFAULT_FOLDER).expanduser().resolve()} and set "
            f"lora_training.base_model.pretrained_path: {DEFAULT_FOLDER}."))
    text = str(model_id_or_path)
    path = Path(text).expanduser()
    if (path / "model_index.json").is_file():
        return PretrainedBase(text, str(path), None)
    looks_like_path = path.is_absolute() or text.startswith((".", "~")) or path.exists() or text.count("/") != 1
    if not looks_like_path and hub_cached(text):
        return PretrainedBase(text, text, None)
    dest = path.resolve()
    where = (
        f"{dest} has no model_index.json (not a diffusers folder)" if looks_like_path
        else f"'{text}' is neither a folder here ({dest}) nor a model in the local Hugging Face cache, and runs never download"
    )
    return PretrainedBase(text, None, f"{where}. {download_advice(text)}, and put the folder at {dest} "
                                      "(or point pretrained_path at the folder where it is).")
