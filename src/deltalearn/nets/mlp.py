"""`DeltaResMLP`: a residual MLP (vector state per sample) whose residual rule is one argument.

    x -> Linear(in, width) [-> repeat to (width, dv)] -> depth × residual(MLP branch)
      [-> channel compressor] -> RMSNorm -> Linear(width, out)

Each residual block is a `DeltaResidual` around `Linear(width, hidden) -> GELU -> Linear(hidden,
width)`: `rule="additive"` is the ordinary pre-norm ResNet `x + F(RMSNorm(x))`, `"delta"` DDL,
`"write_only"` the control without the erase term.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from deltalearn.nets.base import ResidualNet, check_positive
from deltalearn.nn.choices import Rule
from deltalearn.nn.residual import DeltaResidual
from deltalearn.nn.state import ChannelCompressor, repeat_expansion


class DeltaResMLP(ResidualNet):
    """A residual MLP of `depth` blocks of width `width`.

    Args:
        in_features, out_features: input and output sizes.
        width: the residual state width d.
        depth: number of residual blocks.
        rule: "additive", "delta" (DDL) or "write_only".
        hidden: hidden size of each block's MLP branch (default `4 * width`).
        value_channels: dv; above 1 the state is `(..., width, dv)`, repeated from the stem and read
            back by a channel compressor before the head.
        **residual: passed to every `DeltaResidual` (`beta_init`, `value_head`, `gate`, `fused`...).

    `forward(x, output_gates=False)`: `x` `(..., in_features)` -> `(..., out_features)`, or the pair
    `(output, gates)` (see `ResidualNet`).

    Example:
        >>> net = DeltaResMLP(3, 2, width=32, depth=8, rule="delta")
        >>> y, gates = net(torch.randn(16, 3), output_gates=True)   # gates[i].beta: (16,)
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        width: int,
        depth: int,
        rule: Rule = "delta",
        *,
        hidden: int | None = None,
        value_channels: int = 1,
        **residual: Any,
    ) -> None:
        super().__init__(rule)
        hidden = 4 * width if hidden is None else hidden
        check_positive(
            in_features=in_features,
            out_features=out_features,
            width=width,
            depth=depth,
            hidden=hidden,
            value_channels=value_channels,
        )
        residual.setdefault("record_gates", False)
        self.value_channels = value_channels
        self.stem = nn.Linear(in_features, width)
        self.blocks = nn.ModuleList(
            DeltaResidual(
                width,
                nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)),
                value_channels,
                rule=rule,
                **residual,
            )
            for _ in range(depth)
        )
        self.compressor = ChannelCompressor(width, value_channels) if value_channels > 1 else None
        self.norm = nn.RMSNorm(width, eps=1e-6)
        self.head = nn.Linear(width, out_features)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        X = self.stem(x)
        if self.value_channels > 1:
            X = repeat_expansion(X, self.value_channels)
        for block in self.blocks:
            X = block(X)
        if self.compressor is not None:
            X = self.compressor(X)
        return self.head(self.norm(X))
