"""The Triton kernels of DDL's rewrite and compressor reads inside a compiled graph, as custom ops
Inductor calls as they are.

Under `torch.compile` the rewrite and the reads are otherwise traced into plain ops
(`ops/traced_epilogue.py`, `token_mixing.token_mix_traced`, the PyTorch Functions) that Inductor
writes its own Triton code for. Measured on an H200 (`small`, bf16, 8 × 1024, torch 2.11,
2026-11-30): compiled, ddl trains at 0.80×, ddl-cc at 0.54× and ddl-tc at 0.43× the compiled
baseline; eager, the GPU time of a step (the hand-written kernels) gave 0.93 / 0.76 / 0.66× the
eager baseline's. `DELTALEARN_COMPILED_KERNELS=on` (or `COMPILED_KERNELS` below) puts the
hand-written kernels in the compiled graph instead: `deltalearn::rewrite_forward` /
`rewrite_backward` (`ops.triton_epilogue`'s `_RewriteEpilogue`) and `deltalearn::read_forward` /
`read_backward` (`ops.triton_mixing`'s `_ValueRead`: the TC token reads and the CC channel reads
not fused into a rewrite), opaque to Inductor, which fuses around them; each backward is its
forward's registered autograd formula. Off by default until a GPU run has compared the two
(`benchmarks/gpu_check.sh`, stage `compiledkernels`).

The ops launch what the eager Functions launch and save what they save (the rewrite: X, h, z, p,
C; a read: its input and weights), with no state tape (a compiled DeltaLM records none). With
DELTALEARN_COMPILED_REBUILD=on as well, a compiled DeltaLM's delta rewrites take
`chained_rewrite_forward` / `chained_rewrite_backward` instead, on its state chain
(`ops/state_chain.py`): they keep the row scalars X is rebuilt from, not X, and the backward
kernel rebuilds X from Y, which the chain hands it as a gradient. On CUDA
tensors in the kernels' dtypes; on CPU tensors only under Triton's interpreter
(TRITON_INTERPRET=1), which is how the tests run them.
"""

from __future__ import annotations

import os

import torch

from deltalearn.ops import backend
from deltalearn.ops.no_graph import NoGraph
from deltalearn.ops.switches import switched_on

# Module-level override of DELTALEARN_COMPILED_KERNELS (None: read the environment at each trace).
COMPILED_KERNELS: str | None = None


def enabled() -> bool:
    """Whether a compiled graph calls the Triton rewrite and read kernels (`COMPILED_KERNELS`,
    else DELTALEARN_COMPILED_KERNELS: "on" or "off", the default)."""
    return switched_on(
        COMPILED_KERNELS,
        "DELTALEARN_COMPILED_KERNELS",
        "deltalearn.ops.compiled_kernels.COMPILED_KERNELS",
        "Triton kernels in compiled graphs",
        default="off",
    )


def applies(tensors: list[torch.Tensor], choice: str) -> bool:
    """Whether an op on `tensors` (a rewrite's X, h, z, p and C, a read's state and weights) takes
    the custom ops now: being compiled, switched on, the backend "auto" or "triton", triton
    installed, every operand on one device in a kernel dtype, that device CUDA (or a CPU under
    Triton's interpreter)."""
    if not torch.compiler.is_compiling() or choice not in ("auto", "triton") or not enabled():
        return False
    first = tensors[0]
    on_device = first.is_cuda or (first.is_cpu and os.environ.get("TRITON_INTERPRET") == "1")
    return (
        on_device
        and all(t.device == first.device and t.dtype in backend.KERNEL_DTYPES for t in tensors)
        and _triton_installed()
    )


@torch.compiler.assume_constant_result  # asked while tracing: a constant, not traced into
def _triton_installed() -> bool:
    return backend.triton_available()


def _kernels():
    from deltalearn.ops import triton_epilogue  # imports triton: only where a kernel runs

    return triton_epilogue


