"""``deltalearn compare``: train several variants on the same tokens and seeds, then report.

Each (variant, seed) trains in its own fresh process (``multiprocessing`` spawn), so the peak
memory measured for one variant is not inflated by another, and runs are resumable: a run that
finished (a complete ``summary.json``) is skipped when the command is repeated with the same out
folder, and an interrupted one continues from its last checkpoint.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deltalearn.errors import UserError
from deltalearn.train.config import TrainConfig, config_diff, load_config

__all__ = ["CompareConfig", "run_compare", "run_config"]

DEFAULT_VARIANTS = ["baseline", "ddl", "ddl-cc", "write-only-cc"]


@dataclass
class CompareConfig:
    out: str = "runs/compare"  # folder for the runs and the report
    variants: list[str] = field(default_factory=lambda: list(DEFAULT_VARIANTS))  # preset names
    seeds: list[int] = field(default_factory=lambda: [1337])  # several → mean ± std in the table
    # Defaults sized so that data prep + 4 tiny runs + report take < 15 min on 2 CPU cores
    # (measured ~9 min on a shared machine; see the README).
    steps: int = 300  # optimizer steps per run
    batch_size: int = 16  # sequences per step
    seq_len: int = 128  # tokens per sequence
    lr: float = 2e-3  # peak learning rate (warm-up 20 steps, cosine to 10%)
    size: str = "tiny"  # model size preset
    data: str = "shakespeare"  # corpus
    vocab_size: int = 4096  # BPE vocabulary trained on the corpus
    max_chars: int | None = None  # use only the first N characters of the corpus (quick checks)
    cache_dir: str | None = None  # prepared-token cache; None = the data layer's default
    eval_interval: int = 25  # validation every N steps (the curves in val_loss.png)
    eval_batches: int = 8  # validation batches per evaluation
    device: str = "auto"  # auto, cpu, cuda
    progress: bool = True  # progress bars


def run_config(cfg: CompareConfig, variant: str, seed: int) -> TrainConfig:
    """The training config of one (variant, seed): everything equal except the variant."""
    t = TrainConfig()
    t.model.variant, t.model.size = variant, cfg.size
    t.data.source, t.data.vocab_size = cfg.data, cfg.vocab_size
    t.data.max_chars, t.data.cache_dir = cfg.max_chars, cfg.cache_dir
    t.optim.lr = cfg.lr
    t.schedule.warmup_steps = min(t.schedule.warmup_steps, max(cfg.steps // 10, 1))
    r = t.run
    r.out = str(Path(cfg.out) / "runs" / f"{variant}-seed{seed}")
    r.steps, r.batch_size, r.seq_len, r.seed = cfg.steps, cfg.batch_size, cfg.seq_len, seed
    r.eval_interval = max(min(cfg.eval_interval, cfg.steps), 1)
    r.eval_batches, r.device, r.progress = cfg.eval_batches, cfg.device, cfg.progress
    r.checkpoint_interval = max(cfg.steps // 4, 1)  # an interrupted compare loses little
    r.keep_checkpoints = 1
    r.tensorboard = False
    t.validate()
    return t


def _child(cfg_dict: dict[str, Any]) -> None:
    """Entry of the spawned training process."""
    from deltalearn.train.config import config_from_dict
    from deltalearn.train.trainer import train

    train(config_from_dict(cfg_dict), resume=True)


def _finished(t: TrainConfig) -> bool:
    """A complete ``summary.json`` (a torn one does not count) and the same settings."""
    from deltalearn.train.trainer import read_summary

    run = Path(t.run.out)
    if read_summary(run) is None or not (run / "config.yaml").is_file():
        return False
    return not config_diff(load_config(run / "config.yaml"), t)


def _train_one(t: TrainConfig) -> None:
    run = Path(t.run.out)
    if (run / "config.yaml").is_file():
        diff = config_diff(load_config(run / "config.yaml"), t)
        if diff:
            raise UserError(
                f"{run} was trained with other settings ({', '.join(diff)}); use another --out"
            )
    # OpenMP threads that spin while waiting slow training down ~30x when another process holds
    # a core (measured on a shared 2-core machine); passive waiting costs little when idle.
    # The child is a fresh interpreter, so this reaches its OpenMP runtime; users can override.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    proc = mp.get_context("spawn").Process(target=_child, args=(asdict(t),))
    proc.start()
    proc.join()
    from deltalearn.train.trainer import read_summary

    if proc.exitcode == 0 and read_summary(run) is None:  # stopped by a signal
        raise UserError(
            f"training {t.model.variant} (seed {t.run.seed}) was interrupted; "
            "run the same command again to resume"
        )
    if proc.exitcode != 0:
        raise UserError(
            f"training {t.model.variant} (seed {t.run.seed}) failed with exit code {proc.exitcode}; see above"
        )


def run_compare(cfg: CompareConfig) -> Any:
    """Train every (variant, seed) not yet finished, then write the report; returns it."""
    from deltalearn.experiments.report import write_report
    from deltalearn.train.build import prepare_data

    if not cfg.variants:
        raise UserError("no variants to compare")
    if cfg.steps < 1:
        raise UserError(f"--steps must be >= 1, got {cfg.steps}")
    runs = [run_config(cfg, v, s) for v in cfg.variants for s in cfg.seeds]
    out = Path(cfg.out)
    # Prepare (tokenise and cache) the corpus once, before the runs, so they only read it.
    prepare_data(runs[0], progress=cfg.progress)
    from deltalearn.models import DeltaLMConfig

    for v in cfg.variants:  # fail fast on a typo, before hours of training
        try:
            DeltaLMConfig.preset(v, size=cfg.size)
        except ValueError as e:
            raise UserError(str(e).splitlines()[0]) from None
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    for t in runs:
        if _finished(t):
            print(f"compare: {t.model.variant} seed {t.run.seed} already finished, skipping")
            continue
        _train_one(t)
    return write_report(cfg, runs, wall_time_s=time.time() - started)
