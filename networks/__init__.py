"""Networks of ours where MONAI's do not do the job (each module says why)."""

from networks.classifier import NoiseAwareClassifier
from networks.classifiers import (
    AttentionCNN,
    LatentMLPHead,
    LatentResNetHead,
    SimpleCNN,
    resnet50_classifier,
)

__all__ = [
    "AttentionCNN",
    "LatentMLPHead",
    "LatentResNetHead",
    "NoiseAwareClassifier",
    "SimpleCNN",
    "resnet50_classifier",
]
