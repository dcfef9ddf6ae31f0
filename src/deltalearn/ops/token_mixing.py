"""The token compressor's read (TC) as a custom autograd Function: a causal depthwise convolution
over tokens on the `d·dv` channels of the state, summed over the value axis,

    x[b, t, i] = Σ_τ Σ_j W[i, j, τ] · xs[b, p + t − (K − 1 − τ), i, j]      (zero where the index < 0)

`xs` `(B, p + T, d, dv)` holds `p` past states (a decoding history, or none) before the `T` new ones;
tap `K − 1` meets the current token.

Why: written as one channel mix per tap on slices of the state, autograd turns every slice's
gradient into a zero-filled state-sized tensor and then adds K of them (three state-sized passes per
tap). Here the forward accumulates each tap in place into the `(B, T, d)` output and the backward
writes ∂xs once, each tap an in-place multiply-add on its slice:

    ∂xs[b, s, i, j] = Σ_τ W[i, j, τ] · G[b, s − p + (K − 1 − τ), i]
    ∂W[i, j, τ]     = Σ_{b,t} G[b, t, i] · xs[b, p + t − (K − 1 − τ), i, j]

`token_mix_reference` is the plain form (pad, unfold, multiply, sum) it is tested against. On
CUDA the read is one Triton kernel instead (`ops/triton_mixing.py`).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from deltalearn.ops import backend, compiled_kernels, native
from deltalearn.ops._shapes import _fmt, is_small_state, promote_float
from deltalearn.ops.mixing import mixing_weight_grad


def _check(xs: torch.Tensor, W: torch.Tensor, past: int) -> None:
    if W.dim() != 3 or xs.dim() != 4 or tuple(xs.shape[-2:]) != tuple(W.shape[:2]):
        raise ValueError(
            f"xs must be (batch, tokens, d, dv) and W (d, dv, K) with the same (d, dv); got xs "
            f"{_fmt(xs)} and W {_fmt(W)}"
        )
    if not 0 <= past <= xs.shape[1]:
        raise ValueError(f"past must lie in [0, {xs.shape[1]}] (tokens of xs), got {past}")


def token_mix_reference(xs: torch.Tensor, W: torch.Tensor, past: int = 0) -> torch.Tensor:
    """The plain form: `(B, T, d)` in the promoted dtype of xs and W."""
    _check(xs, W, past)
    K = W.shape[-1]
    dtype = promote_float(xs.dtype, W.dtype)
    lead = K - 1 - past  # zeros before the first input, or (negative) inputs never reached
    window = F.pad(xs, (0, 0, 0, 0, lead, 0)) if lead >= 0 else xs[:, -lead:]
    windows = window.to(dtype).unfold(1, K, 1)  # (B, T, d, dv, K)
    return (windows * W.to(dtype)).sum((-1, -2))


def token_mix_traced(xs: torch.Tensor, W: torch.Tensor, past: int = 0) -> torch.Tensor:
    """The form `torch.compile` traces, `(B, T, d)` as the reference: per tap, the slice of xs it
    meets times the tap's weights, summed over the value axis and zero-padded in front to T
    tokens — views, products, sums and pads of `(B, T, d)` tensors, which Inductor fuses into few
    kernels each way (the state is never copied), where `_TokenMix`'s in-place accumulation into
    slices is functionalised into copies. (The reference's unfold, compiled together with its
    backward by Inductor's CPU backend for more than one thread, corrupts the heap on torch
    2.13.0.)"""
    K, T = W.shape[-1], xs.shape[1] - past
    dtype = promote_float(xs.dtype, W.dtype)
    Wd = W.to(dtype)
    out = (xs[:, past:].to(dtype) * Wd[..., K - 1]).sum(-1)
    for tap, src, dst, n in _taps(K, past, T):
        term = (xs[:, src : src + n].to(dtype) * Wd[..., tap]).sum(-1)
        out = out + F.pad(term, (0, 0, dst, T - dst - n))
    return out


def _taps(K: int, past: int, T: int):
    """(tap, first input index, first output index, count) of each tap but the current one's."""
    for tap in range(K - 1):
        start = past - (K - 1 - tap)  # index in xs of the input this tap meets at output 0
        skip = max(-start, 0)  # outputs that meet the left zero padding
        if T - skip > 0:
            yield tap, start + skip, skip, T - skip


