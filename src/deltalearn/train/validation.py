"""Validation inside training: the held-out loss and the mean gate per layer.

`deltalearn.eval` builds on these for whole run folders; they live here so that training needs
nothing from the evaluation layer.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from deltalearn.errors import UserError
from deltalearn.models.loss import next_token_loss

__all__ = ["autocast_context", "evaluate_loss", "mean_beta_per_layer"]


def autocast_context(device: torch.device, dtype: torch.dtype | None):
    """bf16 autocast when asked for; fp32 needs no context."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


@torch.no_grad()
def evaluate_loss(
    model: nn.Module,
    tokens: Any,
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> float:
    """Token-weighted mean loss over ``eval_batches`` of ``tokens`` (the same batches every call)."""
    from deltalearn.data import eval_batches

    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for x, y in eval_batches(tokens, seq_len, batch_size, max_batches):
            x = torch.as_tensor(x, dtype=torch.long, device=device)
            y = torch.as_tensor(y, dtype=torch.long, device=device)
            with autocast_context(device, dtype):
                logits = model(x).logits
            total += next_token_loss(logits, y).item() * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    if count == 0:
        raise UserError(f"validation split is shorter than one sequence of {seq_len + 1} tokens")
    return total / count


@torch.no_grad()
def mean_beta_per_layer(model: nn.Module, x: torch.Tensor) -> list[float] | None:
    """Mean gate β of each layer (both sublayers) on one batch; None for the additive baseline."""
    was_training = model.training
    model.eval()
    try:
        gates = model(x, output_gates=True).gates
    finally:
        model.train(was_training)
    if gates is None:
        return None
    return gates.beta.float().flatten(1).mean(-1).tolist()  # (L, 2, B, T) -> (L,)
