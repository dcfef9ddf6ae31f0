"""Checkpoints and resume: bitwise resume, signals, atomic writes, bad checkpoints, NaN guard."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import TINY_MODEL, tiny_train_args

from deltalearn.errors import CheckpointError, ConfigError, NonFiniteLossError
from deltalearn.train import checkpoint as ckpt
from deltalearn.train import trainer as trainer_mod
from deltalearn.train.config import TrainConfig
from deltalearn.train.logging import read_log
from deltalearn.train.trainer import train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def tiny(out: Path, cache: Path, variant: str = "ddl-cc", **run) -> TrainConfig:
    """2 layers, d=32, seq 32, batch 4, vocab 300 on the first 100k characters of Shakespeare."""
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


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt.latest_checkpoint(run_dir) / ckpt.MODEL_FILE)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ: {different}"


def test_resume_is_bitwise_identical(tmp_path, cache):
    straight = train(tiny(tmp_path / "straight", cache))
    assert straight.status == "finished" and straight.step == 20
    stopped = train(tiny(tmp_path / "resumed", cache, stop_after=10))
    assert stopped.status == "stopped" and stopped.step == 10
    assert not (tmp_path / "resumed" / "model").exists()  # no final model before the end
    resumed = train(tiny(tmp_path / "resumed", cache), resume=True)
    assert resumed.status == "finished" and resumed.step == 20
    assert_bitwise_equal(final_weights(tmp_path / "straight"), final_weights(tmp_path / "resumed"))
    assert resumed.val_loss == straight.val_loss
    log = read_log(tmp_path / "resumed" / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 21))
    straight_log = read_log(tmp_path / "straight" / "log.jsonl")
    assert [r["loss"] for r in log] == [r["loss"] for r in straight_log]
    assert "beta_mean" in log[-1] and len(log[-1]["beta_mean"]) == 2
    assert (tmp_path / "resumed" / "model" / "config.json").is_file()


def test_rerun_without_resume_refuses(tmp_path, cache):
    train(tiny(tmp_path / "run", cache, steps=2))
    with pytest.raises(ConfigError, match="--resume"):
        train(tiny(tmp_path / "run", cache, steps=2))


def test_resume_with_different_config_names_keys(tmp_path, cache):
    train(tiny(tmp_path / "run", cache, stop_after=2))
    cfg = tiny(tmp_path / "run", cache)
    cfg.optim.lr = 5e-3
    cfg.run.seed = 7
    with pytest.raises(ConfigError) as err:
        train(cfg, resume=True)
    msg = str(err.value)
    assert "optim.lr" in msg and "run.seed" in msg and "\n" not in msg


def test_keep_last_n_checkpoints(tmp_path, cache):
    train(tiny(tmp_path / "run", cache, steps=8, checkpoint_interval=2, keep_checkpoints=2))
    names = [p.name for p in ckpt.list_checkpoints(tmp_path / "run")]
    assert names == ["step_000006", "step_000008"]


def test_crash_during_save_leaves_previous_checkpoint(tmp_path, cache, monkeypatch):
    run = tmp_path / "run"
    train(tiny(run, cache, stop_after=4))
    real_save = torch.save

    def crash(*args, **kwargs):  # the model file is written, then the "power fails"
        raise OSError("simulated crash")

    monkeypatch.setattr(ckpt.torch, "save", crash)
    with pytest.raises(OSError, match="simulated"):
        train(tiny(run, cache, stop_after=6), resume=True)
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    root = run / "checkpoints"
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000004"]
    assert any(p.name.startswith(".tmp-") for p in root.iterdir())  # the half-written one
    result = train(tiny(run, cache), resume=True)  # ignores and removes the temp folder
    assert result.step == 20
    assert not any(p.name.startswith(".tmp-") for p in root.iterdir())


@pytest.mark.parametrize("victim", [ckpt.MODEL_FILE, ckpt.STATE_FILE])
def test_truncated_checkpoint_error_names_file(tmp_path, cache, victim):
    run = tmp_path / "run"
    train(tiny(run, cache, stop_after=2))
    path = ckpt.latest_checkpoint(run) / victim
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        train(tiny(run, cache), resume=True)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def _nan_on_call(n: int):
    calls = {"n": 0}
    real = trainer_mod.next_token_loss

    def next_token_loss(logits, targets):
        calls["n"] += 1
        loss = real(logits, targets)
        return loss * float("nan") if calls["n"] == n else loss

    return next_token_loss


def test_nonfinite_loss_stops_with_step(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(trainer_mod, "next_token_loss", _nan_on_call(3))
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="at step 3"):
        train(tiny(run, cache, checkpoint_interval=2))
    # The checkpoint after step 2 exists; nothing with NaN weights was ever written.
    for path in ckpt.list_checkpoints(run):
        assert all(torch.isfinite(t).all() for t in load_file(path / ckpt.MODEL_FILE).values())
    assert not (run / "model").exists()


def test_skip_nonfinite_skips_the_batch(tmp_path, cache, monkeypatch):
    monkeypatch.setattr(trainer_mod, "next_token_loss", _nan_on_call(3))
    result = train(tiny(tmp_path / "run", cache, steps=5, skip_nonfinite=True))
    assert result.status == "finished" and math.isfinite(result.val_loss)
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert [r.get("skipped", False) for r in log] == [False, False, True, False, False]


@pytest.mark.slow
def test_sigterm_saves_checkpoint_and_resume_continues(tmp_path, cache):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "deltalearn.cli"] + tiny_train_args(
        run, cache, "--checkpoint-interval", "100000", steps=100000, eval_interval=100000
    )
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    log = run / "log.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and (not log.is_file() or len(read_log(log)) < 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    step = read_log(log)[-1]["step"]
    assert ckpt.latest_checkpoint(run).name == f"step_{step:06d}"
    assert "--resume" in err
    resume = [*args, "--resume", "--stop-after", str(step + 2)]
    done = subprocess.run(resume, capture_output=True, text=True, timeout=120, env=os.environ)
    assert done.returncode == 0, done.stderr
    assert ckpt.latest_checkpoint(run).name == f"step_{step + 2:06d}"
    assert [r["step"] for r in read_log(log)] == list(range(1, step + 3))
