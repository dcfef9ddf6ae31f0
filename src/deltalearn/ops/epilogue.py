"""The rewrite epilogue of a DDL sublayer: from the sublayer's projections to the new state.

The sublayer's matmuls (branch output h, gate logit z, value pre-activation p) are done before it
(a `DeltaUpdate` with the linear gate hands z and p to the kernels instead: `ops/native.
update_native` on a CPU, `ops/triton_epilogue.update_triton` on CUDA compute them per row inside
the same kernel); what remains per row (token) is elementwise work plus three row reductions, all
of it fused here:

    k = h / sqrt(‖h‖² + ε²)          β = 2σ(z)          v = p  ("paper")  or  s·σ(p)  ("official")
    Y = X + β k (vᵀ − kᵀX)           rule="delta"
    Y = X + β k vᵀ                   rule="write_only"
    x_next[i] = Σ_j C[i, j] Y[i, j]  optional: the next sublayer's channel-compressor read

(the "rms" direction form of SPEC §3.1 is algebraically the L2 form above, so one epilogue serves
both). Shapes: X `(..., d)` (vector state) or `(..., d, dv)`; h `(..., d)`; z `(...)`; p `(...)`
for a vector state or `(..., dv)`; C `(d, dv)` (matrix state only).

`rewrite_epilogue` runs one Triton kernel (forward and backward, `ops/triton_epilogue.py`) for CUDA
tensors when triton is installed, one C kernel each way for fp32/float64 CPU tensors
(`ops/native.py`), else the same math in PyTorch ops as one autograd Function with a hand-written
backward (`ops/fused_epilogue.py`) — except under `torch.compile`, where a matrix state takes
plain ops written one value channel at a time, which Inductor fuses into one pass over the state
(`ops/traced_epilogue.py`). `rewrite_epilogue_reference` is the
plain composition every path is tested against. Which path runs: `ops/backend.py` (the
`DELTALEARN_EPILOGUE` environment variable: "auto", "triton", "native", "torch" or "reference",
the last switching every fast path off). With `DELTALEARN_COMPILED_KERNELS=on` a compiled graph
calls the Triton kernels as custom ops instead of tracing the rewrite (`ops/compiled_kernels.py`).
"""

from __future__ import annotations

import torch

from deltalearn.ops import backend, compiled_kernels, native
from deltalearn.ops._shapes import _fmt, accumulation_dtype
from deltalearn.ops.fused_epilogue import rewrite_epilogue_torch
from deltalearn.ops.mixing import channel_mix
from deltalearn.ops.reference import (
    delta_rewrite_reference,
    normalize_direction,
    write_only_reference,
)
from deltalearn.ops.state_chain import StateChain
from deltalearn.ops.switches import switched_on
from deltalearn.ops.traced_epilogue import rewrite_epilogue_traced

EPILOGUE_RULES = ("delta", "write_only")
EPILOGUE_VALUE_HEADS = ("paper", "official")
# Module-level override of DELTALEARN_FUSED_READ (None: read the environment on each call): whether
# DeltaLM hands a channel compressor's read of the state to the rewrite before it (`compress=`), so
# that the kernel (Triton on CUDA, C on a CPU) reads the row it has just written. "on" by default: on
# an H200 (small, bf16, 8 x 1024) it lifted ddl-cc from 0.45 to 0.48x the baseline's training
# throughput and from 0.40 to 0.44x its inference (benchmarks/results/h200_model_fusedread_*.json).
# Across blocks too (each MLP rewrite makes the next block's read, `DeltaLM._carried_reads`), but
# only where no hook can come between them: FSDP2's hooks keep a block's parameters sharded
# outside its own forward.
FUSED_READ: str | None = None


# Module-level override of DELTALEARN_UPDATE_KERNEL (None: read the environment on each call):
# whether a DeltaUpdate with the linear gate runs whole in one kernel each way, its gate and value
# projections formed inside the rewrite kernel (`ops.native.update_native` on a CPU in training,
# `ops.triton_epilogue.update_triton` on CUDA), or the projections first as their own autograd
# Function (`nn.generators.gate_and_value`), then the epilogue. "on" by default: one update on a
# CPU 1.1-1.6x faster (benchmarks/update_kernel.py), GPU host work a DDL step 5-10% less; its GPU
# time is for the device check's `updatekernel` stage (benchmarks/gpu_check.sh) to measure.
UPDATE_KERNEL: str | None = None


