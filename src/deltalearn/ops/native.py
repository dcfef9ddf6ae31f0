"""The rewrite epilogue and the compressor reads on CPU through the C kernels of `native_kernels.c`:
the default path for fp32 and float64 CPU tensors where the kernels can be built (`native_build`).

The math is that of the PyTorch Functions they replace (`ops/fused_epilogue.py`, `ops/mixing.py`,
`ops/token_mixing.py`); what changes is the number of passes over a matrix state: the epilogue
reads X once and writes Y once per row (and reads the next channel compressor's input from Y while
it is in cache, `compress=`), its backward reads G and X once and writes ∂X once, and a read
accumulates every tap and value channel of a row in one loop.

Without autograd (inference, cached decoding) the kernels are called directly; with it, through one
autograd Function each. A `DeltaUpdate` with the linear gate runs whole in one kernel each way
(`update_native`): the gate's logit and the value head's pre-activation are row dot products inside
the epilogue's row loop, and their backward (∂c, ∂u and the weight gradients, summed in double)
inside its backward's — no products, temporaries or autograd node of their own. Saved for
backward: X (the delta rule), h, and per-row scalars; with `compress`, also Y (the state the next
sublayer keeps anyway) and C; for a whole update also c, u and the weights. In a DeltaLM training forward
the states among them are rebuilt rather than kept (`ops/state_tape.py`, `rebuild_state` below).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd.function import once_differentiable

from deltalearn.ops import no_graph, state_tape
from deltalearn.ops._shapes import new_empty
from deltalearn.ops.native_build import SUFFIXES, library

# The longest value axis the kernels take (MAX_DV in native_kernels.c); longer ones stay on the
# PyTorch Functions.
MAX_VALUE_CHANNELS = 256


def fits(X: torch.Tensor, matrix: bool = True) -> bool:
    """Whether the kernels take a state X (its value axis, the last one of a matrix state)."""
    return not matrix or X.shape[-1] <= MAX_VALUE_CHANNELS


_KERNELS: dict[tuple[str, torch.dtype], Any] = {}


def _kernel(name: str, dtype: torch.dtype):
    fn = _KERNELS.get((name, dtype))
    if fn is None:
        suffix = SUFFIXES[str(dtype).removeprefix("torch.")]
        fn = _KERNELS[name, dtype] = getattr(library(), f"{name}_{suffix}")
    return fn


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _call(name: str, dtype: torch.dtype, *args: Any) -> None:
    code = _kernel(name, dtype)(*args, torch.get_num_threads())
    if code != 0:
        raise RuntimeError(
            f"deltalearn CPU kernel {name} failed (code {code}: 1 = value axis too "
            "long, 2 = out of memory, 3 = a gradient buffer missing)"
        )


def _forward_buffers(X, h, C, saved: bool, keep_v: bool):
    """`(rows, d, dv, (Y, x_next, rho, beta, e, v))` for a forward kernel: the outputs (x_next
    None without C) and, where `saved`, the row scalars backward reads — ρ and β one a row, e (and
    v where `keep_v`) shaped as the value pre-activation p, `(...)` or `(..., dv)`."""
    d = h.shape[-1]
    rows = h.numel() // d
    dv = X.numel() // h.numel()
    Y = torch.empty_like(X)
    x_next = torch.empty_like(h) if C is not None else None
    rho = beta = e = v = None
    if saved:
        lead = h.shape[:-1]
        rho, beta = new_empty(lead, h.dtype, h.device), new_empty(lead, h.dtype, h.device)
        e = new_empty(lead if X.dim() == h.dim() else (*lead, dv), h.dtype, h.device)
        v = torch.empty_like(e) if keep_v else None
    return rows, d, dv, (Y, x_next, rho, beta, e, v)


def _epilogue_forward(
    X, h, z, p, C, delta: bool, official: bool, scale: float, eps: float, saved: bool = True
):
    """Run the forward kernel on contiguous inputs; return (Y, x_next or None, rho, beta, e, v),
    the last four (what backward needs) None unless `saved`."""
    rows, d, dv, (Y, x_next, rho, beta, e, v) = _forward_buffers(X, h, C, saved, keep_v=saved)
    _call(
        "epilogue_forward", X.dtype, rows, d, dv, _ptr(X), _ptr(h), _ptr(z), _ptr(p), _ptr(C),
        int(delta), int(official), float(scale), float(eps),
        _ptr(Y), _ptr(x_next), _ptr(rho), _ptr(beta), _ptr(e), _ptr(v),
    )  # fmt: skip
    return Y, x_next, rho, beta, e, v


class _NativeEpilogue(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, X, h, z, p, C, rule: str, value_head: str, value_scale: float, k_eps):
        delta, official = rule == "delta", value_head == "official"
        Y, x_next, rho, beta, e, v = _epilogue_forward(
            X, h, z, p, C, delta, official, value_scale, k_eps
        )
        tape = state_tape.active()
        if tape is not None:  # before saving: Y is then a state the tape knows
            tape.link(X, Y, h, rho, beta, e)
        ctx.save_for_backward(
            X if delta else None, h, rho, beta, e, v, C, Y if C is not None else None
        )
        ctx.options = (delta, official, value_scale)
        return Y if C is None else (Y, x_next)

    @staticmethod
    @once_differentiable  # backward uses saved tensors only
    def backward(ctx: Any, GY: torch.Tensor, g_next: torch.Tensor | None = None):
        X, h, rho, beta, e, v, C, Y = ctx.saved_tensors
        delta, official, scale = ctx.options
        GY = GY.contiguous()
        g_next = None if g_next is None else g_next.contiguous()
        need_X, need_C = ctx.needs_input_grad[0], ctx.needs_input_grad[4]
        d = h.shape[-1]
        rows, dv = h.numel() // d, GY.numel() // h.numel()
        # Write-only without a read: ∂X is G itself, no kernel write needed.
        direct = not delta and C is None
        gX = None if direct else torch.empty_like(GY)  # written whenever it is not G itself
        gh, gz, gp = torch.empty_like(h), torch.empty_like(rho), torch.empty_like(e)
        gC = torch.empty_like(C) if C is not None and need_C else None
        _call(
            "epilogue_backward", GY.dtype, rows, d, dv, _ptr(GY), _ptr(g_next), _ptr(C), _ptr(Y),
            _ptr(X), _ptr(h), _ptr(rho), _ptr(beta), _ptr(e), _ptr(v),
            int(delta), int(official), float(scale), _ptr(gX), _ptr(gh), _ptr(gz), _ptr(gp),
            _ptr(gC),
        )  # fmt: skip
        if direct:
            gX = GY
        return (gX if need_X else None), gh, gz, gp, gC, None, None, None, None


def rewrite_epilogue_native(X, h, z, p, compress, rule, value_head, value_scale, k_eps):
    """`rewrite_epilogue` on the C kernels (inputs checked, on CPU, of one dtype in
    `NATIVE_DTYPES`): Y, or `(Y, x_next)` with `compress`."""
    X, h, z, p = X.contiguous(), h.contiguous(), z.contiguous(), p.contiguous()
    C = None if compress is None else compress.contiguous()
    inputs = (X, h, z, p) if C is None else (X, h, z, p, C)
    if torch.is_grad_enabled() and any(t.requires_grad for t in inputs):
        return no_graph.apply_direct(
            _NativeEpilogue, X, h, z, p, C, rule, value_head, value_scale, k_eps
        )
    delta, official = rule == "delta", value_head == "official"
    Y, x_next, *_ = _epilogue_forward(X, h, z, p, C, delta, official, value_scale, k_eps, False)
    return Y if C is None else (Y, x_next)


class _NativeUpdate(torch.autograd.Function):
    """A whole DDL update in training, `DeltaUpdate.forward` on the C kernels: the linear gate's
    logit and the value head's pre-activation from (c, u) and the weights, then the rewrite
    epilogue — one autograd node and one kernel each way, where the projections alone were a
    Function of four or five products with row-sized temporaries (one update forward + backward
    1.1–1.6× faster, `benchmarks/update_kernel.py`). Saved: what `_NativeEpilogue` keeps (v for
    the official head only) and c, u (official head), w_g, W_v."""

    @staticmethod
    def forward(ctx: Any, X, h, c, u, w_g, b_g, W_v, b_v, C, delta: bool, official: bool,
                scale: float, eps: float):  # fmt: skip
        Y, x_next, rho, beta, e, v = _update_forward(
            X, h, c, u, w_g, b_g, W_v, b_v, C, delta, official, scale, eps, saved=True
        )
        X_in = X
        tape = state_tape.active()
        ctx.rebuild = None
        if tape is not None:  # before saving: Y is then a state the tape knows
            tape.link(X, Y, h, rho, beta, e)
            slot = tape.deferred(X) if delta else None
            if slot is not None:  # backward rebuilds X from Y itself (`StateTape.claim`)
                ctx.rebuild, X = (tape, slot), None
        # u is the state itself for a vector state's official head: the kernel reads the X it reads
        # or rebuilds (not a copy of it kept, nor a rebuild pass of its own before the backward)
        # and adds u's gradient to X's (not one of its own for autograd to sum).
        u_is_x = delta and official and u is X_in
        ctx.save_for_backward(
            X if delta else None, h, c, u if official and not u_is_x else None, w_g, W_v, rho,
            beta, e, v, C, Y if C is not None else None,
        )  # fmt: skip
        ctx.options = (delta, official, scale, b_v is not None, u_is_x)
        return Y if C is None else (Y, x_next)

    @staticmethod
    @once_differentiable  # backward uses saved tensors only
    def backward(ctx: Any, GY: torch.Tensor, g_next: torch.Tensor | None = None):
        X, h, c, u, w_g, W_v, rho, beta, e, v, C, Y = ctx.saved_tensors
        delta, official, scale, value_bias, u_is_x = ctx.options
        X_out = None
        if ctx.rebuild is not None:  # X kept already (rebuilt for another reader), or rebuilt here
            tape, slot = ctx.rebuild
            X, rebuild = tape.claim(slot)
            if rebuild is not None:
                Y, *_, X_out = rebuild  # the row scalars are those saved here
        need = ctx.needs_input_grad  # X, h, c, u, w_g, b_g, W_v, b_v, C
        GY = GY.contiguous()
        g_next = None if g_next is None else g_next.contiguous()
        d = h.shape[-1]
        rows, dv = h.numel() // d, GY.numel() // h.numel()
        direct = not delta and C is None  # write-only without a read: ∂X is G itself

        def grad(i: int, like: torch.Tensor | None, shape=None) -> torch.Tensor | None:
            if not need[i] or like is None:
                return None
            return new_empty(like.shape if shape is None else shape, like.dtype, like.device)

        gX = None if direct else torch.empty_like(GY)
        gh = torch.empty_like(h)
        gc, gu = grad(2, c), grad(3, u)
        gw_g, gb_g, gW_v = grad(4, w_g), grad(5, w_g, (1,)), grad(6, W_v)
        gb_v = grad(7, W_v, (dv,)) if value_bias else None
        gC = grad(8, C)
        _call(
            "update_backward", GY.dtype, rows, d, dv, _ptr(GY), _ptr(g_next), _ptr(C), _ptr(Y),
            _ptr(X), _ptr(h), _ptr(c), _ptr(u), _ptr(w_g), _ptr(W_v), _ptr(rho), _ptr(beta),
            _ptr(e), _ptr(v), int(delta), int(official), float(scale), _ptr(gX), _ptr(gh),
            _ptr(gc), _ptr(gu), _ptr(gw_g), _ptr(gb_g), _ptr(gW_v), _ptr(gb_v), _ptr(gC),
            _ptr(X_out), int(u_is_x),
        )  # fmt: skip
        if X_out is not None:
            tape.rebuilt(slot, X_out)
        if direct:
            gX = GY
        return (
            gX if need[0] else None, gh, gc, gu, gw_g, gb_g, gW_v, gb_v, gC,
            None, None, None, None,
        )  # fmt: skip


def _update_forward(X, h, c, u, w_g, b_g, W_v, b_v, C, delta, official, scale, eps, saved: bool):
    """Run `update_forward_saved` on contiguous inputs; return (Y, x_next or None, rho, beta, e,
    v), the last four None unless `saved`, and v None for the paper head too (backward reads v
    for the official head's squash only)."""
    keep_v = saved and official
    rows, d, dv, (Y, x_next, rho, beta, e, v) = _forward_buffers(X, h, C, saved, keep_v)
    _call(
        "update_forward_saved", X.dtype, rows, d, dv, _ptr(X), _ptr(h), _ptr(c), _ptr(u),
        _ptr(w_g), _ptr(b_g), _ptr(W_v), _ptr(b_v), _ptr(C), int(delta), int(official),
        float(scale), float(eps), _ptr(Y), _ptr(x_next), _ptr(rho), _ptr(beta), _ptr(e), _ptr(v),
    )  # fmt: skip
    return Y, x_next, rho, beta, e, v


def update_native(X, h, c, u, w_g, b_g, W_v, b_v, compress, rule, value_head, value_scale, k_eps):
    """`DeltaUpdate.forward` with the linear gate on the C kernels: the projections
    `z = c·w_g + b_g`, `p = x W_vᵀ (+ b_v)` (x = c for the "paper" value head, u for "official")
    and the rewrite epilogue of `rewrite_epilogue` from them. Operands checked by the caller: CPU,
    one dtype in `NATIVE_DTYPES`; X `(..., d)` or `(..., d, dv)`, h, c, u `(..., d)`, w_g `(1, d)`,
    b_g `(1,)`, W_v `(dv, d)`, b_v `(dv,)` or None, compress `(d, dv)` or None. Y, or
    `(Y, x_next)` with `compress`."""
    X, h, c, u = X.contiguous(), h.contiguous(), c.contiguous(), u.contiguous()
    w_g, b_g, W_v = w_g.contiguous(), b_g.contiguous(), W_v.contiguous()
    b_v = None if b_v is None else b_v.contiguous()
    C = None if compress is None else compress.contiguous()
    delta, official = rule == "delta", value_head == "official"
    inputs = (X, h, c, u, w_g, b_g, W_v, b_v, C)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        args = (_NativeUpdate, *inputs, delta, official, value_scale, k_eps)
        tape = state_tape.active() if delta else None
        # With a compressor read the update saves Y, a state; u only for the official head, and
        # not where it is X (read from the rebuilt state).
        saved = (h, c, u) if official and u is not X else (h, c)
        if tape is not None and C is None and tape.saves_no_state(X, saved):
            return state_tape.without_hooks(tape, no_graph.apply_direct, *args)
        return no_graph.apply_direct(*args)
    Y, x_next, *_ = _update_forward(*inputs, delta, official, value_scale, k_eps, saved=False)
    return Y if C is None else (Y, x_next)


def rebuild_state(Y: torch.Tensor, h, rho, beta, e, out: torch.Tensor | None = None):
    """`Y − (β ρ h) eᵀ` (`ops.state_tape`) on the C kernel: contiguous CPU operands of Y's dtype
    in `NATIVE_DTYPES`; Y `(..., d)` or `(..., d, dv)`, h `(..., d)`, ρ and β `(...)`, e `(...)`
    or `(..., dv)`; written into `out` (contiguous, Y's shape) where given."""
    d = h.shape[-1]
    X = torch.empty_like(Y) if out is None else out
    _call(
        "state_rebuild", Y.dtype, h.numel() // d, d, Y.numel() // h.numel(), _ptr(Y), _ptr(h),
        _ptr(rho), _ptr(beta), _ptr(e), _ptr(X),
    )  # fmt: skip
    return X


def _as_read(xs: torch.Tensor, W: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """(states, taps, B, S): states `(B, S, d, dv)` in memory, taps `(K, d, dv)`. A channel read
    (W `(d, dv)`) is one tap over every row as one sequence."""
    if W.dim() == 2:
        xs = xs.contiguous()
        return xs, W.contiguous(), 1, xs.numel() // W.numel()
    return xs.contiguous(), W.permute(2, 0, 1).contiguous(), xs.shape[0], xs.shape[1]


def _read_forward(xs, taps, B: int, S: int, past: int, out_shape) -> torch.Tensor:
    K, d, dv = (1, *taps.shape) if taps.dim() == 2 else taps.shape
    out = new_empty(out_shape, xs.dtype, xs.device)
    _call("read_forward", xs.dtype, B, S, past, d, dv, K, _ptr(xs), _ptr(taps), _ptr(out))
    return out


def _read_shape(xs: torch.Tensor, W: torch.Tensor, past: int) -> tuple[int, ...]:
    if W.dim() == 2:
        return tuple(xs.shape[:-1])
    return (xs.shape[0], xs.shape[1] - past, xs.shape[2])


class _NativeRead(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, xs: torch.Tensor, W: torch.Tensor, past: int) -> torch.Tensor:
        states, taps, B, S = _as_read(xs, W)
        ctx.save_for_backward(states, taps)
        ctx.layout = (B, S, past, xs.shape, W.dim() == 2)
        return _read_forward(states, taps, B, S, past, _read_shape(xs, W, past))

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, G: torch.Tensor):
        states, taps = ctx.saved_tensors
        B, S, past, xs_shape, channel = ctx.layout
        need_xs, need_W = ctx.needs_input_grad[:2]
        K, d, dv = (1, *taps.shape) if channel else taps.shape
        gxs = torch.empty_like(states) if need_xs else None
        gtaps = torch.empty_like(taps) if need_W else None
        _call(
            "read_backward", G.dtype, B, S, past, d, dv, K, _ptr(states), _ptr(taps),
            _ptr(G.contiguous()), _ptr(gxs), _ptr(gtaps),
        )  # fmt: skip
        gW = gtaps if gtaps is None or channel else gtaps.permute(1, 2, 0)
        return (None if gxs is None else gxs.reshape(xs_shape)), gW, None


def value_read_native(xs: torch.Tensor, W: torch.Tensor, past: int = 0) -> torch.Tensor:
    """A compressor read on the C kernels: the channel read (`W` `(d, dv)`, `xs` `(..., d, dv)`
    -> `(..., d)`) or the token read (`W` `(d, dv, K)`, `xs` `(B, past + T, d, dv)` ->
    `(B, T, d)`), inputs checked, on CPU, of one dtype in `NATIVE_DTYPES`."""
    if torch.is_grad_enabled() and (xs.requires_grad or W.requires_grad):
        return no_graph.apply_direct(_NativeRead, xs, W, past)
    states, taps, B, S = _as_read(xs, W)
    return _read_forward(states, taps, B, S, past, _read_shape(xs, W, past))


def expansion_taps(weight: torch.Tensor, d: int) -> torch.Tensor:
    """The EC conv `weight` `(d·dv, 1, K)` as the kernels read it: `(K, d, dv)`, contiguous."""
    K = weight.shape[-1]
    return weight.reshape(d, weight.shape[0] // d, K).permute(2, 0, 1).contiguous()


def _expand_forward(xs: torch.Tensor, weight: torch.Tensor, past: int):
    """(out, xs, taps): the expansion of contiguous `xs`, with the inputs backward keeps."""
    B, S, d = xs.shape
    xs = xs.contiguous()
    taps = expansion_taps(weight, d)
    K, _, dv = taps.shape
    out = torch.empty(B, S - past, d, dv, dtype=xs.dtype)
    _call("expand_forward", xs.dtype, B, S, past, d, dv, K, _ptr(xs), _ptr(taps), _ptr(out))
    return out, xs, taps


class _NativeExpand(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, xs: torch.Tensor, weight: torch.Tensor, past: int) -> torch.Tensor:
        out, xs, taps = _expand_forward(xs, weight, past)
        ctx.save_for_backward(xs, taps)
        ctx.past = past
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, G: torch.Tensor):
        xs, taps = ctx.saved_tensors
        need_xs, need_weight = ctx.needs_input_grad[:2]
        (B, S, d), (K, _, dv) = xs.shape, taps.shape
        gxs = torch.empty_like(xs) if need_xs else None
        gtaps = torch.empty_like(taps) if need_weight else None
        _call(
            "expand_backward", G.dtype, B, S, ctx.past, d, dv, K, _ptr(xs), _ptr(taps),
            _ptr(G.contiguous()), _ptr(gxs), _ptr(gtaps),
        )  # fmt: skip
        gweight = None if gtaps is None else gtaps.permute(1, 2, 0).reshape(d * dv, 1, K)
        return gxs, gweight, None


def expand_native(xs: torch.Tensor, weight: torch.Tensor, past: int) -> torch.Tensor:
    """The EC expansion on the C kernels: `xs` `(B, past + T, d)` (`past` earlier inputs, then the
    T new ones), `weight` `(d·dv, 1, K)` in `nn.Conv1d` layout (tap K − 1 meets the current token)
    -> `(B, T, d, dv)`, token-major; `out[b, t, i, j] = Σ_τ w[i·dv + j, τ] xs[b, past + t − (K − 1
    − τ), i]`. Operands on CPU, of one dtype in `NATIVE_DTYPES`."""
    if torch.is_grad_enabled() and (xs.requires_grad or weight.requires_grad):
        return no_graph.apply_direct(_NativeExpand, xs, weight, past)
    return _expand_forward(xs, weight, past)[0]
