"""Deterministic batches of language-modelling windows.

Training (`BatchSampler`): the global batch of optimizer step `s` is rows ``s*B .. s*B + B - 1`` of
an endless sequence of windows. The windows are the token stream cut into consecutive pieces of
``seq_len + 1`` ids overlapping by one (the input and its next-token targets), and the sequence
visits them epoch by epoch: epoch `e` shuffles all windows with a permutation and shifts their
boundaries by a phase, both drawn from ``(seed, e)`` alone. Hence

- a batch depends only on ``(seed, step)``: no sampler state to checkpoint, resume is exact;
- any rows ``[start:stop)`` of it can be computed alone, so data-parallel ranks and gradient
  accumulation micro-batches slice one global batch, and their union is the one-process batch;
- within an epoch no window repeats; every epoch sees different boundaries.

Random numbers come from numpy's `SeedSequence` + `PCG64` raw output, whose streams numpy keeps
stable across versions (the distribution methods do not promise that).

Evaluation (`eval_batches`): the first windows of the stream in order, no shuffling, so every
evaluation sees the same tokens.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from deltalearn.errors import DataError


def _integer(name: str, value: object, *, minimum: int) -> int:
    """`value` as a Python int (numpy integers accepted), or `DataError` below `minimum`."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise DataError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _check_tokens(tokens: np.ndarray, seq_len: int) -> None:
    if tokens.ndim != 1:
        raise DataError(f"tokens must be one-dimensional, got shape {tokens.shape}")
    if len(tokens) < seq_len + 1:
        raise DataError(
            f"corpus too small: {len(tokens)} tokens cannot fill one window of seq_len={seq_len} "
            f"(+1 target) — use a shorter seq_len or more text"
        )


def _windows(
    tokens: np.ndarray, starts: np.ndarray, seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather windows `tokens[s : s + seq_len + 1]` → (x, y), int64 tensors (rows, seq_len)."""
    index = starts[:, None] + np.arange(seq_len + 1)[None, :]  # (rows, seq_len + 1)
    window = torch.from_numpy(np.asarray(tokens[index], dtype=np.int64))
    return window[:, :-1].contiguous(), window[:, 1:].contiguous()


def shard_rows(global_batch_size: int, rank: int, world_size: int) -> tuple[int, int]:
    """The `[start, stop)` rows of a global batch that data-parallel rank `rank` of `world_size`
    owns: contiguous, equal shares (the batch size must divide evenly)."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise DataError(f"rank must be in [0, {world_size}), got {rank}")
    if global_batch_size % world_size:
        raise DataError(
            f"global_batch_size={global_batch_size} is not divisible by world_size={world_size}"
        )
    share = global_batch_size // world_size
    return rank * share, (rank + 1) * share


class BatchSampler:
    """Deterministic, stateless batches of (x, y) windows for language modelling (y = x shifted
    by one), see the module docstring.

    Args:
        tokens: 1-D token ids (e.g. a `PreparedData.tokens("train")` memmap), length N.
        seq_len: tokens per row, L.
        global_batch_size: rows per optimizer step over all ranks and micro-batches, B.
        seed: selects the shuffles and phases.

    Each epoch uses ``W = (N - 1) // L - 1`` windows (one fewer than fit, so that the phase can
    range over a whole window length), or 1 window when the corpus holds fewer than two.
    """

    def __init__(self, tokens: np.ndarray, seq_len: int, global_batch_size: int, seed: int = 0):
        seq_len = _integer("seq_len", seq_len, minimum=1)
        _check_tokens(tokens, seq_len)
        self.tokens = tokens
        self.seq_len = seq_len
        self.global_batch_size = _integer("global_batch_size", global_batch_size, minimum=1)
        self.seed = _integer("seed", seed, minimum=0)
        fit = (len(tokens) - 1) // seq_len  # windows that fit side by side at phase 0
        self.windows_per_epoch = fit - 1 if fit >= 2 else 1
        # Largest phase that keeps the last window's target inside the stream, at most L - 1.
        slack = len(tokens) - 1 - self.windows_per_epoch * seq_len
        self._max_phase = min(slack, seq_len - 1)
        self._epoch_cache: dict[int, tuple[np.ndarray, int]] = {}  # epoch → (order, phase)

    def epoch_of(self, step: int) -> float:
        """Fractional epoch reached at the start of `step`."""
        return step * self.global_batch_size / self.windows_per_epoch

    def _epoch(self, epoch: int) -> tuple[np.ndarray, int]:
        """(window order, phase) of `epoch`: a pure function of (seed, epoch), memoised."""
        if epoch in self._epoch_cache:
            return self._epoch_cache[epoch]
        bits = np.random.PCG64(np.random.SeedSequence([self.seed, epoch])).random_raw(
            self.windows_per_epoch + 1
        )
        phase = int(bits[0] % np.uint64(self._max_phase + 1))
        order = np.argsort(bits[1:], kind="stable")  # a uniform permutation of the windows
        if len(self._epoch_cache) >= 2:  # keep the two latest: a batch may straddle an epoch end
            self._epoch_cache.pop(min(self._epoch_cache))
        self._epoch_cache[epoch] = (order, phase)
        return order, phase

    def starts(self, step: int, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Token offsets of the windows in rows `[start:stop)` of step `step`'s global batch."""
        step = _integer("step", step, minimum=0)
        stop = self.global_batch_size if stop is None else stop
        if not 0 <= start <= stop <= self.global_batch_size:
            raise DataError(
                f"rows [{start}:{stop}) are not within the global batch of {self.global_batch_size}"
            )
        rows = step * self.global_batch_size + np.arange(start, stop, dtype=np.int64)
        epochs, positions = np.divmod(rows, self.windows_per_epoch)
        out = np.empty(len(rows), dtype=np.int64)
        for epoch in np.unique(epochs):  # a batch spans at most a few epochs
            order, phase = self._epoch(int(epoch))
            here = epochs == epoch
            out[here] = phase + order[positions[here]] * self.seq_len
        return out

    def batch(
        self, step: int, start: int = 0, stop: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Rows `[start:stop)` of the global batch of optimizer step `step`.

        Returns:
            x, y: int64 tensors of shape (stop - start, seq_len); ``y[:, t]`` is the token after
            ``x[:, t]`` in the stream (y is x shifted by one, so ``y[:, :-1] == x[:, 1:]``).

        The global batch depends only on (seed, step); slicing it by rank and micro-batch and
        concatenating the slices gives the single-process batch exactly.
        """
        return _windows(self.tokens, self.starts(step, start, stop), self.seq_len)


def eval_batches(
    tokens: np.ndarray, seq_len: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Validation batches: the stream cut into consecutive non-overlapping windows (window i
    covers inputs ``tokens[i*L : (i+1)*L]``), `batch_size` windows per batch, in order; the last
    batch may be smaller. At most `max_batches` batches.

    Yields:
        x, y: int64 tensors (rows, seq_len), y = x shifted by one token.
    """
    seq_len = _integer("seq_len", seq_len, minimum=1)
    _check_tokens(tokens, seq_len)
    batch_size = _integer("batch_size", batch_size, minimum=1)
    if max_batches is not None:
        max_batches = _integer("max_batches", max_batches, minimum=0)
    count = (len(tokens) - 1) // seq_len
    if max_batches is not None:
        count = min(count, max_batches * batch_size)
    for first in range(0, count, batch_size):
        starts = np.arange(first, min(first + batch_size, count), dtype=np.int64) * seq_len
        yield _windows(tokens, starts, seq_len)
