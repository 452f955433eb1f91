"""Networks of ours where MONAI's do not do the job (each module says why)."""

from networks.classifier import NoiseAwareClassifier
from networks.classifiers import (
    AttentionCNN,
    LatentMLPHead,
    LatentResNetHead,
    SimpleCNN,
    resnet50_classifier,
)
from networks.study_vit import (
    VIT_SIZES,
    DiffusionMAEDecoder,
    MAEDecoder,
    StudyClassifier,
    StudyMAE,
    StudyViTEncoder,
    encoder_kwargs,
    size_preset,
)

__all__ = [
    "VIT_SIZES",
    "AttentionCNN",
    "DiffusionMAEDecoder",
    "LatentMLPHead",
    "LatentResNetHead",
    "MAEDecoder",
    "NoiseAwareClassifier",
    "SimpleCNN",
    "StudyClassifier",
    "StudyMAE",
    "StudyViTEncoder",
    "encoder_kwargs",
    "resnet50_classifier",
    "size_preset",
]
