"""Image classifiers for evaluation: torchvision backbones, the tensor data path, one training loop.

Used by the evaluation pipeline for every classifier it trains: the baseline (real source
only), hybrid (real + synthetic), the fidelity scorer (the baseline) and the CAS model
(synthetic only).
"""
from .backbones import build_classifier, check_backbone, classification_backbones
from .data import TensorSet, build_augmentation, prepare_tensors, to_model_input
from .train import TrainConfig, TrainedClassifier, extract_features, predict_proba, train_classifier

__all__ = [
    "TensorSet",
    "TrainConfig",
    "TrainedClassifier",
    "build_augmentation",
    "build_classifier",
    "check_backbone",
    "classification_backbones",
    "extract_features",
    "predict_proba",
    "prepare_tensors",
    "to_model_input",
    "train_classifier",
]
