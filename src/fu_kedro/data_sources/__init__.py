"""Where images come from: the offline phantom generator and readers for real layouts."""
from .phantom import CLASSES, TARGET_CLASSES, generate_phantoms

__all__ = ["CLASSES", "TARGET_CLASSES", "generate_phantoms"]
