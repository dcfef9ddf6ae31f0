"""The compressor reads of an expanded state as Triton kernels, forward and backward.

Both reads contract the value axis, the token compressor also over K causal taps (the channel
compressor is the case K = 1):

    out[b, t, i] = Σ_τ Σ_j W[i, j, τ] · xs[b, p + t − (K − 1 − τ), i, j]        (0 where the index < 0)

`xs` `(B, p + T, d, dv)` (p past states, then the T read), `W` `(d, dv, K)`, out `(B, T, d)`.

Why kernels: the PyTorch Functions beside them (`ops/mixing.py`, `ops/token_mixing.py`) loop over
the value channels, which suits a CPU; on a GPU each channel is a separate kernel over a slice of
stride dv that the vectorised element-wise kernels cannot take (the H200 profile of a ddl-cc step:
the strided multiply-adds and the per-channel reductions of ∂C were a seventh of its GPU time).
Here a program loads a (tokens × features × dv) tile of the state once, contiguous, and reduces it
in registers.

Backward, G = ∂L/∂out `(B, T, d)`:

    ∂xs[b, s, i, j] = Σ_τ W[i, j, τ] · G[b, s − p + (K − 1 − τ), i]       (0 where that t ∉ [0, T))
    ∂W[i, j, τ]     = Σ_{b,s} G[b, s − p + (K − 1 − τ), i] · xs[b, s, i, j]

One kernel walks the state's tokens s, loads the tile of xs once and the K shifted tiles of G, and
writes ∂xs; each program sums ∂W over a fixed set of row blocks in registers (a fixed order:
deterministic) and writes its fp32 partial once; the partials are then summed.

Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) runs these kernels in the tests; see
`ops/triton_epilogue.py` for why the variable must be set before triton's import.
"""

from __future__ import annotations

from typing import Any

import torch
import triton
import triton.language as tl

from deltalearn.ops import backend, no_graph
from deltalearn.ops._shapes import cdiv, dense_past_first, new_empty, next_pow2, promote_float

# Elements of the state one program holds (fp32 after the load).
MAX_TILE = 2048
# Most features a tile spans (the rest of the tile goes to tokens).
MAX_COLUMNS = 128
# Programs along the token axis of the backward when it sums ∂W (None: PROGRAMS_PER_SM a
# multiprocessor over the feature blocks on CUDA, 2 under the interpreter, which exercises the loop
# over row blocks). `benchmarks/kernel_tiles.py` times other settings on a GPU.
WEIGHT_GRAD_PROGRAMS: int | None = None
PROGRAMS_PER_SM = 4


@triton.jit
def _feature_channels(dcol, vcol, sx_d, sx_v, DV: tl.constexpr, DENSE: tl.constexpr):
    """Offsets `(1, BLOCK_D, BLOCK_V)` of features `dcol` and channels `vcol` within a token of
    the state. Dense (`(d, dv)` contiguous: strides `(DV, 1)`) with constant strides, so Triton
    loads each channel vector in one access (`ld.global.v4` at dv = 4) rather than one per
    channel; else the runtime strides."""
    if DENSE:
        return dcol[None, :, None] * DV + vcol[None, None, :]
    return dcol[None, :, None] * sx_d + vcol[None, None, :] * sx_v


@triton.jit
def _read_fwd_kernel(
    XS, W, OUT,
    T, n_tblocks, d, past,
    sx_b, sx_s, sx_d, sx_v,
    DV: tl.constexpr, K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, XS_DENSE: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)
    b = (pid_r // n_tblocks).to(tl.int64)
    t = (pid_r % n_tblocks) * BLOCK_T + tl.arange(0, BLOCK_T)
    dcol = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    vcol = tl.arange(0, BLOCK_V)
    wmask = (dcol < d)[:, None] & (vcol < DV)[None, :]
    x_base = XS + b * sx_b + _feature_channels(dcol, vcol, sx_d, sx_v, DV, XS_DENSE)
    acc = tl.zeros([BLOCK_T, BLOCK_D], dtype=tl.float32)
    for tau in tl.static_range(K):
        src = t + (past - (K - 1 - tau))
        tmask = (t < T) & (src >= 0)
        x = tl.load(
            x_base + src.to(tl.int64)[:, None, None] * sx_s,
            mask=tmask[:, None, None] & wmask[None, :, :],
            other=0.0,
        )
        w = tl.load(W + dcol[:, None] * (DV * K) + vcol[None, :] * K + tau, mask=wmask, other=0.0)
        acc += tl.sum(x.to(tl.float32) * w.to(tl.float32)[None, :, :], axis=2)
    out = OUT + (b * T + t.to(tl.int64))[:, None] * d + dcol[None, :]
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=(t < T)[:, None] & (dcol < d)[None, :])


