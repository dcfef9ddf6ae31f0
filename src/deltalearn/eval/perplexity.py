"""Validation loss and perplexity of a causal LM on held-out tokens."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from deltalearn.train.validation import evaluate_loss

__all__ = ["encode_val_split", "evaluate_run"]


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
    from deltalearn.errors import UserError
    from deltalearn.train.build import prepare_data
    from deltalearn.train.distributed import resolve_device
    from deltalearn.train.runs import load_run

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch-size must be an integer >= 1, got {batch_size!r}")
    if max_batches is not None and (
        isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1
    ):
        raise UserError(f"--max-batches must be an integer >= 1, got {max_batches!r}")
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
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
