"""The broad prior corpus: the offline stand-in for the web-scale images Stable Diffusion saw.

FU-LoRA adapts a model with a *broad* prior (SD v1.5, trained on web images of every
style) to 20 labelled images per class from one hospital. Offline, the tiny base gets its
breadth from this corpus: phantom images of the five classes, each rendered under its own
acquisition style drawn at random from wide, documented ranges (gain, speckle grain,
noise, zoom, sector width and apex, depth attenuation, display gamma, linear vs
curvilinear probe; text marks, depth scales and calipers vary per image as on every
phantom). The LoRA is then fitted on the one-hospital source subset, as in the paper.

How the target stays out: the corpus is made from ``base_training.prior``
alone — the ranges below, the seed — and the top-level ``classes`` list. Nothing here reads the target
centers' settings (``ingestion.phantom.target``) or any target image, and each image's
style is a fresh continuous draw, so no image is rendered with a target center's setting
(``tests/test_prior_corpus.py`` checks both). The ranges are wide on purpose; that they
also span styles like the target centers' is the point of a broad prior, as web images
span many scanners.

``breadth`` shrinks every range towards its midpoint: 1 = the full ranges, 0 = a single
style (the midpoints). It is the knob for "how broad is the prior".
"""
from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from fu_kedro.data_sources.phantom import CLASSES, _rng, render_phantom
from fu_kedro.datasets import ImageSet

# drawn in this order (the schema's fu_kedro.pipelines.base_training.params.Styles has these keys)
STYLE_KEYS = ("gain", "speckle", "noise", "zoom", "sector_deg", "apex", "attenuation", "gamma")


def draw_styles(styles: dict[str, list[float]], breadth: float, linear_fraction: float, n: int,
                rng: np.random.Generator) -> list[dict[str, Any]]:
    """``n`` acquisition settings, each key uniform in its range shrunk by ``breadth``."""
    out = []
    for i in range(n):
        setting: dict[str, Any] = {"name": f"prior_style_{i:05d}"}
        for key in STYLE_KEYS:
            lo, hi = (float(v) for v in styles[key])
            mid = (lo + hi) / 2
            half = (hi - lo) / 2 * float(breadth)
            setting[key] = float(rng.uniform(mid - half, mid + half)) if half > 0 else mid
        if rng.random() < float(linear_fraction) * float(breadth):
            setting["sector_deg"] = 0.0  # linear probe: a rectangular field of view
        out.append(setting)
    return out


def make_prior_corpus(prior: dict[str, Any], classes: list[str], seed: int) -> ImageSet:
    """The captioned-by-class phantom corpus the tiny base is trained on (``train_on: prior``).

    The node (:func:`fu_kedro.pipelines.base_training.nodes.make_prior_corpus`) checks ``prior``
    against its schema first.

    Args:
        prior: ``base_training.prior`` — ``n_per_class`` (0 = an empty corpus,
            e.g. for a pretrained base), ``image_size`` (px, then resized to the
            model's resolution like the source images), ``breadth``, ``linear_probe_fraction``,
            ``styles`` (range per style key), ``caption_template`` (optional: the prior's own
            caption, ``{plane}`` = class word; absent/null = the project's caption, as the
            source images get). A caption of its own tells the base which look is the
            phantoms' and which the real images', as DreamBooth-style prior preservation does.
        classes: the top-level ``classes`` parameter (phantom classes; empty = all of them).
        seed: project seed; same seed and parameters -> same pixels.

    Returns:
        ``ImageSet`` with one row per image: image_id, patient_id (one "patient" per image),
        label, domain ``prior``, center ``prior_corpus``, machine (the style's name),
        source_file ``phantom``, and the style's values (one column per style key).
    """
    n_per_class = int(prior["n_per_class"])
    classes = tuple(classes or CLASSES)
    size = int(prior["image_size"])
    rng = _rng(seed, "prior_corpus")
    labels = np.repeat(np.array(classes), n_per_class)
    rng.shuffle(labels)
    styles = draw_styles(prior["styles"], prior["breadth"], prior["linear_probe_fraction"], len(labels), rng)
    images = np.empty((len(labels), size, size), np.uint8)
    rows = []
    for i, (label, style) in enumerate(zip(labels, styles)):
        image_id = f"prior_{i:05d}"
        images[i] = render_phantom(str(label), size, style, _rng(seed, "prior_corpus", image_id),
                                   float(rng.uniform(0.88, 1.12)))
        rows.append({"image_id": image_id, "patient_id": image_id, "label": str(label), "domain": "prior",
                     "center": "prior_corpus", "machine": style["name"], "source_file": "phantom",
                     **{k: style[k] for k in STYLE_KEYS}})
    columns = ["image_id", "patient_id", "label", "domain", "center", "machine", "source_file", *STYLE_KEYS]
    meta = pd.DataFrame(rows, columns=columns)
    template = prior.get("caption_template")
    if template:
        meta["caption"] = [str(template).format(plane=label) for label in meta["label"]]
    info = {"format": "prior_corpus", "domain": "prior", "seed": int(seed), "n_per_class": n_per_class,
            "image_size": size, "breadth": float(prior["breadth"]), "styles": prior["styles"],
            "linear_probe_fraction": float(prior["linear_probe_fraction"]),
            **({"caption_template": str(template)} if template else {})}
    return ImageSet(images, meta, info)
