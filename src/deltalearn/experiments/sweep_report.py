"""``deltalearn report SWEEP_DIR``: the markdown report, CSV tables and loss curves of a sweep.

Written to SWEEP_DIR from its run folders alone (see :mod:`deltalearn.experiments.results`):
``report.md``, ``cells.csv`` (one row per cell group), ``runs.csv`` (one per run),
``results.json`` (all of it), and ``val_loss_tokens.png``, ``val_loss_flops.png``,
``val_loss_time.png`` (validation loss, mean over seeds, against training tokens, analytic
training FLOPs and training wall-clock).
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deltalearn.atomic import atomic_write_text
from deltalearn.errors import UserError
from deltalearn.experiments.results import (
    LEVEL,
    RunRecord,
    collect_runs,
    control_differences,
    summarize_sweep,
)

__all__ = ["SweepReport", "write_sweep_report"]


@dataclass
class SweepReport:
    rows: list[dict[str, Any]]
    runs: list[RunRecord]
    markdown_path: Path
    plots: list[Path]
    table: str


def _num(x: float | None, digits: int = 4) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def _ci(d: dict[str, Any] | None, digits: int = 4) -> str:
    if not d or d.get("ci_low") is None:
        return "–"
    return f"[{d['ci_low']:.{digits}f}, {d['ci_high']:.{digits}f}]"


def _p(p: float | None) -> str:
    return "–" if p is None else f"{p:.2g}" if p >= 1e-4 else "<1e-4"


def _varying(rows: list[dict[str, Any]]) -> list[str]:
    return [k for k in ("size", "lr", "steps") if len({r[k] for r in rows}) > 1]


def _label(row: dict[str, Any], varying: list[str]) -> str:
    parts = [row["variant"]]
    for k in varying:
        parts.append(
            f"lr {row[k]:g}" if k == "lr" else f"{row[k]} steps" if k == "steps" else row[k]
        )
    return " · ".join(parts)


def _loss_table(rows: list[dict[str, Any]], varying: list[str], bpb: bool) -> str:
    head = "| cell | seeds | tokens | final val loss (mean ± sd) | 95% CI |"
    rule = "|---|---|---|---|---|"
    if bpb:
        head += " bits per byte (mean ± sd) | 95% CI |"
        rule += "---|---|"
    lines = [head, rule]
    for r in rows:
        v = r["val_loss"]
        sd = "" if v["std"] is None else f" ± {v['std']:.4f}"
        note = "".join(f" ({len(r[k])} {k})" for k in ("diverged", "unfinished") if r[k])
        line = f"| {_label(r, varying)} | {len(r['seeds'])}{note} | {r['tokens']:,} | {_num(v['mean'])}{sd} | {_ci(v)} |"
        if bpb:
            b = r["val_bpb"]
            bsd = "" if b["std"] is None else f" ± {b['std']:.4f}"
            line += f" {_num(b['mean'])}{bsd} | {_ci(b)} |"
        lines.append(line)
    return "\n".join(lines)


def _group_label(group: list[Any], varying: list[str]) -> str:
    return _label(dict(zip(("variant", "size", "lr", "steps"), group, strict=True)), varying)


def _difference_cells(d: dict[str, Any]) -> str:
    """pairs | Δ mean ± sd | 95% CI | t | p of one paired difference."""
    sd = "" if d["std"] is None else f" ± {d['std']:.4f}"
    t = "–" if d["t"] is None else f"{d['t']:.2f}"
    return f"{d['n']} | {d['mean']:+.4f}{sd} | {_ci(d)} | {t} | {_p(d['p'])}"


def _diff_table(rows: list[dict[str, Any]], varying: list[str], baseline: str) -> str:
    lines = [
        "| cell | vs | pairs | Δ val loss (mean ± sd) | 95% CI | t | p (paired t-test) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        d = r["vs_baseline"]
        if d is None:
            continue
        lines.append(
            f"| {_label(r, varying)} | {_group_label(r['baseline_group'], varying)} | "
            f"{_difference_cells(d)} |"
        )
    if len(lines) == 2:
        return f"(no cell to compare with {baseline!r}: it is missing or has no finished seed)"
    return "\n".join(lines)


def _controls_table(controls: list[dict[str, Any]], varying: list[str]) -> str:
    lines = [
        "| cell | vs control | isolates | pairs | Δ val loss (mean ± sd) | 95% CI | t | p |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in controls:
        cell, ref = (_group_label(g, varying) for g in (c["group"], c["control_group"]))
        lines.append(f"| {cell} | {ref} | {c['isolates']} | {_difference_cells(c['difference'])} |")
    return "\n".join(lines)


def _sci(x: float | None) -> str:
    return "–" if x is None else f"{x:.3g}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def _cost_table(rows: list[dict[str, Any]], varying: list[str]) -> str:
    kind = next((r["memory_kind"] for r in rows if r["memory_kind"]), None)
    mem = "peak CUDA alloc (MB)" if kind == "cuda_max_allocated" else "peak RSS (MB, process)"
    lines = [
        f"| cell | params | train FLOPs / token | train FLOPs (× baseline) | train tok/s | {mem} "
        "| train time |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if not r["seeds"]:
            continue
        ratio = r["train_flops_vs_baseline"]
        total = _sci(r["train_flops"]) + ("" if ratio is None else f" ({ratio:.3f}×)")
        lines.append(
            f"| {_label(r, varying)} | {r['params']:,} | {_sci(r['flops_per_token'])} | {total} | "
            f"{r['train_tokens_per_s']:,.0f} | {r['peak_memory_mb']:,.0f} | "
            f"{_duration(r['train_seconds'])} |"
        )
    return "\n".join(lines)


def _mean_curve(runs: list[RunRecord], row: dict[str, Any], key: str) -> tuple[list, list] | None:
    """``key`` and validation loss at each evaluation step all finished seeds of the row's group
    logged, averaged over the seeds; None when a seed lacks ``key``."""
    group = (row["variant"], row["size"], row["lr"], row["steps"])
    curves = [r.curve for r in runs if r.group == group and r.status == "finished"]
    if not curves or any(key not in p for c in curves for p in c):
        return None
    steps = sorted(set.intersection(*({p["step"] for p in c} for c in curves)))
    points = [[p for c in curves for p in c if p["step"] == s] for s in steps]
    xs = [statistics.fmean(p[key] for p in at) for at in points]
    return xs, [statistics.fmean(p["val_loss"] for p in at) for at in points]


def _plots(
    runs: list[RunRecord], rows: list[dict[str, Any]], varying: list[str], out: Path
) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    axes = [
        ("tokens", "training tokens", "val_loss_tokens.png"),
        ("flops", "training FLOPs (analytic)", "val_loss_flops.png"),
        ("seconds", "training wall-clock", "val_loss_time.png"),
    ]
    written = []
    for key, xlabel, name in axes:
        curves = [(row, c) for row in rows if (c := _mean_curve(runs, row, key)) is not None]
        if not curves:
            continue
        scale = 1.0
        if key == "seconds":
            minutes = max(x for _, (xs, _) in curves for x in xs) > 120
            scale, xlabel = (1 / 60, f"{xlabel} (min)") if minutes else (1.0, f"{xlabel} (s)")
        fig, ax = plt.subplots(figsize=(7.5, 4.8))
        for row, (xs, ys) in curves:
            ax.plot(
                [x * scale for x in xs], ys, marker="o", markersize=2.5, label=_label(row, varying)
            )
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss (nats/token)")
        ax.set_title(f"Validation loss against {xlabel} (mean over seeds)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / name, dpi=120)
        plt.close(fig)
        written.append(out / name)
    return written


def _csv_text(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()


def _flat_row(row: dict[str, Any]) -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in row.items():
        if isinstance(value, dict):
            for k, v in value.items():
                flat[f"{key}_{k}"] = v
        elif key in ("vs_baseline", "vs_baseline_bpb"):
            for k in ("n", "mean", "std", "ci_low", "ci_high", "t", "p"):
                flat[f"{key}_{k}"] = None
        elif isinstance(value, list):
            flat[key] = " ".join(map(str, value))
        else:
            flat[key] = value
    return flat


def _provenance(record: dict[str, Any]) -> list[str]:
    invocations = record.get("invocations") or []
    if not invocations:
        return ["No `sweep.json`: the commands, commit and machine of these runs are unknown.", ""]
    lines = ["Invocations (each `deltalearn sweep` that trained cells into this folder):", ""]
    for inv in invocations:
        m = inv.get("machine") or {}
        gpus = ", ".join(m.get("gpus") or []) or "none"
        lines += [
            f"- `{inv.get('command', '?')}` — {inv.get('started', '?')} to {inv.get('ended', '(running or killed)')}",
            f"  - commit `{inv.get('commit', '?')}`",
            f"  - machine: {m.get('cpu', '?')}, {m.get('usable_cpus') or m.get('logical_cpus', '?')} "
            f"usable cores, {m.get('memory_gib', '?')} GiB, GPUs {gpus}; {m.get('platform', '?')}; "
            f"Python {m.get('python', '?')}, torch {m.get('torch', '?')}, deltalearn "
            f"{m.get('deltalearn', '?')}; {inv.get('jobs', 1)} job(s) at a time",
        ]
    return lines + [""]


def write_sweep_report(sweep_dir: str | Path) -> SweepReport:
    """Read every run of the sweep and write the report files into ``sweep_dir``."""
    from deltalearn.experiments.sweep import SWEEP_FILE

    out = Path(sweep_dir)
    runs = collect_runs(out)
    if not runs:
        raise UserError(f"sweep folder {out}: no run has started yet")
    record: dict[str, Any] = {}
    if (out / SWEEP_FILE).is_file():
        from deltalearn.files import read_json_object

        record = read_json_object(out / SWEEP_FILE, "sweep record")
    baseline = record.get("baseline", "baseline")
    order = [
        (c["variant"], c["size"], float(c["lr"]), int(c["steps"])) for c in record.get("cells", [])
    ]
    rows = summarize_sweep(runs, baseline, order)
    controls = control_differences(runs)
    varying = _varying(rows)
    bpb = any(r["val_bpb"]["mean"] is not None for r in rows)
    plots = _plots(runs, rows, varying, out)
    loss_table = _loss_table(rows, varying, bpb)
    grid = record.get("grid") or {}
    settings = _settings_line(out, runs)
    md = [
        f"# Sweep report: {grid.get('name', out.name)}",
        "",
        *([grid["description"], ""] if grid.get("description") else []),
        settings,
        "",
        f"Learning rate: {record.get('lr_note', 'as each run config says (no sweep.json)')}.",
        f"Steps: {record.get('steps_note', 'as each run config says (no sweep.json)')}.",
        "",
        "## Final validation loss",
        "",
        loss_table,
        "",
        "Mean and sample standard deviation over seeds; 95% confidence interval of the mean from "
        "Student's t with (seeds − 1) degrees of freedom (none for one seed). Loss in nats per "
        "token on the same validation tokens for every run"
        + ("; bits per byte as the trainer logged it (`val_bpb`)." if bpb else "."),
        "",
        f"## Difference to {baseline} (paired by seed)",
        "",
        _diff_table(rows, varying, baseline),
        "",
        "Δ = cell − baseline for each seed both finished (the same seed trains both on the same "
        "batches in the same order, so the seed-to-seed noise of the data order cancels); mean ± sd "
        "of the differences, its 95% t interval, and the two-sided paired t-test of a zero mean. "
        "Negative Δ: lower loss than the baseline.",
        "",
        *_controls_section(controls, varying),
        "## Cost",
        "",
        _cost_table(rows, varying),
        "",
        "Throughput and memory from the same runs (`summary.json`; mean tokens/s over seeds, the "
        "highest peak). FLOPs: the analytic count of `deltalearn.models.flops` (matrix products, "
        "forward + backward). Train time: wall-clock of the training steps, evaluation excluded.",
        "",
        "## Curves",
        "",
        *[f"![{p.stem}]({p.name})" for p in plots],
        "",
    ]
    missing = [r for r in rows if r["diverged"] or r["unfinished"]]
    if missing:
        md += ["## Not finished", ""]
        for r in missing:
            md.append(
                f"- {_label(r, varying)}: seeds diverged {r['diverged'] or 'none'}, "
                f"unfinished {r['unfinished'] or 'none'}"
            )
        md.append("")
    md += ["## Provenance", "", *_provenance(record)]
    md_path = out / "report.md"
    atomic_write_text(md_path, "\n".join(md))
    atomic_write_text(out / "cells.csv", _csv_text([_flat_row(r) for r in rows]))
    run_rows = [
        {k: v for k, v in asdict(r).items() if k != "curve"} | {"run_dir": f"runs/{r.name}"}
        for r in runs
    ]
    atomic_write_text(out / "runs.csv", _csv_text(run_rows))
    results = {
        "baseline": baseline,
        "level": LEVEL,
        "cells": rows,
        "controls": controls,
        "runs": [asdict(r) for r in runs],
    }
    atomic_write_text(out / "results.json", json.dumps(results, indent=1))
    return SweepReport(rows, runs, md_path, plots, loss_table)


def _controls_section(controls: list[dict[str, Any]], varying: list[str]) -> list[str]:
    if not controls:
        return []
    return [
        "## Where the gain comes from (paired controls)",
        "",
        _controls_table(controls, varying),
        "",
        "Δ = cell − control on the seeds both finished, as above: each row isolates one "
        "ingredient (`deltalearn.experiments.results.CONTROL_PAIRS`). Negative Δ: the ingredient "
        "lowers the loss.",
        "",
    ]


def _settings_line(out: Path, runs: list[RunRecord]) -> str:
    from deltalearn.train.config import load_config

    cfg = load_config(out / "runs" / runs[0].name / "config.yaml")
    r, d = cfg.run, cfg.data
    return (
        f"Corpus `{d.source}` ({d.tokenizer} tokenizer, vocab {d.vocab_size}), {r.batch_size} "
        f"sequences × {r.seq_len} tokens per step, warm-up {cfg.schedule.warmup_steps} steps then "
        f"cosine to {cfg.schedule.min_lr_ratio:g}× the peak lr, {r.eval_batches} validation batches "
        f"per evaluation, device {r.device}. The same seed gives every cell the same batches in "
        f"the same order.{_overrides_note(cfg.model.overrides)}"
    )


def _overrides_note(overrides: dict) -> str:
    """The model fields every cell changes from its preset (e.g. the untied-embedding grids)."""
    if not overrides:
        return ""
    listed = ", ".join(f"`{k}={v!r}`" for k, v in sorted(overrides.items()))
    return f" Model changed from its preset in every cell: {listed}."
