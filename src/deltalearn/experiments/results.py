"""The results of a sweep, read back from its run folders alone, and their statistics.

Everything comes from the files the runs wrote — ``config.yaml`` (the cell), ``log.jsonl`` (the
curves and the final validation loss), ``summary.json`` (finished; throughput, memory, params),
``model/config.json`` (FLOPs). Runs of the same (variant, size, lr, steps) are one *cell group*;
its seeds give

* the mean, sample standard deviation and two-sided 95% t interval of the final validation loss
  (and of ``val_bpb``, bits per byte, when the logs have it);
* the difference to the baseline, paired by seed (the same seed trains every variant on the same
  batches in the same order), with its t interval and the paired t-test's p-value. A group is
  paired with the baseline group of the same size, preferring the same lr and steps.

Training wall-clock is rebuilt from the log: each line's ``tokens_per_s`` covers the tokens since
the line before it (evaluation is not timed by the trainer, so it is excluded).
"""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deltalearn.errors import ConfigError, UserError
from deltalearn.experiments.stats import PairedDifference, Summary, paired_difference, summarize

__all__ = [
    "LEVEL",
    "RunRecord",
    "CONTROL_PAIRS",
    "best_learning_rates",
    "collect_runs",
    "control_differences",
    "summarize_sweep",
]

Group = tuple[str, str, float, int]  # variant, size, lr, steps
LEVEL = 0.95


@dataclass
class RunRecord:
    """One run folder of a sweep, read back from its files."""

    name: str
    variant: str
    size: str
    lr: float
    steps: int
    seed: int
    status: str  # finished, diverged, unfinished
    final_loss: float | None = None  # validation loss logged at the last step
    final_bpb: float | None = None
    tokens: int = 0  # training tokens of the run (steps × batch × seq_len)
    params: int | None = None
    tokens_per_s: float | None = None
    peak_memory_mb: float | None = None
    memory_kind: str | None = None
    flops_per_token: float | None = None  # analytic training FLOPs per token
    train_seconds: float | None = None  # training wall-clock (from the logged throughput)
    # evaluation points: step, tokens, val_loss, [val_bpb], seconds, [flops]
    curve: list[dict[str, float]] = field(default_factory=list)

    @property
    def group(self) -> Group:
        return (self.variant, self.size, self.lr, self.steps)


# ---- reading runs --------------------------------------------------------------------------------


def _flops_per_token(run_dir: Path, seq_len: int) -> float | None:
    """From the trained model's config (``model/config.json``) and the analytic FLOP count."""
    try:
        from deltalearn.files import read_json_object
        from deltalearn.models import DeltaLMConfig
        from deltalearn.models.flops import flops_per_token

        values = read_json_object(run_dir / "model" / "config.json", "model config")
        return flops_per_token(DeltaLMConfig.from_dict(values), seq_len).train
    except (ImportError, UserError, ValueError, TypeError):
        return None


def _curve(
    log: list[dict[str, Any]], tokens_per_step: int, flops: float | None
) -> tuple[list[dict[str, float]], float]:
    """Evaluation points with cumulative training seconds: each logged line's throughput
    covers the tokens since the line before it."""
    seconds, last_tokens = 0.0, 0
    points = []
    for r in sorted(log, key=lambda r: r.get("step", 0)):
        step = int(r.get("step", 0))
        tokens = int(r.get("tokens", step * tokens_per_step))
        rate = r.get("tokens_per_s")
        if isinstance(rate, int | float) and rate > 0 and tokens > last_tokens:
            seconds += (tokens - last_tokens) / rate
        last_tokens = max(last_tokens, tokens)
        if "val_loss" in r:
            point = {
                "step": step,
                "tokens": tokens,
                "val_loss": float(r["val_loss"]),
                "seconds": seconds,
            }
            if "val_bpb" in r:
                point["val_bpb"] = float(r["val_bpb"])
            if isinstance(r.get("flops"), int | float):  # cumulative, when the trainer logs it
                point["flops"] = float(r["flops"])
            elif flops is not None:
                point["flops"] = tokens * flops
            points.append(point)
    return points, seconds


