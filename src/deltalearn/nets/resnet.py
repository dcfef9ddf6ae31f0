"""`DeltaResNet`: a small image ResNet whose residual rule is one argument.

    image -> Conv3×3(in, w₀) [-> repeat to (w₀, dv) per pixel]
          -> stage 0: blocks × residual(Conv3×3 -> GELU -> Conv3×3)
          -> stage i > 0: Conv3×3 stride 2 (w_{i−1} -> w_i, the same conv on each value channel),
                          then blocks × residual(...)
          [-> channel compressor] -> RMSNorm over channels -> mean over pixels
          -> Linear(w_last, classes)

Every residual block is a `ConvDeltaResidual`: the state is the channel vector (dv = 1) or a
`w × dv` matrix at each pixel; `rule="additive"` is the pre-norm ResNet `X + F(RMSNorm_C(X))`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from deltalearn.nets.base import ResidualNet, check_positive
from deltalearn.nn.choices import Rule
from deltalearn.nn.conv import ConvDeltaResidual, conv_repeat_expansion, to_channels_last
from deltalearn.nn.state import ChannelCompressor


def _conv_branch(channels: int) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(channels, channels, 3, padding=1),
        nn.GELU(),
        nn.Conv2d(channels, channels, 3, padding=1),
    )


class _Downsample(nn.Module):
    """A stride-2 3×3 conv between stages, applied to every value channel of the state alike."""

    def __init__(self, in_channels: int, out_channels: int, value_channels: int) -> None:
        super().__init__()
        self.value_channels = value_channels
        self.conv = nn.Conv2d(in_channels, out_channels, 3, stride=2, padding=1)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        if self.value_channels == 1:
            return self.conv(X)
        B, C, dv, H, W = X.shape
        Y = self.conv(X.transpose(1, 2).reshape(B * dv, C, H, W))  # (B·dv, C', H', W')
        return Y.reshape(B, dv, *Y.shape[1:]).transpose(1, 2)


class DeltaResNet(ResidualNet):
    """A small image classifier: stages of `ConvDeltaResidual` blocks with stride-2 transitions.

    Args:
        in_channels: image channels.
        num_classes: output logits.
        rule: "additive", "delta" (DDL) or "write_only".
        widths: channels of each stage (each stage after the first halves the resolution).
        blocks_per_stage: residual blocks per stage.
        value_channels: dv; above 1 each pixel carries a `(width, dv)` state.
        **residual: passed to every `ConvDeltaResidual` (`beta_init`, `value_head`, `gate`, ...).

    `forward(images, output_gates=False)`: `(B, in_channels, H, W)` -> logits `(B, num_classes)`,
    or `(logits, gates)` with β `(B, H_i, W_i)` per block (see `ResidualNet`).

    Example:
        >>> net = DeltaResNet(1, 10, rule="delta", widths=(16, 32))
        >>> logits = net(torch.randn(4, 1, 8, 8))
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        rule: Rule = "delta",
        *,
        widths: Sequence[int] = (16, 32, 64),
        blocks_per_stage: int = 2,
        value_channels: int = 1,
        **residual: Any,
    ) -> None:
        super().__init__(rule)
        widths = tuple(widths)
        if not widths:
            raise ValueError("widths must name at least one stage, got ()")
        check_positive(
            in_channels=in_channels,
            num_classes=num_classes,
            blocks_per_stage=blocks_per_stage,
            value_channels=value_channels,
            **{f"widths[{i}]": w for i, w in enumerate(widths)},
        )
        residual.setdefault("record_gates", False)
        self.value_channels = value_channels
        self.stem = nn.Conv2d(in_channels, widths[0], 3, padding=1)
        self.stages = nn.ModuleList()
        blocks = []
        for i, w in enumerate(widths):
            stage = [] if i == 0 else [_Downsample(widths[i - 1], w, value_channels)]
            for _ in range(blocks_per_stage):
                block = ConvDeltaResidual(w, _conv_branch(w), value_channels, rule=rule, **residual)
                stage.append(block)
                blocks.append(block)
            self.stages.append(nn.Sequential(*stage))
        self.blocks = nn.ModuleList(blocks)  # the same modules, in order, for `residuals()`
        last = widths[-1]
        self.compressor = ChannelCompressor(last, value_channels) if value_channels > 1 else None
        self.norm = nn.RMSNorm(last, eps=1e-6)
        self.head = nn.Linear(last, num_classes)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(x.shape)}")
        X = self.stem(x)
        if self.value_channels > 1:
            X = conv_repeat_expansion(X, self.value_channels)
        for stage in self.stages:
            X = stage(X)
        X = to_channels_last(X, self.value_channels)  # (B, H, W, C[, dv])
        if self.compressor is not None:
            X = self.compressor(X)
        return self.head(self.norm(X).mean(dim=(1, 2)))
