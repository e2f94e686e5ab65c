"""Per-image preprocessing of real scans: crop the black borders, make square, resize."""
from __future__ import annotations

import numpy as np
from PIL import Image
from scipy import ndimage


def content_box(img: np.ndarray, threshold: int, min_area_fraction: float) -> tuple[int, int, int, int] | None:
    """Bounding box ``(top, bottom, left, right)`` of the ultrasound content.

    The content is the largest connected non-black region after a small blur; text and
    marks in the black margin are separate small regions and so fall outside the box.
    Returns ``None`` if no region covers ``min_area_fraction`` of the image.
    """
    k = max(3, min(img.shape) // 100)
    smooth = ndimage.uniform_filter(img.astype(np.float32), size=k)
    mask = ndimage.binary_opening(smooth > threshold, iterations=2)
    labels, n = ndimage.label(mask)
    if n == 0:
        return None
    sizes = np.bincount(labels.ravel())[1:]
    biggest = int(np.argmax(sizes)) + 1
    if sizes[biggest - 1] < min_area_fraction * img.size:
        return None
    rows = np.flatnonzero((labels == biggest).any(axis=1))
    cols = np.flatnonzero((labels == biggest).any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def to_square(img: np.ndarray, mode: str) -> np.ndarray:
    """``pad``: add black margins (keeps all content); ``crop``: centre crop (fills the frame)."""
    h, w = img.shape
    if h == w:
        return img
    if mode == "pad":
        s = max(h, w)
        out = np.zeros((s, s), img.dtype)
        top, left = (s - h) // 2, (s - w) // 2
        out[top:top + h, left:left + w] = img
        return out
    if mode == "crop":
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        return img[top:top + s, left:left + s]
    raise ValueError(f"ingestion.preprocess.square must be 'pad' or 'crop', got {mode!r}")


def preprocess_image(img: np.ndarray, image_size: int, cfg: dict) -> np.ndarray:
    """Grayscale ``(H, W) uint8`` -> cropped to content, square, ``(image_size, image_size) uint8``.

    Raises ``ValueError`` if no ultrasound content is found (the caller names the file).
    """
    box = content_box(img, int(cfg["border_threshold"]), float(cfg["min_content_fraction"]))
    if box is None:
        raise ValueError(
            f"no ultrasound content found (no bright region covering {cfg['min_content_fraction']:.0%} of the image)"
        )
    t, b, l, r = box
    square = to_square(img[t:b, l:r], cfg["square"])
    return np.asarray(
        Image.fromarray(square).resize((image_size, image_size), Image.Resampling.LANCZOS), dtype=np.uint8
    )
