"""DDL building blocks: generators (k, v, β), the rewrite step and residual wrappers, state helpers."""

from deltalearn.nn.generators import (
    GateHead,
    ValueHead,
    beta_init_bias,
    direction,
    direction_rms,
)
from deltalearn.nn.residual import DeltaResidual, DeltaUpdate, GateRecord, residual_step
from deltalearn.nn.state import (
    ChannelCompressor,
    EmbeddingConv,
    TokenCompressor,
    causal_conv,
    repeat_expansion,
)

__all__ = [
    "ChannelCompressor",
    "DeltaResidual",
    "DeltaUpdate",
    "EmbeddingConv",
    "GateHead",
    "GateRecord",
    "TokenCompressor",
    "ValueHead",
    "beta_init_bias",
    "causal_conv",
    "direction",
    "direction_rms",
    "repeat_expansion",
    "residual_step",
]
