"""The three generators of a DDL sublayer (SPEC §2): direction k, target v, gate β.

k = k̃ / sqrt(‖k̃‖² + ε²)                        k̃ = the branch output h = F(c)
v = W_v c                (value_head="paper")
  = s·σ(W_v u + b_v)     (value_head="official", u = the un-normalised x_in, s = 4)
β = 2σ(W_β c + b_β)      (gate="linear")
  = 2σ(W₂ tanh(W₁ c + b₁) + b₂)                 (gate="mlp"), logits in fp32
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd.function import once_differentiable

from deltalearn.nn.choices import (
    DIRECTION_FORMS,
    GATES,
    VALUE_HEADS,
    DirectionForm,
    GateKind,
    ValueHeadKind,
    check_choice,
)
from deltalearn.ops import normalize_direction
from deltalearn.ops._shapes import accumulation_dtype

# β₀/2 is clamped away from 0 and 1 so that its logit is finite.
_BETA_INIT_CLAMP = 1e-4


def direction_rms(k_raw: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The precision-friendly form of §3.1: `RMSNorm(k̃; eps²/d) / sqrt(d)`.

    Algebraically equal to `normalize_direction(k_raw, eps)`; the mean-square keeps fp16/bf16 sums
    in range for wide d.
    """
    d = k_raw.shape[-1]
    kf = k_raw.float()
    k_hat = kf * torch.rsqrt(kf.pow(2).mean(-1, keepdim=True) + eps * eps / d)
    return (k_hat / math.sqrt(d)).to(k_raw.dtype)


def direction(k_raw: torch.Tensor, eps: float = 1e-5, form: DirectionForm = "l2") -> torch.Tensor:
    """Unit direction from an unnormalised proposal, in the exact L2 or the RMS form."""
    check_choice("form", form, DIRECTION_FORMS)
    return normalize_direction(k_raw, eps) if form == "l2" else direction_rms(k_raw, eps)


def beta_init_bias(beta_init: float) -> float:
    """The gate's output bias that makes `2σ(bias) = beta_init` (clamped inside (0, 2))."""
    if not 0.0 <= beta_init <= 2.0:
        raise ValueError(f"beta_init must lie in [0, 2], got {beta_init}")
    p = min(max(beta_init / 2.0, _BETA_INIT_CLAMP), 1.0 - _BETA_INIT_CLAMP)
    return math.log(p / (1.0 - p))


class ValueHead(nn.Module):
    """Target `v ∈ R^{dv}` per token. `forward(c, u)`: c normalised context, u un-normalised x_in."""

    def __init__(
        self,
        dim: int,
        value_channels: int = 1,
        kind: ValueHeadKind = "paper",
        sigmoid_scale: float = 4.0,
    ) -> None:
        super().__init__()
        check_choice("value_head", kind, VALUE_HEADS)
        self.kind = kind
        self.sigmoid_scale = sigmoid_scale
        self.proj = nn.Linear(dim, value_channels, bias=(kind == "official"))

    def pre_activation(self, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """`(..., dv)` before the squash: `W_v c` ("paper", which has none) or `W_v u + b_v`
        ("official"); the fused rewrite epilogue applies `s·σ(·)` itself."""
        return self.proj(c if self.kind == "paper" else u)

    def forward(self, c: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        p = self.pre_activation(c, u)
        return p if self.kind == "paper" else self.sigmoid_scale * torch.sigmoid(p)


def _autocast_on(device_type: str) -> bool:
    # cpu and cuda always have autocast; asking for others' breaks the graph under torch.compile
    if device_type not in ("cpu", "cuda") and not torch.amp.is_autocast_available(device_type):
        return False
    return torch.is_autocast_enabled(device_type)


class _LinearGateLogit(torch.autograd.Function):
    """`z = c·w + b` (one output) in c's dtype, keeping c for ∂w in `keep_dtype`.

    Why: under bf16 autocast the logit is computed in fp32 from the fp32 normalised context c, and
    autograd would keep that fp32 c alive until backward — one more d-wide fp32 tensor a sublayer,
    the largest single item of ddl's extra training memory on the GPU. ∂w = Σ_rows ∂z·c is a weight
    gradient like those of the model's bf16 projections, so it takes c rounded as they do; the
    forward logit and ∂c = ∂z·w stay exact in fp32.
    """

    @staticmethod
    def forward(ctx: Any, c: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, keep_dtype):
        ctx.save_for_backward(c.to(keep_dtype), weight)
        return F.linear(c, weight, bias).squeeze(-1)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gz: torch.Tensor):
        c_kept, weight = ctx.saved_tensors
        need_c, need_w, need_b = ctx.needs_input_grad[:3]
        # ∂c as the (rows × 1) @ (1 × d) product autograd would take: the same op, the same FLOPs
        # in `deltalearn.models.flops` (which counts a linear gate's backward as two matmuls).
        gc = gz.unsqueeze(-1) @ weight if need_c else None
        gw = None
        if need_w:
            rows = c_kept.reshape(-1, c_kept.shape[-1])
            gw = (gz.reshape(1, -1) @ rows.to(gz.dtype)).to(weight.dtype)
        gb = gz.sum().reshape(1).to(weight.dtype) if need_b else None
        return gc, gw, gb, None


class GateHead(nn.Module):
    """Gate `β = 2σ(g(c)) ∈ (0, 2)` per token, computed in fp32; returns shape `c.shape[:-1]`."""

    def __init__(
        self,
        dim: int,
        kind: GateKind = "linear",
        hidden: int = 128,
        beta_init: float = 1.0,
    ) -> None:
        super().__init__()
        check_choice("gate", kind, GATES)
        self.kind = kind
        if kind == "linear":
            self.hidden = None
            self.out = nn.Linear(dim, 1)
        else:
            if hidden < 1:
                raise ValueError(f"gate hidden size must be >= 1, got {hidden}")
            self.hidden = nn.Linear(dim, hidden)
            self.out = nn.Linear(hidden, 1)
        self.beta_init = beta_init
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.out.bias.fill_(beta_init_bias(self.beta_init))

    def logits(self, c: torch.Tensor) -> torch.Tensor:
        acc = accumulation_dtype(c)  # at least fp32, float64 stays float64
        device_type = c.device.type
        # Under autocast the linear gate keeps c for its weight's gradient in the autocast dtype,
        # as every other projection of the model does (`_LinearGateLogit`).
        keep = torch.get_autocast_dtype(device_type) if _autocast_on(device_type) else acc
        with torch.autocast(device_type=device_type, enabled=False):
            z = c.to(acc)
            if self.hidden is None:
                return _LinearGateLogit.apply(
                    z, self.out.weight.to(acc), self.out.bias.to(acc), keep
                )
            z = torch.tanh(F.linear(z, self.hidden.weight.to(acc), self.hidden.bias.to(acc)))
            return F.linear(z, self.out.weight.to(acc), self.out.bias.to(acc)).squeeze(-1)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(self.logits(c))
