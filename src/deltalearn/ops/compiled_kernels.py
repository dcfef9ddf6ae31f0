"""The Triton rewrite kernels inside a compiled graph, as two custom ops Inductor calls as they are.

Under `torch.compile` the rewrite is otherwise traced into plain ops (`ops/traced_epilogue.py`, and
the PyTorch Function of a vector state) that Inductor writes its own Triton code for. Measured on
an H200 (`small`, bf16, 8 × 1024, torch 2.11, 2026-11-30): compiled, ddl trains at 0.80×, ddl-cc
at 0.55× and ddl-tc at 0.43× the compiled baseline; eager, the GPU time of a step (the hand-written
kernels) gave 0.93 / 0.76 / 0.66× the eager baseline's. `DELTALEARN_COMPILED_KERNELS=on` (or
`COMPILED_KERNELS` below) puts the hand-written kernels in the compiled graph instead:
`deltalearn::rewrite_forward` and `deltalearn::rewrite_backward`, opaque to Inductor (which fuses
around them), their backward registered as the op's autograd formula. Off by default until a GPU
run has compared the two (`benchmarks/gpu_check.sh`, stage `compiledkernels`).

What the ops do is `ops.triton_epilogue`'s `_RewriteEpilogue`: the same launches, the same saved
tensors (X, h, z, p, C), no state tape (a compiled DeltaLM records none). On CUDA tensors in the
kernels' dtypes; on CPU tensors only under Triton's interpreter (TRITON_INTERPRET=1), which is
how the tests run them.
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
    """Whether a compiled graph calls the Triton rewrite kernels (`COMPILED_KERNELS`, else
    DELTALEARN_COMPILED_KERNELS: "on" or "off", the default)."""
    return switched_on(
        COMPILED_KERNELS,
        "DELTALEARN_COMPILED_KERNELS",
        "deltalearn.ops.compiled_kernels.COMPILED_KERNELS",
        "Triton kernels in compiled graphs",
        default="off",
    )


def applies(tensors: list[torch.Tensor], choice: str) -> bool:
    """Whether the rewrite of `tensors` (X, h, z, p and C, if any) takes the custom ops now: being
    compiled, switched on, the backend "auto" or "triton", triton installed, every operand on one
    device in a kernel dtype, that device CUDA (or a CPU under Triton's interpreter)."""
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
    out, _ = _kernels()._forward(NoGraph(), X, h, z, p, C, delta, official, value_scale, k_eps)
    return out if C is not None else (out, X.new_empty(0))


@rewrite_forward.register_fake
def _(X, h, z, p, C, delta, official, value_scale, k_eps):
    Y = X.new_empty(X.shape)
    if C is None:
        return Y, X.new_empty(0)
    return Y, X.new_empty(h.shape, dtype=torch.promote_types(X.dtype, C.dtype))


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
    ctx = NoGraph()
    # What the forward left on its context, from its inputs: their shapes and the rows' strides.
    d = h.shape[-1]
    n_rows = h.numel() // d
    dv = X.shape[-1] if X.dim() == h.dim() + 1 else 1
    ctx.shapes = X.shape, h.shape, z.shape, p.shape
    rows = [
        kernels._flat(X, n_rows, d, dv), kernels._flat(h, n_rows, d),
        kernels._flat(z, n_rows), kernels._flat(p, n_rows, dv),
    ]  # fmt: skip
    ctx.rows = (n_rows, d, dv), tuple(stride for _, stride in rows)
    ctx.delta, ctx.official, ctx.value_scale, ctx.k_eps = delta, official, value_scale, k_eps
    saved = [t for t, _ in rows] + [C]
    need = (True, True, True, True, C is not None)
    gX, gh, gz, gp, gC = kernels._backward(ctx, saved, (grad_Y, grad_next), need)
    if gX is None:  # no gradient reached either output
        gX, gh, gz, gp = (torch.zeros_like(t) for t in (X, h, z, p))
        gC = None if C is None else torch.zeros_like(C)
    if gX is grad_Y:  # write-only without a read: ∂X is G itself, which an op may not return
        gX = gX.clone()
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
