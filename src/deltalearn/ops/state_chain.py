"""Rebuilding the residual states in backward inside a compiled graph: the state chain.

In eager training a DeltaLM keeps only its last state and rebuilds the others in backward
(`ops/state_tape.py`), but the tape runs on saved-tensor hooks, which `torch.compile` does not run
inside its graphs: a compiled step keeps every rewrite's input state instead — on an H200
(`small`, bf16, 8 × 1024) ddl-cc's compiled step peaked at 1.45× the compiled baseline's, against
1.05× eager. The chain carries the rebuild through autograd itself, which a compiled graph traces:

- every rewrite on the chain returns, beside its state Y, a stand-in "token": a zero-stride tensor
  shaped as Y, which costs no memory; the next op on the chain takes it as an input it never reads;
- a rewrite keeps k, β and the discrepancy e a row (not its input X), and its backward receives Y
  as the token's gradient, rebuilds `X = Y − β k eᵀ`, forms its own gradients from it and hands X
  on as the gradient of the token it took — to the op before, whose output X is;
- a token compressor's read (TC) keeps only its taps, and passes the state it gets back in
  backward on after using it (its taps' gradient needs it): it reads a state, it makes none;
- `finish` keeps the last state and hands it to the last op as its token's gradient; the first
  token comes from the first state (`StateChain(X)`), whose rebuilt value is dropped.

The rewrite's backward is written one value channel at a time, as `ops/traced_epilogue.py`'s
forward, so that Inductor makes the rebuild and the gradients one pass over the state, and so that
it cannot run the chain of rebuilds (elementwise, on kept row scalars only) ahead of the gradients
with every rebuilt state alive at once: each column's rebuild feeds the same sums as its gradient
(written as one addcmul over the state, the rebuilds ran first on a CPU and the step peaked higher
than keeping the states). A state rebuilt is the state kept up to rounding (one fp32 `βkeᵀ`
subtracted a sublayer, as the eager tape).

Where: a compiled training forward of a DeltaLM whose every state after the first is made by a
rewrite and read either inside the rewrites (CC, the reads fused into them) or by token
compressors (TC), in fp32 or float64 states (`DeltaLM._starts_state_chain` decides).
`benchmarks/compiled_state_chain.py` measures it on a stack of rewrites, `deltalearn bench model
--compile` on a DeltaLM; `tests/test_state_chain.py` holds it to the plain traced path.
Off unless `DELTALEARN_COMPILED_REBUILD=on` (`COMPILED_REBUILD` below): not yet run on a GPU.
With `DELTALEARN_COMPILED_KERNELS=on` too (`ops/compiled_kernels.py`), the chain's delta rewrites
and token reads run the Triton kernels as custom ops (`rewrite_kernel`, `_ChainedKernelTokenRead`):
the forward kernel writes the row scalars ρ, β, e the eager state tape rebuilds from, and the
backward kernel rebuilds X from Y with them as it forms the gradients (its REBUILD mode) — one
kernel each way, where the traced backward is Inductor's. The write-only rule has no REBUILD
mode: its rewrites stay traced on the chain.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from deltalearn.ops import backend, compiled_kernels
from deltalearn.ops._shapes import no_autocast
from deltalearn.ops.mixing import mixing_weight_grad
from deltalearn.ops.switches import switched_on
from deltalearn.ops.token_mixing import _taps, token_mix_traced
from deltalearn.ops.traced_epilogue import rewrite_epilogue_traced

# Module-level override of DELTALEARN_COMPILED_REBUILD (None: read the environment at each trace).
COMPILED_REBUILD: str | None = None


def enabled() -> bool:
    """Whether a compiled DeltaLM training forward rebuilds its states through the chain
    (`COMPILED_REBUILD`, else DELTALEARN_COMPILED_REBUILD: "on" or "off", the default)."""
    return switched_on(
        COMPILED_REBUILD,
        "DELTALEARN_COMPILED_REBUILD",
        "deltalearn.ops.state_chain.COMPILED_REBUILD",
        "state rebuilding in compiled graphs",
        default="off",
    )


def _token(X: torch.Tensor) -> torch.Tensor:
    """A tensor shaped as X with no memory of its own: a gradient of X's shape can reach it."""
    return X.new_zeros(()).expand(X.shape)


class _Start(torch.autograd.Function):
    """The first token; the first state, rebuilt, arrives as its gradient and is dropped."""

    @staticmethod
    def forward(ctx: Any, X: torch.Tensor) -> torch.Tensor:
        return _token(X)

    @staticmethod
    def backward(ctx: Any, rebuilt: torch.Tensor) -> None:
        return None


