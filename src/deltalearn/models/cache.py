"""`DeltaLMCache`: the attention KV cache plus the inputs of the short token-axis convolutions.

A token-axis convolution (the EC expansion, the TC compressors) needs the last `K − 1` inputs it
saw to process the next token. `DeltaLMCache` is a `transformers.DynamicCache` (keys/values per layer,
`[B, heads, T, head_dim]`) that also keeps, per convolution, *every* input it has seen, one entry per
cached token, keyed by where the convolution is used:

    "embed"        (B, S, d)          inputs of the EC expansion (token embeddings, pads zeroed)
    "<l>.attn"     (B, S, d, dv)      states read by layer l's TC compressor before attention
    "<l>.mlp"      (B, S, d, dv)      ... before the MLP
    "final"        (B, S, d, dv)      ... before the final norm

with `S = get_seq_length()`. The model reads only the last `K − 1` of them (`conv_history`) and
appends each chunk's inputs (`append_conv`). Keeping them all makes `crop` exact: cutting the KV
cache and these inputs to the same length puts the cache back exactly as it was at that length, so
assisted (speculative) and prompt-lookup decoding, which crop after verifying draft tokens, work for
every variant, however far back they crop. The cost is memory that grows with the sequence like the
KV cache itself: per token, `d` values for EC and `d·dv` per TC compressor (`2L + 1` of them), so a
TC variant holds about `dv(2L + 1)/(2L)` times the KV cache of its `L` layers (width `d`).
Appending writes into a buffer that doubles when full (outside autograd), so a long generation copies
each input a constant number of times rather than every input at every token.

`conv` is the read-only view the old layout exposed: the last `K − 1` inputs per convolution,
`(B, K − 1, ...)`, zero-padded on the left while fewer than `K − 1` tokens were seen.
The batch operations `generate` uses (beam reordering, repeating, selecting) apply to both parts.

`DeltaLMStaticCache` is the fixed-shape form (`generate(..., cache_implementation="static")`): a
`transformers.StaticCache` for the keys and values plus one pre-allocated buffer per convolution,
`(B, max_cache_len, ...)`, written in place at the cache's current length. Its tensors keep their
shapes and addresses from the first token to the last, and every length is a device tensor, so a
compiled decode step is traced once and reads nothing on the host.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache, StaticCache


def kept_length(length: int, max_length: int) -> int:
    """How many tokens `crop(max_length)` keeps of `length` (see `DeltaLMCache.crop`)."""
    if max_length < 0:
        return max(length + max_length, 0)
    return length if max_length == 0 else min(max_length, length)


class ConvInputCache:
    """What both caches expose about their convolution inputs (module docstring)."""

    _conv_history_len: dict[str, int]

    def conv_history(self, key: str, length: int) -> torch.Tensor | None:
        raise NotImplementedError

    @property
    def conv(self) -> dict[str, torch.Tensor]:
        """The last `K − 1` inputs per convolution (read-only view; module docstring)."""
        return {k: self.conv_history(k, n) for k, n in self._conv_history_len.items()}


class DeltaLMCache(ConvInputCache, DynamicCache):
    """KV cache + every convolution input seen (see the module docstring for keys and shapes)."""

    def __init__(self, *args, **kwargs) -> None:
        self._conv_inputs: dict[str, torch.Tensor] = {}
        # Where `_conv_inputs[key]` is the front of a larger buffer: the buffer, filled that far.
        # Appending one token then writes into it instead of copying every input seen (a growing
        # `torch.cat` per convolution and token, quadratic in the sequence length).
        self._conv_spare: dict[str, torch.Tensor] = {}
        self._conv_history_len: dict[str, int] = {}
        super().__init__(*args, **kwargs)

    # ---- convolution inputs ---------------------------------------------------------------------
    def conv_history(self, key: str, length: int) -> torch.Tensor | None:
        """The last `length` inputs of convolution `key` `(B, length, ...)`, zero-padded on the left
        when fewer were seen; None when `key` has seen no input (a fresh sequence)."""
        if length < 0:
            raise ValueError(f"history length must be >= 0, got {length}")
        seen = self._conv_inputs.get(key)
        if seen is None:
            return None
        missing = length - seen.shape[1]
        if missing <= 0:
            return seen[:, seen.shape[1] - length :]
        pad = seen.new_zeros(seen.shape[0], missing, *seen.shape[2:])
        return torch.cat([pad, seen], dim=1)

    def append_conv(self, key: str, inputs: torch.Tensor, history_len: int) -> None:
        """Record the inputs `(B, T, ...)` convolution `key` (which reads `history_len` = K − 1
        past inputs) has just processed."""
        seen = self._conv_inputs.get(key)
        if seen is not None and (
            seen.shape[0] != inputs.shape[0] or seen.shape[2:] != inputs.shape[2:]
        ):
            raise ValueError(
                f"inputs of shape {tuple(inputs.shape)} do not extend the cached inputs of "
                f"{key!r}, of shape {tuple(seen.shape)} (batch and feature sizes must match)"
            )
        self._conv_inputs[key] = inputs if seen is None else self._extend(key, seen, inputs)
        self._conv_history_len[key] = history_len

    def _extend(self, key: str, seen: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        """`seen` followed by `inputs` along the token axis, in `key`'s buffer when it has room
        (grown by doubling: amortised one copy per input). Under autograd, a plain `torch.cat`
        (no in-place writes into tensors a graph may hold)."""
        inputs = inputs.to(seen)
        if torch.is_grad_enabled() and (seen.requires_grad or inputs.requires_grad):
            self._conv_spare.pop(key, None)
            return torch.cat([seen, inputs], 1)
        n, t = seen.shape[1], inputs.shape[1]
        buffer = self._conv_spare.get(key)
        # (narrow/copy_ rather than slice assignment: a few µs less per convolution and token)
        if buffer is None or buffer.shape[1] < n + t or buffer.data_ptr() != seen.data_ptr():
            buffer = seen.new_empty(seen.shape[0], 2 * (n + t), *seen.shape[2:])
            buffer.narrow(1, 0, n).copy_(seen)
            self._conv_spare[key] = buffer
        buffer.narrow(1, n, t).copy_(inputs)
        return buffer.narrow(1, 0, n + t)

    def convolve_appending(
        self, key: str, inputs: torch.Tensor, history_len: int, kernel, *weights
    ) -> torch.Tensor | None:
        """`kernel(buffer, seen, inputs, *weights)` — an appending read of the inference extension
        (`ops/extension.py`), which writes `inputs` `(B, T, ...)` after the inputs `seen` at the
        front of `key`'s spare buffer and convolves the window ending with them, returning the
        output and the buffer's new front — or None, untouched, where `inputs` do not extend
        `seen` there as they are (no buffer yet, no room left, another shape or dtype): then
        `append_conv` grows the buffer, converts them or says what is wrong."""
        out = kernel(self._conv_spare.get(key), self._conv_inputs.get(key), inputs, *weights)
        if out is None:
            return None
        self._conv_inputs[key] = out[1]
        self._conv_history_len[key] = history_len
        return out[0]

    def _map_conv(self, fn) -> None:
        self._conv_inputs = {key: fn(seen) for key, seen in self._conv_inputs.items()}
        self._conv_spare = {}  # the mapped inputs are new tensors: buffers start again

    # ---- transformers Cache interface ------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._conv_inputs, self._conv_history_len, self._conv_spare = {}, {}, {}

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._map_conv(lambda s: s.index_select(0, beam_idx.to(s.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._map_conv(lambda s: s.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._map_conv(lambda s: s[indices])

    @property
    def is_croppable(self) -> bool:
        return super().is_croppable  # the convolution inputs are cut with the KV cache

    def crop(self, max_length: int) -> None:
        """Cut the cache to its first tokens, KV cache and convolution inputs alike.

        `max_length < 0` removes the last `|max_length|` tokens (what `generate` passes in
        transformers 5); `max_length >= 0` keeps the first `max_length` tokens (the older
        transformers meaning), a no-op when that many or fewer are cached. `crop(0)` keeps all.
        """
        length = self.get_seq_length()
        keep = kept_length(length, max_length)
        if keep < length:
            super().crop(keep - length)
        self._crop_conv(keep)

    def _crop_conv(self, keep: int) -> None:
        # Views of the same buffers: later appends overwrite what was cut (no new buffers).
        self._conv_inputs = {key: seen[:, :keep] for key, seen in self._conv_inputs.items()}


class DeltaLMStaticCache(ConvInputCache, StaticCache):
    """Fixed-shape KV cache + convolution inputs, for compiled decoding (module docstring).

    Build it as a `StaticCache` (`DeltaLMStaticCache(config=model.config, max_cache_len=N)`), or
    let `generate(..., cache_implementation="static")` do it. Holds at most `max_cache_len` tokens.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._init_conv()

    @classmethod
    def wrapping(cls, cache: StaticCache) -> DeltaLMStaticCache:
        """This cache type over the layers (and settings) of a freshly made `StaticCache`."""
        out = cls.__new__(cls)
        out.__dict__.update(cache.__dict__)
        out._init_conv()
        return out

    def _init_conv(self) -> None:
        self._conv_buffers: dict[str, torch.Tensor] = {}  # (B, max_cache_len, ...) per convolution
        self._conv_lengths: dict[str, torch.Tensor] = {}  # inputs written so far, 0-d long
        self._conv_history_len: dict[str, int] = {}

    @property
    def max_cache_len(self) -> int:
        return self.layers[0].max_cache_len

    # ---- convolution inputs ---------------------------------------------------------------------
    def conv_history(self, key: str, length: int) -> torch.Tensor | None:
        """The last `length` inputs of convolution `key` `(B, length, ...)`, zeros where fewer
        were seen; None before the first input. Gathered by tensor index: no host read."""
        if length < 0:
            raise ValueError(f"history length must be >= 0, got {length}")
        buffer = self._conv_buffers.get(key)
        if buffer is None:
            return None
        index = self._conv_lengths[key] - length + torch.arange(length, device=buffer.device)
        seen = (index >= 0).view(1, length, *([1] * (buffer.dim() - 2)))
        return buffer.index_select(1, index.clamp(min=0)) * seen.to(buffer.dtype)

    def append_conv(self, key: str, inputs: torch.Tensor, history_len: int) -> None:
        """Write the inputs `(B, T, ...)` convolution `key` has just processed after those seen."""
        buffer = self._conv_buffers.get(key)
        if buffer is None:
            buffer = self._allocate_conv(key, inputs)
        elif buffer.shape[0] != inputs.shape[0] or buffer.shape[2:] != inputs.shape[2:]:
            raise ValueError(
                f"inputs of shape {tuple(inputs.shape)} do not fit the static buffer of {key!r}, "
                f"of shape {tuple(buffer.shape)} (batch and feature sizes must match)"
            )
        length = self._conv_lengths[key]
        positions = length + torch.arange(inputs.shape[1], device=buffer.device)
        buffer.index_copy_(1, positions, inputs.to(buffer.dtype))
        length.add_(inputs.shape[1])  # in place: the compiled step keeps reading the same tensor
        self._conv_history_len[key] = history_len

    def _allocate_conv(self, key: str, inputs: torch.Tensor) -> torch.Tensor:
        if inputs.shape[1] > self.max_cache_len:
            raise ValueError(
                f"{inputs.shape[1]} tokens do not fit a static cache of max_cache_len "
                f"{self.max_cache_len}"
            )
        shape = (inputs.shape[0], self.max_cache_len, *inputs.shape[2:])
        buffer = inputs.new_zeros(shape)
        length = torch.zeros((), dtype=torch.long, device=inputs.device)
        if not torch.compiler.is_compiling():  # fixed addresses, as StaticLayer does for its KV
            torch._dynamo.mark_static_address(buffer)
            torch._dynamo.mark_static_address(length)
        self._conv_buffers[key], self._conv_lengths[key] = buffer, length
        return buffer

    # ---- transformers Cache interface ------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        for buffer in self._conv_buffers.values():
            buffer.zero_()
        for length in self._conv_lengths.values():
            length.zero_()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        for buffer in self._conv_buffers.values():
            buffer.copy_(buffer.index_select(0, beam_idx.to(buffer.device)))

    def crop(self, max_length: int) -> None:
        """Cut to the first tokens, as `DeltaLMCache.crop` (later writes overwrite the rest)."""
        length = int(self.get_seq_length())
        keep = kept_length(length, max_length)
        if keep < length:
            super().crop(keep - length)
        for conv_length in self._conv_lengths.values():
            conv_length.fill_(keep)
