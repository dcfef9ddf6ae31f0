"""deltalearn — Deep Delta Learning (arXiv 2601.00417) for PyTorch."""

from deltalearn import nn, ops

__version__ = "0.1.0"

__all__ = ["__version__", "nn", "ops"]
