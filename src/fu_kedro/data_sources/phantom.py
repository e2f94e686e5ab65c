"""Offline generator of fetal-ultrasound-like phantom images (no download, no real data).

Five classes, each with one strong, large-scale cue that survives downsampling to 32 px:

- ``brain``   big bright skull ellipse with a bright midline and two small dark ventricles
- ``femur``   one long, straight, very bright bone bar with a dark acoustic shadow below
- ``abdomen`` medium round, moderately bright outline with one LARGE dark stomach bubble
- ``thorax``  round outline drawn as bright dashed rib arcs, a grey heart with four dark
              chambers (a "four-chamber view")
- ``other``   no round organ: a thick, wavy, textured bright band (placenta-like) beside a
              large, irregular dark fluid pocket

Every image gets the ultrasound look: a fan-shaped (or, for one target center,
rectangular) sector mask, depth attenuation from the probe, multiplicative speckle,
additive noise, gain and log-like compression, and text-overlay-like marks outside the
sector (a "label" block, a depth scale of ticks, a caliper cross).

Two acquisition domains: ``source`` (one hospital, a few machine settings) and ``target``
(several centers, each with its own gain, speckle grain, noise, zoom and sector shape, and
like the real African set some centers lack a class). Same seed -> same pixels.
"""
from __future__ import annotations

import zlib
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from fu_kedro.datasets import ImageSet

CLASSES: tuple[str, ...] = ("abdomen", "brain", "femur", "thorax", "other")
TARGET_CLASSES: tuple[str, ...] = ("abdomen", "brain", "femur", "thorax")

# One dict per acquisition setting. Keys: gain (brightness multiplier), speckle (grain size
# in pixels at 128 px), noise (additive std), zoom (anatomy scale), sector_deg (half-angle
# of the fan; 0 = linear probe, a rectangle), apex (apex height as a fraction of the image,
# negative = above the top), attenuation (per unit depth), gamma (display curve).
DEFAULT_SOURCE_MACHINES: list[dict[str, Any]] = [
    {"name": "machine_A", "gain": 1.00, "speckle": 1.5, "noise": 0.03, "zoom": 1.00,
     "sector_deg": 38, "apex": -0.08, "attenuation": 0.6, "gamma": 1.0},
    {"name": "machine_B", "gain": 0.92, "speckle": 1.8, "noise": 0.04, "zoom": 0.95,
     "sector_deg": 42, "apex": -0.05, "attenuation": 0.8, "gamma": 1.1},
    {"name": "machine_C", "gain": 1.08, "speckle": 1.3, "noise": 0.03, "zoom": 1.05,
     "sector_deg": 35, "apex": -0.10, "attenuation": 0.5, "gamma": 0.95},
]
DEFAULT_TARGET_CENTERS: list[dict[str, Any]] = [
    {"name": "center_1", "gain": 1.20, "speckle": 1.0, "noise": 0.05, "zoom": 0.85,
     "sector_deg": 30, "apex": -0.02, "attenuation": 0.3, "gamma": 0.9, "missing": []},
    {"name": "center_2", "gain": 0.70, "speckle": 2.6, "noise": 0.06, "zoom": 1.15,
     "sector_deg": 48, "apex": -0.15, "attenuation": 1.2, "gamma": 1.3, "missing": []},
    {"name": "center_3", "gain": 1.00, "speckle": 3.2, "noise": 0.10, "zoom": 0.95,
     "sector_deg": 0, "apex": 0.0, "attenuation": 0.9, "gamma": 1.0, "missing": ["thorax"]},
    {"name": "center_4", "gain": 0.85, "speckle": 1.2, "noise": 0.14, "zoom": 1.25,
     "sector_deg": 40, "apex": -0.05, "attenuation": 0.7, "gamma": 1.5, "missing": []},
    {"name": "center_5", "gain": 1.20, "speckle": 2.0, "noise": 0.08, "zoom": 0.78,
     "sector_deg": 34, "apex": 0.05, "attenuation": 1.5, "gamma": 0.9, "missing": ["thorax"]},
]


def _rng(seed: int, *keys: str) -> np.random.Generator:
    # crc32 instead of hash(): Python salts str hashes per process, which would break
    # "same seed -> same pixels" across runs.
    return np.random.default_rng([int(seed)] + [zlib.crc32(k.encode()) for k in keys])


