"""`DeltaLMCache`: the attention KV cache plus the short-convolution histories of DDL.

A token-axis convolution (the EC expansion, the TC compressors) needs the last `K − 1` inputs it
saw to process the next token. `DeltaLMCache` is a `transformers.DynamicCache` (keys/values per layer,
`[B, heads, T, head_dim]`) with one extra dict `conv` of those histories, keyed by where they are
used:

    "embed"        (B, K_ec − 1, d)          inputs of the EC expansion (token embeddings)
    "<l>.attn"     (B, K_tc − 1, d, dv)      states read by layer l's TC compressor before attention
    "<l>.mlp"      (B, K_tc − 1, d, dv)      ... before the MLP
    "final"        (B, K_tc − 1, d, dv)      ... before the final norm

The batch operations `generate` uses (beam reordering, repeating, selecting) apply to both parts.
Convolution histories cannot be rolled back, so a cache holding any is not croppable.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache


class DeltaLMCache(DynamicCache):
    """KV cache + convolution histories (see the module docstring for keys and shapes)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.conv: dict[str, torch.Tensor] = {}

    def _map_conv(self, fn) -> None:
        self.conv = {key: fn(state) for key, state in self.conv.items()}

    def reset(self) -> None:
        super().reset()
        self.conv = {}

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
        return not self.conv and super().is_croppable

    def crop(self, tokens_to_remove: int) -> None:
        if self.conv and tokens_to_remove != 0:
            raise ValueError("DeltaLMCache holds convolution histories, which cannot be cropped")
        super().crop(tokens_to_remove)
