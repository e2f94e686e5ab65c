"""Where images come from: the offline phantom generator and readers for real layouts.

- ``generate_phantoms(domain, n_per_class, image_size, seed, ...) -> ImageSet``: offline
  fetal-ultrasound-like images (see ``phantom``'s docstring for the classes).
- ``read_domain(format, path, domain, seed, ingestion_params) -> (ImageSet, quarantine rows)``:
  read + validate + preprocess ``phantom | fetal_planes_db | african | folders``.
"""
from .phantom import CLASSES, TARGET_CLASSES, generate_phantoms
from .readers import FORMATS, plane_to_label, read_domain
from .validation import BadInputError

__all__ = ["CLASSES", "TARGET_CLASSES", "FORMATS", "BadInputError", "generate_phantoms", "plane_to_label",
           "read_domain"]
