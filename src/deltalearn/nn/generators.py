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
from deltalearn.ops._shapes import accumulation_dtype, autocast_on
from deltalearn.ops.projections import cast, kept_inputs, linear, project, projection_grads

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


class _LinearProjections(torch.autograd.Function):
    """The linear gate's logit `z = c·w_g + b_g` and, when `W_v` is given, the value head's
    pre-activation `p = x W_vᵀ (+ b_v)` (x = c or u), as one autograd node with a hand-written
    backward. Called with autocast off; `lin_dtype` is the dtype the value projection runs in
    (the autocast dtype, as `nn.Linear` under autocast would; None: the inputs' own), `keep_dtype`
    the dtype c is kept in for ∂w_g.

    Why: under bf16 autocast autograd would keep the fp32 c alive for ∂w_g — one more d-wide fp32
    tensor a sublayer, the largest item of ddl's extra training memory on the GPU. ∂w_g =
    Σ_rows ∂z·c is a weight gradient like those of the bf16 projections, so it takes c rounded as
    they do; z and ∂c stay exact in fp32, and the value projection's numbers are those of
    autocast's linear. Both projections in one Function make one autograd node where two
    `nn.Linear`s made ten; that did not make the host faster (a Python Function costs about what
    it saves: `benchmarks/README.md`), the memory is the gain.
    """

    @staticmethod
    def forward(ctx: Any, c, x, w_g, b_g, W_v, b_v, keep_dtype, lin_dtype):
        # On the rows as one matrix: every reshape and transpose is a dispatched op, and eager
        # training on a GPU is bound by such host work (addmm and mm, as `F.linear` takes them:
        # the FLOPs `deltalearn.models.flops` counts).
        d = c.shape[-1]
        c2 = c.reshape(-1, d)
        ctx.row_shape = c.shape
        ctx.has_value = W_v is not None
        if not ctx.has_value:
            z = project(c2, w_g, b_g).view(c.shape[:-1])
            ctx.save_for_backward(cast(c2, keep_dtype), w_g)
            return z
        c_kept, x_low = kept_inputs(c2, c2 if x is c else x.reshape(-1, d), keep_dtype, lin_dtype)
        z = project(c2, w_g, b_g).view(c.shape[:-1])
        W, b = cast(W_v, lin_dtype), cast(b_v, lin_dtype)
        p = project(x_low, W, b).view(*c.shape[:-1], -1)
        ctx.save_for_backward(c_kept, w_g, x_low, W_v)
        ctx.value_dtypes = (x.dtype, None if b_v is None else b_v.dtype, lin_dtype)
        return z, p

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, gz: torch.Tensor, gp: torch.Tensor | None = None):
        c_kept, w_g, *value = ctx.saved_tensors
        need = ctx.needs_input_grad
        if not ctx.has_value:
            gc, _, gw_g, gb_g, _, _ = projection_grads(
                gz, None, c_kept, w_g, None, None, need[:6], ctx.row_shape, None
            )
            return gc, None, gw_g, gb_g, None, None, None, None
        grads = projection_grads(gz, gp, c_kept, w_g, *value, need[:6], ctx.row_shape,
                                 ctx.value_dtypes)  # fmt: skip
        return (*grads, None, None)


def projection_dtypes(c: torch.Tensor, acc: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
    """`(keep_dtype, lin_dtype)` of `_LinearProjections` under the current autocast state."""
    device_type = c.device.type
    if autocast_on(device_type):
        low = torch.get_autocast_dtype(device_type)
        return low, low
    return acc, None


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
        # Under autocast the linear gate keeps c for its weight's gradient in the autocast dtype,
        # as every other projection of the model does (`_LinearProjections`).
        keep, _ = projection_dtypes(c, acc)
        with torch.autocast(device_type=c.device.type, enabled=False):
            z = c.to(acc)
            w, b = self.out.weight.to(acc), self.out.bias.to(acc)
            if self.hidden is None:
                return _LinearProjections.apply(z, None, w, b, None, None, keep, None)
            z = torch.tanh(F.linear(z, self.hidden.weight.to(acc), self.hidden.bias.to(acc)))
            return F.linear(z, w, b).squeeze(-1)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return 2.0 * torch.sigmoid(self.logits(c))


def gate_and_value(
    gate: GateHead, value: ValueHead, c: torch.Tensor, u: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(gate.logits(c), value.pre_activation(c, u))`: the same values, from one autograd node for
    the linear gate (`_LinearProjections`, which keeps c in the autocast dtype for ∂w_g)."""
    if gate.hidden is not None:
        return gate.logits(c), value.pre_activation(c, u)
    acc = accumulation_dtype(c)
    if not torch.is_grad_enabled() and not autocast_on(c.device.type):
        # Inference (one decoded token at a time is bound by host work): the same two linears
        # without an autograd node and an autocast switch.
        z = cast(c, acc)
        x = z if value.kind == "paper" else u
        logit = linear(z, cast(gate.out.weight, acc), cast(gate.out.bias, acc)).squeeze(-1)
        return logit, linear(x, value.proj.weight, value.proj.bias)
    keep, lin = projection_dtypes(c, acc)
    with torch.autocast(device_type=c.device.type, enabled=False):
        z = cast(c, acc)
        x = z if value.kind == "paper" else u
        w, b = cast(gate.out.weight, acc), cast(gate.out.bias, acc)
        return _LinearProjections.apply(z, x, w, b, value.proj.weight, value.proj.bias, keep, lin)
