"""The channel-compressor read `x[..., i] = Σ_j C[i, j] X[..., i, j]` as a custom autograd Function.

Why: written as `(X * C).sum(-1)`, PyTorch makes a state-sized temporary and then reduces over an
innermost axis of length dv (4), which runs far below memory bandwidth on CPU (measured 2.8 ms vs
0.9 ms for the loop below on a `(2048, 256, 4)` fp32 state, 2 cores). Accumulating one value channel
at a time (`x += C[:, j] · X[..., j]`) reads the state once per channel with unit-stride rows and
makes no temporary. The backward (one state-sized write for ∂X, per-channel sums for ∂C):

    ∂L/∂X[..., i, j] = C[i, j] · G[..., i]          ∂L/∂C[i, j] = Σ_rows G[..., i] · X[..., i, j]

`channel_mix_reference` is the plain form it is tested against. On CUDA the read is one Triton
kernel instead (`ops/triton_mixing.py`): per-channel loops are a CPU's way, not a GPU's.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from deltalearn.ops import backend, compiled_kernels, native
from deltalearn.ops._shapes import _fmt, is_small_state, promote_float


def _check(X: torch.Tensor, C: torch.Tensor) -> None:
    if C.dim() != 2 or X.dim() < 2 or tuple(X.shape[-2:]) != tuple(C.shape):
        raise ValueError(
            f"X must end in the shape of the mixing matrix C (d, dv) = {_fmt(C)}, got X {_fmt(X)}"
        )


def channel_mix_reference(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """`(X · C).sum(-1)`: `X` `(..., d, dv)`, `C` `(d, dv)` -> `(..., d)` in their promoted dtype."""
    _check(X, C)
    dtype = promote_float(X.dtype, C.dtype)
    return (X.to(dtype) * C.to(dtype)).sum(-1)


def contract_values(A: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`Σ_j A[..., j] · w[..., j]` over the value axis, one channel at a time (module docstring).

    `A` `(..., d, dv)`; `w` broadcastable to it: `(d, dv)` per feature (a compressor) or
    `(..., 1, dv)` per row (the rewrite's `Ge`, `Xs`). Returns `(..., d)`; no autograd of its own.
    """
    x = A[..., 0] * w[..., 0]
    for j in range(1, A.shape[-1]):
        x = torch.addcmul(x, A[..., j], w[..., j])
    return x


class _ChannelMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        dtype = promote_float(X.dtype, C.dtype)
        ctx.save_for_backward(X, C)
        return contract_values(X.to(dtype), C.to(dtype))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, G: torch.Tensor):
        X, C = ctx.saved_tensors
        need_X, need_C = ctx.needs_input_grad
        dtype = G.dtype
        Cd = C.to(dtype)
        gX = gC = None
        if need_X:
            gX = (G.unsqueeze(-1) * Cd).to(X.dtype)  # one state-sized write
        if need_C:
            gC = mixing_weight_grad(G, X).to(C.dtype)
        return gX, gC


def mixing_weight_grad(G: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """`Σ_rows G[..., i] · X[..., i, j]`: the `(d, dv)` weight gradient of a channel mix whose
    output received `G` `(..., d)` from a state `X` `(..., d, dv)`; in G's dtype."""
    rows = tuple(range(G.dim() - 1))  # summed in place: a reshape would copy a strided slice
    Xd = X.to(G.dtype)
    return torch.stack([(G * Xd[..., j]).sum(rows) for j in range(X.shape[-1])], -1)


def channel_mix(X: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """`x[..., i] = Σ_j C[i, j] X[..., i, j]` with a hand-written backward (module docstring).

    Args:
        X: state `(..., d, dv)`.
        C: per-feature mixing weights `(d, dv)`.
    Returns:
        `(..., d)` in the promoted dtype of X and C.
    """
    choice = backend.backend()
    if choice == "reference":
        return channel_mix_reference(X, C)
    _check(X, C)
    if native.fits(X) and backend.use_native([X, C], choice):  # CPU: a row's channels in one loop
        return native.value_read_native(X, C)
    if compiled_kernels.applies([X, C], choice):  # compiled, switched on: the Triton kernels
        return compiled_kernels.value_read(X, C)
    if is_small_state(X):  # e.g. one decoded token: two ops
        return channel_mix_reference(X, C)
    if backend.use_triton([X, C], choice):  # a GPU: one kernel, not a strided op per value channel
        from deltalearn.ops.triton_mixing import value_read_triton

        return value_read_triton(X, C)
    return _ChannelMix.apply(X, C)
