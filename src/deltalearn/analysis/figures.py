"""The audit's figures (PNG), drawn from what `audit.json` holds, with matplotlib's object API
(no pyplot, no global backend switch).

    beta_heatmap.png   share of tokens per β bin (0.05 wide), one row per layer and sublayer
    regimes.png        share of tokens in each regime of the spectral analysis, per sublayer
    contraction.png    RMS discrepancy before and after each rewrite, and their ratio
    update_norms.png   ‖X' − X‖ / ‖X‖ per sublayer, beside the baseline's ‖h‖ / ‖X‖ when given
    channels.png       dv > 1: each value channel's share of the writes and of the state
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["FIGURES", "write_figures"]

FIGURES = ("beta_heatmap", "regimes", "contraction", "update_norms", "channels")
HEATMAP_BINS = 40
REGIME_COLORS = ("#9e9e9e", "#64b5f6", "#2e7d32", "#ffb74d", "#d32f2f")


def _labels(rows: list[dict[str, Any]]) -> list[str]:
    return [f"L{r['layer']} {r['sublayer']}" for r in rows]


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def _save(fig: Any, folder: Path, name: str) -> str:
    file = f"{name}.png"
    fig.savefig(folder / file)
    return file


def beta_heatmap(result: dict[str, Any], folder: Path) -> str:
    rows = result["layers"]
    hist = np.asarray(result["beta_histogram"]["counts"], dtype=np.float64)  # (sites, 200)
    coarse = hist.reshape(len(rows), HEATMAP_BINS, -1).sum(-1)
    share = coarse / np.maximum(coarse.sum(1, keepdims=True), 1)
    fig = _figure(8, 1.2 + 0.32 * len(rows))
    ax = fig.add_subplot()
    im = ax.imshow(
        share,
        aspect="auto",
        cmap="magma_r",
        extent=(0, 2, len(rows) - 0.5, -0.5),
        interpolation="nearest",
    )
    for edge in (0.1, 0.9, 1.1, 1.9):
        ax.axvline(edge, color="#1565c0", lw=0.8, ls="--")
    ax.set_yticks(range(len(rows)), _labels(rows))
    ax.set_xlabel("β (dashed: regime boundaries 0.1, 0.9, 1.1, 1.9)")
    ax.set_title(f"{result['variant']}: distribution of β per sublayer ({result['tokens']} tokens)")
    fig.colorbar(im, ax=ax, label="share of tokens per 0.05 bin")
    return _save(fig, folder, "beta_heatmap")


def regimes(result: dict[str, Any], folder: Path) -> str:
    rows = result["layers"]
    names = [r["name"] for r in result["regimes"]]
    fig = _figure(8, 1.4 + 0.32 * len(rows))
    ax = fig.add_subplot()
    left = np.zeros(len(rows))
    y = np.arange(len(rows))
    for name, color in zip(names, REGIME_COLORS, strict=True):
        share = np.array([r["regimes"][name] for r in rows])
        ax.barh(y, share, left=left, color=color, label=name, height=0.8)
        left += share
    ax.set_yticks(y, _labels(rows))
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of tokens")
    ax.set_title(f"{result['variant']}: β regimes per sublayer")
    fig.legend(ncols=5, loc="outside lower center", fontsize=8, frameon=False)
    return _save(fig, folder, "regimes")


def contraction(result: dict[str, Any], folder: Path) -> str:
    rows = result["layers"]
    x = np.arange(len(rows))
    fig = _figure(9, 3.6)
    ax, ax2 = fig.subplots(1, 2, width_ratios=(2, 1))
    pre = [r["e_pre_rms"] for r in rows]
    post = [r["e_post_rms"] for r in rows]
    ax.bar(x - 0.2, pre, 0.4, label="before: RMS kᵀX − v", color="#90a4ae")
    ax.bar(x + 0.2, post, 0.4, label="after: RMS kᵀX' − v", color="#1565c0")
    ax.set_yscale("log")
    ax.set_xticks(x, _labels(rows), rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("discrepancy along k")
    ax.legend(fontsize=8)
    check = result["contraction_check"]
    status = "passed" if check["passed"] else "FAILED"
    ax.set_title(
        f"{result['variant']}: {check['identity']} — check {status} "
        f"(max {check['max_error_over_tolerance']:.2g}× tolerance)",
        fontsize=9,
    )
    ratio = [r["contraction"] for r in rows]
    ax2.barh(x, ratio, color="#1565c0")
    ax2.plot([r["abs_one_minus_beta_mean"] for r in rows], x, "o", color="k", ms=4)
    ax2.axvline(1.0, color="k", lw=0.8)
    ax2.set_yticks(x, _labels(rows), fontsize=8)
    ax2.invert_yaxis()
    ax2.set_xlabel("factor on the discrepancy")
    ax2.set_title("bars: RMS after / RMS before\ndots: mean |1 − β|", fontsize=9)
    return _save(fig, folder, "contraction")


def update_norms(result: dict[str, Any], folder: Path) -> str:
    rows = result["layers"]
    x = np.arange(len(rows))
    fig = _figure(8, 3.4)
    ax = fig.add_subplot()
    additive = result["rule"] == "additive"
    label = "‖h‖ / ‖X‖ (additive branch)" if additive else "‖X' − X‖ / ‖X‖ (rewrite)"
    base = result.get("against")
    width = 0.4 if base else 0.8
    mean = [r["update_ratio_mean"] for r in rows]
    ax.bar(x - (0.2 if base else 0), mean, width, label=f"{result['variant']}: {label}")
    if base:
        b = [r["baseline_update_ratio_mean"] for r in rows]
        ax.bar(x + 0.2, b, width, color="#9e9e9e", label=f"{base['variant']}: ‖h‖ / ‖X‖")
    ax.set_yscale("log")
    ax.set_xticks(x, _labels(rows), rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("mean over tokens (log scale)")
    ax.set_title("How much each sublayer changes the state", fontsize=10)
    ax.legend(fontsize=8)
    return _save(fig, folder, "update_norms")


def channels(result: dict[str, Any], folder: Path) -> str:
    rows = result["layers"]
    dv = result["value_channels"]
    x = np.arange(len(rows))
    fig = _figure(9, 3.6)
    axes = fig.subplots(1, 2, sharey=True)
    colors = [
        "#1565c0",
        "#2e7d32",
        "#ef6c00",
        "#6a1b9a",
        "#00838f",
        "#ad1457",
        "#5d4037",
        "#455a64",
    ]
    for ax, key, title in zip(
        axes,
        ("write_share", "state_share"),
        ("share of the write ‖ΔX_j‖²", "share of the state ‖X_j‖²"),
        strict=True,
    ):
        bottom = np.zeros(len(rows))
        for j in range(dv):
            share = np.array([r["channels"][key][j] for r in rows])
            ax.bar(x, share, bottom=bottom, color=colors[j % len(colors)], label=f"channel {j}")
            bottom += share
        ax.set_xticks(x, _labels(rows), rotation=60, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        ax.set_ylim(0, 1)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, ncols=min(dv, 8), loc="outside lower center", fontsize=8)
    fig.suptitle(f"{result['variant']}: use of the {dv} value channels", fontsize=10)
    return _save(fig, folder, "channels")


def write_figures(result: dict[str, Any], folder: str | Path) -> list[str]:
    """Draw every figure that applies to ``result`` into ``folder``; return their file names."""
    folder = Path(folder)
    files = []
    if result["rule"] != "additive":
        files += [beta_heatmap(result, folder), regimes(result, folder)]
        files.append(contraction(result, folder))
    files.append(update_norms(result, folder))
    if result["rule"] != "additive" and result["value_channels"] > 1:
        files.append(channels(result, folder))
    return files
