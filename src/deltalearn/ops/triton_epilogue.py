"""The rewrite epilogue of a DDL sublayer as one Triton kernel, forward and backward.

Per row (token) the kernel reads the projections the sublayer already computed — the raw direction
h `(d)`, the gate logit z `()`, the value pre-activation p `(dv)` — and the state X `(d, dv)`, and
writes Y `(d, dv)`; nothing else of the row's size ever reaches global memory. Saved for backward:
the inputs X, h, z, p only; the norm, β, v and the readout are recomputed there (a few flops per
element against a second state-sized tensor kept alive for every sublayer). Where a state tape
records the forward (`ops/state_tape.py`), the kernel also writes e, 1/n and β per row (fp32),
from which backward rebuilds X out of Y instead of keeping it.

A whole `DeltaUpdate` with the linear gate (`update_triton`, `PROJECT`): the forward kernel reads c
(and u, for the official value head) instead of z and p, and computes `z = c·w_g + b_g` and
`p = x W_vᵀ (+ b_v)` per row in fp32 before the epilogue, writing z and p (fp32, `N·(1 + dv)`
numbers) for the backward kernel; that one, with ∂z and ∂p in registers, writes ∂c = ∂z w_g
(+ W_vᵀ∂p where the head reads c) and ∂u = W_vᵀ∂p, and sums ∂w_g = Σ ∂z c, ∂W_v = Σ ∂p xᵀ and the
biases' gradients per program (fp32 partials, then one sum in program order: deterministic, as
∂C). No projection launches and no autograd node of their own either way.

Forward (a vector state is the case dv = 1):
    n = sqrt(‖h‖² + ε²),  k = h / n,  β = 2σ(z),  v = p  or  s·σ(p)        ("paper" / "official")
    r = kᵀX = (hᵀX)/n,  e = v − r  (delta)  or  e = v  (write-only, no read)
    Y = X + β k eᵀ = X + h ⊗ c,  c = (β/n) e                                       c: (dv)
    x_next[i] = Σ_j C[i, j] Y[i, j]           (optional: the next sublayer's channel compressor)

Backward, G = ∂L/∂Y `(d, dv)`; with the compressor read, G ← G + g_next ⊗ C first (g_next = ∂L/∂x_next).
One pass over the row gives the three reductions ‖h‖², hᵀX, hᵀG; then, with sG = kᵀG = (hᵀG)/n:
    ∂X = G − β k sGᵀ                         (write-only: ∂X = G)
    ∂k = β (G e − [delta] X sG)              (d)
    ∂β = sGᵀ e,   ∂v = β sG
    ∂h = (∂k − k (kᵀ∂k)) / n,   kᵀ∂k = β (sGᵀe − [delta] rᵀsG)   — a row scalar, so ∂h needs no
                                              third pass: kᵀG e and kᵀX sG are the reductions above
    ∂z = ∂β · β (1 − β/2)                    (dβ/dz = 2σ(1 − σ))
    ∂p = ∂v  or  ∂v · s σ(p)(1 − σ(p))       ("paper" / "official")
    ∂C = Σ_rows g_next ⊗ Y                   (per-program partial sums, then one deterministic sum)
Everything is computed in fp32 and stored in each input's dtype.

Tiling: a program owns BLOCK_M rows. When a row fits one tile (BLOCK_D = next_power_of_2(d) with
BLOCK_D·dv ≤ MAX_TILE) the forward holds h and X in registers between the reduction and the write;
wider rows are processed in NUM_CHUNKS chunks of BLOCK_D columns, twice (reduce, then write). The
backward always takes the two passes over smaller tiles (MAX_TILE_BWD); the second re-reads what the
same program has just read, mostly from cache.
Rows that lie as contiguous `(d, dv)` blocks (any distance apart) get their in-row strides as
compile-time constants (`X_DENSE`, `G_DENSE`): Triton then loads a thread's channel vector in one
128-bit access rather than one 32-bit load per channel (sm_90 code: `deltalearn bench kernels`).

Triton's interpreter (TRITON_INTERPRET=1, CPU tensors) runs these kernels only when the variable is
set before triton is first imported: triton.language's own jitted helpers (`tl.sum`, `tl.sigmoid`)
are decorated for one mode at that import. The tests run it in a subprocess for that reason.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
import triton
import triton.language as tl

from deltalearn.ops import backend, no_graph, state_tape, triton_mixing
from deltalearn.ops._shapes import cdiv, dense_past_first, new_empty, next_pow2
from deltalearn.ops.projections import cast, kept_inputs

# Elements of X one program holds per chunk (fp32 after the load). 4096 keeps a row of width
# d ≤ 1024 at dv = 4 (the paper's models) in one tile of the forward; wider rows are chunked.
MAX_TILE = 4096
# The backward takes two passes anyway, so chunking costs it nothing, while its tile holds X, G and
# the gradients at once: at 4096 it needs 255 registers a thread (one program per SM on sm_90),
# at 1024 with 4 warps 70-145 and no spills (ptxas -v, sm_90a).
MAX_TILE_BWD = 1024
# ... and at most 512 columns of a row (BLOCK_D): measured on an H200 at d = 768, dv = 1, one
# 1024-wide tile took 760 µs a call against 192 µs as two 512-wide chunks, and 2-8 ms with two or
# four such rows a program (`benchmarks/epilogue_tiles.py`; dv = 4 keeps 256 columns a chunk).
MAX_COLUMNS_BWD = 512
# Most rows one program owns (narrow rows: several per program amortise the gate/value loads).
MAX_ROWS = 16
# Programs of the backward when it also reduces ∂C: each owns a (d, dv) fp32 partial sum, so the
# grid is capped (None: PROGRAMS_PER_SM a multiprocessor on CUDA, 2 under the interpreter, which
# exercises the row loop). `benchmarks/kernel_tiles.py` times other settings on a GPU.
COMPRESS_PROGRAMS: int | None = None
PROGRAMS_PER_SM = 4
# A backward whose row fits one tile keeps its partial sums in registers over its row blocks
# (CARRY_SUMS; the same bits). Off until timed on a GPU: no default tile of the paper's models
# holds a row, and `benchmarks/kernel_tiles.py` tries the tiles that do, with and without it.
CARRY_SUMS = False


@triton.jit
def _state_ptrs(X, rows, offs, vcol, sx_m, sx_d, sx_v, DV: tl.constexpr, DENSE: tl.constexpr):
    """Pointers `(BLOCK_M, BLOCK_D, BLOCK_V)` to features `offs` and channels `vcol` of `rows`. A
    dense row (`(d, dv)` contiguous) takes the strides `(DV, 1)` as constants: Triton then knows
    each channel vector contiguous and aligned and loads it in one access (`ld.global.v4` at
    dv = 4) instead of one per channel."""
    if DENSE:
        return X + rows[:, None, None] * sx_m + offs[None, :, None] * DV + vcol[None, None, :]
    return X + rows[:, None, None] * sx_m + offs[None, :, None] * sx_d + vcol[None, None, :] * sx_v


@triton.jit
def _channels(P, rows, vcol, sp_m, sp_v, DV: tl.constexpr, CONTIGUOUS: tl.constexpr):
    """Pointers to the per-row channel values `(BLOCK_M, BLOCK_V)` of P `(N, dv)`; contiguous
    (rows DV apart) with constant strides, as `_state_ptrs`."""
    if CONTIGUOUS:
        return P + rows[:, None] * DV + vcol[None, :]
    return P + rows[:, None] * sp_m + vcol[None, :] * sp_v


@triton.jit
def _store_rows(E, RHO, BETA, rows, rmask, vcol, pv_mask, e, inv_n, beta, DV: tl.constexpr):
    """The row scalars that let `ops.state_tape` rebuild X from Y: e, 1/n and β (fp32)."""
    tl.store(E + rows[:, None] * DV + vcol[None, :], e, mask=pv_mask)
    tl.store(RHO + rows, inv_n, mask=rmask)
    tl.store(BETA + rows, beta, mask=rmask)


@triton.jit
def _projections(
    CIN, XV, WG, BG, WV, BV, rows, rmask, vcol, vmask, dcol, d, sc_m, sc_d, sxv_m, sxv_d,
    BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_CHUNKS: tl.constexpr, READS_U: tl.constexpr, HAS_BV: tl.constexpr,
):  # fmt: skip
    """The linear gate's logit `z = c·w_g + b_g` `(BLOCK_M)` and the value head's pre-activation
    `p = x W_vᵀ (+ b_v)` `(BLOCK_M, BLOCK_V)` of the rows, in fp32: x = c, or u where `READS_U`
    (the official head), and `Σ u²` a row (zeros without u), from which the backward recomputes
    c = RMSNorm(u) where c is not kept (`NORM_C`). W_v `(dv, d)` contiguous; one pass over the
    rows' c (and u)."""
    z = tl.zeros([BLOCK_M], dtype=tl.float32)
    p = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    uu = tl.zeros([BLOCK_M], dtype=tl.float32)
    for c in range(NUM_CHUNKS):
        offs = c * BLOCK_D + dcol
        dmask = offs < d
        hm = rmask[:, None] & dmask[None, :]
        cf = tl.load(CIN + rows[:, None] * sc_m + offs[None, :] * sc_d, mask=hm, other=0.0)
        cf = cf.to(tl.float32)
        wg = tl.load(WG + offs, mask=dmask, other=0.0).to(tl.float32)
        z += tl.sum(cf * wg[None, :], axis=1)
        if READS_U:
            xf = tl.load(XV + rows[:, None] * sxv_m + offs[None, :] * sxv_d, mask=hm, other=0.0)
            xf = xf.to(tl.float32)
            uu += tl.sum(xf * xf, axis=1)
        else:
            xf = cf
        wmask = dmask[:, None] & vmask[None, :]
        wv = tl.load(WV + vcol[None, :] * d + offs[:, None], mask=wmask, other=0.0)
        p += tl.sum(xf[:, :, None] * wv.to(tl.float32)[None, :, :], axis=1)
    z += tl.load(BG).to(tl.float32)
    if HAS_BV:
        p += tl.load(BV + vcol, mask=vmask, other=0.0).to(tl.float32)[None, :]
    return z, p, uu


