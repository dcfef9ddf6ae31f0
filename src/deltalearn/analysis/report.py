"""`report.md` of a gate audit: what `audit.json` holds, as tables, with the figures linked."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from deltalearn.analysis.regimes import REGIME_NAMES

__all__ = ["render_report", "write_report"]


def _f(x: Any, fmt: str = ".3f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return format(x, fmt)


def _table(head: list[str], lines: list[list[str]]) -> list[str]:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(line) + " |" for line in lines]
    return out


def render_report(result: dict[str, Any]) -> str:
    rows = result["layers"]
    data = result.get("data") or {}
    md = [f"# Gate audit: {result.get('run_dir', result['variant'])}", ""]
    md.append(
        f"Variant `{result['variant']}` (rule `{result['rule']}`, d = {result['hidden_size']}, "
        f"{result['num_layers']} layers, dv = {result['value_channels']}); "
        f"{result['tokens']} held-out tokens"
        + (
            f" ({data['batches']} batches of {data['batch_size']} × {data['seq_len']} from the "
            f"`{data['source']}` validation split)."
            if data
            else "."
        )
    )
    md.append("")
    figures = result.get("figures", [])
    if result["rule"] == "additive":
        md += [result["note"], ""]
        md += _update_section(result)
        md += [f"![{f}]({f})" for f in figures]
        return "\n".join(md) + "\n"

    check = result["contraction_check"]
    status = "PASSED" if check["passed"] else "FAILED — a bug in the rewrite"
    md += [
        "## Rewrite check on real activations",
        "",
        f"**{status}.** For every token, sublayer and value channel: `{check['identity']}` and "
        "`(I − k̂k̂ᵀ)(X' − X) = 0`, recomputed in float64 from the model's own X, X', h, β and v, "
        f"within `{check['tolerance']}` (a worst-case round-off bound, see "
        "`deltalearn/analysis/capture.py`).",
        "",
        *(
            [
                "The write-only control has no erase term, so the readout moves by βv instead of "
                "contracting: its identity is the one above, its discrepancy ratio below is not "
                "the factor 1 − β, and its shortcut is the identity whatever β, so the β regimes "
                "only describe the gate.",
                "",
            ]
            if result["rule"] == "write_only"
            else []
        ),
        f"- values checked: {check['values']}, beyond the bound: {check['failures']}",
        f"- max |error|: {check['max_abs_error']:.3g}; max |error| / scale: "
        f"{check['max_relative_error']:.3g}",
        f"- max error / tolerance: {check['max_error_over_tolerance']:.3g}; max off-k motion / "
        f"tolerance: {check['max_orthogonal_over_tolerance']:.3g}",
        "",
        "## β per sublayer",
        "",
        "Regimes (share of tokens): near-identity β < 0.1, partial 0.1–0.9, near-overwrite "
        "0.9–1.1, over-relaxed 1.1–1.9, near-reflection > 1.9.",
        "",
    ]
    head = ["layer", "sublayer", "mean", "std", "q05", "median", "q95", *REGIME_NAMES]
    md += _table(
        head,
        [
            [
                str(r["layer"]),
                r["sublayer"],
                _f(r["beta_mean"]),
                _f(r["beta_std"]),
                _f(r["beta_quantiles"]["0.05"]),
                _f(r["beta_quantiles"]["0.5"]),
                _f(r["beta_quantiles"]["0.95"]),
                *[_f(r["regimes"][n]) for n in REGIME_NAMES],
            ]
            for r in rows
        ],
    )
    md += ["", *[f"![{f}]({f})" for f in figures if f in ("beta_heatmap.png", "regimes.png")], ""]
    md += [
        "## Discrepancy before and after each rewrite",
        "",
        "e = kᵀX − v along the rewrite direction k (RMS over tokens and value channels); the "
        "contraction is RMS(e_post) / RMS(e_pre), to compare with the mean |1 − β|.",
        "",
    ]
    md += _table(
        ["layer", "sublayer", "RMS e_pre", "RMS e_post", "contraction", "mean abs(1 − β)"],
        [
            [
                str(r["layer"]),
                r["sublayer"],
                _f(r["e_pre_rms"], ".4g"),
                _f(r["e_post_rms"], ".4g"),
                _f(r["contraction"]),
                _f(r["abs_one_minus_beta_mean"]),
            ]
            for r in rows
        ],
    )
    md += ["", *[f"![{f}]({f})" for f in figures if f == "contraction.png"], ""]
    md += _update_section(result)
    md += [*[f"![{f}]({f})" for f in figures if f == "update_norms.png"], ""]
    if result["value_channels"] > 1:
        md += _channel_section(result)
        md += [*[f"![{f}]({f})" for f in figures if f == "channels.png"], ""]
    return "\n".join(md) + "\n"


def _update_section(result: dict[str, Any]) -> list[str]:
    rows = result["layers"]
    base = result.get("against")
    additive = result["rule"] == "additive"
    md = ["## How much each sublayer changes the state", ""]
    what = "‖h‖ / ‖X‖ of the additive branch" if additive else "‖X' − X‖ / ‖X‖ of the rewrite"
    md.append(f"Per token {what}, mean and median over tokens; ‖X‖ is the state entering it.")
    if base:
        md.append(
            f"Beside it, the baseline `{base.get('run_dir', base['variant'])}` ({base['tokens']} "
            "tokens of its own validation split): its branch's ‖h‖ / ‖X‖ at the same layer and sublayer."
        )
    md.append("")
    head = ["layer", "sublayer", "mean ‖X‖", "mean ‖ΔX‖", "mean ratio", "median ratio"]
    if base:
        head += ["baseline mean ‖h‖/‖X‖", "baseline median", "ratio of medians"]
    lines = []
    for r in rows:
        line = [
            str(r["layer"]),
            r["sublayer"],
            _f(r["state_norm_mean"], ".4g"),
            _f(r["update_norm_mean"], ".4g"),
            _f(r["update_ratio_mean"], ".4f"),
            _f(r["update_ratio_median"], ".4f"),
        ]
        if base:
            b = r["baseline_update_ratio_median"]
            line += [
                _f(r["baseline_update_ratio_mean"], ".4f"),
                _f(b, ".4f"),
                _f(r["update_ratio_median"] / b if b else None, ".2f"),
            ]
        lines.append(line)
    return md + _table(head, lines) + [""]


def _channel_section(result: dict[str, Any]) -> list[str]:
    rows = result["layers"]
    dv = result["value_channels"]
    md = [
        "## Value channels",
        "",
        f"Per channel j = 0..{dv - 1}: its share of the write energy ‖ΔX_j‖², of the state "
        "energy ‖X_j‖², of the compressor's read weights (Σ_i |c_ij|), the RMS target v_j; the "
        f"participation ratio (Σ_j w_j)² / Σ_j w_j² of a token's write (1 = one channel, {dv} = "
        "all equally) and the mean cosine between the state's channel columns (1 = copies).",
        "",
    ]

    def vec(xs: Any, fmt: str = ".2f") -> str:
        return " / ".join(_f(x, fmt) for x in xs) if xs is not None else "–"

    head = ["layer", "sublayer", "write share", "state share", "read share", "RMS v_j"]
    head += ["write participation", "channel cosine"]
    lines = [
        [
            str(r["layer"]),
            r["sublayer"],
            vec(r["channels"]["write_share"]),
            vec(r["channels"]["state_share"]),
            vec(r["channels"].get("read_share")),
            vec(r["channels"]["target_rms"], ".3g"),
            _f(r["channels"]["write_participation_mean"], ".2f"),
            _f(r["channels"]["state_channel_cosine_mean"], ".3f"),
        ]
        for r in rows
    ]
    return md + _table(head, lines) + [""]


def write_report(result: dict[str, Any], path: str | Path) -> None:
    Path(path).write_text(render_report(result), encoding="utf-8")
