"""Small helpers the beyond-LM examples share: seed statistics, β pooling, atomic result files and
their command-line conventions.

    mean_interval([0.97, 0.98, 0.975])   -> {"mean", "half_width", "low", "high", "n", "values"}
    write_json(out / "results.json", obj)   and   save_figure(fig, out / "figure.png")
    p.add_argument("--depths", type=int_list);  check_args(p, args, positive=("seeds", "depths"))

`mean_interval` is the mean with a two-sided Student-t interval over seeds (scipy, which
scikit-learn brings, gives the quantile); files are written atomically (`deltalearn.atomic`).
"""

from __future__ import annotations

import argparse
import io
import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from deltalearn.atomic import atomic_write_bytes, atomic_write_text
from deltalearn.nn.choices import RULES
from deltalearn.nn.residual import GateRecord


def mean_interval(values: Sequence[float], level: float = 0.95) -> dict[str, Any]:
    """Mean and the half-width of a two-sided Student-t `level` interval over `values` (seeds).

    Non-finite values (a diverged run) make the mean and interval NaN; one value gives a NaN
    half-width (no spread to estimate).
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must lie in (0, 1), got {level}")
    vals = [float(v) for v in values]
    if not vals:
        raise ValueError("mean_interval needs at least one value, got none")
    n = len(vals)
    mean = math.fsum(vals) / n
    if n < 2 or not all(math.isfinite(v) for v in vals):
        half = math.nan
    else:
        from deltalearn.experiments.stats import t_quantile  # scipy is not a dependency

        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (n - 1))
        half = t_quantile(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return {
        "mean": mean,
        "half_width": half,
        "low": mean - half,
        "high": mean + half,
        "n": n,
        "level": level,
        "values": vals,
    }


def format_interval(stats: dict[str, Any], digits: int = 4, scale: float = 1.0) -> str:
    """`"0.9812 ± 0.0031"` from a `mean_interval` result (values multiplied by `scale`)."""
    mean, half = stats["mean"] * scale, stats["half_width"] * scale
    return f"{mean:.{digits}f} ± {half:.{digits}f}" if math.isfinite(half) else f"{mean:.{digits}f}"


def pooled_betas(gates: Iterable[GateRecord]) -> torch.Tensor:
    """Every β of a `(output, gates)` call, flattened into one fp32 vector."""
    parts = [g.beta.reshape(-1).float() for g in gates]
    return torch.cat(parts) if parts else torch.empty(0)


def write_json(path: str | Path, obj: Any) -> Path:
    """Write `obj` as indented JSON, atomically (parents created); NaN stays JSON `NaN`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=1) + "\n")
    return path


def save_figure(fig: Any, path: str | Path, dpi: int = 120) -> Path:
    """Save a matplotlib figure as PNG atomically (parents created) and close it."""
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
    return path


def pyplot() -> Any:
    """`matplotlib.pyplot` on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def int_list(text: str) -> tuple[int, ...]:
    """An argparse type: `"1,2,4"` -> `(1, 2, 4)`."""
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def name_list(text: str) -> tuple[str, ...]:
    """An argparse type: `"additive,delta"` -> `("additive", "delta")`."""
    return tuple(v for v in text.split(",") if v)


def check_args(
    parser: argparse.ArgumentParser, args: argparse.Namespace, positive: Sequence[str] = ()
) -> None:
    """Exit through `parser.error` (one line, status 2) for an unknown `args.rules` entry or a
    count in `positive` (an int or a tuple of ints) below 1."""
    unknown = [r for r in args.rules if r not in RULES]
    if unknown or not args.rules:
        parser.error(f"--rules: unknown {unknown or 'none given'}; expected some of {list(RULES)}")
    for name in positive:
        value = getattr(args, name)
        if min(value if isinstance(value, tuple) else (value,), default=0) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """The parsed arguments as a JSON-ready dict (paths as strings)."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
