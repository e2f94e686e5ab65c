"""LoRA adapters through peft and diffusers: attach, export, import (diffusers or kohya-ss files), apply.

In memory an adapter is a :class:`LoraAdapter`: a diffusers-format state dict (keys
``unet.…lora.down.weight`` / ``…lora.up.weight``, optional ``text_encoder.…``) plus string
metadata (lineage: rank, alpha, base-model hash, …). The scale ``alpha / rank`` is folded
into the ``up`` weights on export and import, so every adapter we pass on is exactly
``load_lora_weights``-ready with no side-channel alphas; the original rank and alpha stay
in the metadata.
"""
from __future__ import annotations

import hashlib
import json
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

UNET_TARGETS_DEFAULT = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class LoraAdapter:
    """A LoRA adapter in diffusers format, alpha folded in, with string metadata."""

    state_dict: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def content_hash(self) -> str:
        """SHA-256 of the tensors (names, shapes, values): the adapter's identity."""
        digest = hashlib.sha256()
        for key in sorted(self.state_dict):
            digest.update(key.encode())
            digest.update(self.state_dict[key].detach().to(torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()

    @property
    def has_text_encoder(self) -> bool:
        return any(k.startswith("text_encoder.") for k in self.state_dict)


class ImportedAdapter:
    """A LoRA file to use as it is (``lora_training.adapter_source: file``), as the catalog entry
    ``imported_lora_adapter`` loads it (``datasets.LoraAdapterFileDataset``): ``path`` as the
    parameter names it, and — on first use of ``adapter`` or ``sha256`` — the adapter
    (:func:`read_adapter_file`) and the SHA-256 of the file's bytes. A run that trains its
    adapter never touches the file."""

    def __init__(self, path: str, load: Callable[[], tuple[LoraAdapter, str]]):
        self.path = path
        self._load: Callable[[], tuple[LoraAdapter, str]] | None = load
        self._loaded: tuple[LoraAdapter, str] | None = None

    def _get(self) -> tuple[LoraAdapter, str]:
        if self._loaded is None:
            self._loaded, self._load = self._load(), None
        return self._loaded

    @property
    def adapter(self) -> LoraAdapter:
        return self._get()[0]

    @property
    def sha256(self) -> str:
        return self._get()[1]

    def __repr__(self) -> str:
        return f"ImportedAdapter({self.path!r}, {'read' if self._loaded else 'not read'})"


def attach_lora(
    pipe: StableDiffusionPipeline,
    rank: int,
    alpha: float,
    unet_targets: tuple[str, ...] = UNET_TARGETS_DEFAULT,
    train_text_encoder: bool = False,
    seed: int = 0,
) -> None:
    """Add trainable peft LoRA layers to the UNet (and optionally the text encoder); freeze the rest."""
    if rank <= 0:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
    pipe.unet.requires_grad_(False)
    pipe.vae.requires_grad_(False)
    pipe.text_encoder.requires_grad_(False)
    torch.manual_seed(seed)
    pipe.unet.add_adapter(
        LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(unet_targets))
    )
    if train_text_encoder:
        pipe.text_encoder.add_adapter(
            LoraConfig(r=rank, lora_alpha=alpha, init_lora_weights="gaussian", target_modules=list(TEXT_ENCODER_TARGETS))
        )


_LORA_PART = re.compile(r"\.(lora|lora_linear_layer)\.(down|up)\.")


def _module_of(key: str) -> str:
    """``unet.x.to_q.lora.up.weight`` -> ``unet.x.to_q`` (also for ``lora_linear_layer``)."""
    return _LORA_PART.split(key, 1)[0]


def _fold_scale(state_dict: dict[str, torch.Tensor], scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """Multiply each LoRA ``up`` weight by the scale of its module (alpha / rank)."""
    out = {}
    for key, value in state_dict.items():
        module = _module_of(key)
        match = _LORA_PART.search(key)
        if match and match.group(2) == "up" and module in scales:
            value = value * scales[module]
        out[key] = value.detach().to("cpu", torch.float32).contiguous()
    return out


def export_lora(pipe: StableDiffusionPipeline, rank: int, alpha: float, metadata: dict[str, Any]) -> LoraAdapter:
    """The trained peft layers of ``pipe`` as a :class:`LoraAdapter` (diffusers keys, alpha folded)."""
    state: dict[str, torch.Tensor] = {}
    parts = {"unet": pipe.unet}
    if getattr(pipe.text_encoder, "peft_config", None):
        parts["text_encoder"] = pipe.text_encoder
    for prefix, model in parts.items():
        layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(model))
        state.update({f"{prefix}.{k}": v for k, v in layers.items()})
    modules = {_module_of(k) for k in state}
    state = _fold_scale(state, {m: alpha / rank for m in modules})
    meta = {"format": "diffusers", "rank": str(rank), "alpha": str(alpha), "alpha_folded": "true"}
    meta.update({k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in metadata.items()})
    return LoraAdapter(state, meta)


def apply_lora(pipe: StableDiffusionPipeline, adapter: LoraAdapter, scale: float = 1.0, name: str = "fu_lora") -> None:
    """Load ``adapter`` into ``pipe`` (through ``load_lora_weights``) and set its strength."""
    if name in (pipe.get_list_adapters().get("unet", []) if hasattr(pipe, "get_list_adapters") else []):
        pipe.delete_adapters(name)
    pipe.load_lora_weights(dict(adapter.state_dict), adapter_name=name)
    pipe.set_adapters([name], adapter_weights=[scale])


def save_adapter_file(adapter: LoraAdapter, path: Path) -> None:
    """Write the adapter as one ``.safetensors`` file, loadable by ``load_lora_weights(path)``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(adapter.state_dict, str(path), metadata=adapter.metadata)


_KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")


def read_adapter_metadata(path: str | Path) -> dict[str, str]:
    """The string metadata of a LoRA ``.safetensors`` file, from its header only (no tensor is read)."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        return dict(handle.metadata() or {})


def read_adapter_file(path: str | Path) -> LoraAdapter:
    """Read a LoRA ``.safetensors`` file in diffusers or kohya-ss format as a :class:`LoraAdapter`.

    kohya files (the published FU-LoRA adapters among them) are converted with diffusers'
    own converter; their ``.alpha`` tensors are folded into the weights. Text-encoder keys
    that still contain ``text_model`` are renamed for transformers >= 5, whose
    ``CLIPTextModel`` no longer has a ``text_model`` level.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LoRA adapter file '{path}' does not exist")
    try:
        raw = load_file(str(path))
        file_meta = read_adapter_metadata(path)
    except (SafetensorError, OSError, ValueError) as exc:
        raise ValueError(f"LoRA adapter file '{path}' is not a readable safetensors file: {exc}") from exc
    if not raw:
        raise ValueError(f"LoRA adapter file '{path}' holds no tensors")
    if all(k.startswith(_KOHYA_PREFIXES) for k in raw):
        source_format = "kohya"
    elif any(".lora" in k or "lora_A" in k or "lora_down" in k for k in raw):
        source_format = "diffusers"
    else:
        raise ValueError(f"LoRA adapter file '{path}': no LoRA keys recognised (first key: {next(iter(raw))})")

    state, alphas = StableDiffusionPipeline.lora_state_dict(dict(raw))
    state = {_canonical_key(k): v for k, v in state.items()}
    alphas = {_canonical_key(k).removesuffix(".alpha"): float(v) for k, v in (alphas or {}).items()}
    alphas = {(_module_of(k) if _LORA_PART.search(k) else k) + ".alpha": v for k, v in alphas.items()}
    # Fold alpha/rank per module; modules without an alpha keep scale 1 (alpha == rank).
    scales = {}
    for key, value in state.items():
        match = _LORA_PART.search(key)
        if match and match.group(2) == "down":
            module = _module_of(key)
            alpha_key = next((a for a in (module + ".alpha", module.split(".", 1)[-1] + ".alpha") if a in alphas), None)
            if alpha_key is not None:
                scales[module] = alphas[alpha_key] / value.shape[0]
    state = _fold_scale(state, scales)
    meta = {k: v for k, v in file_meta.items() if k != "lora_adapter_metadata"}
    meta.update({"format": "diffusers", "alpha_folded": "true"})
    if not (file_meta.get("adapter_source") == "file" and "imported_format" in file_meta):
        meta.update({"imported_from": str(path), "imported_format": source_format})
    # else: lora_training wrote this file from an imported one (adapter_source: file); its
    # imported_* keys name that file (e.g. a kohya-ss file) and are kept, not replaced by this
    # diffusers-format copy's own path and format
    return LoraAdapter(state, meta)


# diffusers 0.42 converts kohya files to its *old* attention-processor key style for the
# attention projections (``attn1.processor.to_q_lora.down.weight``,
# ``self_attn.to_q_lora.down.weight``); our adapters use the current style everywhere
# (``attn1.to_q.lora.down.weight``, ``self_attn.q_proj.lora_linear_layer.down.weight``).
_OLD_UNET = re.compile(r"\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.")
_OLD_TEXT = re.compile(r"\.self_attn\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.")
_TEXT_PROJ = {"to_q": "q_proj", "to_k": "k_proj", "to_v": "v_proj", "to_out": "out_proj"}


def _canonical_key(key: str) -> str:
    """One adapter key in our format (see above; transformers >= 5 has no ``text_model`` level)."""
    key = re.sub(r"^text_encoder\.text_model\.", "text_encoder.", key)
    key = _OLD_UNET.sub(lambda m: f".{m[1]}{'.0' if m[1] == 'to_out' else ''}.lora.{m[2]}.", key)
    return _OLD_TEXT.sub(lambda m: f".self_attn.{_TEXT_PROJ[m[1]]}.lora_linear_layer.{m[2]}.", key)


def as_json_metadata(metadata: dict[str, Any]) -> dict[str, str]:
    return {k: v if isinstance(v, str) else json.dumps(v, default=str) for k, v in metadata.items()}


def temp_adapter_path() -> Path:
    return Path(tempfile.mkdtemp(prefix="fu_lora_")) / "adapter.safetensors"


def lora_fit_seed(seed: int, fit: int) -> int:
    """The seed of independent LoRA fit ``fit`` (``lora_training.lora.fits``): the project seed
    itself for fit 0 (the ``lora_adapter``), else a 31-bit hash of (seed, fit) — NumPy's
    ``SeedSequence`` mixes them, so fits of neighbouring project seeds share no seed."""
    if int(fit) < 0:
        raise ValueError(f"a LoRA fit index is >= 0, got {fit}")
    if int(fit) == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed), _FIT_SEED_TAG, int(fit)]).generate_state(1, dtype=np.uint32)[0]
    return int(state) & 0x7FFFFFFF


_FIT_SEED_TAG = 0x4C6F5241  # "LoRA": keeps fit seeds apart from image seeds (SeedSequence([base_seed, index]))


class LoraAdapterFits:
    """The independent LoRA fits 1..K-1 trained beside ``lora_adapter`` (fit 0) on the same base
    and LoRA subset, each from its own seed (:func:`lora_fit_seed`); empty when
    ``lora_training.lora.fits`` is 1.

    ``info``: ``fits`` (K, fit 0 included), ``fit_of`` (fit 0's content hash and catalog
    version: the fits belong to that adapter), one summary per fit (``fits_summary``) and, once
    loaded, ``catalog_version``. Adapters are read on first use (``adapter(r)``). A catalog entry
    with no saved version loads as an empty set whose ``missing`` says so: synthesis needs the
    fits only with ``synthesis.adapter_per_replicate``, and then names what to run.
    """

    def __init__(self, adapters: list | None = None, info: dict | None = None, missing: str | None = None):
        self._adapters = list(adapters or [])  # LoraAdapter, or a callable returning one (lazy)
        self.info = dict(info or {})
        self.missing = missing

    def __len__(self) -> int:
        """Fits held here (1..K-1), without fit 0."""
        return len(self._adapters)

    @property
    def fits(self) -> int:
        """K: the fits these belong to, fit 0 (``lora_adapter``) included."""
        return len(self._adapters) + 1

    def adapter(self, fit: int) -> LoraAdapter:
        """Fit ``fit`` (1..K-1)."""
        if not 1 <= int(fit) <= len(self._adapters):
            raise IndexError(f"LoRA fit {fit}: this set holds fits 1..{len(self._adapters)}")
        item = self._adapters[int(fit) - 1]
        if callable(item):
            item = self._adapters[int(fit) - 1] = item()
        return item

    def __repr__(self) -> str:
        return f"LoraAdapterFits({len(self)} fit(s) beside fit 0, version {self.info.get('catalog_version')})"
