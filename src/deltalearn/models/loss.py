"""The language-modelling loss, once, for the model's `labels=` path and the trainer."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of `logits` `(..., V)` against already-aligned `targets` `(...)`, in fp32,
    ignoring targets equal to -100."""
    return F.cross_entropy(
        logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
    )
