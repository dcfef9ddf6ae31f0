"""What `DeltaLM.forward` returns: logits, loss and cache, plus the gates of every rewrite."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.modeling_outputs import CausalLMOutputWithPast

# transformers renamed `past_key_values` to `cache` (in outputs and `generate`'s kwargs) during 5.x.
CACHE_FIELD = (
    "cache" if "cache" in CausalLMOutputWithPast.__dataclass_fields__ else "past_key_values"
)


@dataclass
class DeltaLMGates:
    """What every rewrite did, stacked: sublayer axis 0 = attention, 1 = MLP (all fp32, detached).

    beta `(L, 2, B, T)`; readout `kᵀX` (before the write), target `v` and discrepancy `v − kᵀX`:
    `(L, 2, B, T, dv)` (dv = 1 for a vector state).
    """

    beta: torch.Tensor
    readout: torch.Tensor
    target: torch.Tensor
    discrepancy: torch.Tensor


@dataclass
class DeltaLMOutput(CausalLMOutputWithPast):
    """`CausalLMOutputWithPast` plus `gates` (a `DeltaLMGates`) when `output_gates=True`."""

    gates: DeltaLMGates | None = None
