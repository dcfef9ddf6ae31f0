"""The rewrite epilogue as `torch.compile` traces it for a matrix state: plain differentiable ops,
written one value channel at a time, whose backward AOT autograd derives. Not for a step of one
token a sequence (decoding), whose cost is its kernels, not its bytes (`ops.epilogue._one_token`).

Why: every pass over the `(..., d, dv)` state is `dv` times a pass over a `(..., d)` activation,
and in fp32. Written as tensor ops (the eager Function of `ops/fused_epilogue.py`), the readout
`kᵀX` reduces over d with dv innermost while the write runs over all of `(..., d, dv)`: Inductor
gives them different iteration spaces, so a sublayer's forward read the state for the readout,
again for the write, and its successor read the new state once more (the channel-compressor read).
Column by column, every step of a rewrite iterates over `(rows, d)`:

    e_j   = v_j − Σ_i k_i X[i, j]                    a reduction over d, per column j
    Y[:, j] = X[:, j] + β k e_j                      elementwise over (rows, d)
    x_next = Σ_j C[:, j] X[:, j] + β k Σ_j C[:, j] e_j    the next channel read, from X and e

and Inductor makes them one kernel — with the next sublayer's RMSNorm of x_next — that reads X once
and writes Y once. x_next is formed from X and e rather than from the columns of Y so that each
column has a single user, the stack, which Inductor then writes in place (a column with a second
user became a buffer of its own, copied into Y). Its first term is summed from the same columns
of X, not read from X again as a whole: with `(X * C).sum(-1)` (a second reader of X, the value
axis innermost) Inductor's CPU code on torch 2.11 compiled a ddl-cc training step into wrong
gradients for every layer below the first carried read (`benchmarks/compiled_gradients.py`: 74 of
89 parameters off by 1.3–7.8× their norm at `tiny`; AOT autograd's graph run eagerly was right,
and so was torch 2.13), and with `contract_values(X, C)`, the ops of `ChannelCompressor`'s read,
the graph's common-subexpression pass merged it with a block's own read of X, after which
Inductor's CPU code on torch 2.11 corrupted the heap (glibc's "malloc assertion failure"; torch
2.13 ran clean).
In exact arithmetic x_next equals the read of Y; for an fp32 state they differ by roundings; a
half-precision state (a model cast to bf16) is read before Y is rounded to it, where the eager
paths read the rounded Y.

`python benchmarks/compiled_graph.py` counts what this saves. Tests: `tests/test_ops_traced_
epilogue.py` (against the reference), `tests/test_compile.py` (compiled training against eager).
"""

from __future__ import annotations

import torch

from deltalearn.ops._shapes import accumulation_dtype, no_autocast, promote_float


def rewrite_epilogue_traced(X, k, beta, v, rule, compress=None, with_errors=False):
    """`rewrite_epilogue` of a matrix state X `(..., d, dv)` from its generators `(k, β, v)`
    (`ops.epilogue.epilogue_generators`, fp32 or wider; inputs checked by the caller): Y in X's
    dtype; with `compress` `(d, dv)` also `(Y, x_next)`, x_next in the dtype of X promoted with
    C's. `with_errors`: the discrepancies `e = v − kᵀX` `(..., dv)` (fp32 or wider) appended, for
    a backward that rebuilds X from Y (`ops/state_chain.py`)."""
    with no_autocast(X):
        acc = accumulation_dtype(X, k)
        k = k.to(acc)
        beta_k = beta.to(acc)[..., None] * k
        v = v.to(acc)
        dv = X.shape[-1]
        columns = [X[..., j].to(acc) for j in range(dv)]
        errors = [v[..., j : j + 1] for j in range(dv)]  # (..., 1) each
        if rule == "delta":
            # kᵀX[:, j], not ρ·hᵀX[:, j]: the latter, with a read to make, is 2% fewer bytes at
            # `small`, but Inductor's CPU backend (torch 2.13.0) compiles a DeltaLM's training step
            # with it into wrong gradients (AOT autograd's own graph, run eagerly, is right).
            errors = [errors[j] - (k * columns[j]).sum(-1, keepdim=True) for j in range(dv)]
        Y = torch.stack([columns[j] + beta_k * errors[j] for j in range(dv)], -1).to(X.dtype)
        extra = (torch.cat(errors, -1),) if with_errors else ()
        if compress is None:
            return (Y, *extra) if extra else Y
        C = compress.to(acc)
        # Column by column, from the columns above (the module docstring says why).
        read, written = C[:, 0] * columns[0], C[:, 0] * errors[0]
        for j in range(1, dv):
            read = read + C[:, j] * columns[j]
            written = written + C[:, j] * errors[j]
        x_next = read + beta_k * written
        return Y, x_next.to(promote_float(X.dtype, compress.dtype)), *extra
