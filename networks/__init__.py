"""Networks of ours where MONAI's do not do the job (each module says why)."""

from networks.classifier import NoiseAwareClassifier

__all__ = ["NoiseAwareClassifier"]
