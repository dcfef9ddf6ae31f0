"""On CUDA (skipped without a GPU): torchrun with the NCCL backend trains with DDP and with FSDP2,
and the training steps between sync points never wait for the GPU.

Under torchrun the process group exists even for ``--nproc_per_node=1``, so one GPU runs the same
NCCL collectives (the stop flag, the loss, the evaluation sums) as several.
"""

import os
import subprocess
import sys
import warnings

import pytest
import torch
from train_helpers import tiny_config, tiny_train_args

from deltalearn.train import checkpoint as ckpt
from deltalearn.train.logging import read_log
from deltalearn.train.trainer import train

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.distributed.is_nccl_available()),
    reason="needs a CUDA GPU and NCCL",
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("extra", [[], ["--fsdp"]], ids=["ddp", "fsdp2"])
def test_torchrun_nccl_trains(tmp_path, cache, extra):
    """6 steps, a log line and a sync point every 2, an evaluation and a checkpoint every 3."""
    out = tmp_path / "run"
    args = tiny_train_args(out, cache, "--device", "cuda", *extra, steps=6, eval_interval=3)
    args += ["--checkpoint-interval", "3", "--set", "run.log_interval=2"]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*torchrun, "-m", "deltalearn.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    log = read_log(out / "log.jsonl")
    assert [r["step"] for r in log] == [2, 3, 4, 6]
    assert all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in log)  # no NaN
    assert "val_loss" in log[1] and "val_loss" in log[-1]
    assert ckpt.latest_checkpoint(out).name == "step_000006"
    assert (out / "model" / "config.json").is_file() and (out / "summary.json").is_file()


def _sync_warnings(cfg) -> list[str]:
    """Synchronising CUDA calls of a whole ``train(cfg)`` (torch's sync debug mode)."""
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            train(cfg)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return [str(w.message) for w in caught if "synchroniz" in str(w.message)]


def test_training_steps_do_not_wait_for_the_gpu(tmp_path, cache):
    """Two runs, 4 and 12 steps, one sync point at the end (log, evaluation, checkpoint): the
    8 extra steps add no synchronising call (the setup, evaluation and saving are the same)."""

    def cfg(steps, name):
        c = tiny_config(tmp_path / name, cache, steps=steps, device="cuda")
        c.run.log_interval = c.run.eval_interval = c.run.checkpoint_interval = steps
        return c

    train(cfg(2, "warm-up"))  # data preparation and CUDA initialisation, outside the count
    short = _sync_warnings(cfg(4, "short"))
    long = _sync_warnings(cfg(12, "long"))
    assert len(long) - len(short) < 8, f"{len(short)} vs {len(long)} syncs: {long[:5]}"