class _Finish(torch.autograd.Function):
    """`out` passed on (a copy); the last state kept, handed back as the token's gradient."""

    @staticmethod
    def forward(ctx: Any, out: torch.Tensor, last: torch.Tensor, token: torch.Tensor):
        ctx.save_for_backward(last)
        return out.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor):
        return grad, None, ctx.saved_tensors[0]


class _ChainedRewrite(torch.autograd.Function):
    """`(Y, [x_next,] token)` of `rewrite_epilogue_traced(X, k, β, v, rule, C)`, keeping k, β, e."""

    @staticmethod
    def forward(ctx: Any, X, k, beta, v, C, token, rule: str):
        out = rewrite_epilogue_traced(X, k, beta, v, rule, C, with_errors=True)
        acc = out[-1].dtype  # k and β as the traced forward used them (fp32 or wider)
        ctx.save_for_backward(k.to(acc), beta.to(acc), out[-1], C)
        ctx.delta = rule == "delta"
        ctx.dtypes = X.dtype, k.dtype, beta.dtype, v.dtype, None if C is None else C.dtype
        return (*out[:-1], _token(X))

    @staticmethod
    def backward(ctx: Any, *grads):
        with no_autocast(ctx.saved_tensors[2]):
            return _ChainedRewrite._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx: Any, *grads):
        k, beta, e, C = ctx.saved_tensors
        gY, g_next, Y = (grads[0], None, grads[1]) if C is None else grads
        _missing_state(Y, "a rewrite")
        acc = e.dtype
        beta_k = beta[..., None] * k
        Cf = None if C is None or g_next is None else C.to(acc)
        gn = None if Cf is None else g_next.to(acc)
        # Column by column: each column's rebuild and gradients iterate over (rows, d) together.
        gX, X, s, gC, gk = [], [], [], [], 0
        for j in range(Y.shape[-1]):
            Y_j, e_j = Y[..., j].to(acc), e[..., j : j + 1]
            G_j = torch.zeros_like(Y_j) if gY is None else gY[..., j].to(acc)
            if Cf is not None:
                G_j = G_j + gn * Cf[:, j]
                gC.append((gn * Y_j).flatten(0, -2).sum(0))
            X_j = Y_j - beta_k * e_j
            s_j = (k * G_j).sum(-1, keepdim=True)
            gX.append(G_j - beta_k * s_j if ctx.delta else G_j)
            gk = gk + (G_j * e_j - X_j * s_j if ctx.delta else G_j * e_j)
            X.append(X_j)
            s.append(s_j)
        s = torch.cat(s, -1)
        X_type, k_type, beta_type, v_type, C_type = ctx.dtypes
        grad_C = None
        if C is not None:
            grad_C = torch.zeros_like(C) if Cf is None else torch.stack(gC, -1).to(C_type)
        return (
            torch.stack(gX, -1).to(X_type),
            (beta[..., None] * gk).to(k_type),
            (s * e).sum(-1).to(beta_type),
            (beta[..., None] * s).to(v_type),
            grad_C,
            torch.stack(X, -1).to(Y.dtype),  # the token's gradient: this rewrite's input state
            None,
        )


class _ChainedKernelRewrite(torch.autograd.Function):
    """`(Y, x_next, token)` of the delta rewrite `rewrite_epilogue(X, h, z, p, compress=C)` by the
    Triton kernels as custom ops (`ops.compiled_kernels`, switched on), keeping h, z, p and the
    forward kernel's row scalars: the backward kernel rebuilds X from Y as it forms the gradients
    (the eager state tape's rebuild, `REBUILD`). x_next is empty without C."""

    @staticmethod
    def forward(ctx: Any, X, h, z, p, C, token, official: bool, value_scale: float, k_eps: float):
        Y, x_next, rho, beta, e = compiled_kernels.chained_rewrite_forward(
            X, h, z, p, C, official, value_scale, k_eps
        )
        ctx.save_for_backward(h, z, p, C, rho, beta, e)
        ctx.options = official, value_scale, k_eps
        return Y, x_next, _token(X)

    @staticmethod
    def backward(ctx: Any, gY, g_next, Y):
        h, z, p, C, rho, beta, e = ctx.saved_tensors
        _missing_state(Y, "a rewrite")
        g_next = g_next if C is not None else None
        gX, gh, gz, gp, gC, X = compiled_kernels.chained_rewrite_backward(
            Y, h, z, p, C, rho, beta, e, gY, g_next, *ctx.options
        )
        return gX, gh, gz, gp, (gC if C is not None else None), X, None, None, None


