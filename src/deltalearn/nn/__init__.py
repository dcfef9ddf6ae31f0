"""DDL building blocks: generators (k, v, β), the rewrite step and residual wrappers, state helpers."""

from deltalearn.nn.generators import (
    GateHead,
    ValueHead,
    beta_init_bias,
    direction,
    direction_rms,
)
from deltalearn.nn.residual import DeltaResidual, DeltaUpdate, GateRecord
from deltalearn.nn.state import ChannelCompressor, repeat_expansion

__all__ = [
    "ChannelCompressor",
    "DeltaResidual",
    "DeltaUpdate",
    "GateHead",
    "GateRecord",
    "ValueHead",
    "beta_init_bias",
    "direction",
    "direction_rms",
    "repeat_expansion",
]
