"""kedro-viz previews of the project's datasets (the side panel when a dataset is clicked).

kedro-viz calls ``dataset.preview(**preview_args)`` (``preview_args`` from the catalog entry's
``metadata: kedro-viz: preview_args``) and shows the returned value by the *return
annotation* of ``preview`` (``kedro_datasets._typing``: ``ImagePreview`` = a base64 PNG,
``JSONPreview`` = a JSON string; without an annotation kedro-viz reports ``_empty`` and draws
nothing):

- an image set: a grid of its images, one labelled row per class (:func:`image_grid_preview`);
- a model (the base model, the LoRA adapter): a card with its configuration and a sample drawn
  from it with fixed seeds, one image per class (:func:`model_card_preview`; the sample is
  generated when the preview is opened, on the CPU, from the saved weights; a pretrained base
  is not loaded for a preview and its card says so);
- the LoRA fits' index, a file from outside the project: its JSON.
"""
from __future__ import annotations

import base64
import io
import json
from typing import Any, Sequence

import numpy as np
from kedro_datasets._typing import ImagePreview, JSONPreview
from PIL import Image, ImageDraw, ImageFont


def _png_b64(image: Image.Image) -> ImagePreview:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return ImagePreview(base64.b64encode(buf.getvalue()).decode("ascii"))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def image_grid_preview(image_set, per_class: int = 6, size: int = 64, by: str = "label") -> ImagePreview:
    """The first ``per_class`` images of each class (rows, labelled), as a base64 PNG."""
    meta = image_set.meta
    groups = sorted(meta[by].astype(str).unique()) if by in meta.columns else ["all"]
    label_w, pad = 72, 2
    rows = []
    for g in groups:
        idx = np.flatnonzero(meta[by].astype(str).to_numpy() == g) if by in meta.columns else np.arange(len(meta))
        rows.append((g, idx[:per_class]))
    width = label_w + per_class * (size + pad)
    canvas = Image.new("L", (width, max(1, len(rows)) * (size + pad)), color=255)
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    for r, (g, idx) in enumerate(rows):
        y = r * (size + pad)
        draw.text((4, y + size // 2 - 6), g[:11], fill=0, font=font)
        for c, i in enumerate(idx):
            tile = Image.fromarray(image_set.images[i]).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (size + pad), y))
    return _png_b64(canvas)


def json_preview(data: dict[str, Any], drop: tuple[str, ...] = ()) -> JSONPreview:
    return JSONPreview(json.dumps({k: v for k, v in data.items() if k not in drop}, default=str))


def model_card_preview(title: str, facts: Sequence[tuple[str, Any]], samples: Sequence[tuple[str, np.ndarray]],
                       note: str = "", size: int = 96) -> ImagePreview:
    """A model's card as one PNG: ``title``, its configuration (``facts``, one ``key: value``
    line each), then ``samples`` (label, ``uint8`` image) in one row, and ``note`` under them."""
    font, bold, pad, line = _font(13), _font(15), 8, 18
    text = [f"{k}: {v}" for k, v in facts]
    n = max(1, len(samples))
    width = max(480, pad + n * (size + pad))
    height = pad + line + len(text) * line + pad + (size + line + pad if samples else 0) + (line if note else 0) + pad
    canvas = Image.new("L", (width, height), color=255)
    draw = ImageDraw.Draw(canvas)
    draw.text((pad, pad), title, fill=0, font=bold)
    y = pad + line + 4
    for t in text:
        draw.text((pad, y), t[:90], fill=40, font=font)
        y += line
    y += pad
    for i, (label, img) in enumerate(samples):
        x = pad + i * (size + pad)
        canvas.paste(Image.fromarray(img).resize((size, size), Image.NEAREST), (x, y))
        draw.text((x, y + size + 2), str(label)[:14], fill=0, font=font)
    if samples:
        y += size + line + pad
    if note:
        draw.text((pad, y), note[:100], fill=90, font=font)
    return _png_b64(canvas)


def sample_per_class(pipe, classes: Sequence[str], prompts: Sequence[str], resolution: int, steps: int,
                     guidance_scale: float, seed: int) -> list[tuple[str, np.ndarray]]:
    """One image per class (``prompts[i]`` for ``classes[i]``) from ``pipe``, image *i* seeded
    ``seed + i`` (a preview's sample)."""
    from fu_kedro.models.generation import generate_images, torch_threads

    with torch_threads(1):
        images = generate_images(pipe, prompts, [seed + i for i in range(len(prompts))], resolution=resolution,
                                 steps=steps, guidance_scale=guidance_scale)
    return list(zip(classes, images))


def _short(value: Any, n: int = 16) -> str:
    return str(value)[:n] if value else "-"


def _folder_architecture(model: str | None) -> dict:
    """The UNet's and the text encoder's ``config.json`` of a diffusers folder (a pretrained base's
    reference names its folder, relative to the project or absolute); ``{}`` where it is absent."""
    from pathlib import Path

    out = {}
    for part in ("unet", "text_encoder"):
        config = Path(model) / part / "config.json" if model else None
        if config is not None and config.is_file():
            out[part] = json.loads(config.read_text())
    return out


