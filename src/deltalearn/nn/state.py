"""Expanded residual state (d_v > 1): expansion at the input and compressors (SPEC §3).

State layout `(..., d, dv)`. A compressor maps it to the width-d vector `x_in` a sublayer reads.
"""

from __future__ import annotations

import torch
from torch import nn


def repeat_expansion(x: torch.Tensor, value_channels: int) -> torch.Tensor:
    """`X_0 = x 1ᵀ_{dv}`: (..., d) -> (..., d, dv) (the "w/o EC" expansion)."""
    if value_channels < 1:
        raise ValueError(f"value_channels must be >= 1, got {value_channels}")
    return x.unsqueeze(-1).expand(*x.shape, value_channels).contiguous()


class ChannelCompressor(nn.Module):
    """CC: per-feature mixing of the current token's dv values, `x_in_i = Σ_j c_ij X_ij`.

    Initialised to the uniform average (c_ij = 1/dv) so that a repeated state reads back unchanged.
    """

    def __init__(self, dim: int, value_channels: int) -> None:
        super().__init__()
        if value_channels < 1:
            raise ValueError(f"value_channels must be >= 1, got {value_channels}")
        self.weight = nn.Parameter(torch.full((dim, value_channels), 1.0 / value_channels))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if X.shape[-2:] != self.weight.shape:
            raise ValueError(
                f"state of shape {tuple(X.shape)} does not end in (dim, value_channels) = "
                f"{tuple(self.weight.shape)}"
            )
        return (X * self.weight.to(X.dtype)).sum(-1)
