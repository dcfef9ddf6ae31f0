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

__all__ = [
    "autocast_context",
    "evaluate_loss",
    "loss_sums",
    "mean_beta_per_layer",
    "mean_from_sums",
]


def autocast_context(device: torch.device, dtype: torch.dtype | None, cache: bool = True):
    """bf16 autocast when asked for; fp32 needs no context. `cache`: autocast's cache of cast
    weights (off for a step recorded as a CUDA graph, as PyTorch asks)."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache)


@torch.no_grad()
def loss_sums(
    model: nn.Module,
    tokens: Any,
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    device: torch.device,
    dtype: torch.dtype | None = None,
    rank: int = 0,
    world_size: int = 1,
    lockstep: bool = False,
    progress: bool = False,
) -> torch.Tensor:
    """``[Σ loss·tokens, Σ tokens]`` (float64, on ``device``) over this rank's share of the batches.

    Batch ``i`` of ``eval_batches(tokens, ...)`` belongs to rank ``i % world_size``; summing the
    result over ranks gives exactly the one-process sums (each batch's loss is computed on the
    same rows either way; the sums are float64). Nothing is read back to the host, so the caller
    decides when to synchronise. ``lockstep``: every rank runs the same number of forwards
    (FSDP gathers parameters inside forward), so a rank with fewer batches repeats one with
    weight 0. ``progress``: a tqdm bar over the batches (on stderr).
    """
    from tqdm.auto import tqdm

    from deltalearn.data import eval_batches
    from deltalearn.data.textbytes import eval_window_count

    was_training = model.training
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)

    def forward(x: torch.Tensor, y: torch.Tensor, weight: int) -> None:
        x = torch.as_tensor(x, dtype=torch.long).to(device, non_blocking=True)
        y = torch.as_tensor(y, dtype=torch.long).to(device, non_blocking=True)
        with autocast_context(device, dtype):
            logits = model(x).logits
        if weight:
            sums[0] += next_token_loss(logits, y).double() * y.numel()
            sums[1] += y.numel()

    batches = eval_batches(tokens, seq_len, batch_size, max_batches)
    if progress:
        windows = eval_window_count(len(tokens), seq_len, batch_size, max_batches)
        total = -(-windows // batch_size)
        batches = tqdm(batches, total=total, desc="eval", unit="batch", dynamic_ncols=True)
    try:
        count, spare = 0, None  # batches seen (all ranks'); one to repeat with weight 0
        for i, (x, y) in enumerate(batches):
            count = i + 1
            if i % world_size == rank:
                forward(x, y, 1)
                spare = (x, y)
            elif spare is None:
                spare = (x, y)
        if lockstep and spare is not None:  # every rank runs ceil(count / world) forwards
            for _ in range(-(-count // world_size) - len(range(rank, count, world_size))):
                forward(*spare, 0)
    finally:
        model.train(was_training)
        if progress:
            batches.close()
    return sums


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
    total, count = loss_sums(
        model, tokens, seq_len, batch_size, max_batches, device, dtype
    ).tolist()
    return mean_from_sums(total, count, seq_len)


def mean_from_sums(total: float, count: float, seq_len: int) -> float:
    """The mean loss of :func:`loss_sums` (summed over ranks); an error if nothing was evaluated."""
    if count == 0:
        raise UserError(f"validation split is shorter than one sequence of {seq_len + 1} tokens")
    return total / count


@torch.no_grad()
def mean_beta_per_layer(model: nn.Module, x: torch.Tensor) -> list[float] | None:
    """Mean gate β of each layer (both sublayers) on one batch; None for the additive baseline.
    Eager even where the model is compiled (`--compile`): this one small forward, with its gate
    records and a batch of its own, would compile a graph of its own otherwise (the training
    graph of ddl-cc at `small` took 53 s to compile on an H200), for one forward an evaluation."""
    was_training = model.training
    model.eval()
    try:
        with torch.compiler.set_stance("force_eager"):
            gates = model(x, output_gates=True).gates
    finally:
        model.train(was_training)
    if gates is None:
        return None
    return gates.beta.float().flatten(1).mean(-1).tolist()  # (L, 2, B, T) -> (L,)
