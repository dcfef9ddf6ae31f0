"""UTF-8 bytes behind token ids: what bits per byte divides by.

Bits per byte (bpb) = Σ NLL of the scored tokens (nats) / ln 2 / the UTF-8 bytes of the text those
tokens spell. Unlike the loss per token it does not depend on the tokenizer, so runs with the BPE-4096
and the GPT-2 tokenizer can be compared.

Both tokenizers here are byte-level BPE: every ordinary token stands for a fixed byte string, one
character of its vocabulary entry per byte (GPT-2's byte-to-character table), so the bytes of any
run of tokens are the sum of per-token lengths, exact even where a multi-byte character is split
between tokens or between evaluation windows. `<|endoftext|>` (after every document) and any other
special token stand for no text: 0 bytes. Their loss is still scored — the model has to predict
where a document ends — so the eos cost is spread over the bytes of the documents, and bpb over a
whole split is `loss_per_token / ln 2 × tokens / bytes` with the split's own tokens and bytes.

Which tokens are scored: `eval_batches` cuts the stream into consecutive windows of `seq_len + 1`
ids overlapping by one; window `i` scores the targets `tokens[i·L + 1 : (i + 1)·L + 1]`, so `n`
windows score exactly `tokens[1 : n·L + 1]` (the very first id is context only, nothing after the
last whole window is read). `scored_bytes` counts the bytes of exactly those targets.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tokenizers import decoders, pre_tokenizers

from deltalearn.errors import DataError

__all__ = ["eval_window_count", "scored_bytes", "token_byte_lengths"]

_CHUNK = 1 << 20  # ids gathered at a time: bounds memory on long splits


def token_byte_lengths(tokenizer: Any) -> np.ndarray:
    """UTF-8 bytes each token id stands for, int64 `(vocab,)`; 0 for special tokens.

    `tokenizer`: a `transformers` fast tokenizer or a `tokenizers.Tokenizer` with a ByteLevel
    decoder and vocabulary. Raises `DataError` (naming why) for any other kind, where the bytes
    behind a token are not fixed.
    """
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    if not isinstance(backend.decoder, decoders.ByteLevel):
        raise DataError(
            f"tokenizer: its decoder is {type(backend.decoder).__name__}, not ByteLevel, so the "
            "bytes behind its tokens are unknown; bits per byte needs a byte-level BPE tokenizer "
            "(bpe or gpt2)"
        )
    vocab: dict[str, int] = backend.get_vocab(with_added_tokens=True)
    special = {
        token.content for token in backend.get_added_tokens_decoder().values() if token.special
    }
    alphabet = set(pre_tokenizers.ByteLevel.alphabet())
    lengths = np.zeros(max(vocab.values()) + 1, dtype=np.int64)
    for text, index in vocab.items():
        if text in special:
            continue
        if not set(text) <= alphabet:
            raise DataError(
                f"tokenizer: token {text!r} (id {index}) is not byte-level, so its UTF-8 bytes "
                "are unknown; bits per byte needs a byte-level BPE tokenizer (bpe or gpt2)"
            )
        lengths[index] = len(text)  # one byte per character of a byte-level entry
    return lengths


def eval_window_count(
    num_tokens: int, seq_len: int, batch_size: int, max_batches: int | None
) -> int:
    """How many windows `eval_batches(tokens, seq_len, batch_size, max_batches)` yields."""
    count = max((num_tokens - 1) // seq_len, 0)
    if max_batches is not None:
        count = min(count, max_batches * batch_size)
    return count


def scored_bytes(tokens: np.ndarray, byte_lengths: np.ndarray, seq_len: int, windows: int) -> int:
    """UTF-8 bytes of the targets that `windows` evaluation windows of `seq_len` score, i.e. of
    `tokens[1 : windows·seq_len + 1]` (module docstring)."""
    stop = windows * seq_len + 1
    if windows < 0 or stop > len(tokens):
        raise DataError(
            f"{windows} windows of {seq_len} tokens need {stop} tokens, the split has {len(tokens)}"
        )
    total = 0
    for start in range(1, stop, _CHUNK):
        ids = np.asarray(tokens[start : min(start + _CHUNK, stop)], dtype=np.int64)
        if ids.size and int(ids.max()) >= len(byte_lengths):
            raise DataError(
                f"token id {int(ids.max())} is outside the tokenizer's {len(byte_lengths)} ids"
            )
        total += int(byte_lengths[ids].sum())
    return total