@triton.jit
def _fwd_kernel(
    X, H, Z, P, C, Y, XN, E, RHO, BETA, CIN, XV, WG, BG, WV, BV, RSTD,
    n_rows, d, eps2, value_scale, norm_eps,
    sx_m, sx_d, sx_v, sh_m, sh_d, sz_m, sp_m, sp_v, sc_m, sc_d, sxv_m, sxv_d,
    DV: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_CHUNKS: tl.constexpr, DELTA: tl.constexpr, OFFICIAL: tl.constexpr,
    COMPRESS: tl.constexpr, SAVE_ROWS: tl.constexpr, X_DENSE: tl.constexpr, P_CONTIGUOUS: tl.constexpr,
    PROJECT: tl.constexpr, READS_U: tl.constexpr, HAS_BV: tl.constexpr, NORM_C: tl.constexpr,
):  # fmt: skip
    # NORM_C (PROJECT, READS_U): c is RMSNorm(u) and not kept; the kernel writes u's 1/rms a row
    # (fp32, RSTD), from which the backward recomputes c wherever it reads u.
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    rows = rows.to(tl.int64)  # row offsets of large batches overflow int32
    vcol = tl.arange(0, BLOCK_V)
    vmask = vcol < DV
    dcol = tl.arange(0, BLOCK_D)

    pv_mask = rmask[:, None] & vmask[None, :]
    p_ptr = _channels(P, rows, vcol, sp_m, sp_v, DV, P_CONTIGUOUS)
    if PROJECT:  # z and p from c (and u) here, written out for the backward kernel
        zf, pre, uu = _projections(
            CIN, XV, WG, BG, WV, BV, rows, rmask, vcol, vmask, dcol, d, sc_m, sc_d, sxv_m, sxv_d,
            BLOCK_M, BLOCK_V, BLOCK_D, NUM_CHUNKS, READS_U, HAS_BV,
        )  # fmt: skip
        tl.store(Z + rows * sz_m, zf, mask=rmask)
        tl.store(p_ptr, pre, mask=pv_mask)
        if NORM_C:  # as torch.rms_norm: 1 / sqrt(mean(u²) + eps)
            tl.store(RSTD + rows, tl.rsqrt(uu / d + norm_eps), mask=rmask)
    else:
        zf = tl.load(Z + rows * sz_m, mask=rmask, other=0.0).to(tl.float32)
        pre = tl.load(p_ptr, mask=pv_mask, other=0.0)
        pre = pre.to(tl.float32)
    beta = 2.0 * tl.sigmoid(zf)
    if OFFICIAL:
        v = value_scale * tl.sigmoid(pre)
    else:
        v = pre  # (BLOCK_M, BLOCK_V); padded value lanes meet G = X = C = 0 below

    h_row = H + rows[:, None] * sh_m  # (BLOCK_M, 1) pointers
    y_row = Y + rows[:, None, None] * (d * DV) + vcol[None, None, :]  # Y is contiguous
    xn_row = XN + rows[:, None] * d

    if NUM_CHUNKS == 1:
        # The whole row is one tile: read h and X once, keep them in registers for the write.
        dmask = dcol < d
        hm = rmask[:, None] & dmask[None, :]
        xm = hm[:, :, None] & vmask[None, None, :]
        hf = tl.load(h_row + dcol[None, :] * sh_d, mask=hm, other=0.0).to(tl.float32)
        x_ptr = _state_ptrs(X, rows, dcol, vcol, sx_m, sx_d, sx_v, DV, X_DENSE)
        xf = tl.load(x_ptr, mask=xm, other=0.0).to(tl.float32)
        inv_n = tl.rsqrt(tl.sum(hf * hf, axis=1) + eps2)
        if DELTA:
            e = v - tl.sum(hf[:, :, None] * xf, axis=1) * inv_n[:, None]
        else:
            e = v
        coef = (beta * inv_n)[:, None] * e  # Y = X + h ⊗ coef
        if SAVE_ROWS:
            _store_rows(E, RHO, BETA, rows, rmask, vcol, pv_mask, e, inv_n, beta, DV)
        y = (xf + hf[:, :, None] * coef[:, None, :]).to(Y.dtype.element_ty)
        tl.store(y_row + dcol[None, :, None] * DV, y, mask=xm)
        if COMPRESS:
            cmask = dmask[:, None] & vmask[None, :]
            cm = tl.load(C + dcol[:, None] * DV + vcol[None, :], mask=cmask, other=0.0)
            xn = tl.sum(y.to(tl.float32) * cm.to(tl.float32)[None, :, :], axis=2)
            tl.store(xn_row + dcol[None, :], xn.to(XN.dtype.element_ty), mask=hm)
    else:
        # Pass 1: ‖h‖² and hᵀX over the chunks.
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        hx = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK_D + dcol
            hm = rmask[:, None] & (offs < d)[None, :]
            hf = tl.load(h_row + offs[None, :] * sh_d, mask=hm, other=0.0).to(tl.float32)
            sq += tl.sum(hf * hf, axis=1)
            if DELTA:
                xm = hm[:, :, None] & vmask[None, None, :]
                x_ptr = _state_ptrs(X, rows, offs, vcol, sx_m, sx_d, sx_v, DV, X_DENSE)
                xf = tl.load(x_ptr, mask=xm, other=0.0)
                hx += tl.sum(hf[:, :, None] * xf.to(tl.float32), axis=1)
        inv_n = tl.rsqrt(sq + eps2)
        if DELTA:
            e = v - hx * inv_n[:, None]
        else:
            e = v
        coef = (beta * inv_n)[:, None] * e
        if SAVE_ROWS:
            _store_rows(E, RHO, BETA, rows, rmask, vcol, pv_mask, e, inv_n, beta, DV)
        # Pass 2: the write (and the compressor read of the written row).
        for c in range(NUM_CHUNKS):
            offs = c * BLOCK_D + dcol
            dmask = offs < d
            hm = rmask[:, None] & dmask[None, :]
            xm = hm[:, :, None] & vmask[None, None, :]
            hf = tl.load(h_row + offs[None, :] * sh_d, mask=hm, other=0.0).to(tl.float32)
            x_ptr = _state_ptrs(X, rows, offs, vcol, sx_m, sx_d, sx_v, DV, X_DENSE)
            xf = tl.load(x_ptr, mask=xm, other=0.0).to(tl.float32)
            y = (xf + hf[:, :, None] * coef[:, None, :]).to(Y.dtype.element_ty)
            tl.store(y_row + offs[None, :, None] * DV, y, mask=xm)
            if COMPRESS:
                cmask = dmask[:, None] & vmask[None, :]
                cm = tl.load(C + offs[:, None] * DV + vcol[None, :], mask=cmask, other=0.0)
                xn = tl.sum(y.to(tl.float32) * cm.to(tl.float32)[None, :, :], axis=2)
                tl.store(xn_row + offs[None, :], xn.to(XN.dtype.element_ty), mask=hm)