@torch.library.custom_op("deltalearn::rewrite_forward", mutates_args=())
def rewrite_forward(
    X: torch.Tensor,
    h: torch.Tensor,
    z: torch.Tensor,
    p: torch.Tensor,
    C: torch.Tensor | None,
    delta: bool,
    official: bool,
    value_scale: float,
    k_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(Y, x_next)` of the forward kernel; x_next empty without C (an op returns tensors)."""
    out, _ = _kernels()._forward(
        NoGraph(), X, h, z, p, C, delta, official, value_scale, k_eps, taped=False
    )
    return out if C is not None else (out, X.new_empty(0))


def _rewrite_outputs(X, h, C) -> tuple[torch.Tensor, torch.Tensor]:
    """Fakes of a rewrite's `(Y, x_next)`."""
    Y = X.new_empty(X.shape)
    if C is None:
        return Y, X.new_empty(0)
    return Y, X.new_empty(h.shape, dtype=torch.promote_types(X.dtype, C.dtype))


@rewrite_forward.register_fake
def _(X, h, z, p, C, delta, official, value_scale, k_eps):
    return _rewrite_outputs(X, h, C)


@torch.library.custom_op("deltalearn::rewrite_backward", mutates_args=())
def rewrite_backward(
    X: torch.Tensor,
    h: torch.Tensor,
    z: torch.Tensor,
    p: torch.Tensor,
    C: torch.Tensor | None,
    grad_Y: torch.Tensor | None,
    grad_next: torch.Tensor | None,
    delta: bool,
    official: bool,
    value_scale: float,
    k_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(∂X, ∂h, ∂z, ∂p, ∂C)` of the backward kernel (∂C empty without C)."""
    kernels = _kernels()
    ctx = NoGraph()  # what the forward left on its context, from its inputs
    rows = kernels.rows_on_context(ctx, X, h, z, p, delta, official, value_scale, k_eps)
    saved = [*rows, C]
    need = (True, True, True, True, C is not None)
    gX, gh, gz, gp, gC = kernels._backward(ctx, saved, (grad_Y, grad_next), need)
    if gX is None:  # no gradient reached either output
        gX, gh, gz, gp = (torch.zeros_like(t) for t in (X, h, z, p))
        gC = None if C is None else torch.zeros_like(C)
    if gX is grad_Y or not gX.is_contiguous():  # write-only, no read: ∂X is G (or its zeros)
        gX = gX.clone(memory_format=torch.contiguous_format)  # an op returns its own, as faked
    return gX, gh, gz, gp, (X.new_empty(0) if gC is None else gC)


@rewrite_backward.register_fake
def _(X, h, z, p, C, grad_Y, grad_next, delta, official, value_scale, k_eps):
    gC = X.new_empty(0) if C is None else C.new_empty(C.shape)
    return (*(t.new_empty(t.shape) for t in (X, h, z, p)), gC)


def _setup_context(ctx, inputs, output) -> None:
    X, h, z, p, C, delta, official, value_scale, k_eps = inputs
    ctx.save_for_backward(X, h, z, p, C)
    ctx.options = delta, official, value_scale, k_eps


def _backward(ctx, grad_Y, grad_next):
    X, h, z, p, C = ctx.saved_tensors
    grad_next = grad_next if C is not None else None
    gX, gh, gz, gp, gC = rewrite_backward(X, h, z, p, C, grad_Y, grad_next, *ctx.options)
    return gX, gh, gz, gp, (gC if C is not None else None), None, None, None, None


rewrite_forward.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("deltalearn::chained_rewrite_forward", mutates_args=())
def chained_rewrite_forward(
    X: torch.Tensor,
    h: torch.Tensor,
    z: torch.Tensor,
    p: torch.Tensor,
    C: torch.Tensor | None,
    official: bool,
    value_scale: float,
    k_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The delta rewrite on a state chain (`ops.state_chain`): `(Y, x_next, ρ, β, e)`, the forward
    kernel's output (x_next empty without C) and the fp32 row scalars X is rebuilt from."""
    ctx = NoGraph()
    out, _ = _kernels()._forward(
        ctx, X, h, z, p, C, True, official, value_scale, k_eps, taped=False, keep_rows=True
    )
    Y, x_next = out if C is not None else (out, X.new_empty(0))
    return (Y, x_next, *ctx.row_scalars)


@chained_rewrite_forward.register_fake
def _(X, h, z, p, C, official, value_scale, k_eps):
    Y, x_next = _rewrite_outputs(X, h, C)
    rho = z.new_empty(z.shape, dtype=torch.float32)
    e_shape = z.shape if X.dim() == h.dim() else p.shape
    return Y, x_next, rho, torch.empty_like(rho), p.new_empty(e_shape, dtype=torch.float32)


@torch.library.custom_op("deltalearn::chained_rewrite_backward", mutates_args=())
def chained_rewrite_backward(
    Y: torch.Tensor,
    h: torch.Tensor,
    z: torch.Tensor,
    p: torch.Tensor,
    C: torch.Tensor | None,
    rho: torch.Tensor,
    beta: torch.Tensor,
    e: torch.Tensor,
    grad_Y: torch.Tensor | None,
    grad_next: torch.Tensor | None,
    official: bool,
    value_scale: float,
    k_eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(∂X, ∂h, ∂z, ∂p, ∂C, X)` of `chained_rewrite_forward` from its output Y and row scalars:
    the backward kernel rebuilds X (returned last, for the op before on the chain) as it forms the
    gradients (∂C empty without C)."""
    kernels = _kernels()
    ctx = NoGraph()
    Y = Y.contiguous()  # the rebuilt X is written in Y's layout
    _, h, z, p = kernels.rows_on_context(ctx, Y, h, z, p, True, official, value_scale, k_eps)
    if grad_Y is None:  # the rebuilt X is still due: a zero gradient, not none
        grad_Y = Y.new_zeros(()).expand(Y.shape)
    X = torch.empty_like(Y)
    need = (True, True, True, True, C is not None)
    rebuild = (Y, rho.contiguous(), beta.contiguous(), e.contiguous(), X)
    gX, gh, gz, gp, gC = kernels._backward(
        ctx, [None, h, z, p, C], (grad_Y, grad_next), need, rebuild=rebuild
    )
    return gX, gh, gz, gp, (Y.new_empty(0) if gC is None else gC), X


@chained_rewrite_backward.register_fake
def _(Y, h, z, p, C, rho, beta, e, grad_Y, grad_next, official, value_scale, k_eps):
    gC = Y.new_empty(0) if C is None else C.new_empty(C.shape)
    return (*(t.new_empty(t.shape) for t in (Y, h, z, p)), gC, Y.new_empty(Y.shape))


def _mixing():
    from deltalearn.ops import triton_mixing  # imports triton: only where a kernel runs

    return triton_mixing


@torch.library.custom_op("deltalearn::read_forward", mutates_args=())
def read_forward(xs: torch.Tensor, W: torch.Tensor, past: int) -> torch.Tensor:
    """The compressor read's forward kernel (`ops.triton_mixing.read_forward`)."""
    return _mixing().read_forward(xs, W, past)[0]


@read_forward.register_fake
def _(xs, W, past):
    channel = W.dim() == 2
    shape = xs.shape[:-1] if channel else (xs.shape[0], xs.shape[1] - past, xs.shape[2])
    return xs.new_empty(shape, dtype=torch.promote_types(xs.dtype, W.dtype))


@torch.library.custom_op("deltalearn::read_backward", mutates_args=())
def read_backward(
    xs: torch.Tensor, W: torch.Tensor, grad: torch.Tensor, past: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """`(∂xs, ∂W)` of the read's backward kernel."""
    mixing = _mixing()
    saved = mixing._as_sequence(xs, W)
    return mixing.read_backward(saved, grad, past, (xs.shape, W.shape), True, True)


@read_backward.register_fake
def _(xs, W, grad, past):
    return xs.new_empty(xs.shape), W.new_empty(W.shape)


def _setup_read_context(ctx, inputs, output) -> None:
    xs, W, past = inputs
    ctx.save_for_backward(xs, W)
    ctx.past = past


def _read_backward(ctx, grad):
    xs, W = ctx.saved_tensors
    return *read_backward(xs, W, grad, ctx.past), None


read_forward.register_autograd(_read_backward, setup_context=_setup_read_context)


def value_read(xs: torch.Tensor, W: torch.Tensor, past: int = 0) -> torch.Tensor:
    """`ops.triton_mixing.value_read_triton`'s result (inputs already validated) through the
    custom ops: a token read (W `(d, dv, K)`) or a channel read (W `(d, dv)`)."""
    return read_forward(xs, W, past)


def rewrite(
    X: torch.Tensor,
    h: torch.Tensor,
    z: torch.Tensor,
    p: torch.Tensor,
    compress: torch.Tensor | None,
    *,
    rule: str,
    value_head: str,
    value_scale: float,
    k_eps: float,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """`rewrite_epilogue`'s result (inputs already validated) through the custom ops: Y, or
    `(Y, x_next)` with `compress`."""
    Y, x_next = rewrite_forward(
        X, h, z, p, compress, rule == "delta", value_head == "official", float(value_scale),
        float(k_eps),
    )  # fmt: skip
    return Y if compress is None else (Y, x_next)
