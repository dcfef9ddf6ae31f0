"""The backbone sublayers of DeltaLM (SPEC §4): RMSNorm, RoPE attention with QK norm, SwiGLU MLP.

Index legend: B batch, T new tokens, S keys (cached + new), H heads, D head dim, d model width.
No biases anywhere in the backbone. Conventions follow the authors' code so their checkpoints load:
RMSNorm computed in fp32 with a learned weight; RoPE rotates the two halves of each head
(not interleaved pairs), base `rope_theta`, angles in fp32; rotary is applied *before* the QK norm.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import Cache

from deltalearn.models.configuration_deltalm import DeltaLMConfig
from deltalearn.ops.projections import cast


class RMSNorm(nn.Module):
    """`x / rms(x) · w`, computed in fp32 and returned in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return cast(y, x.dtype)  # no `.to` call where y is in x's dtype already

    def rms_norm_parameters(self) -> tuple[torch.Tensor, float]:
        """`(weight, eps)` of `rms_norm` as `forward` applies it (`nn.residual.rms_norm_parameters`:
        a DDL rewrite's backward may recompute this norm of its input instead of keeping it)."""
        return self._parameters["weight"], self.eps  # not via nn.Module.__getattr__: host time


class OutProj(nn.Linear):
    """A projection that writes into the residual stream (attention output, MLP down-projection).

    Only a marker type: its weight starts with the smaller std `f/√d/√L` (SPEC §4).
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__(in_features, out_features, bias=False)


def rope_angles(
    position_ids: torch.Tensor, head_dim: int, theta: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of the rotary angles for positions `(B, T)` -> two `(B, T, 1, D/2)` fp32 tensors."""
    exponent = torch.arange(0, head_dim, 2, device=position_ids.device, dtype=torch.float32)
    inv_freq = 1.0 / theta ** (exponent / head_dim)  # (D/2,)
    angles = position_ids.float()[..., None] * inv_freq  # (B, T, D/2)
    return angles.cos()[:, :, None, :], angles.sin()[:, :, None, :]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate `(B, T, H, D)` by the angles: the pair is (x[..., i], x[..., i + D/2])."""
    x1, x2 = x.float().chunk(2, dim=-1)  # (B, T, H, D/2) each
    return cast(torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1), x.dtype)


class Attention(nn.Module):
    """Causal multi-head self-attention with RoPE and QK RMSNorm, via `scaled_dot_product_attention`."""

    def __init__(self, config: DeltaLMConfig, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        d, inner = config.hidden_size, config.num_heads * config.head_dim
        self.q_proj = nn.Linear(d, inner, bias=False)
        self.k_proj = nn.Linear(d, inner, bias=False)
        self.v_proj = nn.Linear(d, inner, bias=False)
        self.o_proj = OutProj(inner, d)
        self.q_norm = RMSNorm(config.head_dim, config.norm_eps)
        self.k_norm = RMSNorm(config.head_dim, config.norm_eps)

    def forward(
        self,
        c: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        mask: torch.Tensor | None,
        cache: Cache | None = None,
    ) -> torch.Tensor:
        """c `(B, T, d)`; rope = (cos, sin) `(B, T, 1, D/2)`; mask `(B|1, 1, T, S)` bool (True =
        may attend) or None for plain causal attention without a past; cache: a `transformers`
        `Cache` that receives this layer's keys and values. Returns `(B, T, d)`."""
        B, T, _ = c.shape
        q = self.q_proj(c).view(B, T, self.num_heads, self.head_dim)  # (B, T, H, D)
        k = self.k_proj(c).view(B, T, self.num_heads, self.head_dim)
        v = self.v_proj(c).view(B, T, self.num_heads, self.head_dim)
        cos, sin = rope
        q = self.q_norm(apply_rope(q, cos, sin))
        k = self.k_norm(apply_rope(k, cos, sin))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # (B, H, S, D)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None)
        y = y.transpose(1, 2).reshape(B, T, self.num_heads * self.head_dim)  # (B, T, H*D)
        return self.o_proj(y)


class MLP(nn.Module):
    """SwiGLU: `down(silu(gate(c)) * up(c))`, hidden width ⌊8d/3⌋."""

    def __init__(self, config: DeltaLMConfig) -> None:
        super().__init__()
        d, hidden = config.hidden_size, config.mlp_hidden_size
        self.gate_proj = nn.Linear(d, hidden, bias=False)
        self.up_proj = nn.Linear(d, hidden, bias=False)
        self.down_proj = OutProj(hidden, d)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(c)) * self.up_proj(c))


def attention_mask_4d(
    padding_mask: torch.Tensor | None, num_new: int, num_keys: int, device: torch.device
) -> torch.Tensor | None:
    """Boolean mask `(B|1, 1, T, S)` for T new queries over S keys (the last T of which are new).

    Causal, and with a padding mask `(B, S)` (1 = real token) pad keys are hidden. A pad query
    would then see no key at all (a NaN row in SDPA), so every query may always see itself; pad
    outputs are garbage but finite and never read by a real token. None when plain
    `is_causal=True` suffices (no past, no padding).
    """
    past = num_keys - num_new
    if padding_mask is None and past == 0:
        return None
    q_pos = past + torch.arange(num_new, device=device)
    k_pos = torch.arange(num_keys, device=device)
    allowed = k_pos[None, :] <= q_pos[:, None]  # (T, S)
    if padding_mask is None:
        return allowed[None, None]
    allowed = allowed & padding_mask.bool()[:, None, None, :]  # (B, 1, T, S)
    return allowed | (k_pos[None, :] == q_pos[:, None])


def fixed_length_mask(
    attention_mask: torch.Tensor | None, query_positions: torch.Tensor, num_keys: int
) -> torch.Tensor:
    """Boolean mask `(B|1, 1, T, K)` over all `K` slots of a fixed-length (static) KV cache, for
    new tokens at `query_positions` `(T,)` (a device tensor: no host read).

    `attention_mask` is None (no padding), `(B, S)` with S ≤ K (1 = real token, over the cached
    and new tokens), or an already built `(B|1, 1, T, K)` mask (bool, True = may attend, or
    additive float, 0 = may attend), as `generate` makes for fixed-shape caches. Slots past the
    newest token are hidden by causality. Unlike `attention_mask_4d`, pad queries are not given
    their own key here: the caller reads the padding from this mask first.
    """
    keys = torch.arange(num_keys, device=query_positions.device)
    causal = keys[None, :] <= query_positions[:, None]  # (T, K)
    if attention_mask is None:
        return causal[None, None]
    T = query_positions.shape[0]
    if attention_mask.dim() == 4:
        if attention_mask.shape[1:] != (1, T, num_keys):
            raise ValueError(
                f"a 4-D attention_mask must have shape (batch, 1, new tokens, max_cache_len) = "
                f"(B, 1, {T}, {num_keys}), got {tuple(attention_mask.shape)}"
            )
        allowed = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return allowed & causal
    if attention_mask.dim() != 2 or attention_mask.shape[1] > num_keys:
        raise ValueError(
            f"attention_mask must have shape (batch, cached + new tokens) with at most "
            f"max_cache_len = {num_keys} tokens, got {tuple(attention_mask.shape)}"
        )
    padding = F.pad(attention_mask.bool(), (0, num_keys - attention_mask.shape[1]))  # (B, K)
    return causal & padding[:, None, None, :]
