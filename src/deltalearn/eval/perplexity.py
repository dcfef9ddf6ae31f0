"""Validation loss, perplexity and bits per byte of a causal LM on held-out tokens.

Bits per byte = Σ NLL of the scored tokens (nats) / ln 2 / the UTF-8 bytes of the text they
spell; the scored tokens and their bytes are exactly those of `deltalearn.data.textbytes` (the
targets of the evaluation windows, eos scored with 0 bytes).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from deltalearn.train.validation import loss_sums, mean_from_sums

__all__ = ["encode_val_split", "evaluate_run", "evaluate_tokens"]


def encode_val_split(
    source: str, tokenizer: Any, val_fraction: float = 0.05, max_chars: int | None = None
) -> np.ndarray:
    """The validation split of ``source`` encoded with ``tokenizer``: the documents cleaned and
    split as the data layer prepares them, each followed by the eos token. Used to evaluate a
    model on a corpus it was not prepared with, keeping the model's own tokenizer."""
    from deltalearn.data import resolve_source, split_documents
    from deltalearn.data.corpora import clean_document

    corpus = resolve_source(source, max_chars=max_chars)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    documents = (clean_document(text) for text in corpus.documents())
    ids: list[int] = []
    for _, val in split_documents((text for text in documents if text), val_fraction):
        if val:
            ids.extend(tokenizer(val, add_special_tokens=False).input_ids)
            ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def evaluate_tokens(
    model: Any,
    tokens: np.ndarray,
    tokenizer: Any,
    seq_len: int,
    batch_size: int,
    max_batches: int | None,
    device: Any,
    progress: bool = False,
) -> dict[str, Any]:
    """Loss, perplexity and bits per byte of ``model`` on the evaluation windows of ``tokens``
    (``eval_batches``), with the token and byte counts behind them. ``bits_per_byte`` is None
    when ``tokenizer`` is not byte-level (its bytes per token are unknown)."""
    from deltalearn.data.textbytes import eval_window_count, scored_bytes, token_byte_lengths
    from deltalearn.errors import DataError

    total, count = loss_sums(
        model, tokens, seq_len, batch_size, max_batches, device, progress=progress
    ).tolist()
    loss = mean_from_sums(total, count, seq_len)
    windows = eval_window_count(len(tokens), seq_len, batch_size, max_batches)
    try:
        n_bytes: int | None = scored_bytes(tokens, token_byte_lengths(tokenizer), seq_len, windows)
    except DataError:
        n_bytes = None
    return {
        "val_loss": loss,
        "perplexity": math.exp(min(loss, 50.0)),
        "bits_per_byte": total / math.log(2) / n_bytes if n_bytes else None,
        "tokens": int(count),
        "bytes": n_bytes,
        "batches": -(-windows // batch_size),
    }


def evaluate_run(
    run_dir: str | Path,
    data_source: str | None = None,
    batch_size: int = 8,
    max_batches: int | None = 50,
    device: str = "auto",
    progress: bool = False,
) -> dict[str, Any]:
    """Validation loss, perplexity and bits per byte of ``RUN_DIR/model`` on its own validation
    split, or on the validation split of ``data_source`` (any source the trainer accepts)
    tokenised with the run's tokenizer. At most ``max_batches`` batches of ``batch_size``
    windows of the run's ``seq_len``; ``progress``: a progress bar on stderr."""
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
    seq_len = cfg.run.seq_len
    result = evaluate_tokens(
        model, tokens, run.tokenizer, seq_len, batch_size, max_batches, dev, progress=progress
    )
    return {
        "run_dir": str(run_dir),
        "data": source,
        **result,
        "seq_len": seq_len,
        "batch_size": batch_size,
        "max_batches": max_batches,
    }
