"""The Delta operator written as the spec reads (SPEC §1). Every faster path is tested against this.

    X' = X + beta * k (v^T - k^T X)          delta rewrite
       = (I - beta k k^T) X + beta k v^T
    X' = X + beta * k v^T                     write-only control (no erase term)

Shapes: X (..., d) or (..., d, dv); k (..., d), unit norm; beta (...); v (...) or (..., dv).
Every function computes in (at least) fp32 with autocast switched off, and returns the input dtype.
"""

from __future__ import annotations

import torch

from deltalearn.ops._shapes import (
    accumulation_dtype,
    check_direction_and_gate,
    check_rewrite_inputs,
    no_autocast,
)


def normalize_direction(k_raw: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """`k_raw / sqrt(||k_raw||^2 + eps^2)` over the last axis (exact L2 form with an epsilon guard)."""
    if k_raw.dim() == 0:
        raise ValueError(f"k_raw needs at least one axis (d); got shape {tuple(k_raw.shape)}")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}")
    acc = accumulation_dtype(k_raw)
    with no_autocast(k_raw):
        sq = k_raw.to(acc).pow(2).sum(-1, keepdim=True)
        return (k_raw.to(acc) * torch.rsqrt(sq + eps * eps)).to(k_raw.dtype)


def delta_rewrite_reference(
    X: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """`X + beta·k·(vᵀ − kᵀX)`, computed in fp32 and returned in X's dtype."""
    matrix = check_rewrite_inputs(X, k, beta, v)
    acc = accumulation_dtype(X, k, beta, v)
    with no_autocast(X):
        Xf, kf, bf, vf = X.to(acc), k.to(acc), beta.to(acc), v.to(acc)
        if matrix:
            readout = torch.einsum("...d,...dv->...v", kf, Xf)  # k^T X: (..., dv)
            out = Xf + bf[..., None, None] * kf[..., :, None] * (vf - readout)[..., None, :]
        else:
            readout = (kf * Xf).sum(-1)  # (...)
            out = Xf + (bf * (vf - readout))[..., None] * kf
        return out.to(X.dtype)


def write_only_reference(
    X: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, v: torch.Tensor
) -> torch.Tensor:
    """`X + beta·k·vᵀ`: the same write without reading or erasing."""
    matrix = check_rewrite_inputs(X, k, beta, v)
    acc = accumulation_dtype(X, k, beta, v)
    with no_autocast(X):
        Xf, kf, bf, vf = X.to(acc), k.to(acc), beta.to(acc), v.to(acc)
        if matrix:
            out = Xf + bf[..., None, None] * kf[..., :, None] * vf[..., None, :]
        else:
            out = Xf + (bf * vf)[..., None] * kf
        return out.to(X.dtype)


def delta_operator(k: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """The shortcut matrix `A = I − beta·k·kᵀ`, shape `(..., d, d)`."""
    check_direction_and_gate(k, beta)
    d = k.shape[-1]
    eye = torch.eye(d, dtype=k.dtype, device=k.device)
    return eye - beta[..., None, None] * k[..., :, None] * k[..., None, :]


def shortcut_spectrum(k: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of `I − beta·k·kᵀ` for unit `k` in closed form (Prop. 2.1), ascending.

    `1` with multiplicity `d − 1` and `1 − beta` once.
    """
    check_direction_and_gate(k, beta)
    d = k.shape[-1]
    ones = torch.ones((*k.shape[:-1], d - 1), dtype=k.dtype, device=k.device)
    special = (1 - beta).to(k.dtype)[..., None]
    return torch.cat([special, ones], dim=-1).sort(dim=-1).values
