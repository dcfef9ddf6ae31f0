"""Validation loss and perplexity of a causal LM on held-out tokens."""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["evaluate_loss", "evaluate_run", "lm_loss"]


def lm_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy; ``targets`` are already shifted (the sampler's ``y``)."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1))


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
            total += lm_loss(logits, y).item() * y.numel()
            count += y.numel()
    finally:
        model.train(was_training)
    if count == 0:
        from deltalearn.train.errors import UserError

        raise UserError(f"validation split is shorter than one sequence of {seq_len + 1} tokens")
    return total / count


def encode_val_split(
    source: str, tokenizer: Any, val_fraction: float = 0.05, max_chars: int | None = None
) -> np.ndarray:
    """The validation split of ``source`` encoded with ``tokenizer`` (each document followed by
    the eos token, as the data layer stores it). Used to evaluate a model on a corpus it was not
    prepared with, keeping the model's own tokenizer."""
    from deltalearn.data import resolve_source, split_documents

    corpus = resolve_source(source, max_chars=max_chars)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids: list[int] = []
    for _, val in split_documents(corpus.documents(), val_fraction):
        if val:
            ids.extend(tokenizer(val, add_special_tokens=False).input_ids)
            ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def evaluate_run(
    run_dir: str | Path,
    data_source: str | None = None,
    batch_size: int = 8,
    max_batches: int | None = 50,
    device: str = "auto",
) -> dict[str, Any]:
    """Validation loss/perplexity of ``RUN_DIR/model`` on its own validation split, or on the
    validation split of ``data_source`` tokenised with the run's tokenizer."""
    from deltalearn.train.build import prepare_data
    from deltalearn.train.distributed import resolve_device
    from deltalearn.train.runs import load_run

    run = load_run(run_dir)
    cfg = run.config
    if data_source is None or data_source == cfg.data.source:
        tokens = prepare_data(cfg, progress=False).tokens("val")  # the cached split
        source = cfg.data.source
    else:
        tokens = encode_val_split(data_source, run.tokenizer, cfg.data.val_fraction)
        source = data_source
    dev = resolve_device(device)
    model = run.model.to(dev)
    loss = evaluate_loss(model, tokens, cfg.run.seq_len, batch_size, max_batches, dev)
    return {
        "run_dir": str(run_dir),
        "data": source,
        "val_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "seq_len": cfg.run.seq_len,
        "batches": max_batches,
    }
