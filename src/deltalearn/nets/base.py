"""What the ready networks share: a list of residual blocks whose rule is one argument, and their
gates on request."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from deltalearn.nn.choices import RULES, Rule, check_choice
from deltalearn.nn.residual import DeltaResidual, GateRecord


class ResidualNet(nn.Module):
    """Base of `DeltaResMLP` and `DeltaResNet`: subclasses define `_forward(x)` and keep their
    residual blocks (`DeltaResidual` or `ConvDeltaResidual`) in `self.blocks`.

    `forward(x, output_gates=False)` returns the output, or `(output, gates)` with one `GateRecord`
    (β, readout, target, discrepancy, detached) per residual block in order; `gates` is empty for
    the additive rule, which has none. Recording runs only when asked for: it repeats the
    generators outside the fused rewrite.
    """

    blocks: nn.ModuleList

    def __init__(self, rule: Rule) -> None:
        super().__init__()
        check_choice("rule", rule, RULES)
        self.rule = rule

    def residuals(self) -> Iterator[DeltaResidual]:
        """The residual blocks, input to output."""
        yield from self.blocks

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(
        self, x: torch.Tensor, output_gates: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[GateRecord]]:
        if not output_gates:
            return self._forward(x)
        blocks = list(self.residuals())
        before = [b.record_gates for b in blocks]
        for b in blocks:
            b.record_gates = True
        try:
            y = self._forward(x)
            gates = [b.last_gates for b in blocks if b.last_gates is not None]
        finally:
            for b, on in zip(blocks, before, strict=True):
                b.record_gates = on
        return y, gates


def check_positive(**sizes: int) -> None:
    """Raise `ValueError` naming the first size below 1."""
    for name, value in sizes.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