@triton.jit
def _bwd_tile(
    c, dcol, d, rows, rmask, vcol, vmask, h_row, G, gn_row, C, sh_d, sg_m, sg_d, sg_v, sn_m,
    sn_d, t_len, DV: tl.constexpr, BLOCK_D: tl.constexpr, COMPRESS: tl.constexpr,
    G_DENSE: tl.constexpr, TOKEN_K: tl.constexpr,
):  # fmt: skip
    """Chunk `c` of the rows' feature axis, as both backward passes read it: offsets, masks, h, the
    upstream gradient G in fp32 with the compressor read's gradient folded in (G + gn ⊗ C), gn.
    With TOKEN_K (a token compressor's K taps, C here tap-major `(K, d, dv)`, so that a feature's
    channels load as one vector) the read's gradient is that of the next sublayer's token read
    instead: row s of a sequence of `t_len` met the outputs s + m (m < K, within the sequence)
    through tap K − 1 − m, so G + Σ_m gn[s + m] ⊙ C[K − 1 − m]."""
    offs = c * BLOCK_D + dcol
    dmask = offs < d
    hm = rmask[:, None] & dmask[None, :]
    xm = hm[:, :, None] & vmask[None, None, :]
    hf = tl.load(h_row + offs[None, :] * sh_d, mask=hm, other=0.0).to(tl.float32)
    g_ptr = _state_ptrs(G, rows, offs, vcol, sg_m, sg_d, sg_v, DV, G_DENSE)
    gf = tl.load(g_ptr, mask=xm, other=0.0).to(tl.float32)
    gn = tl.zeros_like(hf)  # ∂L/∂x_next; only read with COMPRESS
    cmask = dmask[:, None] & vmask[None, :]
    if COMPRESS:
        gn = tl.load(gn_row + offs[None, :] * sn_d, mask=hm, other=0.0).to(tl.float32)
        cm = tl.load(C + offs[:, None] * DV + vcol[None, :], mask=cmask, other=0.0)
        gf += gn[:, :, None] * cm.to(tl.float32)[None, :, :]
    if TOKEN_K > 0:
        position = rows % t_len  # the row's token within its sequence
        for m in tl.static_range(TOKEN_K):
            later = hm & (position + m < t_len)[:, None]
            gm = tl.load(gn_row + m * sn_m + offs[None, :] * sn_d, mask=later, other=0.0)
            tap = C + (TOKEN_K - 1 - m) * d * DV + offs[:, None] * DV + vcol[None, :]
            wm = tl.load(tap, mask=cmask, other=0.0).to(tl.float32)
            gf += gm.to(tl.float32)[:, :, None] * wm[None, :, :]
    return offs, hm, xm, hf, gf, gn


@triton.jit
def _projections_bwd_tile(
    CIN, XV, WG, WV, GCIN, GXV, WN, rows, offs, hm, vcol, vmask, d,
    gz, gp, x_state, rstd, sc_m, sc_d, sxv_m, sxv_d, DV: tl.constexpr, READS_U: tl.constexpr,
    XV_STATE: tl.constexpr, NORM_C: tl.constexpr,
):  # fmt: skip
    """The projections' backward on one chunk of the rows: ∂c = ∂z w_g (+ W_vᵀ∂p where the value
    head reads c), ∂u = W_vᵀ∂p (where it reads u), and these rows' sums of ∂w_g = Σ ∂z c
    `(BLOCK_D,)` and ∂W_v = Σ ∂p xᵀ `(BLOCK_D, BLOCK_V)`, returned for the caller to add to the
    program's partial sums; c and x as the
    forward kept them (`ops.projections.kept_inputs`), or with XV_STATE x the state itself, which
    the caller holds as `x_state` (fp32): the official head's u of a vector state, whose ∂u the
    caller added to ∂X. With NORM_C (READS_U) c is not kept but recomputed from u as the norm
    formed it, c = (u · rstd) · w_n, rstd `(BLOCK_M)` the forward's 1/rms of u."""
    dmask = offs < d
    wmask = dmask[:, None] & vmask[None, :]
    wg = tl.load(WG + offs, mask=dmask, other=0.0).to(tl.float32)
    wv = tl.load(WV + vcol[None, :] * d + offs[:, None], mask=wmask, other=0.0).to(tl.float32)
    g_value = tl.sum(gp[:, None, :] * wv[None, :, :], axis=2)  # (BLOCK_M, BLOCK_D)
    g_gate = gz[:, None] * wg[None, :]
    gc_ptr = GCIN + rows[:, None] * d + offs[None, :]
    if READS_U:
        tl.store(gc_ptr, g_gate.to(GCIN.dtype.element_ty), mask=hm)
        if not XV_STATE:  # else ∂u went into ∂X (u is X)
            gu_ptr = GXV + rows[:, None] * d + offs[None, :]
            tl.store(gu_ptr, g_value.to(GXV.dtype.element_ty), mask=hm)
        if XV_STATE:
            xf = x_state
        else:
            xf = tl.load(XV + rows[:, None] * sxv_m + offs[None, :] * sxv_d, mask=hm, other=0.0)
            xf = xf.to(tl.float32)
        if NORM_C:
            wn = tl.load(WN + offs, mask=dmask, other=0.0).to(tl.float32)
            cf = (xf * rstd[:, None]) * wn[None, :]
        else:
            cf = tl.load(CIN + rows[:, None] * sc_m + offs[None, :] * sc_d, mask=hm, other=0.0)
            cf = cf.to(tl.float32)
    else:
        cf = tl.load(CIN + rows[:, None] * sc_m + offs[None, :] * sc_d, mask=hm, other=0.0)
        cf = cf.to(tl.float32)
        tl.store(gc_ptr, (g_gate + g_value).to(GCIN.dtype.element_ty), mask=hm)
        xf = cf
    return tl.sum(gz[:, None] * cf, axis=0), tl.sum(gp[:, None, :] * xf[:, :, None], axis=0)


@triton.jit
def _add_to_partial(ptr, mask, later, value):
    """A program's partial sum in global memory: set by its first row block, added to by the
    `later` ones (in the program's row order: deterministic)."""
    tl.store(ptr, tl.load(ptr, mask=mask & later, other=0.0) + value, mask=mask)


