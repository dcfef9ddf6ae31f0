"""Ready residual networks beyond language models, each with its residual rule as one argument
(`"additive"`, `"delta"`, `"write_only"`): `DeltaResMLP` (vector state per sample) and `DeltaResNet`
(a small image ResNet; the state is the channel vector at each pixel)."""

from deltalearn.nets.base import ResidualNet
from deltalearn.nets.mlp import DeltaResMLP
from deltalearn.nets.resnet import DeltaResNet

__all__ = ["DeltaResMLP", "DeltaResNet", "ResidualNet"]