@triton.jit
def _read_bwd_kernel(
    XS, W, G, GXS, GW,
    T, S, n_sblocks, n_blocks, d, past, iters,
    sx_b, sx_s, sx_d, sx_v, sg_b, sg_t, sg_d,
    DV: tl.constexpr, K: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr, WRITE_GX: tl.constexpr, REDUCE_W: tl.constexpr,
    XS_DENSE: tl.constexpr,
):  # fmt: skip
    pid_r = tl.program_id(0)
    nprog = tl.num_programs(0)
    dcol = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    vcol = tl.arange(0, BLOCK_V)
    dmask = dcol < d
    wmask = dmask[:, None] & (vcol < DV)[None, :]
    w_ptr = W + dcol[:, None] * (DV * K) + vcol[None, :] * K
    kcol = tl.arange(0, BLOCK_K)
    # Program pid_r owns row blocks pid_r, pid_r + nprog, ...: its ∂W partial sums stay in
    # registers in a fixed order (deterministic) and are written once, to GW[pid_r].
    gw = tl.zeros([BLOCK_D, BLOCK_V, BLOCK_K], dtype=tl.float32)
    for it in range(0, iters):
        r = pid_r + it * nprog
        b = (r // n_sblocks).to(tl.int64)
        s = (r % n_sblocks) * BLOCK_T + tl.arange(0, BLOCK_T)
        smask = (s < S) & (
            s * 0 + r < n_blocks
        )  # block-shaped: a scalar mask trips the interpreter
        xmask = smask[:, None, None] & wmask[None, :, :]
        x = tl.zeros([BLOCK_T, BLOCK_D, BLOCK_V], dtype=tl.float32)
        if REDUCE_W:
            x_ptr = (
                XS + b * sx_b + s.to(tl.int64)[:, None, None] * sx_s
                + _feature_channels(dcol, vcol, sx_d, sx_v, DV, XS_DENSE)
            )  # fmt: skip
            x = tl.load(x_ptr, mask=xmask, other=0.0).to(tl.float32)
        gx = tl.zeros([BLOCK_T, BLOCK_D, BLOCK_V], dtype=tl.float32)
        for tau in tl.static_range(K):
            t = s - past + (K - 1 - tau)  # the output this input met through tap tau
            tm = smask & (t >= 0) & (t < T)
            g_ptr = G + b * sg_b + t.to(tl.int64)[:, None] * sg_t + dcol[None, :] * sg_d
            g = tl.load(g_ptr, mask=tm[:, None] & dmask[None, :], other=0.0).to(tl.float32)
            if WRITE_GX:
                w = tl.load(w_ptr + tau, mask=wmask, other=0.0).to(tl.float32)
                gx += g[:, :, None] * w[None, :, :]
            if REDUCE_W:
                part = tl.sum(g[:, :, None] * x, axis=0)  # (BLOCK_D, BLOCK_V), into tap tau
                gw += part[:, :, None] * (kcol == tau).to(tl.float32)[None, None, :]
        if WRITE_GX:
            gx_ptr = (
                GXS + (b * S + s.to(tl.int64))[:, None, None] * (d * DV)
                + dcol[None, :, None] * DV + vcol[None, None, :]
            )  # fmt: skip
            tl.store(gx_ptr, gx.to(GXS.dtype.element_ty), mask=xmask)
    if REDUCE_W:
        gw_ptr = (
            GW + pid_r * (d * DV * K) + dcol[:, None, None] * (DV * K)
            + vcol[None, :, None] * K + kcol[None, None, :]
        )  # fmt: skip
        tl.store(gw_ptr, gw, mask=wmask[:, :, None] & (kcol < K)[None, None, :])


def read_launch_config(d: int, dv: int) -> tuple[int, int, int]:
    """`(BLOCK_T, BLOCK_D, BLOCK_V)`: a tile of MAX_TILE state elements, at most MAX_COLUMNS
    features wide."""
    block_v = next_pow2(dv)
    block_d = min(next_pow2(d), MAX_COLUMNS, max(MAX_TILE // block_v, 1))
    block_t = max(MAX_TILE // (block_d * block_v), 1)
    return block_t, block_d, block_v


def _dense_tokens(xs: torch.Tensor) -> bool:
    """Whether each token of `xs` `(B, S, d, dv)` is one contiguous `(d, dv)` block."""
    return dense_past_first(xs.shape[1:], xs.stride()[1:])


def _weight_grad_programs(n_blocks: int, n_dblocks: int, device: torch.device) -> int:
    if WEIGHT_GRAD_PROGRAMS is not None:
        cap = WEIGHT_GRAD_PROGRAMS
    elif device.type == "cuda":
        sms = backend.multiprocessors(device)
        cap = max(1, PROGRAMS_PER_SM * sms // n_dblocks)
    else:
        cap = 2
    return max(1, min(n_blocks, cap))


def _as_sequence(xs: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """xs `(B, S, d, dv)` and W `(d, dv, K)` as the kernels read them: a channel read (W `(d, dv)`)
    as one sequence of K = 1 (views, not copies, where xs is contiguous), W contiguous."""
    if W.dim() == 2:
        xs, W = xs.reshape(1, -1, *W.shape), W.unsqueeze(-1)
    return xs, W.contiguous()


def read_forward(xs: torch.Tensor, W: torch.Tensor, past: int) -> tuple[torch.Tensor, tuple]:
    """The read's forward kernel: `(out, saved)`, saved `(xs, W)` as the kernels read them
    (`_as_sequence`), what `read_backward` takes."""
    channel = W.dim() == 2
    out_shape = xs.shape[:-1] if channel else (xs.shape[0], xs.shape[1] - past, xs.shape[2])
    out = new_empty(out_shape, promote_float(xs.dtype, W.dtype), xs.device)
    xs, Wc = _as_sequence(xs, W)
    B, S, d, dv = xs.shape
    K, T = Wc.shape[-1], S - past
    block_t, block_d, block_v = read_launch_config(d, dv)
    n_tblocks = cdiv(T, block_t)
    if out.numel() > 0:
        grid = (B * n_tblocks, cdiv(d, block_d))
        _read_fwd_kernel[grid](
            xs, Wc, out, T, n_tblocks, d, past, *xs.stride(),
            DV=dv, K=K, BLOCK_V=block_v, BLOCK_T=block_t, BLOCK_D=block_d,
            XS_DENSE=_dense_tokens(xs),
        )  # fmt: skip
    return out, (xs, Wc)


def read_backward(
    saved: tuple, G: torch.Tensor, past: int, shapes: tuple, need_xs: bool, need_W: bool
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """`(∂xs, ∂W)` (None where not `need`ed) from `read_forward`'s `saved`, the output gradient G
    and the inputs' `shapes` `(xs.shape, W.shape)`."""
    xs, W = saved
    B, S, d, dv = xs.shape
    K, T = W.shape[-1], S - past
    G = G.reshape(B, T, d)
    block_t, block_d, block_v = read_launch_config(d, dv)
    n_sblocks = cdiv(S, block_t)
    n_blocks, n_dblocks = B * n_sblocks, cdiv(d, block_d)
    nprog = _weight_grad_programs(n_blocks, n_dblocks, xs.device) if need_W else n_blocks
    xs_shape, W_shape = shapes
    gxs = new_empty(xs_shape, xs.dtype, xs.device) if need_xs else None
    gW_part = new_empty((nprog, d, dv, K), torch.float32, xs.device) if need_W else None
    if n_blocks > 0 and (need_xs or need_W):
        _read_bwd_kernel[(nprog, n_dblocks)](
            xs, W, G, gxs if need_xs else G, gW_part if need_W else G,
            T, S, n_sblocks, n_blocks, d, past, cdiv(n_blocks, nprog),
            *xs.stride(), *G.stride(),
            DV=dv, K=K, BLOCK_V=block_v, BLOCK_T=block_t, BLOCK_D=block_d,
            BLOCK_K=next_pow2(K), WRITE_GX=need_xs, REDUCE_W=need_W,
            XS_DENSE=_dense_tokens(xs),
        )  # fmt: skip
    else:  # no rows: nothing to read
        if need_xs:
            gxs.zero_()
        if need_W:
            gW_part.zero_()
    gW = gW_part.sum(0).to(W.dtype).reshape(W_shape) if need_W else None
    return gxs, gW


class _ValueRead(torch.autograd.Function):
    """The token read: xs `(B, p + T, d, dv)`, W `(d, dv, K)` -> `(B, T, d)`; or the channel read:
    xs `(..., d, dv)`, W `(d, dv)` -> `(...)`, seen by the kernels as one sequence of K = 1 (the
    reshape in here: outside it would add autograd nodes, host work that bounds eager training on
    a GPU)."""

    @staticmethod
    def forward(ctx: Any, xs: torch.Tensor, W: torch.Tensor, past: int) -> torch.Tensor:
        ctx.shapes = xs.shape, W.shape
        out, saved = read_forward(xs, W, past)
        ctx.save_for_backward(*saved)
        ctx.past = past
        return out

    @staticmethod
    def backward(ctx: Any, G: torch.Tensor):
        need_xs, need_W = ctx.needs_input_grad[:2]
        grads = read_backward(ctx.saved_tensors, G, ctx.past, ctx.shapes, need_xs, need_W)
        return *grads, None


def value_read_triton(xs: torch.Tensor, W: torch.Tensor, past: int = 0) -> torch.Tensor:
    """The read in the module docstring (inputs already validated), in the promoted dtype of xs
    and W: the token read, xs `(B, p + T, d, dv)` and W `(d, dv, K)` -> `(B, T, d)`, or the channel
    read, xs `(..., d, dv)` and W `(d, dv)` -> `(...)`."""
    return no_graph.apply(_ValueRead, xs, W, past)