@triton.jit
def _bwd_kernel(
    X, H, Z, P, C, G, GN, GX, GH, GZ, GP, PART, CIN, XV, WG, WV, GCIN, GXV, w_offset, b_offset,
    Y, E, RHO, BETA, XO, WN, RSTD,
    n_rows, d, eps2, value_scale, iters, part_stride,
    sx_m, sx_d, sx_v, sh_m, sh_d, sz_m, sp_m, sp_v, sg_m, sg_d, sg_v, sn_m, sn_d,
    sc_m, sc_d, sxv_m, sxv_d, sy_m, sy_d, sy_v, t_len,
    DV: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_CHUNKS: tl.constexpr, DELTA: tl.constexpr, OFFICIAL: tl.constexpr,
    COMPRESS: tl.constexpr, WRITE_GX: tl.constexpr, X_DENSE: tl.constexpr, P_CONTIGUOUS: tl.constexpr,
    G_DENSE: tl.constexpr, PROJECT: tl.constexpr, READS_U: tl.constexpr, REBUILD: tl.constexpr,
    Y_DENSE: tl.constexpr, XV_STATE: tl.constexpr, NORM_C: tl.constexpr,
    CARRY_SUMS: tl.constexpr = False, TOKEN_K: tl.constexpr = 0,
):  # fmt: skip
    # REBUILD (delta only): X is not read but formed from the output Y and the row scalars the
    # forward saved for the state tape, x = y − (βρh) eᵀ as `_rebuild_kernel` forms it, and
    # written to XO: the state the rewrite consumed, rebuilt in the pass that needs it.
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    vcol = tl.arange(0, BLOCK_V)
    vmask = vcol < DV
    dcol = tl.arange(0, BLOCK_D)
    # Program pid owns row blocks pid, pid + nprog, ...: a fixed assignment, so its partial sums
    # (PART's row pid, part_stride long: ∂C at 0, the projections' weights at w_offset, their
    # biases at b_offset; not zeroed, the first row block sets them) are accumulated in a fixed
    # order — deterministic.
    GW = PART + w_offset
    GB = PART + b_offset
    # CARRY_SUMS (a row in one chunk): the partial sums stay in registers over the program's row
    # blocks and are stored once at the end, where otherwise every row block loads and stores
    # them; the same additions in the same order, so the same bits.
    sum_c = tl.zeros([BLOCK_D, BLOCK_V], dtype=tl.float32)
    sum_wg = tl.zeros([BLOCK_D], dtype=tl.float32)
    sum_wv = tl.zeros([BLOCK_D, BLOCK_V], dtype=tl.float32)
    sum_bg = tl.zeros([BLOCK_V], dtype=tl.float32)
    sum_bv = tl.zeros([BLOCK_V], dtype=tl.float32)
    for it in range(0, iters):
        later = it > 0  # the program's first row block sets its partial sums, later ones add
        rows = (pid + it * nprog) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < n_rows
        rows = rows.to(tl.int64)

        zf = tl.load(Z + rows * sz_m, mask=rmask, other=0.0).to(tl.float32)
        beta = 2.0 * tl.sigmoid(zf)
        pv_mask = rmask[:, None] & vmask[None, :]
        p_ptr = _channels(P, rows, vcol, sp_m, sp_v, DV, P_CONTIGUOUS)
        pre = tl.load(p_ptr, mask=pv_mask, other=0.0)
        pre = pre.to(tl.float32)
        if OFFICIAL:
            sig = tl.sigmoid(pre)
            v = value_scale * sig
            dv_dp = value_scale * sig * (1.0 - sig)
        else:
            v = pre
            dv_dp = tl.full([BLOCK_M, BLOCK_V], 1.0, tl.float32)

        h_row = H + rows[:, None] * sh_m
        gn_row = GN + rows[:, None] * sn_m
        rstd = zf  # unread unless NORM_C: u's 1/rms a row, as the forward wrote it
        if NORM_C:
            rstd = tl.load(RSTD + rows, mask=rmask, other=0.0)

        # Pass 1: ‖h‖², hᵀX, hᵀG (G including the compressor term).
        sq = tl.zeros([BLOCK_M], dtype=tl.float32)
        hx = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        hg = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
        for c in range(NUM_CHUNKS):
            offs, hm, xm, hf, gf, gn = _bwd_tile(
                c, dcol, d, rows, rmask, vcol, vmask, h_row, G, gn_row, C, sh_d, sg_m, sg_d,
                sg_v, sn_m, sn_d, t_len, DV, BLOCK_D, COMPRESS, G_DENSE, TOKEN_K,
            )  # fmt: skip
            sq += tl.sum(hf * hf, axis=1)
            hg += tl.sum(hf[:, :, None] * gf, axis=1)
            if DELTA and not REBUILD:  # with REBUILD kᵀX comes from the saved e = v − kᵀX
                x_ptr = _state_ptrs(X, rows, offs, vcol, sx_m, sx_d, sx_v, DV, X_DENSE)
                xf = tl.load(x_ptr, mask=xm, other=0.0)
                hx += tl.sum(hf[:, :, None] * xf.to(tl.float32), axis=1)

        inv_n = tl.rsqrt(sq + eps2)
        s_g = hg * inv_n[:, None]  # kᵀG
        br = tl.zeros([BLOCK_M], dtype=tl.float32)  # βρ as the forward saved them (REBUILD)
        if REBUILD:
            e = tl.load(E + rows[:, None] * DV + vcol[None, :], mask=pv_mask, other=0.0)
            rho_saved = tl.load(RHO + rows, mask=rmask, other=0.0)
            br = tl.load(BETA + rows, mask=rmask, other=0.0) * rho_saved
            r = v - e  # kᵀX
        elif DELTA:
            r = hx * inv_n[:, None]  # kᵀX
            e = v - r
        else:
            e = v
        if DELTA:
            k_dk = beta * (tl.sum(s_g * e, axis=1) - tl.sum(r * s_g, axis=1))
        else:
            k_dk = beta * tl.sum(s_g * e, axis=1)
        g_beta = tl.sum(s_g * e, axis=1)
        gz = g_beta * beta * (1.0 - 0.5 * beta)
        gp = beta[:, None] * s_g * dv_dp
        if not PROJECT:  # with PROJECT the projections' gradients are formed below instead
            tl.store(GZ + rows, gz.to(GZ.dtype.element_ty), mask=rmask)
            gp_ptr = GP + rows[:, None] * DV + vcol[None, :]
            tl.store(gp_ptr, gp.to(GP.dtype.element_ty), mask=pv_mask)
        coef = (beta * inv_n)[:, None] * e  # Y = X + h ⊗ coef (for ∂C)
        bks = (beta * inv_n)[:, None] * s_g  # ∂X = G − h ⊗ bks

        # Pass 2: the row-sized gradients ∂h, ∂X (and the ∂C partial sums).
        for c in range(NUM_CHUNKS):
            offs, hm, xm, hf, gf, gn = _bwd_tile(
                c, dcol, d, rows, rmask, vcol, vmask, h_row, G, gn_row, C, sh_d, sg_m, sg_d,
                sg_v, sn_m, sn_d, t_len, DV, BLOCK_D, COMPRESS, G_DENSE, TOKEN_K,
            )  # fmt: skip
            gk = tl.sum(gf * e[:, None, :], axis=2)
            if REBUILD:
                y_ptr = _state_ptrs(Y, rows, offs, vcol, sy_m, sy_d, sy_v, DV, Y_DENSE)
                yf = tl.load(y_ptr, mask=xm, other=0.0).to(tl.float32)
                xf = yf - (br[:, None] * hf)[:, :, None] * e[:, None, :]
                xo_ptr = XO + rows[:, None, None] * (d * DV) + offs[None, :, None] * DV
                tl.store(xo_ptr + vcol[None, None, :], xf.to(XO.dtype.element_ty), mask=xm)
            elif DELTA or COMPRESS:
                x_ptr = _state_ptrs(X, rows, offs, vcol, sx_m, sx_d, sx_v, DV, X_DENSE)
                xf = tl.load(x_ptr, mask=xm, other=0.0).to(tl.float32)
            if DELTA:
                gk -= tl.sum(xf * s_g[:, None, :], axis=2)
            gk = beta[:, None] * gk
            gh = (gk - hf * (inv_n * k_dk)[:, None]) * inv_n[:, None]
            gh_ptr = GH + rows[:, None] * d + offs[None, :]
            tl.store(gh_ptr, gh.to(GH.dtype.element_ty), mask=hm)
            if WRITE_GX:
                if DELTA:
                    gx = gf - hf[:, :, None] * bks[:, None, :]
                else:
                    gx = gf
                if XV_STATE:  # (DV = 1) u is X: ∂u = W_vᵀ∂p joins ∂X here, not a tensor of its own
                    wv1 = tl.load(WV + offs, mask=offs < d, other=0.0).to(tl.float32)
                    gx += (tl.sum(gp, axis=1)[:, None] * wv1[None, :])[:, :, None]
                gx_ptr = GX + rows[:, None, None] * (d * DV) + offs[None, :, None] * DV
                tl.store(gx_ptr + vcol[None, None, :], gx.to(GX.dtype.element_ty), mask=xm)
            if COMPRESS:
                # The forward read the rounded Y; so does its gradient.
                if REBUILD:
                    y = yf  # Y itself
                else:
                    y = (xf + hf[:, :, None] * coef[:, None, :]).to(X.dtype.element_ty)
                    y = y.to(tl.float32)
                part = tl.sum(gn[:, :, None] * y, axis=0)  # (BLOCK_D, BLOCK_V)
                if CARRY_SUMS:
                    sum_c += part
                else:
                    gc_ptr = PART + pid * part_stride + offs[:, None] * DV + vcol[None, :]
                    _add_to_partial(gc_ptr, (offs < d)[:, None] & vmask[None, :], later, part)
            if PROJECT:
                if XV_STATE:  # (DELTA, DV = 1) the value head's u is the state, in hand here
                    x_state = tl.sum(xf, axis=2)
                else:
                    x_state = gh  # unread
                rows_wg, rows_wv = _projections_bwd_tile(
                    CIN, XV, WG, WV, GCIN, GXV, WN, rows, offs, hm, vcol, vmask, d, gz, gp,
                    x_state, rstd, sc_m, sc_d, sxv_m, sxv_d, DV, READS_U, XV_STATE, NORM_C,
                )  # fmt: skip
                if CARRY_SUMS:
                    sum_wg += rows_wg
                    sum_wv += rows_wv
                else:  # at GW + pid · part_stride: `(1 + dv, d)`, row 0 w_g, rows 1.. W_v
                    part_w = GW + pid * part_stride
                    _add_to_partial(part_w + offs, offs < d, later, rows_wg)
                    wv_ptr = part_w + (1 + vcol[None, :]) * d + offs[:, None]
                    _add_to_partial(wv_ptr, (offs < d)[:, None] & vmask[None, :], later, rows_wv)
        if PROJECT:  # the biases' partial sums: ∂b_g = Σ ∂z, ∂b_v = Σ ∂p
            if CARRY_SUMS:
                sum_bg += tl.sum(gz, axis=0)
                sum_bv += tl.sum(gp, axis=0)
            else:
                gb_ptr = GB + pid * part_stride
                _add_to_partial(gb_ptr + vcol, vcol < 1, later, tl.sum(gz, axis=0))
                _add_to_partial(gb_ptr + 1 + vcol, vmask, later, tl.sum(gp, axis=0))
    if CARRY_SUMS:
        cmask = (dcol < d)[:, None] & vmask[None, :]
        if COMPRESS:
            tl.store(PART + pid * part_stride + dcol[:, None] * DV + vcol[None, :], sum_c, cmask)
        if PROJECT:
            part_w = GW + pid * part_stride
            tl.store(part_w + dcol, sum_wg, mask=dcol < d)
            tl.store(part_w + (1 + vcol[None, :]) * d + dcol[:, None], sum_wv, mask=cmask)
            tl.store(GB + pid * part_stride + vcol, sum_bg, mask=vcol < 1)
            tl.store(GB + pid * part_stride + 1 + vcol, sum_bv, mask=vmask)


