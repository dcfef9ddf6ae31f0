"""Training the cells of a sweep: each in its own process, ``jobs`` at a time, with progress.

Each cell trains in ``python -m deltalearn.experiments.runner CONFIG_JSON [THREADS]``, in its own
session with ``OMP_NUM_THREADS`` set, so that ``jobs`` processes share the cores without
oversubscribing them and a terminal's Ctrl-C reaches the sweep alone. On Ctrl-C or SIGTERM the
sweep sends every running cell one SIGINT (the trainer then saves a checkpoint at its next step)
and waits for them. A cell whose loss turns non-finite writes ``diverged.json`` into its run
folder and is not retried.

Exit codes of a cell process: 0 finished, 2 a user error (one line on stderr), 3 diverged,
4 stopped by a signal before the end (a checkpoint was saved), anything else a crash.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deltalearn.atomic import atomic_write_text
from deltalearn.errors import UserError
from deltalearn.experiments.grid import Cell
from deltalearn.train.config import TrainConfig

__all__ = ["DIVERGED_FILE", "CellOutcome", "checkpoint_step", "say", "train_cells"]

DIVERGED_FILE = "diverged.json"  # in a cell's run folder: its loss became non-finite
_EXIT_USER_ERROR, _EXIT_DIVERGED, _EXIT_STOPPED = 2, 3, 4
_POLL_S = 0.2


@dataclass
class CellOutcome:
    """What became of the cells this invocation trained (cell names)."""

    finished: list[str] = field(default_factory=list)
    diverged: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)


@dataclass
class _Running:
    cell: Cell
    cfg: TrainConfig
    proc: subprocess.Popen[bytes]
    started: float
    from_step: int


def _spawn(cfg: TrainConfig, threads: int | None) -> subprocess.Popen[bytes]:
    env = dict(os.environ)
    if threads is not None:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    # OpenMP threads that spin while waiting slow training down badly when another process holds
    # a core (see compare.py); passive waiting costs little when the machine is idle.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = [sys.executable, "-m", "deltalearn.experiments.runner", json.dumps(asdict(cfg))]
    if threads is not None:
        args.append(str(threads))
    # Its own session: a terminal's Ctrl-C reaches the sweep, which then stops each cell once.
    return subprocess.Popen(args, env=env, start_new_session=True)


class _Clock:
    """Time left, from the wall-clock seconds per step of the cells finished in this invocation
    (per variant and size when one of that kind finished, else over all of them)."""

    def __init__(self) -> None:
        self.seconds: dict[tuple[str, str], float] = {}
        self.steps: dict[tuple[str, str], int] = {}

    def add(self, cell: Cell, steps: int, seconds: float) -> None:
        key = (cell.variant, cell.size)
        self.seconds[key] = self.seconds.get(key, 0.0) + seconds
        self.steps[key] = self.steps.get(key, 0) + max(steps, 1)

    def estimate(self, cell: Cell, steps: int) -> float | None:
        key = (cell.variant, cell.size)
        if key in self.steps:
            return steps * self.seconds[key] / self.steps[key]
        if not self.steps:
            return None
        return steps * sum(self.seconds.values()) / sum(self.steps.values())

    def left(
        self, todo: list[tuple[Cell, int]], running: list[_Running], jobs: int
    ) -> float | None:
        total = 0.0
        now = time.monotonic()
        for cell, steps in todo:
            est = self.estimate(cell, steps)
            if est is None:
                return None
            total += est
        for r in running:
            est = self.estimate(r.cell, r.cell.steps - r.from_step)
            if est is None:
                return None
            total += max(est - (now - r.started), 0.0)
        return total / max(min(jobs, len(todo) + len(running)), 1)


def _minutes(seconds: float | None) -> str:
    if seconds is None:
        return "time left unknown until a cell finishes"
    if seconds < 90:
        return f"~{seconds:.0f} s left"
    if seconds < 5400:
        return f"~{seconds / 60:.1f} min left"
    return f"~{seconds / 3600:.1f} h left"


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """SIGTERM to the sweep behaves like Ctrl-C (the cells are stopped with a checkpoint), and
    SIGINT interrupts it even when it was started ignoring SIGINT (a shell's background job
    inherits SIG_IGN, and so would the cells), so `kill -INT` always stops it cleanly."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, handler)
    old_int = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)
        signal.signal(signal.SIGINT, old_int)


def _stop_all(running: list[_Running]) -> None:
    """One SIGINT to each running cell (it checkpoints at its next step), then wait; a second
    Ctrl-C meanwhile passes one more SIGINT on (the trainer then stops without a checkpoint)."""
    for r in running:
        with contextlib.suppress(ProcessLookupError):
            r.proc.send_signal(signal.SIGINT)
    while True:
        try:
            for r in running:
                r.proc.wait()
            return
        except KeyboardInterrupt:
            for r in running:
                with contextlib.suppress(ProcessLookupError):
                    r.proc.send_signal(signal.SIGINT)


