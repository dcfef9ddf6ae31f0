"""The β regimes of the spectral analysis (SPEC §1) and the fixed histograms the audit keeps.

The shortcut `A = I − β k kᵀ` has eigenvalue `1 − β` along `k`, so a rewrite multiplies the
discrepancy along `k` by `1 − β` (`e_post = (1 − β) e_pre`). The audit sorts every token's β
into five regimes by that factor:

    near-identity    β < 0.1          |1 − β| > 0.9, keeps almost all of the old readout
    partial write    0.1 ≤ β < 0.9    shrinks the discrepancy, same sign
    near-overwrite   0.9 ≤ β ≤ 1.1    |1 − β| ≤ 0.1: the readout becomes (almost) v
    over-relaxed     1.1 < β ≤ 1.9    overshoots v: the discrepancy flips sign and shrinks
    near-reflection  β > 1.9          `A` is close to the Householder reflection `I − 2kkᵀ`

Statistics are accumulated over many batches without keeping activations: histograms with fixed
bins (β on [0, 2] in bins of 0.001; positive ratios on a log10 grid) and quantiles read back from
them by linear interpolation inside a bin (so a quantile is exact to one bin width).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

__all__ = [
    "BETA_BINS",
    "BETA_EDGES",
    "LOG_EDGES",
    "QUANTILES",
    "REGIMES",
    "REGIME_NAMES",
    "beta_histogram",
    "histogram_quantiles",
    "log_histogram",
    "regime_counts",
]

# (name, lower bound, upper bound); which regime a bound itself belongs to: see `regime_counts`.
REGIMES: tuple[tuple[str, float, float], ...] = (
    ("near-identity", 0.0, 0.1),
    ("partial", 0.1, 0.9),
    ("near-overwrite", 0.9, 1.1),
    ("over-relaxed", 1.1, 1.9),
    ("near-reflection", 1.9, 2.0),
)
REGIME_NAMES = tuple(r[0] for r in REGIMES)

BETA_BINS = 2000  # width 0.001 over [0, 2]
BETA_EDGES = np.linspace(0.0, 2.0, BETA_BINS + 1)
# Positive ratios (‖X' − X‖ / ‖X‖): log10 from -8 to 3 in steps of 0.005 (1.2 % per bin), plus an
# underflow bin (below 1e-8, zero included) and an overflow bin (above 1e3).
LOG_LO, LOG_HI, LOG_STEP = -8.0, 3.0, 0.005
LOG_BINS = round((LOG_HI - LOG_LO) / LOG_STEP)
LOG_EDGES = np.concatenate(([0.0], 10.0 ** np.linspace(LOG_LO, LOG_HI, LOG_BINS + 1), [math.inf]))

QUANTILES = (0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99)


def regime_counts(beta: torch.Tensor) -> torch.Tensor:
    """Tokens per regime, `(5,)` int64, in the order of `REGIMES` (exact comparisons, not bins):
    [0, 0.1), [0.1, 0.9), [0.9, 1.1], (1.1, 1.9], (1.9, 2]."""
    b = beta.detach().flatten()
    lo = torch.tensor([0.1, 0.9], dtype=b.dtype, device=b.device)
    hi = torch.tensor([1.1, 1.9], dtype=b.dtype, device=b.device)
    idx = torch.bucketize(b, lo, right=True)  # 0: < 0.1, 1: [0.1, 0.9), 2: ≥ 0.9
    idx = idx + torch.bucketize(b, hi, right=False)  # + 1 above 1.1, + 2 above 1.9
    return torch.bincount(idx, minlength=len(REGIMES)).cpu()


def beta_histogram(beta: torch.Tensor) -> torch.Tensor:
    """Counts of β in `BETA_BINS` equal bins over [0, 2] (β = 2 falls in the last bin)."""
    b = beta.detach().flatten().double()
    idx = (b * (BETA_BINS / 2.0)).floor().long().clamp(0, BETA_BINS - 1)
    return torch.bincount(idx, minlength=BETA_BINS).cpu()


def log_histogram(x: torch.Tensor) -> torch.Tensor:
    """Counts of non-negative `x` in the bins of `LOG_EDGES` (underflow, log grid, overflow)."""
    x = x.detach().flatten().double()
    with torch.no_grad():
        pos = (torch.log10(x.clamp_min(1e-300)) - LOG_LO) / LOG_STEP
        idx = pos.floor().long() + 1
        idx = torch.where(x < 10.0**LOG_LO, torch.zeros_like(idx), idx)
        idx = idx.clamp(0, LOG_BINS + 1)
    return torch.bincount(idx, minlength=LOG_BINS + 2).cpu()


def histogram_quantiles(
    counts: np.ndarray | torch.Tensor,
    edges: np.ndarray,
    qs: Sequence[float] = QUANTILES,
    log: bool = False,
) -> list[float]:
    """Quantiles of the values a histogram counted, interpolating inside the bin where the
    cumulative count crosses `q·n`: linearly, or geometrically (`log`, for `LOG_EDGES`). NaN for an
    empty histogram."""
    c = np.asarray(counts, dtype=np.float64)
    n = c.sum()
    if n == 0:
        return [math.nan] * len(qs)
    cum = np.cumsum(c)
    out = []
    for q in qs:
        target = q * n
        # the bin of the ⌈qn⌉-th value (q = 0: the first non-empty bin)
        i = int(np.argmax(cum >= target)) if target > 0 else int(np.argmax(c > 0))
        below = cum[i] - c[i]
        frac = 0.0 if c[i] == 0 else (target - below) / c[i]
        lo, hi = float(edges[i]), float(edges[i + 1])
        if math.isinf(hi):  # the overflow bin: its lower edge is all we know
            out.append(lo)
        elif log and lo > 0:
            out.append(lo * (hi / lo) ** frac)
        else:
            out.append(lo + (hi - lo) * frac)
    return out