@triton.jit
def _rebuild_kernel(
    Y, H, RHO, BETA, E, X,
    n_rows, d,
    sy_m, sy_d, sy_v, sh_m, sh_d,
    DV: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
    NUM_CHUNKS: tl.constexpr, Y_DENSE: tl.constexpr,
):  # fmt: skip
    """The state before a rewrite from the one after it (`ops.state_tape`): X = Y − (βρh) eᵀ
    from the row scalars the forward wrote (`_store_rows`); X contiguous."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    rows = rows.to(tl.int64)
    vcol = tl.arange(0, BLOCK_V)
    vmask = vcol < DV
    dcol = tl.arange(0, BLOCK_D)
    br = tl.load(BETA + rows, mask=rmask, other=0.0) * tl.load(RHO + rows, mask=rmask, other=0.0)
    pv_mask = rmask[:, None] & vmask[None, :]
    e = tl.load(E + rows[:, None] * DV + vcol[None, :], mask=pv_mask, other=0.0)
    h_row = H + rows[:, None] * sh_m
    x_row = X + rows[:, None, None] * (d * DV) + vcol[None, None, :]
    for c in range(NUM_CHUNKS):
        offs = c * BLOCK_D + dcol
        hm = rmask[:, None] & (offs < d)[None, :]
        xm = hm[:, :, None] & vmask[None, None, :]
        a = br[:, None] * tl.load(h_row + offs[None, :] * sh_d, mask=hm, other=0.0).to(tl.float32)
        y_ptr = _state_ptrs(Y, rows, offs, vcol, sy_m, sy_d, sy_v, DV, Y_DENSE)
        y = tl.load(y_ptr, mask=xm, other=0.0).to(tl.float32)
        x = y - a[:, :, None] * e[:, None, :]
        tl.store(x_row + offs[None, :, None] * DV, x.to(X.dtype.element_ty), mask=xm)


def _token_taps(C: torch.Tensor | None) -> bool:
    """Whether the compressor operand is a token compressor's taps `(d, dv, K)` (not a channel
    compressor's `(d, dv)` matrix)."""
    return C is not None and C.dim() == 3


def _floor_pow2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def launch_config(d: int, dv: int, max_tile: int | None = None) -> tuple[int, int, int, int]:
    """`(BLOCK_M, BLOCK_D, NUM_CHUNKS, BLOCK_V)` for rows of width `d` with `dv` value channels."""
    return _tiles(d, dv, MAX_TILE if max_tile is None else max_tile, MAX_ROWS)