def _read_run(run_dir: Path) -> RunRecord | None:
    """The run in ``run_dir``; None when it never started (no config.yaml)."""
    from deltalearn.experiments.runner import DIVERGED_FILE
    from deltalearn.train.config import load_config
    from deltalearn.train.logging import read_log
    from deltalearn.train.trainer import read_summary

    if not (run_dir / "config.yaml").is_file():
        return None
    cfg = load_config(run_dir / "config.yaml")
    summary = read_summary(run_dir)
    status = (
        "finished"
        if summary
        else "diverged"
        if (run_dir / DIVERGED_FILE).is_file()
        else "unfinished"
    )
    log = read_log(run_dir / "log.jsonl") if (run_dir / "log.jsonl").is_file() else []
    r = cfg.run
    tokens_per_step = r.batch_size * r.seq_len
    flops = None
    if summary:  # the trainer's own figure when it wrote one, else counted from the model config
        logged = summary.get("flops_per_token")
        flops = float(logged) if logged else _flops_per_token(run_dir, r.seq_len)
    curve, seconds = _curve(log, tokens_per_step, flops)
    rec = RunRecord(
        name=run_dir.name,
        variant=cfg.model.variant,
        size=cfg.model.size,
        lr=cfg.optim.lr,
        steps=r.steps,
        seed=r.seed,
        status=status,
        tokens=r.steps * tokens_per_step,
        flops_per_token=flops,
        curve=curve,
    )
    if summary:
        last = [p for p in curve if p["step"] == r.steps]
        if not last:
            raise UserError(
                f"run log {run_dir / 'log.jsonl'}: no validation loss at the last step "
                f"({r.steps}) of a finished run (truncated?)"
            )
        rec.final_loss = last[-1]["val_loss"]
        rec.final_bpb = last[-1].get("val_bpb")
        rec.params = summary["params"]
        rec.tokens_per_s = summary["train_tokens_per_s"]
        rec.peak_memory_mb = summary["peak_memory_mb"]
        rec.memory_kind = summary["memory_kind"]
        rec.train_seconds = seconds
    return rec


def collect_runs(sweep_dir: str | Path) -> list[RunRecord]:
    """Every run folder under ``SWEEP_DIR/runs`` that started, in folder-name order."""
    root = Path(sweep_dir)
    if not root.is_dir():
        raise UserError(f"sweep folder {root}: {'is a file' if root.exists() else 'not found'}")
    runs_dir = root / "runs"
    if not runs_dir.is_dir():
        raise UserError(f"sweep folder {root}: no runs/ folder (not a sweep, or nothing ran yet)")
    out = []
    for run_dir in sorted(p for p in runs_dir.iterdir() if p.is_dir()):
        try:
            rec = _read_run(run_dir)
        except ConfigError as e:
            raise UserError(str(e)) from None
        if rec is not None:
            out.append(rec)
    return out


# ---- statistics -------------------------------------------------------------------------------


def _known(values: Any) -> list[float]:
    """The values of finished runs (never None there)."""
    return [float(x) for x in values if x is not None]


def _summary_dict(s: Summary | None) -> dict[str, Any]:
    if s is None:
        return {"n": 0, "mean": None, "std": None, "ci_low": None, "ci_high": None}
    return {"n": s.n, "mean": s.mean, "std": s.std, "ci_low": s.ci_low, "ci_high": s.ci_high}


def _paired_dict(d: PairedDifference | None) -> dict[str, Any] | None:
    return None if d is None else {k: v for k, v in asdict(d).items() if k != "level"}


def _train_flops(run: RunRecord) -> float | None:
    return None if not run.flops_per_token else run.flops_per_token * run.tokens


def _pick_baseline(group: Group, baselines: list[Group]) -> Group | None:
    """The baseline group a group is compared with: same size; then same lr, same steps when
    there is one; None when no single one remains."""
    cands = [b for b in baselines if b[1] == group[1]]
    for i in (2, 3):  # lr, steps
        same = [b for b in cands if b[i] == group[i]]
        if same:
            cands = same
    return cands[0] if len(cands) == 1 else None


def summarize_sweep(
    runs: list[RunRecord], baseline: str, order: list[Group] | None = None
) -> list[dict[str, Any]]:
    """One row per cell group: final loss (and bpb) statistics, the paired difference to the
    baseline, costs. ``order``: groups to list first (the sweep's order)."""
    groups: dict[Group, list[RunRecord]] = {}
    for g in order or []:
        groups.setdefault(g, [])
    for r in runs:
        groups.setdefault(r.group, []).append(r)
    groups = {g: rs for g, rs in groups.items() if rs}
    done = {
        g: sorted((r for r in rs if r.status == "finished"), key=lambda r: r.seed)
        for g, rs in groups.items()
    }
    base_groups = [g for g in groups if g[0] == baseline and done[g]]
    rows = []
    for g, rs in groups.items():
        fin = done[g]
        losses = _known(r.final_loss for r in fin)
        bpbs = _known(r.final_bpb for r in fin)
        has_bpb = bool(fin) and len(bpbs) == len(fin)
        row: dict[str, Any] = {
            "variant": g[0],
            "size": g[1],
            "lr": g[2],
            "steps": g[3],
            "tokens": rs[0].tokens,
            "seeds": [r.seed for r in fin],
            "runs": len(rs),
            "diverged": sorted(r.seed for r in rs if r.status == "diverged"),
            "unfinished": sorted(r.seed for r in rs if r.status == "unfinished"),
            "val_loss": _summary_dict(summarize(losses, LEVEL) if fin else None),
            "val_bpb": _summary_dict(summarize(bpbs, LEVEL) if has_bpb else None),
            "params": fin[0].params if fin else None,
            "flops_per_token": fin[0].flops_per_token if fin else None,
            "train_flops": _train_flops(fin[0]) if fin else None,
            "train_tokens_per_s": statistics.fmean(_known(r.tokens_per_s for r in fin))
            if fin
            else None,
            "peak_memory_mb": max(_known(r.peak_memory_mb for r in fin)) if fin else None,
            "memory_kind": fin[0].memory_kind if fin else None,
            "train_seconds": statistics.fmean(_known(r.train_seconds for r in fin))
            if fin
            else None,
            "train_flops_vs_baseline": None,
            "baseline_group": None,
            "paired_seeds": [],
            "vs_baseline": None,
            "vs_baseline_bpb": None,
        }
        ref = None if g[0] == baseline else _pick_baseline(g, base_groups)
        if ref is not None and fin:
            row["baseline_group"] = list(ref)
            ref_flops = _train_flops(done[ref][0])
            if row["train_flops"] and ref_flops:
                row["train_flops_vs_baseline"] = row["train_flops"] / ref_flops
            seeds, loss, bpb = _paired_by_seed(fin, done[ref])
            row["paired_seeds"], row["vs_baseline"], row["vs_baseline_bpb"] = seeds, loss, bpb
        rows.append(row)
    return rows


