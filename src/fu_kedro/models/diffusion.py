"""Latent diffusion models for both profiles, built in one place.

Both profiles are a diffusers ``StableDiffusionPipeline`` (``AutoencoderKL`` +
``UNet2DConditionModel`` + CLIP text encoder + tokenizer); they differ only in where the
weights come from and in a handful of sizes:

* ``tiny`` (offline default): every component is built from the small config below and
  trained here from scratch on CPU (see :mod:`fu_kedro.models.training`). It is named
  "tiny base trained here" in every log and report, never "Stable Diffusion".
* ``pretrained``: ``StableDiffusionPipeline.from_pretrained(<local dir or hub id>)`` —
  Stable Diffusion v1.5 in the paper. Nothing is downloaded at run time: the weights must
  be on disk (or in the local Hugging Face cache).

``SD15_CONFIG`` holds SD v1.5's published architecture values so the paper's architecture
can be built with random weights (tests, benchmarks) without a download.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from fu_kedro.models.pretrained import download_advice, resolve_pretrained_base

log = logging.getLogger(__name__)

TINY_BASE_NAME = "tiny base trained here (not Stable Diffusion)"

# SD v1.5's training noise schedule (scheduler/scheduler_config.json), shared by both profiles.
SD15_NOISE_SCHEDULE: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "steps_offset": 1,
}

# Small enough to train on 2 CPU cores in minutes; same classes as SD v1.5's components.
TINY_CONFIG: dict[str, Any] = {
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 3,  # 3 blocks -> downsampling factor f=4
        "up_block_types": ["UpDecoderBlock2D"] * 3,
        "block_out_channels": [16, 32, 32],
        "layers_per_block": 1,
        "latent_channels": 4,
        "norm_num_groups": 8,
        "mid_block_add_attention": False,
    },
    "unet": {
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
        "block_out_channels": [32, 64, 64],
        "layers_per_block": 1,
        "attention_head_dim": 4,  # diffusers' name; it is the number of heads in SD-style UNets
        "norm_num_groups": 16,
    },
    "text_encoder": {
        "hidden_size": 64,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "max_position_embeddings": 77,
        "projection_dim": 64,
    },
    # SD v1.5's noise schedule (DPM-Solver++ is unstable at the cosine schedule's end)
    "scheduler": dict(SD15_NOISE_SCHEDULE),
}

# Stable Diffusion v1.5's published component configs (runwayml/stable-diffusion-v1-5,
# */config.json), so its exact architecture can be built offline with random weights.
SD15_CONFIG: dict[str, Any] = {
    "vae": {
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
        "block_out_channels": [128, 256, 512, 512],
        "layers_per_block": 2,
        "latent_channels": 4,
        "norm_num_groups": 32,
        "sample_size": 512,
        "scaling_factor": 0.18215,
    },
    "unet": {
        "sample_size": 64,
        "in_channels": 4,
        "out_channels": 4,
        "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        "block_out_channels": [320, 640, 1280, 1280],
        "layers_per_block": 2,
        "cross_attention_dim": 768,
        "attention_head_dim": 8,
        "norm_num_groups": 32,
    },
    "text_encoder": {
        "vocab_size": 49408,
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "max_position_embeddings": 77,
        "projection_dim": 768,
        "hidden_act": "quick_gelu",
    },
    "scheduler": SD15_NOISE_SCHEDULE | {"clip_sample": False, "set_alpha_to_one": False},  # + DDIM-only keys
}

# The offline CLIP tokenizer of the tiny base: a small byte-level BPE vocabulary committed as
# package data (vocab.json + merges.txt beside this module): all 256 bytes, each also as a
# word end, plus whole-word tokens for the caption words (abdomen brain femur thorax other fetal
# photo a of an the fetus ultrasound image scan plane view standard maternal cervix abdominal head
# heart stomach bone trans-thalamic trans-cerebellum trans-ventricular low quality blurry noise
# text), each spelt by a chain of merges. Any other word falls back to byte-level pieces (still
# tokenised, never an error). 653 tokens; <|startoftext|> = 651, <|endoftext|> = 652 (eos, pad,
# unk). tests/test_diffusion_tokenizer.py pins the token ids of every caption the project uses.
TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"


def build_offline_tokenizer() -> CLIPTokenizer:
    """The tiny base's CLIP tokenizer from the committed ``tokenizer/vocab.json`` + ``merges.txt``.

    ``model_max_length`` is 77 like CLIP's. (transformers 5: the files go in as ``vocab=`` /
    ``merges=`` paths; ``vocab_file=`` / ``merges_file=`` are silently ignored there.)
    """
    return CLIPTokenizer(vocab=str(TOKENIZER_DIR / "vocab.json"), merges=str(TOKENIZER_DIR / "merges.txt"),
                         model_max_length=77)


def _text_config(tokenizer: CLIPTokenizer, values: dict[str, Any]) -> CLIPTextConfig:
    # With a small vocab the special ids are not CLIP's; the pooled output is taken at the
    # eos position, so the config must know the real ids.
    return CLIPTextConfig(
        **{"vocab_size": len(tokenizer)} | values,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def check_resolution(resolution: int, factor: int, where: str = "lora_training.resolution") -> None:
    """The VAE must take the resolution: a positive multiple of 8 (SD pipelines) and of the VAE factor."""
    if not isinstance(resolution, int) or resolution <= 0 or resolution % 8 or resolution % factor:
        raise ValueError(
            f"{where}={resolution!r}: the VAE cannot take it; use a positive multiple of 8 "
            f"(and of the VAE downsampling factor {factor}), e.g. 32 (tiny) or 512 (SD v1.5)"
        )


def build_pipeline_from_config(
    config: dict[str, Any], resolution: int, seed: int, tokenizer: CLIPTokenizer | None = None
) -> StableDiffusionPipeline:
    """Assemble a ``StableDiffusionPipeline`` with randomly initialised weights from ``config``.

    Used for the tiny base (then trained) and for SD v1.5's architecture in tests. The
    sampler is DPM-Solver++ (multistep), built from the training noise schedule.
    """
    torch.manual_seed(seed)
    tokenizer = tokenizer or build_offline_tokenizer()
    vae_cfg = dict(config["vae"])
    down = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    vae_cfg.setdefault("sample_size", resolution)
    vae = AutoencoderKL(**vae_cfg)
    text_encoder = CLIPTextModel(_text_config(tokenizer, config["text_encoder"]))
    unet_cfg = dict(config["unet"])
    unet_cfg.setdefault("sample_size", resolution // down)
    unet_cfg.setdefault("cross_attention_dim", config["text_encoder"]["hidden_size"])
    unet = UNet2DConditionModel(**unet_cfg)
    scheduler = DPMSolverMultistepScheduler.from_config(config["scheduler"])  # ignores DDIM-only keys
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def training_noise_scheduler(pipe: StableDiffusionPipeline) -> DDPMScheduler:
    """The DDPM noise schedule matching the pipeline's sampler (same betas and prediction type)."""
    return DDPMScheduler.from_config(pipe.scheduler.config)


