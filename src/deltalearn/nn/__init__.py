"""DDL building blocks: generators (k, v, β), the rewrite step and residual wrappers (vector and
convolutional), state helpers."""

from deltalearn.nn.conv import (
    ConvDeltaResidual,
    conv_repeat_expansion,
    to_channels_first,
    to_channels_last,
)
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
    "ConvDeltaResidual",
    "DeltaResMLP",
    "DeltaResNet",
    "DeltaResidual",
    "DeltaUpdate",
    "EmbeddingConv",
    "GateHead",
    "GateRecord",
    "TokenCompressor",
    "ValueHead",
    "beta_init_bias",
    "causal_conv",
    "conv_repeat_expansion",
    "direction",
    "direction_rms",
    "repeat_expansion",
    "residual_step",
    "to_channels_first",
    "to_channels_last",
]

_NETS = ("DeltaResMLP", "DeltaResNet")  # the ready networks live in deltalearn.nets


def __getattr__(name: str):
    # Lazy, so that deltalearn.nets (built from these blocks) can import this package first.
    if name in _NETS:
        import deltalearn.nets

        return getattr(deltalearn.nets, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