def _smooth_noise(rng: np.random.Generator, size: int, cells: float) -> np.ndarray:
    """Noise with grain ~``size/cells`` px: random values on a coarse grid, bilinear upsampling."""
    n = max(2, int(round(cells)))
    coarse = rng.standard_normal((n, n)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((size, size), Image.Resampling.BILINEAR))


def _frame(xx, yy, cx, cy, angle, sx, sy):
    """Coordinates of the grid in a shape's own frame (rotated, scaled by its half-axes)."""
    c, s = np.cos(angle), np.sin(angle)
    dx, dy = xx - cx, yy - cy
    return (c * dx + s * dy) / sx, (-s * dx + c * dy) / sy


def _ring(u, v, width):
    d = np.sqrt(u * u + v * v)
    return np.exp(-(((d - 1.0) / width) ** 2))


def _blob(u, v, sharp=8.0):
    d = np.sqrt(u * u + v * v)
    return 1.0 / (1.0 + np.exp(sharp * (d - 1.0)))


def _draw_brain(rng, xx, yy, zoom):
    cx, cy = rng.uniform(0.42, 0.58), rng.uniform(0.48, 0.6)
    a = rng.uniform(0.30, 0.36) * zoom
    b = a * rng.uniform(0.72, 0.85)
    ang = rng.uniform(-0.5, 0.5)
    u, v = _frame(xx, yy, cx, cy, ang, a, b)
    inside = _blob(u, v, 12.0)
    img = 0.30 * (1 - inside) + 0.16 * inside
    img += 1.1 * _ring(u, v, 0.07)
    midline = np.exp(-((v / 0.03) ** 2)) * (np.abs(u) < 0.85)
    img += 0.65 * midline
    for side in (-1, 1):
        uu, vv = (u - 0.05) / 0.22, (v - side * 0.28) / 0.12
        img -= 0.12 * _blob(uu, vv, 6.0)
    return img


def _draw_femur(rng, xx, yy, zoom):
    cx, cy = rng.uniform(0.40, 0.60), rng.uniform(0.42, 0.58)
    length = rng.uniform(0.30, 0.38) * zoom
    thick = rng.uniform(0.025, 0.035) * zoom
    ang = rng.uniform(-0.45, 0.45)
    u, v = _frame(xx, yy, cx, cy, ang, length, thick)
    img = 0.30 + 0.05 * np.sin(9 * xx + 5 * yy)
    bar = 1.0 / (1.0 + np.exp(10 * (np.abs(u) - 1.0))) * np.exp(-(v ** 2))
    # slightly bulbous ends (condyles) make it read as a bone, not a line
    ends = sum(_blob((u - e) / (0.12 / 1.0), v / 1.6, 6.0) for e in (-1.0, 1.0))
    img += 1.2 * np.clip(bar + 0.6 * ends, 0, 1)
    # acoustic shadow: behind a bone (deeper = larger y) the echo is lost
    shadow = (v > 1.5) * (np.abs(u) < 1.0) * np.exp(-(v - 1.5) / 12.0)
    img *= 1 - 0.6 * shadow
    return img


def _draw_abdomen(rng, xx, yy, zoom):
    cx, cy = rng.uniform(0.42, 0.58), rng.uniform(0.48, 0.6)
    r = rng.uniform(0.25, 0.30) * zoom
    ang = rng.uniform(-0.4, 0.4)
    u, v = _frame(xx, yy, cx, cy, ang, r, r * rng.uniform(0.88, 1.0))
    inside = _blob(u, v, 14.0)
    img = 0.28 * (1 - inside) + 0.42 * inside
    img += 0.55 * _ring(u, v, 0.06)
    # the stomach bubble: big and nearly black, the class's cue at 32 px
    bx, by = rng.uniform(-0.35, 0.2), rng.uniform(-0.3, 0.1)
    br = rng.uniform(0.36, 0.46)
    bubble = _blob((u - bx) / br, (v - by) / (br * rng.uniform(0.75, 1.0)), 10.0)
    img = img * (1 - 0.95 * bubble)
    # small bright umbilical vein segment opposite the bubble
    img += 0.4 * _blob((u - 0.45) / 0.25, (v - 0.3) / 0.06, 6.0)
    return img


