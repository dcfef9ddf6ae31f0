"""Tiny training runs for the tests (2 layers, d = 32, a 100k-character corpus), and tools to
crash them: a write cut off half-way, and several gloo ranks in fresh processes."""

import builtins
import io
import json
import multiprocessing as mp
import os
import signal
import socket
import traceback
from pathlib import Path

from deltalearn.train.config import TrainConfig

TINY_MODEL = {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "head_dim": 16}


def tiny_train_args(out, cache, *extra, steps: int = 6, eval_interval: int = 3) -> list[str]:
    """`deltalearn train ...` arguments for a run that takes about a second on one CPU thread."""
    args = [
        "train", "--out", str(out), "--variant", "ddl-cc", "--steps", str(steps),
        "--batch-size", "4", "--seq-len", "32", "--eval-interval", str(eval_interval),
        "--eval-batches", "2", "--vocab-size", "300", "--cache-dir", str(cache), "--no-progress",
        "--no-tensorboard", "--warmup-steps", "2", "--set", "data.max_chars=100000", *extra,
    ]  # fmt: skip
    return args + [f"--set=model.overrides.{k}={v}" for k, v in TINY_MODEL.items()]


def tiny_config(out, cache, variant: str = "ddl-cc", **run) -> TrainConfig:
    """2 layers, d=32, seq 32, batch 4, vocab 300 on the first 100k characters of Shakespeare;
    20 steps, evaluation every 10. ``run`` sets other ``cfg.run`` fields."""
    cfg = TrainConfig()
    cfg.model.variant = variant
    cfg.model.overrides = dict(TINY_MODEL)
    cfg.data.max_chars, cfg.data.vocab_size, cfg.data.cache_dir = 100_000, 300, str(cache)
    cfg.schedule.warmup_steps = 3
    r = cfg.run
    r.out, r.steps, r.batch_size, r.seq_len = str(out), 20, 4, 32
    r.eval_interval, r.eval_batches, r.progress, r.tensorboard = 10, 2, False, False
    for key, value in run.items():
        setattr(r, key, value)
    return cfg


# ---- a write cut off half-way ------------------------------------------------------------------


class _HalfWriter:
    """A file whose first write stores half of its data, then fails like a crash would: an
    OSError, or (``kill``) SIGKILL of the whole process."""

    def __init__(self, f, kill: bool):
        self._f, self._kill = f, kill

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        self._f.flush()
        os.fsync(self._f.fileno())
        if self._kill:
            os.kill(os.getpid(), signal.SIGKILL)
        self._f.close()
        raise OSError("simulated crash half-way through a write")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


def crash_halfway_writing(monkeypatch, name: str, kill: bool = False) -> None:
    """From now on, writing any file whose name contains ``name`` (the file itself, or a temp
    file beside it) stores half the data and raises OSError (``kill``: SIGKILLs the process):
    the state a crash leaves behind. ``monkeypatch`` None patches for good (in a subprocess).

    It patches ``open`` (``io.open``, which ``Path.write_text`` and ``os.fdopen`` use too), so
    any way of writing a file through Python's file objects is cut off the same way.
    """
    real_open = io.open

    def fake_open(file, mode="r", *args, **kwargs):
        f = real_open(file, mode, *args, **kwargs)
        path = os.readlink(f"/proc/self/fd/{file}") if isinstance(file, int) else os.fspath(file)
        writing = any(c in mode for c in "wax+")
        return _HalfWriter(f, kill) if writing and name in Path(path).name else f

    patch = setattr if monkeypatch is None else monkeypatch.setattr
    patch(io, "open", fake_open)
    patch(builtins, "open", fake_open)


# ---- gloo ranks in fresh processes -------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, world: int, port: int, out: str, args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        result = {"ok": fn(*args)}
    except BaseException:
        result = {"error": traceback.format_exc()}
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))


def run_ranks(fn, world: int, tmp: Path, *args, timeout: float = 120.0) -> list:
    """Run ``fn(*args)`` in ``world`` fresh processes that form a gloo group (torchrun's env
    variables set); return each rank's JSON-able result, or fail with a rank's traceback."""
    ctx = mp.get_context("spawn")
    port = _free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    procs = [
        ctx.Process(target=_rank_main, args=(fn, r, world, port, str(tmp), args))
        for r in range(world)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} still running after {timeout}s (a collective hangs?)"
    results = []
    for r in range(world):
        path = tmp / f"rank{r}.json"
        assert path.is_file(), f"rank {r} exited with {procs[r].exitcode} and no result"
        result = json.loads(path.read_text())
        assert "error" not in result, f"rank {r} failed:\n{result['error']}"
        results.append(result["ok"])
    return results
