"""A loss over a stack of rewrites, on a state chain or not, for the state chain's tests
(`tests/test_state_chain.py`, `tests/test_compiled_kernels.py`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from deltalearn.ops.state_chain import StateChain


def rewrite_stack_loss(
    X0: torch.Tensor,
    C: torch.Tensor,
    layers: Sequence,
    rewrite: Callable,
    read: bool,
    chained: bool,
) -> torch.Tensor:
    """The rewrites `rewrite(chain, X, layer, C or None)` of each of `layers` from X0 (`chain` a
    `StateChain` of X0 where `chained`, else None); each one's channel read (with `read`, weighted
    by its depth) and the last state enter the loss, so every gradient depends on every state."""
    chain = StateChain(X0) if chained else None
    X, total = X0, 0
    for i, layer in enumerate(layers):
        out = rewrite(chain, X, layer, C if read else None)
        X, x = out if read else (out, None)
        if read:
            total = total + (x.square() * (i + 1)).sum()
    last = X.sum(-1)
    if chained:
        last = chain.finish(last)
    return total + last.pow(3).sum()
