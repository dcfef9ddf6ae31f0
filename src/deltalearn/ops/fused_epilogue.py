"""The rewrite epilogue in PyTorch ops as one autograd Function: the path where neither kernel
runs — a vector state or a decoding step under `torch.compile` (a matrix state takes
`ops/traced_epilogue.py` there otherwise), half precision on CPU (autocast), a CPU without a C
compiler — the counterpart of the Triton kernel of `ops/triton_epilogue.py` and the C kernel of
`ops/native.py`.

Why one Function and not autograd through the generators: autograd through `k = h/‖h‖` keeps h as
well as k alive for backward (two `d`-vectors per token and sublayer, where one is enough), and
records a graph node per generator op. This Function saves X, k (h where h is narrower, under
autocast), 1/‖h‖ and per-row scalars only; on a CPU training step at width 256 that is 16 MB of the
32 MB ddl spends above the baseline. (In a DeltaLM training forward X is rebuilt from Y in backward
rather than kept: `ops/state_tape.py`.)

Math (matrix state; a vector state is dv = 1), with the rewrite's own gradients from `ops/fused.py`:
    ρ = (‖h‖² + ε²)^-½,  k = ρ h          ∂L/∂h = ρ (∂L/∂k − k (kᵀ ∂L/∂k))
    β = 2σ(z)                             ∂L/∂z = ∂L/∂β · β (1 − β/2)
    v = p  or  s·σ(p)                     ∂L/∂p = ∂L/∂v  or  ∂L/∂v · v (1 − v/s)
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from deltalearn.ops import state_tape
from deltalearn.ops._shapes import accumulation_dtype, cast_grads, no_autocast
from deltalearn.ops.fused import _readout, delta_rewrite_grads, rank1_update, write_only_grads
from deltalearn.ops.projections import cast


class _RewriteEpilogue(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, X, h, z, p, rule: str, value_head: str, value_scale: float, k_eps: float):
        with no_autocast(X):
            return _RewriteEpilogue._forward(ctx, X, h, z, p, rule, value_head, value_scale, k_eps)

    @staticmethod
    def _forward(ctx: Any, X, h, z, p, rule, value_head, value_scale, k_eps):
        acc = accumulation_dtype(X, h, z, p)
        hf = h.to(acc)
        rho = torch.rsqrt((hf * hf).sum(-1, keepdim=True) + k_eps * k_eps)  # (..., 1)
        k = hf * rho
        beta = 2.0 * torch.sigmoid(z.to(acc))
        v = p.to(acc)
        if value_head == "official":
            v = value_scale * torch.sigmoid(v)
        # A vector state stays in vector ops (fewer per decoded token): e (...), else (..., dv).
        e = v - _readout(k, X) if rule == "delta" else v
        Y = rank1_update(X.to(acc), beta[..., None] * k, e)
        # The state is saved only where backward reads it; a bf16 state is saved as it came. A
        # half-precision h (the branch output under autocast) is half the bytes of k: keep h and
        # recompute k = ρh in backward (the same ops, so the same numbers).
        ctx.k_from_h = h.dtype != acc
        tape = state_tape.active()
        if tape is not None and X.dtype == acc:  # a rounded state cannot be rebuilt exactly
            # What the Function keeps anyway: h and ρ where it keeps h, else k itself.
            tape.link(X, Y, *((h, rho) if ctx.k_from_h else (k, None)), beta, e)
        ctx.save_for_backward(
            X if rule == "delta" else None, h if ctx.k_from_h else k, rho, beta, e, v
        )
        ctx.options = (rule, value_head, value_scale)
        ctx.dtypes = (X.dtype, h.dtype, z.dtype, p.dtype)
        return cast(Y, X.dtype)

    @staticmethod
    @once_differentiable  # backward uses saved tensors only; no second derivatives
    def backward(ctx: Any, G: torch.Tensor):
        with no_autocast(G):
            return _RewriteEpilogue._backward(ctx, G)

    @staticmethod
    def _backward(ctx: Any, G: torch.Tensor):
        X, k, rho, beta, e, v = ctx.saved_tensors
        if ctx.k_from_h:
            k = k.to(rho.dtype) * rho
        rule, value_head, value_scale = ctx.options
        need_X, need_h, need_z, need_p = ctx.needs_input_grad[:4]
        needs = (need_X, need_h, need_z, need_p)
        vector = G.dim() == k.dim()
        if vector:  # the matrix case with dv = 1
            G, e, v = G[..., None], e[..., None], v[..., None]
            X = X if X is None else X[..., None]
        if rule == "delta":
            gX, gk, gb, gv = delta_rewrite_grads(G, X, k, beta, e, needs)
        else:
            gX, gk, gb, gv = write_only_grads(G, k, beta, v, needs)
        if vector:
            gX = gX if gX is None else gX[..., 0]
            gv, v = (gv if gv is None else gv[..., 0]), v[..., 0]
        gh = gz = gp = None
        if need_h:
            gh = rho * (gk - k * (k * gk).sum(-1, keepdim=True))
        if need_z:
            gz = gb * beta * (1.0 - 0.5 * beta)
        if need_p:
            gp = gv if value_head == "paper" else gv * v * (1.0 - v / value_scale)
        grads = (gX, gh, gz, gp)
        return (*cast_grads(grads, ctx.dtypes), None, None, None, None)


def rewrite_epilogue_torch(X, h, z, p, rule, value_head, value_scale, k_eps) -> torch.Tensor:
    """Y of `rewrite_epilogue`, options positional (inputs already checked:
    `check_epilogue_inputs`)."""
    return _RewriteEpilogue.apply(X, h, z, p, rule, value_head, value_scale, k_eps)
