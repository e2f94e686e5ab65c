"""kedro-viz previews of the project's datasets (the side panel when a dataset is clicked).

kedro-viz calls ``dataset.preview(**preview_args)`` (``preview_args`` from the catalog entry's
``metadata: kedro-viz: preview_args``) and shows the returned ``kedro_datasets._typing`` value:
an image set as a grid of its images (one row per class), a model or an adapter as its
reference / metadata JSON.
"""
from __future__ import annotations

import base64
import io
import json
from typing import Any

import numpy as np
from kedro_datasets._typing import ImagePreview, JSONPreview
from PIL import Image, ImageDraw


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
    for r, (g, idx) in enumerate(rows):
        y = r * (size + pad)
        draw.text((4, y + size // 2 - 6), g[:11], fill=0)
        for c, i in enumerate(idx):
            tile = Image.fromarray(image_set.images[i]).resize((size, size), Image.NEAREST)
            canvas.paste(tile, (label_w + c * (size + pad), y))
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return ImagePreview(base64.b64encode(buf.getvalue()).decode("ascii"))


def json_preview(data: dict[str, Any], drop: tuple[str, ...] = ()) -> JSONPreview:
    return JSONPreview(json.dumps({k: v for k, v in data.items() if k not in drop}, default=str))
