"""Capture what every residual sublayer of a `DeltaLM` does to the state, batch after batch, keeping
only running statistics (sums, fixed-bin histograms, maxima) — never the activations.

Forward hooks, no change to the model:

* a DDL sublayer (rule "delta" or "write_only"): a hook on its `DeltaUpdate` sees the state
  before (`X`, argument 0), the branch output `h` (argument 1, the unnormalised direction) and
  the new state `X'` (the output); β and the target `v` come from the update's `GateRecord`
  (`model(..., output_gates=True)` turns recording on).
* an additive sublayer (the baseline): a pre-hook on the block gives the state entering it, hooks
  on the attention and MLP branches give `h`; the state after the attention sublayer is `X + h`.

For every DDL rewrite the hook checks the algebra on the real activations, in float64 from the
model's own `X`, `X'`, β and `v`, with `k = h / sqrt(‖h‖² + ε_k²)` recomputed from `h` (SPEC §1):

    delta:       e_post = kᵀX' − v  must equal  (1 − β‖k‖²)(kᵀX − v)   (= (1 − β) e_pre, ‖k‖ = 1)
    write-only:  kᵀX'  must equal  kᵀX + β‖k‖² v
    both:        (I − k̂k̂ᵀ)(X' − X) = 0      (nothing moves orthogonally to k)

per token and value channel j, to within `tol = (2d + 9)·eps·(‖X_j‖ + ‖X'_j‖ + |v_j|)`, `eps` the
machine epsilon of the state's dtype. Why that bound: the model computes `X'` in floating point of
unit roundoff `u = eps/2`. Its readout `kᵀX` is a d-term dot product, off by at most `γ_d‖X‖`
(`γ_d ≈ d·u`, Higham's bound for any summation order, so it also covers the blocked reductions
of a GPU kernel); its `k` is off from the float64 one by at most `(d/2 + 3)u`; the discrepancy, the
product `β k (v − kᵀX)` and the final addition add a few `u` each, relative to `|v| + ‖X‖` and
`‖X'‖` (as does a β or v recorded outside a fused kernel that differs from the kernel's own by an
ulp). With β < 2 doubling the discrepancy terms, the first-order sum is at most
`(4d + 18)·u·(‖X‖ + ‖X'‖ + |v|)` — the tolerance above, a worst case, not an estimate. A real bug
(a wrong β, a missing erase term, a `k` off unit norm by 1e-3 as a bf16 one is) moves `e_post` by
a fraction of `|e_pre|`, orders of magnitude more for the widths used here; the measured maximum
is reported in units of the tolerance, so the margin is visible.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from deltalearn.analysis.regimes import (
    BETA_BINS,
    LOG_BINS,
    beta_histogram,
    log_histogram,
    regime_counts,
)

__all__ = ["SUBLAYERS", "SiteStats", "capture_sites", "tolerance_factor"]

SUBLAYERS = ("attn", "mlp")  # the order of the sublayer axis of `DeltaLMGates`
CHUNK = 2048  # tokens per float64 slice in a hook (bounds the extra memory)


def tolerance_factor(d: int) -> int:
    """`c` in `tol = c·eps·(‖X_j‖ + ‖X'_j‖ + |v_j|)`: `2d + 9` (module docstring)."""
    return 2 * d + 9


@dataclass
class SiteStats:
    """Running statistics of one (layer, sublayer). Sums are float64 Python numbers or numpy
    arrays; `rule` is "delta", "write_only" or "additive"."""

    layer: int
    sublayer: str
    rule: str
    dim: int
    value_channels: int
    tokens: int = 0
    sums: dict[str, float] = field(default_factory=dict)
    update_ratio_hist: np.ndarray = field(default_factory=lambda: np.zeros(LOG_BINS + 2, np.int64))
    beta_hist: np.ndarray = field(default_factory=lambda: np.zeros(BETA_BINS, np.int64))
    regimes: np.ndarray = field(default_factory=lambda: np.zeros(5, np.int64))
    channel: dict[str, np.ndarray] = field(default_factory=dict)
    check: dict[str, float] = field(
        default_factory=lambda: {
            "values": 0,
            "failures": 0,
            "max_abs_error": 0.0,
            "max_error_over_tolerance": 0.0,
            "max_relative_error": 0.0,
            "max_orthogonal_over_tolerance": 0.0,
        }
    )

    def add(self, name: str, value: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + float(value)

    def add_channel(self, name: str, value: torch.Tensor) -> None:
        v = value.detach().double().cpu().numpy()
        self.channel[name] = self.channel[name] + v if name in self.channel else v

    # ---- the two kinds of sublayer -----------------------------------------------------------
    @torch.no_grad()
    def add_additive(self, X: torch.Tensor, h: torch.Tensor) -> None:
        """An additive sublayer: state X `(N, d, dv)`, branch output h `(N, d)` (added to every
        value channel)."""
        dv = X.shape[-1]
        for s in range(0, X.shape[0], CHUNK):
            x, hh = X[s : s + CHUNK].double(), h[s : s + CHUNK].double()
            x_norm = x.flatten(1).norm(dim=1)
            h_norm = hh.norm(dim=1)
            self._add_update(x_norm, h_norm * math.sqrt(dv))
            self.add("branch_norm", h_norm.sum())

    @torch.no_grad()
    def add_rewrite(
        self,
        X: torch.Tensor,
        Y: torch.Tensor,
        h: torch.Tensor,
        beta: torch.Tensor,
        v: torch.Tensor,
        discrepancy: torch.Tensor,
        k_eps: float,
    ) -> None:
        """A DDL rewrite: X, Y = X' `(N, d, dv)`, h `(N, d)`, β `(N,)`, v and the model's recorded
        discrepancy `v − kᵀX` `(N, dv)`."""
        eps = torch.finfo(X.dtype).eps if X.dtype.is_floating_point else 0.0
        c = tolerance_factor(X.shape[1])
        b_all = beta.detach()
        self.beta_hist += beta_histogram(b_all).numpy()
        self.regimes += regime_counts(b_all).numpy()
        self.add("beta_gt_1", (b_all > 1).sum())
        self.add("abs_discrepancy", discrepancy.double().abs().mean(-1).sum())
        for s in range(0, X.shape[0], CHUNK):
            sl = slice(s, s + CHUNK)
            x, y, hh = X[sl].double(), Y[sl].double(), h[sl].double()
            b, vv = beta[sl].double(), v[sl].double()
            k = hh / torch.sqrt(hh.pow(2).sum(-1, keepdim=True) + k_eps * k_eps)  # (n, d)
            kk = k.pow(2).sum(-1)  # ‖k‖², 1 up to ε_k²/‖h‖²
            e_pre = torch.einsum("nd,ndv->nv", k, x) - vv
            e_post = torch.einsum("nd,ndv->nv", k, y) - vv
            if self.rule == "delta":
                predicted = (1 - b * kk)[:, None] * e_pre
            else:  # write-only: kᵀX' = kᵀX + β‖k‖² v
                predicted = e_pre + (b * kk)[:, None] * vv
            err = (e_post - predicted).abs()
            D = y - x
            k_norm = kk.sqrt().clamp_min(1e-300)[:, None]
            k_hat = k / k_norm
            along = torch.einsum("nd,ndv->nv", k_hat, D)
            orth = (D - k_hat[:, :, None] * along[:, None, :]).norm(dim=1)  # (n, dv)
            scale = x.norm(dim=1) + y.norm(dim=1) + vv.abs()  # (n, dv)
            tol = c * eps * scale
            self._add_check(err, orth, scale, tol)
            # statistics
            self.add("beta", b.sum())
            self.add("beta_sq", b.pow(2).sum())
            self.add("abs_one_minus_beta", (1 - b).abs().sum())
            self.add("e_pre_sq", e_pre.pow(2).sum())
            self.add("e_post_sq", e_post.pow(2).sum())
            self.add("abs_e_pre", e_pre.abs().mean(-1).sum())
            self.add("abs_e_post", e_post.abs().mean(-1).sum())
            x_norm = x.flatten(1).norm(dim=1)
            self._add_update(x_norm, D.flatten(1).norm(dim=1))
            if x.shape[-1] > 1:
                self._add_channels(x, D, vv, e_pre)

    # ---- helpers -------------------------------------------------------------------------------
    def _add_update(self, x_norm: torch.Tensor, d_norm: torch.Tensor) -> None:
        ratio = d_norm / x_norm.clamp_min(1e-300)
        self.tokens += int(x_norm.numel())
        self.add("state_norm", x_norm.sum())
        self.add("update_norm", d_norm.sum())
        self.add("update_norm_sq", d_norm.pow(2).sum())
        self.add("update_ratio", ratio.sum())
        self.update_ratio_hist += log_histogram(ratio).numpy()

    def _add_check(
        self, err: torch.Tensor, orth: torch.Tensor, scale: torch.Tensor, tol: torch.Tensor
    ) -> None:
        ch = self.check
        tiny = torch.finfo(torch.float64).tiny
        over = err / tol.clamp_min(tiny)
        orth_over = orth / tol.clamp_min(tiny)
        failed = (err > tol) | (orth > tol)
        ch["values"] += int(err.numel())
        ch["failures"] += int(failed.sum())
        ch["max_abs_error"] = max(ch["max_abs_error"], float(err.max()))
        ch["max_error_over_tolerance"] = max(ch["max_error_over_tolerance"], float(over.max()))
        rel = float((err / scale.clamp_min(tiny)).max())
        ch["max_relative_error"] = max(ch["max_relative_error"], rel)
        ch["max_orthogonal_over_tolerance"] = max(
            ch["max_orthogonal_over_tolerance"], float(orth_over.max())
        )

    def _add_channels(
        self, x: torch.Tensor, D: torch.Tensor, v: torch.Tensor, e_pre: torch.Tensor
    ) -> None:
        """How the dv value channels are used: targets, discrepancies, the write per channel, the
        state's energy per channel and how alike the channels of the state are."""
        write = D.pow(2).sum(1)  # (n, dv): ‖ΔX_j‖² = β² e_j² ‖k‖²
        total = write.sum(-1)
        written = total > 0
        pr = total[written].pow(2) / write[written].pow(2).sum(-1)  # participation ratio ∈ [1, dv]
        self.add("written_tokens", written.sum())
        self.add("write_participation", pr.sum())
        self.add_channel("v", v.sum(0))
        self.add_channel("v_sq", v.pow(2).sum(0))
        self.add_channel("e_pre_sq", e_pre.pow(2).sum(0))
        self.add_channel("write_sq", write.sum(0))
        self.add_channel("state_sq", x.pow(2).sum(1).sum(0))
        cols = x / x.norm(dim=1, keepdim=True).clamp_min(1e-300)  # (n, d, dv) unit columns
        gram = torch.einsum("ndi,ndj->nij", cols, cols)  # (n, dv, dv) cosines
        dv = x.shape[-1]
        off = ~torch.eye(dv, dtype=torch.bool, device=x.device)
        self.add("state_channel_cosine", gram[:, off].mean(-1).sum())