@functools.lru_cache(maxsize=256)  # a few calls a sublayer, the same few shapes: host time
def _tiles(d: int, dv: int, max_tile: int, max_rows: int) -> tuple[int, int, int, int]:
    tile = _floor_pow2(max_tile)
    block_v = next_pow2(dv)
    block_d = min(next_pow2(d), max(tile // block_v, 16))
    num_chunks = cdiv(d, block_d)
    block_m = min(_floor_pow2(tile // (block_d * block_v)), _floor_pow2(max_rows))
    return block_m, block_d, num_chunks, block_v


def backward_launch_config(d: int, dv: int) -> tuple[int, int, int, int]:
    """`launch_config` of the backward: MAX_TILE_BWD elements, at most MAX_COLUMNS_BWD columns."""
    return launch_config(d, dv, min(MAX_TILE_BWD, MAX_COLUMNS_BWD * next_pow2(dv)))


# Warps of an update backward that takes a token read's gradient (TOKEN_K): its K shifted loads
# of ∂x_next and of the taps take registers. Compiled for sm_90 at small (1 × 256 tiles): 8 warps
# 164-169 registers a thread, one program (8 warps) an SM; 16 warps 32, four programs, 64 warps.
# Chosen by occupancy, not timed: `benchmarks/kernel_tiles.py` times the others on a GPU.
TOKEN_READ_WARPS = 16


def _num_warps(block_m: int, block_d: int, block_v: int, reduces_dc: bool = False) -> int:
    # The backward that also sums ∂C ran faster with 8 (H200, d = 768, dv = 4: 289 µs a call
    # against 460 µs with 4).
    return 4 if block_m * block_d * block_v <= 2048 and not reduces_dc else 8


def _compress_programs(num_blocks: int, device: torch.device) -> int:
    if COMPRESS_PROGRAMS is not None:
        cap = COMPRESS_PROGRAMS
    elif device.type == "cuda":
        cap = PROGRAMS_PER_SM * backend.multiprocessors(device)
    else:
        cap = 2
    return max(1, min(num_blocks, cap))


def _row_offsets_fit_int32(t: torch.Tensor) -> torch.Tensor:
    """`t`, copied to contiguous when an offset inside one row would overflow int32.

    The kernels form row offsets in int64 and offsets within a row (column · stride) in int32;
    only an exotic layout (say the value axis outermost of a > 2³¹-element state) needs the copy.
    """
    span = sum((n - 1) * abs(st) for n, st in zip(t.shape[1:], t.stride()[1:], strict=True))
    return t if span < 2**31 else t.contiguous()


def _dense_rows(t: torch.Tensor) -> bool:
    """Whether the rows of `t` `(N, d, dv)` are contiguous blocks, whatever the stride between
    rows: the kernels then take the strides within a row as constants (`_state_ptrs`)."""
    return dense_past_first(t.shape, t.stride())


def _flat(t: torch.Tensor, *shape: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """`t` as the kernels read it with its rows flattened to `shape`, and the strides: `t` itself
    with the strides computed where it is contiguous (a reshape is a dispatched op, and eager
    training on a GPU is bound by such host work), else the view `_rows` makes."""
    if t.is_contiguous():
        return t, _contiguous_strides(shape)
    view = _rows(t, *shape)
    return view, view.stride()


@functools.lru_cache(maxsize=1024)
def _contiguous_strides(shape: tuple[int, ...]) -> tuple[int, ...]:
    strides, step = [], 1
    for size in reversed(shape):
        strides.append(step)
        step *= size
    return tuple(reversed(strides))


def _rows(t: torch.Tensor, *shape: int) -> torch.Tensor:
    """`t` with its rows flattened to `shape`: a view whenever the leading axes merge (the kernels
    take the strides), int32-safe within a row."""
    return _row_offsets_fit_int32(t.reshape(shape))


def rows_on_context(ctx: Any, X, h, z, p, delta: bool, official: bool, value_scale, k_eps):
    """X, h, z, p as the kernels read them (`_flat`), with what `_backward` reads of the forward
    put on `ctx`: the operands' shapes, the rows `(n_rows, d, dv)` and their strides, the rule's
    flags and constants. `_forward` calls it, and so does a backward without a forward's context
    (`ops.compiled_kernels`)."""
    d = h.shape[-1]
    n_rows = h.numel() // d
    dv = X.shape[-1] if X.dim() == h.dim() + 1 else 1
    ctx.shapes = X.shape, h.shape, z.shape, p.shape
    (X, sx), (h, sh) = _flat(X, n_rows, d, dv), _flat(h, n_rows, d)
    (z, sz), (p, sp) = _flat(z, n_rows), _flat(p, n_rows, dv)
    ctx.rows = (n_rows, d, dv), (sx, sh, sz, sp)
    ctx.delta, ctx.official = delta, official
    ctx.value_scale, ctx.k_eps = float(value_scale), float(k_eps)
    return X, h, z, p


def _forward(
    ctx: Any, X, h, z, p, C, delta: bool, official: bool, value_scale: float, k_eps: float,
    projections: tuple | None = None, norm_eps: float | None = None, taped: bool = True,
    keep_rows: bool = False,
):  # fmt: skip
    """Launch the forward kernel; return `(outputs, saved)`: `Y` or `(Y, XN)`, and the tensors
    backward reads, `[X, h, z, p, C]`. With `projections` `(c, x, w_g, b_g, W_v, b_v)` z and p
    are None on entry and made here: the kernel computes them from c and x and writes them (fp32,
    p shaped `(..., dv)` for any state); with `norm_eps` too (the official head: c = RMSNorm(x)
    with that ε) it also writes x's 1/rms a row, appended to `saved` (fp32, z's shape). Keeps on
    `ctx` what `_backward` needs besides. `taped=False`: no state tape links Y, even where one
    records (a caller that keeps X itself: `ops.compiled_kernels`). `keep_rows`: the kernel
    writes the row scalars X is rebuilt from, as for a tape, and `ctx.row_scalars` holds them,
    `(ρ, β, e)`, no tape involved (a compiled graph's state chain: `ops.compiled_kernels`)."""
    if projections is not None:
        dv = X.shape[-1] if X.dim() == h.dim() + 1 else 1
        z = new_empty(h.shape[:-1], torch.float32, X.device)
        p = new_empty((*h.shape[:-1], dv), torch.float32, X.device)
    Y = new_empty(X.shape, X.dtype, X.device)
    X_in, h_in = X, h
    X, h, z, p = rows_on_context(ctx, X, h, z, p, delta, official, value_scale, k_eps)
    (n_rows, d, dv), (sx, sh, sz, sp) = ctx.rows
    block_m, block_d, num_chunks, block_v = launch_config(d, dv)
    taps = _token_taps(C)  # read by its own kernel below
    compress = C is not None and not taps
    Cc = C.contiguous() if compress else Y  # unread placeholder pointers when not compressing
    if compress:  # the dtype ChannelCompressor reads a state in: X's promoted with C's
        xn_dtype = torch.promote_types(X.dtype, C.dtype)
        XN = new_empty(ctx.shapes[1], xn_dtype, X.device)
    else:
        XN = Y
    norm_c = norm_eps is not None
    rstd = new_empty(z.shape, torch.float32, X.device) if norm_c else Y
    if projections is None:
        cin = xv = wg = bg = wv = bv = Y  # unread placeholder pointers
        sc = sxv = (0, 0)
        reads_u = has_bv = False
    else:
        c, x, w_g, b_g, W_v, b_v = projections
        reads_u, has_bv = x is not c, b_v is not None
        (cin, sc), (xv, sxv) = _flat(c, n_rows, d), _flat(x, n_rows, d)
        wg, bg, wv = w_g.contiguous(), b_g.contiguous(), W_v.contiguous()
        bv = b_v.contiguous() if has_bv else Y
    # Where a state tape records this forward, the kernel also writes the row scalars the
    # state before it is rebuilt from in backward (`ops.state_tape`); fp32, n_rows·(dv + 2).
    tape = state_tape.active() if taped else None
    save_rows = (tape is not None or keep_rows) and n_rows > 0
    if save_rows or keep_rows:  # shaped as z and p (a row each, contiguous): linked without a view
        vector = X_in.dim() == h_in.dim()  # e `(...)`, as the tape takes it (p: maybe `(..., 1)`)
        e = new_empty(ctx.shapes[2 if vector else 3], torch.float32, X.device)
        rho = new_empty(ctx.shapes[2], torch.float32, X.device)
        beta = torch.empty_like(rho)
    else:
        e = rho = beta = Y  # unwritten placeholder pointers
    grid = (cdiv(n_rows, block_m),)
    if n_rows > 0:
        _fwd_kernel[grid](
            X, h, z, p, Cc, Y, XN, e, rho, beta, cin, xv, wg, bg, wv, bv, rstd,
            n_rows, d, float(k_eps) ** 2, float(value_scale), float(norm_eps or 0.0),
            *sx, *sh, *sz, *sp, *sc, *sxv,
            DV=dv, BLOCK_V=block_v, BLOCK_M=block_m, BLOCK_D=block_d,
            NUM_CHUNKS=num_chunks, DELTA=delta, OFFICIAL=official, COMPRESS=compress,
            SAVE_ROWS=save_rows, X_DENSE=dense_past_first((n_rows, d, dv), sx),
            P_CONTIGUOUS=p.is_contiguous(), PROJECT=projections is not None, READS_U=reads_u,
            HAS_BV=has_bv, NORM_C=norm_c, num_warps=_num_warps(block_m, block_d, block_v),
        )  # fmt: skip
    if keep_rows:
        ctx.row_scalars = rho, beta, e
    elif save_rows:  # before saving: Y is then a state the tape knows
        tape.link(X_in, Y, h_in, rho, beta, e)
    ctx.set_materialize_grads(False)
    if taps:  # the next sublayer's token read of Y `(B, T, d, dv)`, its first token unpadded
        XN = triton_mixing.read_forward(Y, C, 0)[0]
        compress = True
    return ((Y, XN) if compress else Y), [X, h, z, p, C, *((rstd,) if norm_c else ())]


def _backward(
    ctx: Any, saved, grads, need, projections: tuple | None = None, rebuild: tuple | None = None,
    norm: tuple | None = None, Y_out: torch.Tensor | None = None,
) -> tuple:  # fmt: skip
    """`(∂X, ∂h, ∂z, ∂p, ∂C)` of `_forward`'s launch from its saved `[X, h, z, p, C]`, the output
    gradients `(∂Y, ∂XN)` (None where unused) and which of the five are `need`ed. With
    `projections` `(c_kept, x_low, w_g, W_v, c_dtype, u_dtype)` the kernel forms the projections'
    gradients instead of ∂z and ∂p: then `(∂X, ∂h, (∂c, ∂u, ∂w_g, ∂b_g, ∂W_v, ∂b_v), None, ∂C)`
    (∂u None where the value head reads c, `u_dtype` None; the caller drops what it does not
    need); c_kept None and `norm` `(rstd, w_n)`: c is recomputed from u as RMSNorm formed it
    (the official head, `_forward`'s `norm_eps`). `rebuild` `(Y, rho, beta, e, X_out)`: X is None
    in `saved`; the kernel forms it from Y and the row scalars the forward saved for the state
    tape and writes it to X_out (delta). A token compressor's taps C `(d, dv, K)`: the read's
    gradient joins ∂Y in the kernel (`_bwd_tile`), and ∂C is summed by the read's own kernel from
    Y — `rebuild`'s, else `Y_out` (the forward's output) — before the kernel may write X over it."""
    X, h, z, p, C = saved
    if rebuild is not None:
        Y, rho_saved, beta_saved, e_saved, X = rebuild  # X: the output buffer, shape and dtype
    (n_rows, d, dv), (sx, sh, sz, sp) = ctx.rows
    X_shape, h_shape, z_shape, p_shape = ctx.shapes
    gY = grads[0]
    taps = _token_taps(C)
    compress = C is not None and len(grads) > 1 and grads[1] is not None
    need_X, need_h, need_z, need_p, need_C = need
    gC_taps = None
    if taps and compress and need_C:
        Y_read = rebuild[0] if rebuild is not None else Y_out
        gC_taps = triton_mixing.read_backward(
            (Y_read, C.contiguous()), grads[1], 0, (Y_read.shape, C.shape), False, True
        )[1]
    if gY is None:
        if not compress and projections is None:
            return (None,) * 5
        gY = X.new_zeros(()).expand(X_shape)  # stride 0: read, never materialised
    write_gx = need_X and (ctx.delta or compress)
    gY_in = gY
    gY, sg = _flat(gY, n_rows, d, dv)

    block_m, block_d, num_chunks, block_v = backward_launch_config(d, dv)
    num_blocks = cdiv(n_rows, block_m)
    reduces = (compress and not taps) or projections is not None  # per-program partial sums
    nprog = _compress_programs(num_blocks, X.device) if reduces else num_blocks
    iters = cdiv(num_blocks, nprog) if num_blocks else 0
    # Written in the inputs' own shapes (contiguous): no reshape a call on the way out.
    gX = new_empty(X_shape, X.dtype, X.device) if write_gx else gY
    gh = new_empty(h_shape, h.dtype, h.device)
    if projections is None:
        gz = new_empty(z_shape, z.dtype, z.device)
        gp = new_empty(p_shape, p.dtype, p.device)
    else:  # unwritten: the kernel forms the projections' gradients from them in registers
        gz = gp = gh
    if compress:
        Cc = C.permute(2, 0, 1).contiguous() if taps else C.contiguous()  # taps: `(K, d, dv)`
        gN, sn = _flat(grads[1], n_rows, d)
    else:
        Cc, gN, sn = gh, gh, (0, 0)  # unread placeholders
    token_k = C.shape[-1] if taps and compress else 0
    # Every program's partial sums in one row of one fp32 buffer (one allocation and one sum where
    # there were up to three): ∂C (d·dv), ∂w_g and ∂W_v ((1 + dv)·d), the biases (1 + dv), and
    # padding to a multiple of 16 numbers (row starts the compiler knows aligned).
    sums_c = compress and not taps
    sizes = [d * dv if sums_c else 0, *((d, dv * d, 1, dv) if projections is not None else ())]
    used = sum(sizes)
    part_stride = cdiv(used, 16) * 16
    sizes.append(part_stride - used)
    if reduces:  # unzeroed: the kernel sets every partial sum (a program has a row block at least)
        alloc = torch.empty if n_rows > 0 else torch.zeros
        part = alloc(nprog, part_stride, dtype=torch.float32, device=X.device)
    else:
        part = gh  # unread placeholder
    if projections is None:
        cin = xv = wg = wv = g_c = g_u = gh  # unread placeholders
        sc = sxv = (0, 0)
        reads_u = x_is_state = False
    else:
        c_kept, x_low, w_g, W_v, c_dtype, u_dtype = projections
        reads_u = u_dtype is not None
        x_is_state = x_low is None  # u is X: read from X, its gradient goes into ∂X
        (cin, sc), (xv, sxv) = (gh, (0, 0)), (gh, (0, 0))  # unread: c with norm, x if x is X
        if norm is None:
            cin, sc = _flat(c_kept, n_rows, d)
        if not x_is_state:
            xv, sxv = _flat(x_low, n_rows, d)
        wg, wv = w_g.contiguous(), W_v.contiguous()
        g_c = new_empty(h_shape, c_dtype, X.device)
        u_own = reads_u and not x_is_state
        g_u = new_empty(h_shape, u_dtype, X.device) if u_own else g_c
    rstd, w_n = (gh, gh) if norm is None else norm  # unread placeholders without norm
    if rebuild is None:
        Yr, sy, e_rows, rho_rows, beta_rows, XO = gh, sx, gh, gh, gh, gh  # unread placeholders
    else:
        (Yr, sy), XO = _flat(Y, n_rows, d, dv), X
        e_rows, rho_rows, beta_rows = e_saved, rho_saved, beta_saved
    if n_rows > 0:
        _bwd_kernel[(nprog,)](
            X, h, z, p, Cc, gY, gN, gX, gh, gz, gp, part,
            cin, xv, wg, wv, g_c, g_u, sizes[0], used - 1 - dv,
            Yr, e_rows, rho_rows, beta_rows, XO, w_n, rstd,
            n_rows, d, ctx.k_eps**2, ctx.value_scale, iters, part_stride,
            *sx, *sh, *sz, *sp, *sg, *sn, *sc, *sxv, *sy, X_shape[1] if token_k else 1,
            DV=dv, BLOCK_V=block_v, BLOCK_M=block_m, BLOCK_D=block_d,
            NUM_CHUNKS=num_chunks, DELTA=ctx.delta, OFFICIAL=ctx.official,
            COMPRESS=sums_c, WRITE_GX=write_gx, X_DENSE=dense_past_first((n_rows, d, dv), sx),
            P_CONTIGUOUS=p.is_contiguous(), G_DENSE=dense_past_first((n_rows, d, dv), sg),
            PROJECT=projections is not None, READS_U=reads_u, REBUILD=rebuild is not None,
            Y_DENSE=dense_past_first((n_rows, d, dv), sy),
            XV_STATE=x_is_state, NORM_C=norm is not None,
            CARRY_SUMS=CARRY_SUMS and reduces and num_chunks == 1, TOKEN_K=token_k,
            num_warps=TOKEN_READ_WARPS if token_k else _num_warps(block_m, block_d, block_v, reduces),
        )  # fmt: skip
    if need_X and not write_gx:
        gX = cast(gY_in, X.dtype)  # write-only, no compressor read: ∂X = G
    # The partial sums, in program order: deterministic.
    sums = part.sum(0).split_with_sizes(sizes) if reduces else ()
    gC = None
    if need_C:
        summed = gC_taps if taps else sums[0].view(d, dv) if compress else None
        gC = torch.zeros_like(C) if summed is None else cast(summed, C.dtype)
    if projections is not None:
        gw_g, gW_v, gb_g, gb_v = sums[1:5]
        weights = (cast(gw_g.view(1, d), w_g.dtype), gb_g, cast(gW_v.view(dv, d), W_v.dtype), gb_v)
        grads = (g_c, g_u if u_own else None, *weights)
        return gX if need_X else None, gh if need_h else None, grads, None, gC
    return (
        gX if need_X else None,
        gh if need_h else None,
        gz if need_z else None,
        gp if need_p else None,
        gC,
    )


class _RewriteEpilogue(torch.autograd.Function):
    """X `(..., d)` or `(..., d, dv)`, h `(..., d)`, z `(...)`, p `(...)` or `(..., dv)`, C `(d, dv)`
    or None; the kernels see the rows flattened, `(N, d, dv)` and so on.

    Returns Y (X's shape and dtype), and x_next (h's shape; X's dtype promoted with C's) when C is
    given. The rows are flattened in here, not around the call: each reshape outside would be two
    more autograd nodes a sublayer, and eager training on a GPU is bound by such host work.
    """

    @staticmethod
    def forward(ctx: Any, X, h, z, p, C, delta: bool, official: bool, value_scale, k_eps):
        out, saved = _forward(ctx, X, h, z, p, C, delta, official, value_scale, k_eps)
        ctx.save_for_backward(*saved)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None):
        need = ctx.needs_input_grad[:5]
        return (*_backward(ctx, ctx.saved_tensors, grads, need), None, None, None, None)


class _TritonUpdate(torch.autograd.Function):
    """A whole DDL update with the linear gate: the forward kernel computes the gate's logit
    `z = c·w_g + b_g` and the value head's pre-activation `p = x W_vᵀ (+ b_v)` (x = c, or u for
    the official head) from the rows itself, in fp32, then rewrites; the backward kernel forms the
    projections' gradients too (module docstring). Where u is the state X itself (the official
    head of a vector state) and the rule is delta, ∂W_v is formed from the X the backward reads
    or rebuilds anyway: no copy of u kept (under autocast a half-precision one) and nothing saved
    that the state tape must see. One autograd node and no projection launches,
    where `_LinearProjections` before `_RewriteEpilogue` made two nodes, six products and their
    casts and views: eager training on a GPU is bound by such host work. `keep_dtype` /
    `lin_dtype`: as `_LinearProjections`' — c is kept for ∂w_g, and u for ∂W_v, in the autocast
    dtype (the memory they take); every product of the kernel is fp32.

    `norm_weight`, `norm_eps` (the official head; None, None otherwise): c is `rms_norm(u,
    norm_weight, norm_eps)`, and neither c nor a copy of u is kept: u as it is (its norm keeps
    it for its own backward anyway), and the backward recomputes c from u in fp32 with the 1/rms
    the forward kernel wrote a row. Under autocast that saves the low-precision copies of c and
    u (at `small`, bf16, 8 × 1024: 12.6 MB each a sublayer), and ∂w_g is summed from fp32 c."""

    @staticmethod
    def forward(ctx: Any, X, h, c, x, w_g, b_g, W_v, b_v, C, delta: bool, official: bool,
                value_scale: float, k_eps: float, keep_dtype, lin_dtype, norm_weight,
                norm_eps):  # fmt: skip
        projections = (c, x, w_g, b_g, W_v, b_v)
        out, saved = _forward(
            ctx, X, h, None, None, C, delta, official, value_scale, k_eps, projections, norm_eps
        )
        # Kept in their own shapes: the backward's `_flat` reads them as rows (no view a call).
        if norm_eps is None:
            c_kept, x_low = kept_inputs(c, x, keep_dtype, lin_dtype)
        else:  # c recomputed from u (x), kept as it is; after the 1/rms a row (`saved`'s end)
            c_kept, x_low = None, x
            saved.append(norm_weight)  # with it, the backward's `norm`
        if _reads_own_state(X, x, delta, official):  # the backward has X in hand: no copy kept
            x_low = None
        tape = state_tape.active() if delta else None
        slot = None if tape is None else tape.deferred(X)
        ctx.rebuild = None
        if slot is not None:  # backward rebuilds X from Y itself (`StateTape.claim`)
            ctx.rebuild = tape, slot
            saved[0] = None
        # A token read's ∂C is summed from Y: the tape hands it over with X's rebuild, else kept
        # (a state the tape records is kept as a handle, not as memory).
        ctx.keeps_y = _token_taps(C) and slot is None
        ctx.save_for_backward(*saved, c_kept, w_g, x_low, W_v, *out[:1] if ctx.keeps_y else ())
        bias_dtypes = (b_g.dtype, None if b_v is None else b_v.dtype)
        ctx.projection = (c.dtype, None if x is c else x.dtype, bias_dtypes)
        return out

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None):
        saved = ctx.saved_tensors
        Y_out = saved[-1] if ctx.keeps_y else None
        X, h, z, p, C, *norm, c_kept, w_g, x_low, W_v = saved[:-1] if ctx.keeps_y else saved
        norm = tuple(norm) or None  # (1/rms of u a row, norm weight) where c is recomputed
        need = ctx.needs_input_grad
        c_dtype, u_dtype, bias_dtypes = ctx.projection
        projections = (c_kept, x_low, w_g, W_v, c_dtype, u_dtype)
        rebuild = None
        if ctx.rebuild is not None:  # X kept already (rebuilt for another reader), or rebuilt here
            tape, slot = ctx.rebuild
            X, rebuild = tape.claim(slot)
            if rebuild is None and _token_taps(C):
                Y_out = tape.state_after(slot)  # for the token read's ∂C
        gX, gh, projected, _, gC = _backward(
            ctx, (X, h, z, p, C), grads, (need[0], need[1], False, False, need[8]), projections,
            rebuild, norm, Y_out,
        )  # fmt: skip
        if rebuild is not None:
            tape.rebuilt(slot, rebuild[-1])
        gc, gu, gw_g, gb_g, gW_v, gb_v = projected
        b_g_dtype, b_v_dtype = bias_dtypes
        return (
            gX, gh,
            gc if need[2] else None, gu if need[3] else None,
            gw_g if need[4] else None, cast(gb_g, b_g_dtype) if need[5] else None,
            gW_v if need[6] else None,
            cast(gb_v, b_v_dtype) if need[7] else None,
            gC, *(None,) * 8,
        )  # fmt: skip


def rebuild_state_triton(
    Y: torch.Tensor,
    h: torch.Tensor,
    rho: torch.Tensor,
    beta: torch.Tensor,
    e: torch.Tensor,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """`Y − (β ρ h) eᵀ` (`ops.state_tape`) as one kernel: Y `(..., d)` or `(..., d, dv)`, h
    `(..., d)`, ρ and β `(...)`, e `(...)` or `(..., dv)` (the fp32 row scalars the forward
    kernel wrote); written into `out` (contiguous, Y's shape) where given, else a new tensor."""
    d = h.shape[-1]
    n_rows = h.numel() // d
    dv = Y.numel() // h.numel() if h.numel() else 1
    if out is None or not out.is_contiguous():
        out = new_empty(Y.shape, Y.dtype, Y.device)
    X = out
    if n_rows == 0:
        return X
    (Y, sy), (h, sh) = _flat(Y, n_rows, d, dv), _flat(h, n_rows, d)
    rho, beta, e = rho.contiguous(), beta.contiguous(), e.contiguous()
    block_m, block_d, num_chunks, block_v = launch_config(d, dv)
    _rebuild_kernel[(cdiv(n_rows, block_m),)](
        Y, h, rho, beta, e, X, n_rows, d, *sy, *sh,
        DV=dv, BLOCK_V=block_v, BLOCK_M=block_m, BLOCK_D=block_d, NUM_CHUNKS=num_chunks,
        Y_DENSE=dense_past_first((n_rows, d, dv), sy),
        num_warps=_num_warps(block_m, block_d, block_v),
    )  # fmt: skip
    return X


def rewrite_epilogue_triton(
    X: torch.Tensor,
    h: torch.Tensor,
    z: torch.Tensor,
    p: torch.Tensor,
    *,
    rule: str,
    value_head: str,
    value_scale: float,
    k_eps: float,
    compress: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The Triton path of `deltalearn.ops.epilogue.rewrite_epilogue` (inputs already validated).

    X `(..., d)` or `(..., d, dv)`, h `(..., d)`, z `(...)`, p `(...)` or `(..., dv)`, compress
    `(d, dv)` or None. Returns Y (shape and dtype of X), and x_next `(..., d)` with `compress`
    (X's dtype promoted with compress's).
    """
    return no_graph.apply(
        _RewriteEpilogue, X, h, z, p, compress, rule == "delta", value_head == "official",
        value_scale, k_eps,
    )  # fmt: skip


def _reads_own_state(X: torch.Tensor, x: torch.Tensor, delta: bool, official: bool) -> bool:
    """Whether the official value head's input is the state itself (u = X: a vector state) where
    the delta backward reads X anyway. Not the paper head's x = c, even where c is X: its ∂x is
    part of ∂c, which the kernel writes as it is."""
    return delta and official and x is X


def update_triton(
    X, h, c, x, w_g, b_g, W_v, b_v, compress, *, rule, value_head, value_scale, k_eps, keep, lin,
    norm=None,
):  # fmt: skip
    """A `DeltaUpdate` with the linear gate as one Triton kernel each way (`_TritonUpdate`): X
    `(..., d)` or `(..., d, dv)`, h, c, x `(..., d)` (x: c for the paper head, u for the official),
    w_g `(1, d)`, b_g `(1,)`, W_v `(dv, d)`, b_v `(dv,)` or None, compress `(d, dv)` or None, all on
    one device (checked by the caller); `keep` / `lin` the dtypes of `nn.generators.
    projection_dtypes`; `norm` `(weight (d,), eps)` where c = `rms_norm(u, weight, eps)` (the
    caller knows and, training under autocast, would keep a copy of c otherwise:
    `DeltaUpdate._triton_update`); the official head only. Returns Y, or `(Y, x_next)` with
    compress. Where no graph is recorded (`ops.no_graph`) the forward kernel runs alone: no
    Function, nothing kept for a backward (`keep`, `lin` and `norm` unused)."""
    delta, official = rule == "delta", value_head == "official"
    if not no_graph.records_graph():
        projections = (c, x, w_g, b_g, W_v, b_v)
        return _forward(no_graph.NoGraph(), X, h, None, None, compress, delta, official,
                        value_scale, k_eps, projections)[0]  # fmt: skip
    norm_weight = norm_eps = None
    if norm is not None and official:  # the kernels recompute c from u, which the paper head lacks
        norm_weight, norm_eps = norm
    args = (
        X, h, c, x, w_g, b_g, W_v, b_v, compress, delta, official, value_scale, k_eps, keep, lin,
        norm_weight, norm_eps,
    )  # fmt: skip
    tape = state_tape.active() if delta else None
    saved = (h, x) if norm_eps is not None else (h, c, x)
    if _reads_own_state(X, x, delta, official):
        saved = saved[:-1]
    if tape is not None and tape.saves_no_state(X, saved):
        return state_tape.without_hooks(tape, no_graph.apply_direct, _TritonUpdate, *args)
    return no_graph.apply_direct(_TritonUpdate, *args)