class _ChainedTokenRead(torch.autograd.Function):
    """`(x, token)` of the TC read `token_mix_traced(X, W)` of a whole sequence (no history),
    keeping only W: X reaches backward as the token's gradient and is handed on."""

    @staticmethod
    def forward(ctx: Any, X, W, token):
        ctx.save_for_backward(W)
        ctx.dtype = X.dtype
        return token_mix_traced(X, W, 0), _token(X)

    @staticmethod
    def backward(ctx: Any, G, X):
        (W,) = ctx.saved_tensors
        _missing_state(X, "a read")
        with no_autocast(X):
            K, T = W.shape[-1], G.shape[1]
            Wd = W.to(G.dtype)
            # ∂X: each tap's products, zero-padded behind to T tokens (views and sums only).
            gX = G[..., None] * Wd[..., K - 1]
            gW = [None] * K
            gW[K - 1] = mixing_weight_grad(G, X)
            for tap, src, dst, n in _taps(K, 0, T):
                part = G[:, dst : dst + n, :, None] * Wd[..., tap]
                gX = gX + F.pad(part, (0, 0, 0, 0, src, T - src - n))
                gW[tap] = mixing_weight_grad(G[:, dst : dst + n], X[:, src : src + n])
            return gX.to(ctx.dtype), torch.stack(gW, -1).to(W.dtype), X


class _ChainedKernelTokenRead(torch.autograd.Function):
    """`_ChainedTokenRead` by the Triton read kernels as custom ops (`ops.compiled_kernels`)."""

    @staticmethod
    def forward(ctx: Any, X, W, token):
        ctx.save_for_backward(W)
        return compiled_kernels.read_forward(X, W, 0), _token(X)

    @staticmethod
    def backward(ctx: Any, G, X):
        (W,) = ctx.saved_tensors
        _missing_state(X, "a read")
        gX, gW = compiled_kernels.read_backward(X, W, G, 0)
        return gX, gW, X


def _missing_state(X: torch.Tensor | None, op: str) -> None:
    if X is None:
        raise RuntimeError(
            f"internal: {op} on the state chain got no state back in backward (the chain was not "
            "finished: state_chain.StateChain.finish)"
        )


class StateChain:
    """One forward's chain: `token` stands for `state`, the newest state on the chain (module
    docstring). Made from the first state; every rewrite and TC read of the states after it goes
    through `rewrite` and `token_read`; `finish` closes it on the forward's output."""

    def __init__(self, X: torch.Tensor) -> None:
        self.state, self.token = X, _Start.apply(X)

    def rewrite(self, X, k, beta, v, rule: str, compress=None):
        """`rewrite_epilogue_traced(X, k, β, v, rule, compress)`, on the chain: X must be the
        chain's newest state (a state the chain cannot rebuild would be wrong in backward)."""
        self._check_state(X)
        *out, self.token = _ChainedRewrite.apply(X, k, beta, v, compress, self.token, rule)
        self.state = out[0]
        return out[0] if compress is None else tuple(out)

    def rewrite_kernel(self, X, h, z, p, compress, official: bool, value_scale, k_eps):
        """The delta rule's `rewrite_epilogue(X, h, z, p, compress=...)` on the chain by the Triton
        kernels as custom ops (`ops.compiled_kernels`; the caller checked they apply)."""
        self._check_state(X)
        Y, x_next, self.token = _ChainedKernelRewrite.apply(
            X, h, z, p, compress, self.token, official, float(value_scale), float(k_eps)
        )
        self.state = Y
        return Y if compress is None else (Y, x_next)

    def token_read(self, X: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
        """The TC read `token_mix(X, W)` of a whole sequence, on the chain (X its newest state):
        the read keeps its taps W only and gets X back in backward. By the Triton read kernel
        where the compiled kernels apply (`ops.compiled_kernels.applies`), else traced."""
        self._check_state(X)
        read = _ChainedTokenRead
        if compiled_kernels.applies([X, W], backend.backend()):
            read = _ChainedKernelTokenRead
        x, self.token = read.apply(X, W, self.token)
        return x

    def finish(self, out: torch.Tensor) -> torch.Tensor:
        """`out` (a copy), the forward's result past the last state, with the chain closed: the
        last state is kept for the op that took it last."""
        return _Finish.apply(out, self.state, self.token)

    def _check_state(self, X: torch.Tensor) -> None:
        if X is not self.state:
            raise RuntimeError(
                "internal: an op on the state chain got a state the chain did not make (shape "
                f"{tuple(X.shape)}); DeltaLM starts a chain only where every rewrite and read "
                "takes the state the rewrite before it wrote"
            )
        if X.dtype not in (torch.float32, torch.float64):
            raise ValueError(
                f"the state chain rebuilds fp32 or float64 states only, got {X.dtype} (a rounded "
                "state cannot be rebuilt exactly)"
            )