def _paired_by_seed(
    runs: list[RunRecord], reference: list[RunRecord]
) -> tuple[list[int], dict[str, Any] | None, dict[str, Any] | None]:
    """Seeds both finished, and the paired differences (runs − reference) of final loss and of
    bits per byte (None without pairs, or where a run logged no bpb)."""
    base = {r.seed: r for r in reference}
    pairs = [(r, base[r.seed]) for r in runs if r.seed in base]
    if not pairs:
        return [], None, None
    loss = paired_difference(
        _known(a.final_loss for a, _ in pairs), _known(b.final_loss for _, b in pairs), LEVEL
    )
    bpb = None
    if all(a.final_bpb is not None and b.final_bpb is not None for a, b in pairs):
        bpb = paired_difference(
            _known(a.final_bpb for a, _ in pairs), _known(b.final_bpb for _, b in pairs), LEVEL
        )
    return [a.seed for a, _ in pairs], _paired_dict(loss), _paired_dict(bpb)


# Pairs of presets whose paired difference says where a gain comes from: (cell, control, what the
# difference isolates). The report lists every pair whose two variants the sweep trained.
CONTROL_PAIRS: tuple[tuple[str, str, str], ...] = (
    ("ddl-cc", "additive-cc", "the delta rewrite, on the same expanded state"),
    ("ddl-cc", "write-only-cc", "the erase term (dv = 4)"),
    ("ddl", "write-only", "the erase term (dv = 1)"),
    ("additive-cc", "baseline", "the expanded state, without the rewrite"),
)


def control_differences(runs: list[RunRecord]) -> list[dict[str, Any]]:
    """The paired differences of :data:`CONTROL_PAIRS` (cell − control, same seeds), one row per
    cell group whose control group is found as a baseline would be (same size; same lr and
    steps when there is such a group)."""
    finished: dict[Group, list[RunRecord]] = {}
    for r in sorted(runs, key=lambda r: r.seed):
        if r.status == "finished":
            finished.setdefault(r.group, []).append(r)
    out = []
    for cell, control, isolates in CONTROL_PAIRS:
        refs = [g for g in finished if g[0] == control]
        for g in (g for g in finished if g[0] == cell):
            ref = _pick_baseline(g, refs)
            if ref is None:
                continue
            seeds, loss, bpb = _paired_by_seed(finished[g], finished[ref])
            if loss is not None:
                out.append(
                    {
                        "group": list(g),
                        "control_group": list(ref),
                        "isolates": isolates,
                        "paired_seeds": seeds,
                        "difference": loss,
                        "difference_bpb": bpb,
                    }
                )
    return out


def best_learning_rates(sweep_dir: str | Path, size: str) -> tuple[dict[str, float], float]:
    """From a finished lr sweep: each variant's best rate, and the best shared rate (see
    ``deltalearn.experiments.sweep.choose_learning_rates``)."""
    runs = [r for r in collect_runs(sweep_dir) if r.size == size]
    rows = summarize_sweep(runs, baseline="")
    complete = [r for r in rows if r["seeds"] and not r["diverged"] and not r["unfinished"]]
    if not complete:
        raise UserError(f"lr sweep {sweep_dir}: no cell of size {size} finished every seed")
    per_variant: dict[str, float] = {}
    by_variant: dict[str, dict[float, float]] = {}
    for r in complete:
        by_variant.setdefault(r["variant"], {})[r["lr"]] = r["val_loss"]["mean"]
    for v, losses in by_variant.items():
        per_variant[v] = min(losses, key=lambda lr: (losses[lr], lr))
    shared_rates = set.intersection(*(set(x) for x in by_variant.values()))
    if not shared_rates:
        raise UserError(f"lr sweep {sweep_dir}: no learning rate finished for every variant")
    shared = min(
        shared_rates, key=lambda lr: (statistics.fmean(by_variant[v][lr] for v in by_variant), lr)
    )
    return per_variant, shared