def update_kernel_enabled() -> bool:
    """Whether a `DeltaUpdate` forms its projections inside the rewrite kernel (`UPDATE_KERNEL`
    above, else DELTALEARN_UPDATE_KERNEL: "on", the default, or "off"). Inference on a CPU is one
    kernel call either way (`ops.prepared`, `ops.extension`)."""
    return switched_on(
        UPDATE_KERNEL,
        "DELTALEARN_UPDATE_KERNEL",
        "deltalearn.ops.epilogue.UPDATE_KERNEL",
        "whole-update kernel",
    )


# Module-level override of DELTALEARN_FUSED_TOKEN_READ (None: read the environment on each call):
# whether a DeltaLM with token compressors (ddl-tc) hands each next sublayer's read to the rewrite
# before it in training (`compress=` the read's taps `(d, dv, K)`), where the Triton update runs
# the read after its own kernel and takes the read's gradient into its backward kernel: no
# separate read Function, no sum of the state's two gradients (at `small`, 8 x 1024 a 100 MB
# state-sized addition a sublayer on the GPU), no read writing a state-sized gradient of its own.
# "on" by default, chosen without a GPU: 379 MB less memory traffic a sublayer at `small`, 8 x 1024
# (counted), 5.8% less of ddl-tc's extra host work a step (counted), the same step peak, and its
# backward kernel at 16 warps holds 64 warps an SM against the plain backward's 16. Timed on a
# GPU by benchmarks/gpu_check.sh, stage `tokenread`, which decides whether it stays.
FUSED_TOKEN_READ: str | None = None


def fused_token_read_enabled() -> bool:
    """Whether DeltaLM fuses each token-compressor read into the rewrite before it in training
    (`FUSED_TOKEN_READ` above, else DELTALEARN_FUSED_TOKEN_READ: "on", the default, or "off")."""
    return switched_on(
        FUSED_TOKEN_READ,
        "DELTALEARN_FUSED_TOKEN_READ",
        "deltalearn.ops.epilogue.FUSED_TOKEN_READ",
        "fused token read",
    )


def fused_read_enabled() -> bool:
    """Whether DeltaLM fuses each channel-compressor read into the rewrite before it (`FUSED_READ`
    above, else DELTALEARN_FUSED_READ: "on", the default, or "off")."""
    return switched_on(
        FUSED_READ,
        "DELTALEARN_FUSED_READ",
        "deltalearn.ops.epilogue.FUSED_READ",
        "fused compressor read",
    )


def check_epilogue_inputs(
    X: torch.Tensor,
    h: torch.Tensor,
    z: torch.Tensor,
    p: torch.Tensor,
    compress: torch.Tensor | None = None,
) -> bool:
    """Validate the operands of the epilogue; return True for a matrix state `(..., d, dv)`."""
    named = [("X", X), ("h", h), ("z", z), ("p", p)]
    if compress is not None:
        named.append(("compress", compress))
    for name, t in named:
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")
    if h.dim() == 0 or X.dim() == 0:
        raise ValueError(f"X and h need at least one axis (d); got X {_fmt(X)} and h {_fmt(h)}")
    lead, d = h.shape[:-1], h.shape[-1]
    if z.shape != lead:
        raise ValueError(
            f"gate logits z must have the leading shape of h {tuple(lead)}, got z {_fmt(z)} "
            f"(h {_fmt(h)})"
        )
    if X.shape == h.shape:
        matrix, dv = False, 1
        want_p = tuple(lead)
    elif X.dim() == h.dim() + 1 and X.shape[:-1] == h.shape:
        matrix, dv = True, X.shape[-1]
        want_p = (*tuple(lead), dv)
    else:
        raise ValueError(
            f"X {_fmt(X)} does not match h {_fmt(h)}: expected X of shape {_fmt(h)} (vector "
            f"state) or {(*tuple(lead), d, 'dv')} (matrix state)"
        )
    if p.shape != want_p:
        kind = "matrix" if matrix else "vector"
        raise ValueError(
            f"{kind} state X {_fmt(X)} needs value pre-activations p of shape {want_p}; "
            f"got p {_fmt(p)}"
        )
    if compress is not None:
        if not matrix:
            raise ValueError(
                f"compress reads a matrix state (..., d, dv); X {_fmt(X)} is a vector state"
            )
        if compress.shape != (d, dv):
            raise ValueError(
                f"compress must be the (d, dv) = {(d, dv)} mixing matrix of X {_fmt(X)}; "
                f"got compress {_fmt(compress)}"
            )
    return matrix


