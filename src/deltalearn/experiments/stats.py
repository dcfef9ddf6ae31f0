"""Small-sample statistics for the sweep report: t intervals and the paired t-test.

Student's t distribution is evaluated in closed form for integer degrees of freedom (the only
kind a seed count gives), after Abramowitz & Stegun 26.7.3–26.7.4: with ``θ = atan(t / √ν)``,

    A(t | ν) = P(|T| ≤ t) = sin θ · Σ_{j<ν/2} c_j cos^{2j} θ,        c_0 = 1, c_j = c_{j-1}(2j-1)/(2j)
                                                                     (ν even)
                          = (2/π) (θ + sin θ cos θ · Σ_{j<(ν-1)/2} d_j cos^{2j} θ),
                                                                     d_0 = 1, d_j = d_{j-1}(2j)/(2j+1)
                                                                     (ν odd; the sum is empty for ν = 1)

so no SciPy is needed. Quantiles invert ``A`` by bisection (to round-off: 200 halvings).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "PairedDifference",
    "Summary",
    "paired_difference",
    "summarize",
    "t_central_probability",
    "t_quantile",
    "t_two_sided_p",
]


def _check_df(df: int) -> None:
    if isinstance(df, bool) or not isinstance(df, int) or df < 1:
        raise ValueError(f"degrees of freedom must be an integer >= 1, got {df!r}")


def t_central_probability(t: float, df: int) -> float:
    """``P(|T| <= t)`` for Student's t with ``df`` degrees of freedom (``t >= 0``; inf gives 1)."""
    _check_df(df)
    t = abs(t)
    if math.isinf(t):
        return 1.0
    theta = math.atan(t / math.sqrt(df))
    s, c2 = math.sin(theta), math.cos(theta) ** 2
    if df % 2 == 0:
        term, total = 1.0, 1.0
        for j in range(1, df // 2):
            term *= c2 * (2 * j - 1) / (2 * j)
            total += term
        return min(1.0, s * total)
    if df == 1:
        return 2 * theta / math.pi
    term, total = 1.0, 1.0
    for j in range(1, (df - 1) // 2):
        term *= c2 * (2 * j) / (2 * j + 1)
        total += term
    return min(1.0, 2 / math.pi * (theta + s * math.cos(theta) * total))


def t_two_sided_p(t: float, df: int) -> float:
    """Two-sided p-value of a t statistic: ``P(|T| >= |t|)``."""
    if math.isnan(t):
        return math.nan
    return max(0.0, 1.0 - t_central_probability(t, df))


def t_quantile(probability: float, df: int) -> float:
    """The ``probability`` quantile of Student's t (``0 < probability < 1``)."""
    _check_df(df)
    if not 0.0 < probability < 1.0:
        raise ValueError(f"probability must lie in (0, 1), got {probability!r}")
    if probability == 0.5:
        return 0.0
    central = abs(2 * probability - 1)  # P(|T| <= q) for the upper quantile q
    lo, hi = 0.0, 1.0
    while t_central_probability(hi, df) < central:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_central_probability(mid, df) < central:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 4 * math.ulp(hi):
            break
    q = (lo + hi) / 2
    return q if probability > 0.5 else -q


@dataclass(frozen=True)
class Summary:
    """Mean, sample standard deviation and the two-sided t interval of the mean."""

    n: int
    mean: float
    std: float | None  # None for one value
    ci_low: float | None
    ci_high: float | None
    level: float = 0.95

    @property
    def half_width(self) -> float | None:
        if self.ci_low is None or self.ci_high is None:
            return None
        return (self.ci_high - self.ci_low) / 2


def _interval(mean: float, std: float, n: int, level: float) -> tuple[float, float]:
    half = t_quantile(0.5 + level / 2, n - 1) * std / math.sqrt(n)
    return mean - half, mean + half


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"confidence level must lie in (0, 1), got {level!r}")


def summarize(values: Sequence[float], level: float = 0.95) -> Summary:
    """:class:`Summary` of ``values`` (at least one); the interval needs two or more."""
    _check_level(level)
    if not values:
        raise ValueError("summarize needs at least one value, got none")
    n, mean = len(values), statistics.fmean(values)
    if n == 1:
        return Summary(1, mean, None, None, None, level)
    std = statistics.stdev(values)
    low, high = _interval(mean, std, n, level)
    return Summary(n, mean, std, low, high, level)


@dataclass(frozen=True)
class PairedDifference:
    """Mean of ``a_i − b_i`` over pairs, its t interval, and the paired t-test of a zero mean."""

    n: int
    mean: float
    std: float | None  # of the differences; None for one pair
    ci_low: float | None
    ci_high: float | None
    t: float | None  # mean / (std / √n); ±inf when every difference is the same non-zero value
    p: float | None  # two-sided p-value of the paired t-test
    level: float = 0.95


def paired_difference(
    a: Sequence[float], b: Sequence[float], level: float = 0.95
) -> PairedDifference:
    """Paired comparison of ``a`` with ``b`` (same length, pair ``i`` = same seed)."""
    if len(a) != len(b):
        raise ValueError(f"paired samples must have the same length, got {len(a)} and {len(b)}")
    diffs = [x - y for x, y in zip(a, b, strict=True)]
    s = summarize(diffs, level)
    if s.std is None:
        return PairedDifference(1, s.mean, None, None, None, None, None, level)
    if s.std == 0.0:
        t = 0.0 if s.mean == 0 else math.copysign(math.inf, s.mean)
    else:
        t = s.mean / (s.std / math.sqrt(s.n))
    return PairedDifference(
        s.n, s.mean, s.std, s.ci_low, s.ci_high, t, t_two_sided_p(t, s.n - 1), level
    )
