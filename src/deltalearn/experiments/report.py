"""The comparison report: ``results.json``, ``results.csv``, ``report.md`` and ``val_loss.png``."""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deltalearn.atomic import atomic_write_text
from deltalearn.train.config import TrainConfig
from deltalearn.train.logging import read_log

__all__ = ["Report", "write_report"]

PAPER_NOTE = (
    "Paper (arXiv 2601.00417, §5), 124M models after 49B tokens: baseline 2.8543, DDL d_v=1 "
    "2.8482, DDL-CC 2.8329 final validation loss. The runs here are tiny and short; they check "
    "that the variants train and show the direction and cost of the effect, not its size."
)


@dataclass
class Report:
    rows: list[dict[str, Any]]  # one aggregated row per variant
    table: str  # the markdown table
    markdown_path: Path
    plot_path: Path | None


def _mean_std(values: list[float]) -> tuple[float, float | None]:
    if len(values) == 1:
        return values[0], None
    return statistics.fmean(values), statistics.stdev(values)


def _fmt(mean: float, std: float | None, digits: int = 4) -> str:
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _collect(
    runs: list[TrainConfig],
) -> tuple[list[dict[str, Any]], dict[str, list[list[tuple[int, float]]]]]:
    per_run: list[dict[str, Any]] = []
    curves: dict[str, list[list[tuple[int, float]]]] = {}
    for t in runs:
        run = Path(t.run.out)
        summary = json.loads((run / "summary.json").read_text())
        log = read_log(run / "log.jsonl") if (run / "log.jsonl").is_file() else []
        curve = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
        curves.setdefault(t.model.variant, []).append(curve)
        per_run.append(
            {"variant": t.model.variant, "seed": t.run.seed, "run_dir": str(run), **summary}
        )
    return per_run, curves


def _aggregate(per_run: list[dict[str, Any]], variants: list[str]) -> list[dict[str, Any]]:
    rows = []
    for v in variants:
        rs = [r for r in per_run if r["variant"] == v]
        losses = [r["val_loss"] for r in rs]
        loss, loss_std = _mean_std(losses)
        ppl, ppl_std = _mean_std([math.exp(x) for x in losses])
        tps, _ = _mean_std([r["train_tokens_per_s"] for r in rs])
        mem = max(r["peak_memory_mb"] for r in rs)
        rows.append(
            {
                "variant": v,
                "seeds": [r["seed"] for r in rs],
                "val_loss": loss,
                "val_loss_std": loss_std,
                "perplexity": ppl,
                "perplexity_std": ppl_std,
                "params": rs[0]["params"],
                "train_tokens_per_s": tps,
                "peak_memory_mb": mem,
                "memory_kind": rs[0]["memory_kind"],
            }
        )
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    kind = rows[0]["memory_kind"] if rows else ""
    mem_label = "peak CUDA alloc (MB)" if kind == "cuda_max_allocated" else "peak RSS (MB, process)"
    base = next((r for r in rows if r["variant"] == "baseline"), None)
    lines = [
        f"| variant | final val loss | perplexity | Δ loss vs baseline | params | train tok/s | {mem_label} |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = "" if base is None or r is base else f"{r['val_loss'] - base['val_loss']:+.4f}"
        lines.append(
            f"| {r['variant']} | {_fmt(r['val_loss'], r['val_loss_std'])} | "
            f"{_fmt(r['perplexity'], r['perplexity_std'], 2)} | {delta} | {r['params']:,} | "
            f"{r['train_tokens_per_s']:,.0f} | {r['peak_memory_mb']:,.0f} |"
        )
    return "\n".join(lines)


def _plot(curves: dict[str, list[list[tuple[int, float]]]], path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for variant, runs in curves.items():
        steps = sorted({s for run in runs for s, _ in run})
        means = []
        for s in steps:
            vals = [v for run in runs for st, v in run if st == s]
            means.append(statistics.fmean(vals))
        ax.plot(steps, means, marker="o", markersize=3, label=variant)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss")
    ax.set_title("Validation loss (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(cfg: Any, runs: list[TrainConfig], wall_time_s: float | None = None) -> Report:
    """Aggregate the finished runs into ``cfg.out``: json, csv, markdown and the loss plot."""
    out = Path(cfg.out)
    per_run, curves = _collect(runs)
    rows = _aggregate(per_run, list(dict.fromkeys(t.model.variant for t in runs)))
    table = _table(rows)
    atomic_write_text(
        out / "results.json",
        json.dumps({"settings": asdict(cfg), "variants": rows, "runs": per_run}, indent=1),
    )
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "seeds"] + ["seeds"])
        writer.writeheader()
        for r in rows:
            writer.writerow({**r, "seeds": " ".join(map(str, r["seeds"]))})
    plot = _plot(curves, out / "val_loss.png")
    t0 = runs[0]
    tokens = t0.run.steps * t0.run.batch_size * t0.run.seq_len
    md = [
        "# deltalearn compare",
        "",
        f"Corpus `{t0.data.source}` (BPE vocab {t0.data.vocab_size}), model size `{t0.model.size}`, "
        f"{t0.run.steps} steps × {t0.run.batch_size} sequences × {t0.run.seq_len} tokens "
        f"= {tokens:,} training tokens per run, peak lr {t0.optim.lr:g} (warm-up "
        f"{t0.schedule.warmup_steps}, cosine to {t0.schedule.min_lr_ratio:g}×), "
        f"seeds {', '.join(map(str, cfg.seeds))}. Every variant sees the same batches in the same order.",
        "",
        table,
        "",
        "Val loss: mean next-token cross-entropy (nats) on the same "
        f"{t0.run.eval_batches} validation batches at the last step"
        + ("; mean ± sample std over seeds." if len(cfg.seeds) > 1 else "; one seed."),
        "Peak memory: on CPU the peak resident set of the training process (Python and torch "
        "included, so differences between variants are what matters); on CUDA "
        "`torch.cuda.max_memory_allocated`.",
        "",
        PAPER_NOTE,
        "",
    ]
    if plot is not None:
        md += ["![validation loss](val_loss.png)", ""]
    if wall_time_s is not None:
        md += [f"Wall time of this invocation: {wall_time_s / 60:.1f} min.", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(md))
    return Report(rows, table, path, plot)