def _check_options(rule: str, value_head: str, k_eps: float) -> None:
    if rule not in EPILOGUE_RULES:
        raise ValueError(f"rule must be one of {list(EPILOGUE_RULES)}, got {rule!r}")
    if value_head not in EPILOGUE_VALUE_HEADS:
        raise ValueError(
            f"value_head must be one of {list(EPILOGUE_VALUE_HEADS)}, got {value_head!r}"
        )
    if k_eps < 0:
        raise ValueError(f"k_eps must be >= 0, got {k_eps}")


def epilogue_generators(
    h: torch.Tensor,
    z: torch.Tensor,
    p: torch.Tensor,
    *,
    value_head: str = "paper",
    value_scale: float = 4.0,
    k_eps: float = 1e-5,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`(k, β, v)` from `(h, z, p)`, in fp32 (float64 if any input is): shapes of h, z, p.

    The kernel keeps k and v in fp32 registers; computing them here in the same precision (not
    rounded to h's dtype first) keeps every path on the same numbers.
    """
    acc = accumulation_dtype(h, z, p)
    k = normalize_direction(h.to(acc), k_eps)
    beta = 2.0 * torch.sigmoid(z.to(acc))
    pf = p.to(acc)
    v = pf if value_head == "paper" else value_scale * torch.sigmoid(pf)
    return k, beta, v


def _one_token(X: torch.Tensor) -> bool:
    """Whether X `(B, T, d, dv)` holds one token a sequence (a decoding step), which keeps the
    Function's form under compile: a step of a few hundred elements costs its kernels, not its
    bytes, and the traced form's column-by-column reductions were more of them (a compiled `tiny`
    decode step on Inductor's CPU code: ddl-cc 136 kernels against 131, ddl-tc 148 against 132)."""
    return X.dim() >= 4 and X.shape[-3] == 1


def _compose(
    X, h, z, p, *, rule, value_head, value_scale, k_eps, compress, reference: bool, choice=None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    _check_options(rule, value_head, k_eps)
    matrix = check_epilogue_inputs(X, h, z, p, compress)
    operands = [X, h, z, p] + ([compress] if compress is not None else [])
    if not reference and native.fits(X, matrix) and backend.use_native(operands, choice):
        return native.rewrite_epilogue_native(
            X, h, z, p, compress, rule, value_head, value_scale, k_eps
        )
    if not reference and matrix and torch.compiler.is_compiling() and not _one_token(X):
        k, beta, v = epilogue_generators(
            h, z, p, value_head=value_head, value_scale=value_scale, k_eps=k_eps
        )
        return rewrite_epilogue_traced(X, k, beta, v, rule, compress)
    if not reference:
        Y = rewrite_epilogue_torch(X, h, z, p, rule, value_head, value_scale, k_eps)
        # The next read as ChannelCompressor takes it: its dtype and hand-written backward.
        return Y if compress is None else (Y, channel_mix(Y, compress))
    k, beta, v = epilogue_generators(
        h, z, p, value_head=value_head, value_scale=value_scale, k_eps=k_eps
    )
    op = delta_rewrite_reference if rule == "delta" else write_only_reference
    Y = op(X, k, beta, v)
    if compress is None:
        return Y
    acc = accumulation_dtype(Y, compress)
    x_next = (Y.to(acc) * compress.to(acc)).sum(-1)
    return Y, x_next.to(torch.promote_types(X.dtype, compress.dtype))


def rewrite_epilogue_reference(
    X: torch.Tensor,
    h: torch.Tensor,
    z: torch.Tensor,
    p: torch.Tensor,
    *,
    rule: str = "delta",
    value_head: str = "paper",
    value_scale: float = 4.0,
    k_eps: float = 1e-5,
    compress: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The epilogue as the spec composes it: `normalize_direction`, the gate and value squashes, then
    `delta_rewrite_reference` / `write_only_reference`. All reductions in fp32 (float64 stays).

    Args:
        X: state `(..., d)` or `(..., d, dv)`.
        h: raw direction (the branch output) `(..., d)`.
        z: gate logits `(...)`; β = 2σ(z).
        p: value pre-activation `(...)` (vector state) or `(..., dv)`.
        rule: "delta" or "write_only".
        value_head: "paper" (v = p) or "official" (v = value_scale·σ(p)).
        value_scale: the sigmoid scale s of the official value head.
        k_eps: ε of the direction normalisation.
        compress: optional `(d, dv)` mixing matrix C of the next channel compressor.
    Returns:
        Y, shape and dtype of X; with `compress`, the pair `(Y, x_next)`: x_next `(..., d)`,
        `x_next[i] = Σ_j C[i, j] Y[i, j]` read from Y as rounded to X's dtype, in the dtype
        `ChannelCompressor` returns (X's promoted with C's: fp32 for a bf16 state and fp32 C).
    """
    return _compose(
        X,
        h,
        z,
        p,
        rule=rule,
        value_head=value_head,
        value_scale=value_scale,
        k_eps=k_eps,
        compress=compress,
        reference=True,
    )


def rewrite_epilogue(
    X: torch.Tensor,
    h: torch.Tensor,
    z: torch.Tensor,
    p: torch.Tensor,
    *,
    rule: str = "delta",
    value_head: str = "paper",
    value_scale: float = 4.0,
    k_eps: float = 1e-5,
    compress: torch.Tensor | None = None,
    chain: StateChain | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The fused epilogue: arguments, shapes and result as `rewrite_epilogue_reference`.

    One Triton kernel per direction (forward and backward) on CUDA; elsewhere one autograd Function
    in PyTorch ops with a hand-written backward (`ops/fused_epilogue.py`). `chain`: a compiled
    DeltaLM training forward's state chain (`ops/state_chain.py`), which X must be the newest
    state of: the rewrite then keeps no state for backward and rebuilds X there.

    Example:
        >>> X = torch.randn(2, 8, 64, 4); h = torch.randn(2, 8, 64)
        >>> Y = rewrite_epilogue(X, h, torch.zeros(2, 8), torch.randn(2, 8, 4))  # β = 1
    """
    tensors = [X, h, z, p] + ([compress] if compress is not None else [])
    choice = backend.backend()
    if chain is not None:
        _check_options(rule, value_head, k_eps)
        if not check_epilogue_inputs(X, h, z, p, compress):
            raise ValueError(f"the state chain rebuilds matrix states only, got {_fmt(X)}")
        # The Triton kernels rebuild a delta rewrite's input (the eager tape's REBUILD mode).
        if rule == "delta" and compiled_kernels.applies(tensors, choice):
            official = value_head == "official"
            return chain.rewrite_kernel(X, h, z, p, compress, official, value_scale, k_eps)
        k, beta, v = epilogue_generators(
            h, z, p, value_head=value_head, value_scale=value_scale, k_eps=k_eps
        )
        return chain.rewrite(X, k, beta, v, rule, compress)
    if compiled_kernels.applies(tensors, choice):  # compiled, switched on: the Triton kernels
        _check_options(rule, value_head, k_eps)
        check_epilogue_inputs(X, h, z, p, compress)
        return compiled_kernels.rewrite(
            X, h, z, p, compress, rule=rule, value_head=value_head, value_scale=value_scale,
            k_eps=k_eps,
        )  # fmt: skip
    if not backend.use_triton(tensors, choice):
        return _compose(  # reference=True: the fast paths switched off by the backend choice
            X,
            h,
            z,
            p,
            rule=rule,
            value_head=value_head,
            value_scale=value_scale,
            k_eps=k_eps,
            compress=compress,
            reference=choice == "reference",
            choice=choice,
        )
    _check_options(rule, value_head, k_eps)
    check_epilogue_inputs(X, h, z, p, compress)
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise ValueError(
            f"X, h, z, p{', compress' if compress is not None else ''} must be on one device for "
            f"the Triton epilogue, got {[str(t.device) for t in tensors]}"
        )
    from deltalearn.ops.triton_epilogue import rewrite_epilogue_triton

    return rewrite_epilogue_triton(
        X,
        h,
        z,
        p,
        rule=rule,
        value_head=value_head,
        value_scale=value_scale,
        k_eps=k_eps,
        compress=compress,
    )