def capture_sites(model: nn.Module, batches: Iterable[Any]) -> list[SiteStats]:
    """Run `model` (a `DeltaLM`) on every batch of token ids and return one `SiteStats` per
    (layer, sublayer), in the order layer 0 attn, layer 0 mlp, layer 1 attn, ..."""
    cfg = model.config
    rule = cfg.residual
    dv = cfg.value_channels if cfg.expanded else 1
    sites = [
        SiteStats(i, sub, rule, cfg.hidden_size, dv)
        for i in range(cfg.num_layers)
        for sub in SUBLAYERS
    ]
    handles = []
    device = next(model.parameters()).device

    def as_matrix(X: torch.Tensor) -> torch.Tensor:  # (B, T, d[, dv]) -> (N, d, dv)
        return X.reshape(-1, cfg.hidden_size, dv)

    if rule == "additive":
        state: dict[int, torch.Tensor] = {}

        def on_block(i: int):
            def hook(module, args):
                state[i] = args[0]

            return hook

        def on_branch(i: int, j: int):
            def hook(module, args, out):
                X = state[i]
                sites[2 * i + j].add_additive(as_matrix(X), out.reshape(-1, cfg.hidden_size))
                state[i] = X + (out.unsqueeze(-1) if X.dim() == out.dim() + 1 else out)

            return hook

        for i, block in enumerate(model.layers):
            handles.append(block.register_forward_pre_hook(on_block(i)))
            handles.append(block.attn.register_forward_hook(on_branch(i, 0)))
            handles.append(block.mlp.register_forward_hook(on_branch(i, 1)))
    else:

        def on_update(site: SiteStats):
            def hook(module, args, out):
                rec = module.last_record
                if rec is None:
                    raise RuntimeError("the rewrite kept no GateRecord: run with output_gates=True")
                X, h = args[0], args[1]
                # With the fused compressor read the rewrite also returns the next sublayer's read.
                Y = out[0] if isinstance(out, tuple) else out
                site.add_rewrite(
                    as_matrix(X),
                    as_matrix(Y),
                    h.reshape(-1, cfg.hidden_size),
                    rec.beta.reshape(-1),
                    rec.target.reshape(-1, dv),
                    rec.discrepancy.reshape(-1, dv),
                    module.k_eps,
                )

            return hook

        for i, block in enumerate(model.layers):
            for j, update in enumerate((block.attn_update, block.mlp_update)):
                handles.append(update.register_forward_hook(on_update(sites[2 * i + j])))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for x in batches:
                x = torch.as_tensor(x, dtype=torch.long, device=device)
                model(x, output_gates=rule != "additive")
    finally:
        for hd in handles:
            hd.remove()
        model.train(was_training)
    return sites
