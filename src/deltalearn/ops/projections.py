"""The linear gate's and the value head's projections as a DDL update computes them and their
backward: `z = c·w_g + b_g` and `p = x W_vᵀ (+ b_v)` (x = c for the paper head, u for the
official), on the rows as one matrix — `nn.generators._LinearProjections`, the projections as their
own autograd Function before any epilogue, and what the Triton update
(`ops/triton_epilogue._TritonUpdate`, which forms both inside its kernels) keeps for backward.
"""

from __future__ import annotations

import torch

from deltalearn.ops import backend


# A matrix product with one column (a gate logit, dv = 1) as MKL takes it costs ~260 µs at 2048 ×
# 256 between a training step's large products on a CPU, against ~70 µs as an elementwise product
# and a sum (both read the matrix once): three of them a sublayer were most of ddl's extra training
# time there (`benchmarks/README.md`). Only in fp32/float64 on a CPU with the fast paths on
# (`backend.native_allowed`: not under torch.compile or the "torch"/"reference" backends, whose
# matrix products a FLOP counter sees): a low-precision product would round each term before the
# sum, and a GPU takes the matrix products at full speed.
def _elementwise(a: torch.Tensor, columns: int) -> bool:
    return (
        columns == 1
        and a.is_cpu
        and a.dtype in (torch.float32, torch.float64)
        and backend.native_allowed()
    )


def traced() -> bool:
    """Whether the projections are being traced by `torch.compile` (training or inference, any
    dtype). Then a product with a few columns, and each product of its backward, is an elementwise
    product and a sum: Inductor fuses those with the rewrite's own reductions over d and with the
    ops around them, where a matrix product is a library call of its own that reads its operands
    again. A compiled `tiny` ddl training graph of two layers this way has 60 forward and 93
    backward kernels against 76 and 125 (the baseline's: 63 and 88; `benchmarks/README.md`).
    Low-precision operands lose nothing by it: Inductor computes their products and sums in fp32
    and rounds once, as a matrix product does."""
    return torch.compiler.is_compiling()


def project(a: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """`a @ w.t() (+ b)` for `a` (rows, d), `w` (n, d): (rows, n)."""
    if _elementwise(a, w.shape[0]):
        out = (a * w).sum(-1, keepdim=True)
        return out if b is None else out.add_(b)
    if traced():
        return _product_and_sum(a, w, b)
    return a @ w.t() if b is None else torch.addmm(b, a, w.t())


def linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    """`F.linear(x, w, b)` for `x` (..., d), `w` (n, d); traced, as an elementwise product and a
    sum (`traced`)."""
    if traced():
        return _product_and_sum(x, w, b)
    return torch.nn.functional.linear(x, w, b)


def _product_and_sum(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    out = (x.unsqueeze(-2) * w).sum(-1)
    return out if b is None else out + b


def _outer(g: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """`g @ w` for `g` (rows, n), `w` (n, d): with n = 1 each entry is one product."""
    if traced():
        return (g.unsqueeze(-1) * w).sum(-2)
    return g * w if _elementwise(g, g.shape[1]) else g @ w


def _column_sum(g: torch.Tensor, a: torch.Tensor) -> torch.Tensor:
    """`g.t() @ a` for `g` (rows, n), `a` (rows, d): (n, d)."""
    if _elementwise(a, g.shape[1]):
        return (g * a).sum(0, keepdim=True)
    if traced():  # a reduction over the rows: the (rows, n, d) product is never materialised
        return (g.unsqueeze(-1) * a.unsqueeze(-2)).sum(0)
    return g.t() @ a


def cast(t: torch.Tensor | None, dtype: torch.dtype | None) -> torch.Tensor | None:
    """`t` in `dtype` (None: as it is). Checked here: a no-op `.to` still costs ~1 µs of host
    time, ten a sublayer in training; and a custom Function whose forward returned `Y.to(X.dtype)`
    of Y's own dtype was traced by torch 2.11's dynamo with a zero gradient for all its inputs
    (compiled ddl training; torch 2.13 traces it right), so the rewrite Functions end with this.
    The dtype goes by keyword: given by position, torch's parser first tries it as a device and
    formats an error it drops (~0.5 µs)."""
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype=dtype)


def kept_inputs(
    c: torch.Tensor, x: torch.Tensor, keep_dtype: torch.dtype | None, lin_dtype: torch.dtype | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(c_kept, x_low)`: what the projections' backward keeps — c in `keep_dtype` (for ∂w_g) and
    the value head's input x in `lin_dtype` (for ∂W_v), one copy where x is c in one dtype."""
    c_kept = cast(c, keep_dtype)
    x_low = cast(x, lin_dtype)
    if x is c and c_kept.dtype == x_low.dtype:
        x_low = c_kept  # the paper head reads c: keep one copy
    return c_kept, x_low


def projection_grads(
    gz: torch.Tensor,
    gp: torch.Tensor | None,
    c_kept: torch.Tensor,
    w_g: torch.Tensor,
    x_low: torch.Tensor | None,
    W_v: torch.Tensor | None,
    need: tuple[bool, ...],
    row_shape: torch.Size,
    value_dtypes: tuple | None,
) -> tuple[torch.Tensor | None, ...]:
    """`(∂c, ∂x, ∂w_g, ∂b_g, ∂W_v, ∂b_v)` from `∂z` `(...)` and `∂p` `(..., dv)` (None: no value
    head), each where `need` says (in that order), as `nn.Linear`'s backward takes them: ∂c as the
    `(rows × 1) @ (1 × d)` product (the FLOPs `deltalearn.models.flops` counts), ∂w_g from c as
    kept, the value products in `lin_dtype`. `value_dtypes`: `(x dtype, b_v dtype or None,
    lin_dtype)`; `row_shape`: c's shape."""
    gz2 = gz.reshape(-1, 1)
    gc = _outer(gz2, w_g).view(row_shape) if need[0] else None
    gw_g = cast(_column_sum(gz2, cast(c_kept, gz.dtype)), w_g.dtype) if need[2] else None
    gb_g = cast(gz2.sum(0), w_g.dtype) if need[3] else None
    if gp is None:
        return gc, None, gw_g, gb_g, None, None
    x_dtype, b_dtype, lin_dtype = value_dtypes
    rows = cast(gp.reshape(-1, gp.shape[-1]), x_low.dtype)
    gx = cast(_outer(rows, cast(W_v, lin_dtype)), x_dtype).view(row_shape) if need[1] else None
    gW_v = cast(_column_sum(rows, x_low), W_v.dtype) if need[4] else None
    gb_v = cast(rows.sum(0), b_dtype) if need[5] else None
    return gc, gx, gw_g, gb_g, gW_v, gb_v
