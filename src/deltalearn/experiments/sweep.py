"""``deltalearn sweep GRID``: train every cell of a grid, resumably, then write the report.

Layout of the sweep folder::

    SWEEP_DIR/sweep.json          the grid, its cells, and every invocation (command, commit,
                                  machine, start and end): what the report needs besides the logs
    SWEEP_DIR/runs/CELL/          one training run per cell (config.yaml, log.jsonl, summary.json,
                                  checkpoints/, model/): see deltalearn.train
    SWEEP_DIR/report.md ...       written at the end (deltalearn.experiments.sweep_report)

A cell whose run finished (a complete ``summary.json`` and the same settings) is never trained
again, an interrupted one resumes from its last checkpoint, a diverged one is not retried; a run
folder holding other settings stops the sweep before anything trains (use another ``--out``).
How the cells run (own processes, ``jobs`` at a time, Ctrl-C): :mod:`deltalearn.experiments.runner`.
"""

from __future__ import annotations

import datetime
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deltalearn.atomic import atomic_write_text
from deltalearn.errors import ConfigError, UserError
from deltalearn.experiments.grid import Cell, Grid, cell_config, plan_cells
from deltalearn.experiments.provenance import machine_info, source_commit
from deltalearn.experiments.runner import DIVERGED_FILE, say, train_cells
from deltalearn.train.config import TrainConfig, config_diff, load_config

__all__ = [
    "SWEEP_FILE",
    "SweepOptions",
    "SweepResult",
    "choose_learning_rates",
    "lr_note",
    "plan",
    "run_sweep",
    "train_flops_per_token",
]

SWEEP_FILE = "sweep.json"


@dataclass
class SweepOptions:
    out: str  # the sweep folder
    jobs: int = 1  # cells trained at the same time, each in its own process
    threads: int | None = None  # torch threads per cell; None: cores / jobs (all when jobs = 1)
    progress: bool = True  # per-cell progress bars (jobs = 1 only; the sweep's lines always)
    command: str = ""  # the command line, recorded for the report
    lr_note: str = ""  # where the learning rates came from (see choose_learning_rates)
    dry_run: bool = False  # plan and print the cells, train nothing
    report: bool = True  # write the report at the end


@dataclass
class SweepResult:
    out: Path
    cells: list[Cell]
    finished: list[str] = field(default_factory=list)  # cell names
    skipped: list[str] = field(default_factory=list)  # finished before this invocation
    diverged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    report: Any = None


# ---- FLOPs ------------------------------------------------------------------------------------


def train_flops_per_token(cfg: TrainConfig, vocab_size: int | None = None) -> float:
    """Analytic training FLOPs per token of a cell's model (``deltalearn.models.flops``)."""
    from deltalearn.models.flops import flops_per_token
    from deltalearn.train.build import model_config

    vocab = cfg._model_vocab_size() if vocab_size is None else vocab_size
    return flops_per_token(model_config(cfg, vocab), cfg.run.seq_len).train


# ---- learning rates from an lr sweep --------------------------------------------------------


def choose_learning_rates(
    grid: Grid, lr_sweep_dir: str | Path, choice: str = "per-variant"
) -> tuple[Grid, str]:
    """``grid`` with its learning rates taken from a finished lr sweep, and a note saying which.

    ``per-variant``: each variant the sweep tried gets its own best rate (lowest mean final
    validation loss over seeds); ``shared``: every variant gets the one rate whose mean over the
    swept variants is lowest. Variants the sweep did not try get the shared best rate. Only rates
    at which every seed of a variant finished count (a diverged cell rules its rate out).
    """
    from deltalearn.experiments.results import best_learning_rates

    if choice not in ("per-variant", "shared"):
        raise ConfigError(f"--lr-choice must be per-variant or shared, got {choice!r}")
    per_variant, shared = best_learning_rates(lr_sweep_dir, size=grid.size[0])
    rates: dict[str, float] = {}
    sources: list[str] = []
    for v in grid.variants:
        if choice == "per-variant" and v in per_variant:
            rates[v] = per_variant[v]
            sources.append(f"{v} {per_variant[v]:g}")
        else:
            rates[v] = shared
    if choice == "shared":
        note = (
            f"one shared learning rate {shared:g} for every variant: the rate with the lowest mean "
            f"final validation loss over {', '.join(sorted(per_variant))} in the lr sweep "
            f"{lr_sweep_dir}"
        )
    else:
        untuned = [v for v in grid.variants if v not in per_variant]
        note = (
            f"the best learning rate per variant from the lr sweep {lr_sweep_dir} "
            f"({', '.join(sources)})"
        )
        if untuned:
            note += (
                f"; {', '.join(untuned)} (not in that sweep) take the best shared rate {shared:g}"
            )
    new = Grid(**{**grid.__dict__, "lr": rates})
    return new, note


def lr_note(grid: Grid) -> str:
    """How the grid's learning rates were chosen, for the report."""
    if isinstance(grid.lr, dict):
        rates = ", ".join(f"{v} {x:g}" for v, x in grid.lr.items())
        return f"a learning rate per variant, as the grid lists them ({rates})"
    if len(grid.lr) == 1:
        return (
            f"one shared learning rate {grid.lr[0]:g} for every variant (the grid's; not tuned "
            "per variant: see the lr grid and --lr-from)"
        )
    return f"a learning-rate axis: every variant at each of {', '.join(f'{x:g}' for x in grid.lr)}"