def _draw_thorax(rng, xx, yy, zoom):
    cx, cy = rng.uniform(0.42, 0.58), rng.uniform(0.48, 0.6)
    r = rng.uniform(0.27, 0.32) * zoom
    ang = rng.uniform(-np.pi, np.pi)
    u, v = _frame(xx, yy, cx, cy, ang, r, r)
    inside = _blob(u, v, 14.0)
    img = 0.27 * (1 - inside) + 0.36 * inside
    # ribs: bright arcs on the rim alternating with gaps, each casting a dark radial shadow
    theta = np.arctan2(v, u)
    n_ribs = rng.integers(7, 10)
    ribs = (np.cos(n_ribs * theta) > 0.2).astype(np.float32)
    img += 1.0 * _ring(u, v, 0.09) * ribs
    outer = np.sqrt(u * u + v * v)
    img *= 1 - 0.35 * ribs * (outer > 1.1) * (outer < 1.6)
    # the heart: a grey oval with four dark chambers in a 2x2 layout
    hx, hy = rng.uniform(-0.25, 0.25), rng.uniform(-0.25, 0.1)
    hu, hv = (u - hx) / 0.55, (v - hy) / 0.48
    heart = _blob(hu, hv, 10.0)
    img = img * (1 - heart) + 0.62 * heart
    for sx in (-0.42, 0.42):
        for sy in (-0.40, 0.40):
            img *= 1 - 0.92 * _blob((hu - sx) / 0.34, (hv - sy) / 0.32, 9.0)
    return img


def _draw_other(rng, xx, yy, zoom):
    # placenta-like thick bright band with a wavy edge, and a big irregular fluid pocket
    ang = rng.uniform(-0.6, 0.6)
    u, v = _frame(xx, yy, 0.5, 0.5, ang, 1.0, 1.0)
    off = rng.uniform(-0.15, 0.15)
    edge = off + 0.06 * np.sin(rng.uniform(8, 14) * u + rng.uniform(0, 6)) + 0.04 * np.sin(23 * u)
    band_w = rng.uniform(0.16, 0.24) * zoom
    band = 1.0 / (1.0 + np.exp(-60 * (v - edge))) * (1.0 / (1.0 + np.exp(60 * (v - edge - band_w))))
    tex = 0.5 + 0.5 * np.sin(40 * u + 7 * np.sin(13 * v))
    img = 0.30 + band * (0.45 + 0.35 * tex)
    side = rng.choice([-1.0, 1.0])
    fluid = 1.0 / (1.0 + np.exp(-50 * (side * (edge - v) - 0.08)))
    fluid *= 1.0 / (1.0 + np.exp(40 * (np.abs(u + 0.1 * np.sin(9 * v)) - rng.uniform(0.25, 0.38))))
    img *= 1 - 0.85 * fluid
    # a few scattered small echoes (limbs, cord) so it is not a plain band
    for _ in range(3):
        px, py = rng.uniform(0.2, 0.8), rng.uniform(0.3, 0.85)
        pu, pv = _frame(xx, yy, px, py, rng.uniform(-np.pi, np.pi), 0.05, 0.02)
        img += 0.35 * _blob(pu, pv, 5.0)
    return img


_DRAW = {"abdomen": _draw_abdomen, "brain": _draw_brain, "femur": _draw_femur,
         "thorax": _draw_thorax, "other": _draw_other}


def _sector_mask(xx, yy, sector_deg, apex):
    """Fan (curvilinear probe) or rectangle (linear probe, ``sector_deg == 0``); also the depth map."""
    if sector_deg <= 0:
        mask = (xx > 0.12) & (xx < 0.88) & (yy > 0.06) & (yy < 0.94)
        depth = np.clip(yy - 0.06, 0, None)
        return mask.astype(np.float32), depth
    dx, dy = xx - 0.5, yy - apex
    r = np.sqrt(dx * dx + dy * dy)
    phi = np.arctan2(dx, dy)
    r0, r1 = 0.08 - apex, 1.0 - apex - 0.03
    mask = (r > r0) & (r < r1) & (np.abs(phi) < np.deg2rad(sector_deg))
    return mask.astype(np.float32), np.clip(r - r0, 0, None)