class _TokenMix(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, xs: torch.Tensor, W: torch.Tensor, past: int) -> torch.Tensor:
        dtype = promote_float(xs.dtype, W.dtype)
        K, T, dv = W.shape[-1], xs.shape[1] - past, W.shape[1]
        Wd = W.to(dtype)
        cur = xs[:, past:].to(dtype)
        out = cur[..., 0] * Wd[:, 0, K - 1]
        for j in range(1, dv):
            out.addcmul_(cur[..., j], Wd[:, j, K - 1])
        for tap, src, dst, n in _taps(K, past, T):
            part = out[:, dst : dst + n]
            inputs = xs[:, src : src + n].to(dtype)
            for j in range(dv):
                part.addcmul_(inputs[..., j], Wd[:, j, tap])
        ctx.save_for_backward(xs, W)
        ctx.past = past
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, G: torch.Tensor):
        xs, W = ctx.saved_tensors
        past = ctx.past
        need_xs, need_W = ctx.needs_input_grad[:2]
        K, T = W.shape[-1], G.shape[1]
        Wd = W.to(G.dtype)
        gxs = gW = None
        if need_xs:
            gxs = torch.empty(xs.shape, dtype=G.dtype, device=G.device)
            gxs[:, :past].zero_()
            torch.mul(G[..., None], Wd[..., K - 1], out=gxs[:, past:])
            for tap, src, dst, n in _taps(K, past, T):
                gxs[:, src : src + n].addcmul_(G[:, dst : dst + n, :, None], Wd[..., tap])
            gxs = gxs.to(xs.dtype)
        if need_W:
            gW = torch.zeros(W.shape, dtype=G.dtype, device=G.device)
            gW[..., K - 1] = mixing_weight_grad(G, xs[:, past:])
            for tap, src, dst, n in _taps(K, past, T):
                gW[..., tap] = mixing_weight_grad(G[:, dst : dst + n], xs[:, src : src + n])
            gW = gW.to(W.dtype)
        return gxs, gW, None


def token_mix(xs: torch.Tensor, W: torch.Tensor, past: int = 0) -> torch.Tensor:
    """The TC read with a hand-written backward (module docstring).

    Args:
        xs: `(B, past + T, d, dv)`: `past` earlier states, then the T states to read.
        W: taps `(d, dv, K)` (the read vector folded in); tap `K − 1` is the current token.
        past: how many leading tokens of xs are history.
    Returns:
        `(B, T, d)` in the promoted dtype of xs and W.
    """
    _check(xs, W, past)
    choice = backend.backend()
    # Traced, even with every fast path off, the read takes `token_mix_traced` (below): the
    # reference's unfold, compiled with its backward, corrupts the heap (Inductor's CPU code for
    # more than one thread, torch 2.13.0).
    if choice == "reference" and not torch.compiler.is_compiling():
        return token_mix_reference(xs, W, past)
    if native.fits(xs) and backend.use_native([xs, W], choice):  # CPU: a row's taps in one loop
        return native.value_read_native(xs, W, past)
    if compiled_kernels.applies([xs, W], choice):  # compiled, switched on: the Triton kernels
        return compiled_kernels.value_read(xs, W, past)
    if torch.compiler.is_compiling():
        return token_mix_traced(xs, W, past)
    # E.g. one decoded token: the few ops of the plain form, on a GPU too, as the channel read
    # takes it. There a Triton launch costs the host 107-134 µs (an H200's, 2026-11-30), and
    # one-token decoding is bound by host work; this form is four ops (~8 µs each on that host).
    if is_small_state(xs):
        return token_mix_reference(xs, W, past)
    if backend.use_triton([xs, W], choice):  # a GPU: one kernel for every tap and value channel
        from deltalearn.ops.triton_mixing import value_read_triton

        return value_read_triton(xs, W, past)
    return _TokenMix.apply(xs, W, past)