# diffusers renamed from_pretrained's `torch_dtype` to `dtype` (the old name warns); older
# releases (>= 0.32 is allowed) know only `torch_dtype`.
try:
    from diffusers.utils.deprecation_utils import _resolve_dtype as _  # noqa: F401

    _DTYPE_KWARG = "dtype"
except ImportError:
    _DTYPE_KWARG = "torch_dtype"


def load_pretrained_pipeline(model_id_or_path: str) -> StableDiffusionPipeline:
    """Load SD v1.5 (or any SD-1.x layout) from a local folder or the local hub cache — never downloads.

    A missing base fails at once, naming what to download and where to put it
    (:func:`fu_kedro.models.pretrained.resolve_pretrained_base`, as the pre-run check says it).
    """
    base = resolve_pretrained_base(model_id_or_path)
    if base.problem:
        raise FileNotFoundError(f"Pretrained base model: {base.problem}")
    try:
        pipe = StableDiffusionPipeline.from_pretrained(
            base.source,
            local_files_only=True,
            safety_checker=None,
            requires_safety_checker=False,
            # float32 whatever the files hold: transformers 5 otherwise keeps an fp16 text encoder
            # in fp16 beside an fp32 UNet (dtype mismatch); training and synthesis cast themselves.
            # `dtype` where diffusers has it (`torch_dtype` is deprecated there), else `torch_dtype`
            **{_DTYPE_KWARG: torch.float32},
        )
    except OSError as exc:  # e.g. a cached hub id with some of its files missing
        raise FileNotFoundError(
            f"Pretrained base model '{model_id_or_path}' is incomplete ({exc}). {download_advice(str(model_id_or_path))}."
        ) from exc
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config)
    return pipe


def state_dict_hash(modules: dict[str, torch.nn.Module]) -> str:
    """SHA-256 over the parameters of the named modules, in a fixed order (content hash)."""
    digest = hashlib.sha256()
    for name in sorted(modules):
        for key, tensor in sorted(modules[name].state_dict().items()):
            digest.update(f"{name}.{key}".encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def pipeline_hash(pipe: StableDiffusionPipeline) -> str:
    """Content hash of the weights of a pipeline (VAE, UNet, text encoder)."""
    return state_dict_hash({"vae": pipe.vae, "unet": pipe.unet, "text_encoder": pipe.text_encoder})


def to_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)