def base_model_card(folder, load_pipe, steps: int, guidance_scale: float, seed: int,
                    caption_template: str) -> ImagePreview:
    """The card of a saved base model (``<version>/base_model``: ``reference.json`` [+ ``model/``])."""
    from pathlib import Path

    ref = json.loads((Path(folder) / "reference.json").read_text())
    made = ref.get("trained_by") or {}  # a folder made by base_training (the shipped tiny base): its lineage
    arch = ref.get("architecture") or _folder_architecture(ref.get("model"))
    unet, text = arch.get("unet") or {}, arch.get("text_encoder") or {}
    trained = ref.get("trained_on") or made.get("trained_on") or {}
    classes = sorted(trained.get("per_class") or {})
    facts = [("kind", ref.get("kind")), ("name", ref.get("name")), *([("model", ref["model"])] if ref.get("model") else []),
             ("resolution", f"{ref.get('resolution')} px"), ("content hash", _short(ref.get("content_hash"))),
             ("UNet channels", unet.get("block_out_channels", "-")),
             ("text encoder", f"{text.get('num_hidden_layers', '-')} layers x {text.get('hidden_size', '-')}"),
             ("training steps", ref.get("steps") or made.get("steps") or "-"),
             ("trained on", f"{trained.get('corpus') or trained.get('train_on') or '-'}, {trained.get('images', '-')} images")]
    samples, note = [], ""
    if ref.get("kind") == "pretrained" and not made:
        note = "no sample: a pretrained base is not loaded for a preview (see lora_validation_grid)"
    elif not classes:
        note = "no sample: reference.json names no classes (trained_on.per_class)"
    else:
        samples = sample_per_class(load_pipe(), classes, [caption_template.format(plane=c) for c in classes],
                                   int(ref["resolution"]), steps, guidance_scale, seed)
        note = f"sample: '{caption_template}', seeds {seed}..{seed + len(classes) - 1}, {steps} steps, cfg {guidance_scale}"
    return model_card_preview(f"base model {folder.parent.name}", facts, samples, note)


def adapter_card(path, base_root: str | None, steps: int, guidance_scale: float, seed: int) -> ImagePreview:
    """The card of a saved LoRA adapter; its sample is the base it was trained on (found under
    ``base_root``, the base model's catalog folder, by the adapter's ``base_catalog_version``) + the adapter."""
    from pathlib import Path

    from fu_kedro.models.lora import apply_lora, read_adapter_file

    adapter = read_adapter_file(path)
    meta = adapter.metadata
    lora = meta.get("lora_params") or {}
    lora = json.loads(lora) if isinstance(lora, str) else lora
    captions = meta.get("captions") or []
    captions = json.loads(captions) if isinstance(captions, str) else captions
    subset = meta.get("lora_subset_image_ids") or []
    subset = json.loads(subset) if isinstance(subset, str) else subset
    facts = [("format", meta.get("format", "-")), ("rank / alpha", f"{meta.get('rank')} / {meta.get('alpha')}"),
             ("UNet targets", ", ".join(lora.get("unet_targets") or []) or "-"),
             ("text encoder", lora.get("train_text_encoder", "-")), ("steps", meta.get("steps", "-")),
             ("learning rate", lora.get("learning_rate", "-")), ("seed", meta.get("seed", "-")),
             ("base", f"{meta.get('base_name', '-')} @{meta.get('base_catalog_version', '-')}"),
             ("base content hash", _short(meta.get("base_content_hash"))),
             ("LoRA subset", f"{len(subset)} images @{meta.get('lora_subset_version', '-')}")]
    base = Path(base_root) / str(meta.get("base_catalog_version")) / "base_model" if base_root else None
    samples, note = [], ""
    ref = json.loads((base / "reference.json").read_text()) if base and (base / "reference.json").is_file() else {}
    folder = base / "model" if base and (base / "model").is_dir() else (
        Path(ref["model"]) if ref.get("trained_by") and ref.get("model") else None)  # a base_training folder (small)
    if not captions or folder is None or not (folder / "model_index.json").is_file():
        note = f"no sample: the tiny base it was trained on is not at {base}" if captions else "no sample: no captions"
    else:
        from diffusers import StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        apply_lora(pipe, adapter)
        before, _, after = (meta.get("caption_template") or "{plane}").partition("{plane}")
        classes = [c[len(before):len(c) - len(after)] for c in captions]
        samples = sample_per_class(pipe, classes, captions, int(meta.get("resolution") or 32), steps,
                                   guidance_scale, seed)
        note = f"sample: base + adapter, seeds {seed}..{seed + len(classes) - 1}, {steps} steps, cfg {guidance_scale}"
    return model_card_preview(f"LoRA adapter {Path(path).parent.name}", facts, samples, note)