def checkpoint_step(cfg: TrainConfig) -> int:
    """The step of the run's latest checkpoint (0 without one)."""
    from deltalearn.train.checkpoint import latest_checkpoint

    path = latest_checkpoint(Path(cfg.run.out))
    if path is None:
        return 0
    digits = "".join(ch for ch in path.name if ch.isdigit())
    return int(digits) if digits else 0


def say(text: str) -> None:
    """A progress line of the sweep."""
    print(f"sweep: {text}", flush=True)


def train_cells(
    todo: list[tuple[Cell, TrainConfig]],
    total: int,
    jobs: int = 1,
    threads: int | None = None,
    progress: bool = True,
) -> CellOutcome:
    """Train ``todo`` (resuming from checkpoints), ``jobs`` processes at a time, printing cells
    done (of ``total``, the whole grid) and time left; re-raises KeyboardInterrupt after
    stopping the running cells. ``threads``: torch threads per cell (default cores / jobs when
    jobs > 1, torch's default for one job)."""
    jobs = max(jobs, 1)
    if threads is None and jobs > 1:
        threads = max((os.cpu_count() or 1) // jobs, 1)
    result = CellOutcome()
    clock = _Clock()
    queue = list(todo)
    running: list[_Running] = []
    done = total - len(todo)

    def remaining() -> list[tuple[Cell, int]]:
        return [(c, c.steps - checkpoint_step(t)) for c, t in queue]

    with _sigterm_as_interrupt():
        try:
            while queue or running:
                while queue and len(running) < jobs:
                    cell, cfg = queue.pop(0)
                    if jobs > 1 or not progress:
                        cfg.run.progress = False  # (a resumable key: no effect on the results)
                    start = checkpoint_step(cfg)
                    what = (
                        f"resuming {cell.name} from step {start}"
                        if start
                        else f"training {cell.name}"
                    )
                    say(f"{what} ({done + len(running) + 1}/{total})")
                    running.append(
                        _Running(cell, cfg, _spawn(cfg, threads), time.monotonic(), start)
                    )
                time.sleep(_POLL_S)
                for r in [r for r in running if r.proc.poll() is not None]:
                    running.remove(r)
                    seconds = time.monotonic() - r.started
                    code = r.proc.returncode
                    if code == 0:
                        done += 1
                        result.finished.append(r.cell.name)
                        clock.add(r.cell, r.cell.steps - r.from_step, seconds)
                        left = _minutes(clock.left(remaining(), running, jobs))
                        say(
                            f"{done}/{total} cells done ({r.cell.name}: {seconds / 60:.1f} min), "
                            + (left if queue or running else "all done")
                        )
                    elif code == _EXIT_DIVERGED:
                        done += 1
                        result.diverged.append(r.cell.name)
                        say(f"{r.cell.name} diverged; {done}/{total} cells done")
                    elif code == _EXIT_STOPPED:
                        raise KeyboardInterrupt  # stopped by a signal that was not ours
                    else:
                        result.failed.append(r.cell.name)
                        say(f"{r.cell.name} failed (exit code {code}); going on with the others")
        except KeyboardInterrupt:
            _stop_all(running)
            say(
                f"interrupted: {done}/{total} cells done; the running ones saved a checkpoint. "
                "Run the same command again to resume."
            )
            raise
    return result


def _cell_main(argv: list[str]) -> int:
    """Train one cell: ``python -m deltalearn.experiments.runner CONFIG_JSON [THREADS]``."""
    from deltalearn.errors import NonFiniteLossError
    from deltalearn.train.config import config_from_dict

    cfg = config_from_dict(json.loads(argv[0]))
    if len(argv) > 1:
        import torch

        torch.set_num_threads(int(argv[1]))
    from deltalearn.train.trainer import train

    name = Path(cfg.run.out).name
    try:
        result = train(cfg, resume=True)
    except NonFiniteLossError as e:
        atomic_write_text(
            Path(cfg.run.out) / DIVERGED_FILE, json.dumps({"cell": name, "error": str(e)})
        )
        print(f"deltalearn: error: {name}: {e}", file=sys.stderr)
        return _EXIT_DIVERGED
    except UserError as e:
        print(f"deltalearn: error: {name}: {e}", file=sys.stderr)
        return _EXIT_USER_ERROR
    except KeyboardInterrupt:  # a second SIGINT: stopped without a checkpoint
        return _EXIT_STOPPED
    return 0 if result.status == "finished" else _EXIT_STOPPED


if __name__ == "__main__":
    sys.exit(_cell_main(sys.argv[1:]))