def _overlay_marks(rng, img, size):
    """Text-like marks outside (and one caliper inside) the sector, as on real exports."""
    px = max(1, size // 64)
    x0, y0 = rng.integers(1, 4) * px, rng.integers(1, 3) * px
    for k in range(rng.integers(3, 6)):  # a "text" line: short bright dashes of varied length
        w = int(rng.integers(2, 5)) * px
        img[y0:y0 + 2 * px, x0:x0 + w] = rng.uniform(0.7, 0.95)
        x0 += w + px
    xs = size - 3 * px
    for yk in np.linspace(0.15, 0.9, 7):  # depth scale ticks on the right
        y = int(yk * size)
        img[y:y + px, xs:xs + 2 * px] = 0.8
    cx, cy = int(rng.uniform(0.3, 0.7) * size), int(rng.uniform(0.3, 0.8) * size)
    img[cy:cy + px, max(cx - 2 * px, 0):cx + 3 * px] = 0.9  # caliper cross
    img[max(cy - 2 * px, 0):cy + 3 * px, cx:cx + px] = 0.9
    return img


def render_phantom(label: str, size: int, setting: dict[str, Any], rng: np.random.Generator,
                   anatomy_scale: float = 1.0) -> np.ndarray:
    """One phantom image ``(size, size) uint8`` of class ``label`` under acquisition ``setting``."""
    if label not in _DRAW:
        raise ValueError(f"unknown phantom class {label!r}; expected one of {CLASSES}")
    g = (np.arange(size, dtype=np.float32) + 0.5) / size
    xx, yy = np.meshgrid(g, g)
    zoom = float(setting["zoom"]) * anatomy_scale
    tissue = _draw_label(label, rng, xx, yy, zoom)
    # large-scale tissue inhomogeneity, so backgrounds are not flat
    tissue = tissue * (1 + 0.12 * _smooth_noise(rng, size, 5))
    mask, depth = _sector_mask(xx, yy, float(setting["sector_deg"]), float(setting["apex"]))
    tissue = tissue * np.exp(-float(setting["attenuation"]) * depth)
    # Rayleigh speckle with the setting's grain size: coarse grids, nearest-upsampled
    grain = max(float(setting["speckle"]) * size / 128.0, 1.0)
    n = max(4, int(round(size / grain)))
    ray = rng.rayleigh(0.8, (n, n)).astype(np.float32)
    speckle = np.asarray(Image.fromarray(ray, mode="F").resize((size, size), Image.Resampling.BILINEAR))
    img = tissue * speckle * float(setting["gain"]) * rng.uniform(0.85, 1.15)
    img = img + float(setting["noise"]) * rng.standard_normal(img.shape).astype(np.float32)
    img = np.clip(img, 0, None)
    img = np.log1p(3.0 * img) / np.log1p(3.0 * 1.4)  # log compression as on scanners
    img = np.clip(img, 0, 1) ** float(setting["gamma"])
    img = img * mask
    img = _overlay_marks(rng, img, size)
    return (np.clip(img, 0, 1) * 255 + 0.5).astype(np.uint8)


def _draw_label(label, rng, xx, yy, zoom):
    return _DRAW[label](rng, xx, yy, zoom).astype(np.float32)


def generate_phantoms(
    domain: str = "source",
    n_per_class: int = 120,
    image_size: int = 128,
    seed: int = 42,
    settings: list[dict[str, Any]] | None = None,
    images_per_patient: tuple[int, int] = (3, 6),
    classes: tuple[str, ...] | None = None,
    class_proportions: dict[str, float] | None = None,
) -> ImageSet:
    """Generate a labelled phantom set of one acquisition domain.

    Args:
        domain: ``"source"`` (one hospital; ``settings`` are its machines, each patient is
            scanned on one machine) or ``"target"`` (``settings`` are centers; a center's
            ``missing`` list names classes it has no images of).
        n_per_class: images per class in the whole domain.
        image_size: side of the square images in pixels.
        seed: same seed -> same pixels.
        settings: acquisition settings (see ``DEFAULT_SOURCE_MACHINES`` /
            ``DEFAULT_TARGET_CENTERS``); ``None`` uses those defaults.
        images_per_patient: (min, max) images per source patient; target patients have
            one image per class, like the African set.
        classes: classes to draw; default all five for source, four (no ``other``) for target.
        class_proportions: source only: class -> weight (normalised); the domain then has
            ``n_per_class x len(classes)`` images split in these shares (largest remainder),
            e.g. FETAL_PLANES_DB's training split (Other 42 %, brain 26 %, thorax 17 %,
            femur 8 %, abdomen 6 %). ``None``: ``n_per_class`` of each class.

    Returns:
        ``ImageSet`` with meta columns image_id, patient_id, label, domain, center,
        machine, source_file ("phantom").
    """
    if domain not in ("source", "target"):
        raise ValueError(f"phantom domain must be 'source' or 'target', got {domain!r}")
    if image_size < 16:
        raise ValueError(f"phantom image_size must be >= 16, got {image_size}")
    rng = _rng(seed, "phantom", domain)
    if domain == "source":
        settings = settings or DEFAULT_SOURCE_MACHINES
        classes = tuple(classes or CLASSES)
        counts = class_counts(classes, n_per_class, class_proportions)
        rows = _source_rows(rng, classes, counts, settings, images_per_patient)
    else:
        settings = settings or DEFAULT_TARGET_CENTERS
        classes = tuple(classes or TARGET_CLASSES)
        rows = _target_rows(rng, classes, n_per_class, settings)
    by_name = {s["name"]: s for s in settings}
    images = np.empty((len(rows), image_size, image_size), np.uint8)
    for i, row in enumerate(rows):
        setting = by_name[row["machine"] if domain == "source" else row["center"]]
        img_rng = _rng(seed, "phantom", domain, row["image_id"])
        images[i] = render_phantom(row.pop("label_"), image_size, setting, img_rng, row.pop("scale_"))
    meta = pd.DataFrame(rows)
    meta["domain"] = domain
    meta["source_file"] = "phantom"
    info = {"format": "phantom", "domain": domain, "seed": int(seed), "n_per_class": int(n_per_class),
            **({"class_proportions": dict(class_proportions)} if class_proportions and domain == "source" else {}),
            "image_size": int(image_size), "settings": settings}
    return ImageSet(images, meta[["image_id", "patient_id", "label", "domain", "center", "machine",
                                  "source_file"]], info)


def class_counts(classes: tuple[str, ...], n_per_class: int, proportions: dict[str, float] | None) -> list[int]:
    """Images per class: ``n_per_class`` each, or ``n_per_class x len(classes)`` split by ``proportions``."""
    if not proportions:
        return [int(n_per_class)] * len(classes)
    missing = sorted(set(classes) - set(proportions))
    extra = sorted(set(proportions) - set(classes))
    weights = np.array([float(proportions.get(c, 0)) for c in classes])
    if missing or extra or (weights <= 0).any():
        raise ValueError(f"phantom class_proportions must give a weight > 0 to each of {list(classes)} and nothing "
                         f"else; missing {missing}, unknown {extra}")
    total = int(n_per_class) * len(classes)
    raw = weights / weights.sum() * total
    counts = np.floor(raw).astype(int)
    counts[np.argsort(-(raw - counts), kind="stable")[: total - counts.sum()]] += 1
    return counts.tolist()


def _source_rows(rng, classes, counts, machines, images_per_patient):
    labels = np.repeat(np.array(classes), counts)
    rng.shuffle(labels)
    lo, hi = images_per_patient
    rows, i, p = [], 0, 0
    while i < len(labels):
        p += 1
        k = int(rng.integers(lo, hi + 1))
        machine = machines[int(rng.integers(len(machines)))]["name"]
        scale = float(rng.uniform(0.88, 1.12))  # gestational age: one patient, one size
        for lab in labels[i:i + k]:
            rows.append({"image_id": f"src_p{p:04d}_{len(rows):05d}", "patient_id": f"src_p{p:04d}",
                         "label": str(lab), "label_": str(lab), "center": "source_hospital",
                         "machine": machine, "scale_": scale * float(rng.uniform(0.95, 1.05))})
        i += k
    return rows


def _target_rows(rng, classes, n_per_class, centers):
    rows = []
    for lab in classes:
        having = [c["name"] for c in centers if lab not in (c.get("missing") or [])]
        counts = np.full(len(having), n_per_class // max(len(having), 1))
        counts[: n_per_class - counts.sum()] += 1
        for center, n in zip(having, counts):
            for j in range(int(n)):
                # patient j of a center has one image of each plane, as in the African set
                pid = f"{center}_p{j + 1:03d}"
                rows.append({"image_id": f"tgt_{pid}_{lab}", "patient_id": pid, "label": lab,
                             "label_": lab, "center": center, "machine": center,
                             "scale_": float(rng.uniform(0.88, 1.12))})
    order = sorted(range(len(rows)), key=lambda k: rows[k]["image_id"])
    return [rows[k] for k in order]