# ---- planning ----------------------------------------------------------------------------------


def plan(
    grid: Grid, out: str | Path, vocab_size: int | None = None
) -> list[tuple[Cell, TrainConfig]]:
    """Every cell of ``grid`` with its validated TrainConfig (run folders under ``out/runs``).

    ``vocab_size``: the prepared tokenizer's (equal-flops counts the LM head with it); by default
    the configured one.
    """

    def flops(cfg: TrainConfig) -> float:
        return train_flops_per_token(cfg, vocab_size)

    cells = plan_cells(grid, flops if grid.steps_rule == "equal-flops" else None)
    return [(c, cell_config(grid, c, out)) for c in cells]


def _status(cfg: TrainConfig) -> str:
    """finished, diverged, resumable (a checkpoint to resume from) or new. Raises UserError when
    the run folder holds a run with other settings."""
    from deltalearn.train.checkpoint import latest_checkpoint
    from deltalearn.train.trainer import read_summary

    run = Path(cfg.run.out)
    saved = run / "config.yaml"
    if saved.is_file():
        diff = config_diff(load_config(saved), cfg)
        if diff:
            raise UserError(
                f"{run} was trained with other settings ({', '.join(diff)}); "
                "use another --out for a changed grid"
            )
        if read_summary(run) is not None:
            return "finished"
        if (run / DIVERGED_FILE).is_file():
            return "diverged"
    if latest_checkpoint(run) is not None:
        return "resumable"
    return "new"


# ---- the sweep record ---------------------------------------------------------------------------


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def _read_record(out: Path) -> dict[str, Any]:
    try:
        record = json.loads((out / SWEEP_FILE).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def _write_record(out: Path, record: dict[str, Any]) -> None:
    atomic_write_text(out / SWEEP_FILE, json.dumps(record, indent=1))


def run_sweep(grid: Grid, opts: SweepOptions) -> SweepResult:
    """Train every cell of ``grid`` not finished yet into ``opts.out``, then write the report."""
    from deltalearn.train.build import prepare_data

    if opts.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {opts.jobs}")
    if opts.threads is not None and opts.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {opts.threads}")
    out = Path(opts.out)
    vocab = None
    if not opts.dry_run:
        first = cell_config(grid, plan_cells(grid, lambda t: 1.0)[0], out)
        vocab = prepare_data(first, progress=opts.progress).vocab_size  # once, before the cells
    cells = plan(grid, out, vocab)
    result = SweepResult(out, [c for c, _ in cells])
    if opts.dry_run:
        for c, t in cells:
            say(f"{c.name}  ({t.run.steps} steps × {t.run.batch_size} × {t.run.seq_len} tokens)")
        say(f"{len(cells)} cells (dry run: nothing trained)")
        return result
    status = {c.name: _status(t) for c, t in cells}
    out.mkdir(parents=True, exist_ok=True)
    record = _read_record(out)
    invocation = {
        "command": opts.command,
        "commit": source_commit(),
        "machine": machine_info(),
        "jobs": opts.jobs,
        "threads": opts.threads,
        "started": _now(),
    }
    record.update(
        grid={"name": grid.name, "source": grid.source, **grid.to_dict()},
        baseline=grid.baseline,
        lr_note=opts.lr_note or lr_note(grid),
        steps_note=_steps_note(grid),
        cells=[{"name": c.name, **asdict(c)} for c, _ in cells],
    )
    record.setdefault("invocations", []).append(invocation)
    _write_record(out, record)
    for c, _ in cells:
        if status[c.name] == "finished":
            result.skipped.append(c.name)
        elif status[c.name] == "diverged":
            result.diverged.append(c.name)
    if result.skipped or result.diverged:
        say(
            f"{len(result.skipped)} of {len(cells)} cells already finished"
            + (f", {len(result.diverged)} diverged" if result.diverged else "")
            + ": not trained again"
        )
    todo = [(c, t) for c, t in cells if status[c.name] in ("new", "resumable")]
    try:
        outcome = train_cells(todo, len(cells), opts.jobs, opts.threads, opts.progress)
        result.finished, result.failed = outcome.finished, outcome.failed
        result.diverged += outcome.diverged
    finally:
        invocation["ended"] = _now()
        _write_record(out, record)
    if opts.report:
        from deltalearn.experiments.sweep_report import write_sweep_report

        result.report = write_sweep_report(out)
    if result.failed:
        raise UserError(
            f"{len(result.failed)} cell(s) failed: {', '.join(result.failed)} (see above); "
            "run the same command again to retry them"
        )
    return result


def _steps_note(grid: Grid) -> str:
    if grid.steps_rule == "equal-flops":
        return (
            f"equal training FLOPs: {grid.baseline} trains the grid's steps, every other variant "
            "the steps that spend the same analytic training FLOPs (deltalearn.models.flops: "
            "matrix products, 2 FLOPs per multiply-add, forward + backward), rounded"
        )
    return "equal tokens: every variant trains the same steps"
