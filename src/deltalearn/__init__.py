"""deltalearn — Deep Delta Learning (arXiv 2601.00417) for PyTorch."""

from deltalearn import nn, ops
from deltalearn.models import DeltaLM, DeltaLMConfig, register_auto_classes

register_auto_classes()

__version__ = "0.1.0"

__all__ = ["DeltaLM", "DeltaLMConfig", "__version__", "nn", "ops"]
