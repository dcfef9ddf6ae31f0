"""Checkpoints and resume: bitwise resume, signals, SIGKILL mid-save, atomic re-save, bad
checkpoints, the NaN guard and host syncs per step."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from train_helpers import tiny_config, tiny_train_args

from deltalearn.cli import main as cli_main
from deltalearn.errors import CheckpointError, ConfigError, NonFiniteLossError, UserError
from deltalearn.train import checkpoint as ckpt
from deltalearn.train import trainer as trainer_mod
from deltalearn.train.config import TrainConfig
from deltalearn.train.logging import read_log
from deltalearn.train.optim import param_groups
from deltalearn.train.trainer import train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


def tiny(out: Path, cache: Path, variant: str = "ddl-cc", **run) -> TrainConfig:
    """2 layers, d=32, seq 32, batch 4, vocab 300 on the first 100k characters of Shakespeare."""
    return tiny_config(out, cache, variant, **run)


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(ckpt.latest_checkpoint(run_dir) / ckpt.MODEL_FILE)


def assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"parameters differ: {different}"


@pytest.fixture(scope="module")
def straight(tmp_path_factory, cache):
    """The reference: the tiny run trained straight through its 20 steps in one call."""
    run = tmp_path_factory.mktemp("straight") / "run"
    result = train(tiny(run, cache))
    assert result.status == "finished" and result.step == 20
    return run, result


def test_resume_is_bitwise_identical(tmp_path, cache, straight):
    straight_dir, straight = straight
    stopped = train(tiny(tmp_path / "resumed", cache, stop_after=10))
    assert stopped.status == "stopped" and stopped.step == 10
    assert not (tmp_path / "resumed" / "model").exists()  # no final model before the end
    resumed = train(tiny(tmp_path / "resumed", cache), resume=True)
    assert resumed.status == "finished" and resumed.step == 20
    assert_bitwise_equal(final_weights(straight_dir), final_weights(tmp_path / "resumed"))
    assert resumed.val_loss == straight.val_loss
    log = read_log(tmp_path / "resumed" / "log.jsonl")
    assert [r["step"] for r in log] == list(range(1, 21))
    straight_log = read_log(straight_dir / "log.jsonl")
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


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory, cache):
    """A run stopped after 2 steps (one checkpoint); tests damage copies of it."""
    run = tmp_path_factory.mktemp("stopped") / "run"
    train(tiny(run, cache, stop_after=2))
    return run


def _damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "random":
        path.write_bytes(torch.randint(0, 256, (len(data),), dtype=torch.uint8).numpy().tobytes())
    elif how == "missing":
        path.unlink()


DAMAGE = ["truncated", "empty", "random", "missing"]


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("victim", [ckpt.STATE_FILE, ckpt.MODEL_FILE])
def test_damaged_checkpoint_error_names_file(tmp_path, cache, stopped_run, victim, how):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    path = ckpt.latest_checkpoint(run) / victim
    _damage(path, how)
    with pytest.raises(CheckpointError) as err:
        train(tiny(run, cache), resume=True)
    msg = str(err.value)
    assert str(path) in msg and "\n" not in msg, msg


def test_bug_while_loading_state_is_not_called_corrupt(tmp_path, stopped_run, monkeypatch):
    """Only what torch.load raises for a damaged file becomes a CheckpointError; a programming
    error (here a TypeError) keeps its type and traceback."""

    def buggy_load(*args, **kwargs):
        raise TypeError("load() got an unexpected keyword argument 'weights_onyl'")

    monkeypatch.setattr(ckpt.torch, "load", buggy_load)
    with pytest.raises(TypeError, match="weights_onyl"):
        ckpt.read_state(ckpt.latest_checkpoint(stopped_run))


@pytest.mark.parametrize("victim", [ckpt.STATE_FILE, ckpt.MODEL_FILE])
def test_cli_resume_of_damaged_checkpoint_is_one_line(tmp_path, stopped_run, capsys, victim):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    path = ckpt.latest_checkpoint(run) / victim
    _damage(path, "truncated")
    code = cli_main(["train", "--resume", "--out", str(run)])
    err = capsys.readouterr().err
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltalearn: error: "), err
    assert str(path) in lines[0] and "Traceback" not in err


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


# ---- no host syncs inside a step; non-finite steps never reach the weights --------------------


def _unfused_adamw(model, cfg):
    """The AdamW of build_optimizer, not fused (as for FSDP2's DTensors): it cannot skip a step on
    the device, so the trainer zeroes a non-finite step's gradients or checks on the host."""
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        fused=False,
    )


OPTIMIZERS = pytest.mark.parametrize("fused", [False, True], ids=["adamw", "adamw-fused"])


def test_nonfinite_loss_caught_within_log_interval(tmp_path, cache, monkeypatch):
    """log_interval 4: the NaN of step 3 is found at step 4 (a checkpoint step, checked before
    saving), named as step 3, and no checkpoint after step 2 is written."""
    monkeypatch.setattr(trainer_mod, "next_token_loss", _nan_on_call(3))
    run = tmp_path / "run"
    with pytest.raises(NonFiniteLossError, match="at step 3;"):
        train(tiny(run, cache, log_interval=4, checkpoint_interval=2))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step_000002"]
    for path in ckpt.list_checkpoints(run):
        assert all(torch.isfinite(t).all() for t in load_file(path / ckpt.MODEL_FILE).values())


@OPTIMIZERS
def test_skipped_step_leaves_weights_and_optimizer_bitwise(tmp_path, cache, monkeypatch, fused):
    if not fused:
        monkeypatch.setattr(trainer_mod, "build_optimizer", _unfused_adamw)
    two = tmp_path / "two"
    train(tiny(two, cache, steps=5, stop_after=2))
    monkeypatch.setattr(trainer_mod, "next_token_loss", _nan_on_call(3))
    three = tmp_path / "three"
    cfg = tiny(three, cache, steps=5, stop_after=3, skip_nonfinite=True, log_interval=3)
    assert train(cfg).step == 3
    assert_bitwise_equal(final_weights(two), final_weights(three))
    a = ckpt.read_state(ckpt.latest_checkpoint(two))["optimizer"]["state"]
    b = ckpt.read_state(ckpt.latest_checkpoint(three))["optimizer"]["state"]
    assert a.keys() == b.keys()
    for i in a:
        assert all(torch.equal(a[i][k], b[i][k]) for k in a[i]), f"optimizer state {i} differs"
    log = read_log(three / "log.jsonl")
    assert log[-1]["step"] == 3 and log[-1]["skipped"] and log[-1]["skipped_steps"] == [3]


def _count_host_syncs(monkeypatch) -> list[str]:
    """Record every read-back of a tensor to the host requested by the training code
    (``deltalearn.train``; the model's own checks, free on the CPU and sync-free on CUDA, are
    not counted here)."""
    calls: list[str] = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "numpy"):
        real = getattr(torch.Tensor, name)

        def counted(self, *args, _real=real, _name=name, **kwargs):
            caller = sys._getframe(1)
            if caller.f_globals.get("__name__", "").startswith("deltalearn.train"):
                calls.append(f"{_name} at {caller.f_code.co_filename}:{caller.f_lineno}")
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    real_sync = torch.cuda.synchronize

    def synchronize(*args, **kwargs):
        calls.append("torch.cuda.synchronize")
        return real_sync(*args, **kwargs)

    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    return calls


@pytest.mark.parametrize(
    "fused, skip", [(False, False), (True, True)], ids=["adamw", "adamw-fused-skip-nonfinite"]
)
def test_host_syncs_only_at_log_intervals(tmp_path, cache, monkeypatch, fused, skip):
    """24 steps, a log line every 8, one evaluation at the end: one read-back per sync point
    (the first step, timed apart, and steps 8, 16, 24) plus two for the evaluation (loss, β)."""
    if not fused:
        monkeypatch.setattr(trainer_mod, "build_optimizer", _unfused_adamw)
    steps, every = 24, 8
    cfg = tiny(
        tmp_path / "run",
        cache,
        steps=steps,
        log_interval=every,
        eval_interval=steps,
        checkpoint_interval=1000,
        skip_nonfinite=skip,
    )
    calls = _count_host_syncs(monkeypatch)
    train(cfg)
    monkeypatch.undo()
    assert len(calls) <= steps // every + 1 + 2, "\n".join(calls)
    log = read_log(tmp_path / "run" / "log.jsonl")
    assert [r["step"] for r in log] == [8, 16, 24]
    for key in ("loss", "lr", "grad_norm", "tokens_per_s", "tokens"):
        assert all(key in r for r in log), key
    assert "val_loss" in log[-1] and len(log[-1]["beta_mean"]) == 2


# ---- the run's figures, re-saves, SIGKILL at any moment -----------------------------------------


def test_resuming_finished_run_keeps_summary(tmp_path, cache):
    run = tmp_path / "run"
    first = train(tiny(run, cache, steps=3))
    before = (run / "summary.json").read_text()
    assert first.train_tokens_per_s > 0
    again = train(tiny(run, cache, steps=3), resume=True)
    assert (run / "summary.json").read_text() == before
    assert again.train_tokens_per_s == first.train_tokens_per_s
    assert again.peak_memory_mb == first.peak_memory_mb


def test_stopped_and_resumed_run_reports_its_throughput(tmp_path, cache):
    run = tmp_path / "run"
    train(tiny(run, cache, steps=4, stop_after=2))
    result = train(tiny(run, cache, steps=4), resume=True)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train_tokens_per_s"] == result.train_tokens_per_s > 0


def test_resave_crash_between_renames_keeps_the_step(tmp_path, cache, monkeypatch):
    """Re-saving step 4 renames the old folder aside, then the new one into place; a crash
    between the two must not lose step 4."""
    from deltalearn.train.build import prepare_data
    from deltalearn.train.distributed import DistEnv
    from deltalearn.train.trainer import Trainer

    run = tmp_path / "run"
    train(tiny(run, cache, stop_after=4))
    saved = final_weights(run)
    cfg = tiny(run, cache)
    trainer = Trainer(cfg, DistEnv(0, 1, 0, torch.device("cpu")), prepare_data(cfg, False))
    assert trainer.resume() and trainer.step == 4
    real_replace = os.replace

    def crash_on_second_rename(src, dst):
        if Path(src).name.startswith(".tmp-"):
            raise OSError("simulated crash between the renames")
        real_replace(src, dst)

    monkeypatch.setattr(ckpt.os, "replace", crash_on_second_rename)
    with pytest.raises(OSError, match="simulated"):
        trainer.save()
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(run)
    assert latest is not None and load_file(latest / ckpt.MODEL_FILE).keys() == saved.keys()
    ckpt.clean_temp(run)  # puts it back under its name
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step_000004"]
    assert_bitwise_equal(final_weights(run), saved)
    assert train(tiny(run, cache), resume=True).step == 20


_KILLER = """
import json, os, signal, sys
from pathlib import Path
import torch
torch.set_num_threads(1)
from deltalearn.train import checkpoint as ckpt
from deltalearn.train import trainer as trainer_mod
from deltalearn.train.config import config_from_dict
from deltalearn.train.trainer import train

cfg, where, step = config_from_dict(json.loads(sys.argv[1])), sys.argv[2], int(sys.argv[3])
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if where == "state-file":  # half of trainer_state.pt is on disk
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        if obj.get("step") == step:
            Path(f).write_bytes(Path(f).read_bytes()[: Path(f).stat().st_size // 2])
            die()
    ckpt.torch.save = save
elif where == "log-truncation":  # resuming, half-way through rewriting log.jsonl
    sys.path.insert(0, sys.argv[4])
    from train_helpers import crash_halfway_writing
    crash_halfway_writing(None, "log.jsonl", kill=True)
elif where == "mid-step":  # inside the forward of step `step` (between sync points)
    real_loss, calls = trainer_mod.next_token_loss, []
    def loss(logits, targets):
        calls.append(1)
        if len(calls) == step:
            die()
        return real_loss(logits, targets)
    trainer_mod.next_token_loss = loss
train(cfg, resume=True)
"""


@pytest.mark.slow
@pytest.mark.parametrize("where", ["state-file", "mid-step", "log-truncation"])
def test_sigkill_then_resume_equals_straight_run(tmp_path, cache, straight, where):
    """A process killed with SIGKILL (half-way through writing the step-8 checkpoint, in the
    middle of step 11, or half-way through rewriting the log when resuming after step 8)
    resumes, and the finished run is the straight one: bitwise weights, the same log lines."""
    run = tmp_path / "run"
    cfg = tiny(run, cache, checkpoint_interval=4, log_interval=3)
    if where == "log-truncation":  # the killed process is itself a resume
        train(tiny(run, cache, checkpoint_interval=4, log_interval=3, stop_after=8))
    step = 11 if where == "mid-step" else 8
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    helpers = str(Path(__file__).parent)
    args = [sys.executable, "-c", _KILLER, json.dumps(asdict(cfg)), where, str(step), helpers]
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    left = sorted(p.name for p in (run / "checkpoints").iterdir())
    expected = ["step_000004"] if where == "state-file" else ["step_000004", "step_000008"]
    assert [n for n in left if n.startswith("step_")] == expected
    if where == "log-truncation":  # the half-written new log lies beside the intact old one
        assert [n for n in os.listdir(run) if n.endswith(".tmp")]
    result = train(tiny(run, cache, checkpoint_interval=4, log_interval=3), resume=True)
    assert result.status == "finished" and result.step == 20
    straight_dir, straight_result = straight
    assert_bitwise_equal(final_weights(straight_dir), final_weights(run))
    assert result.val_loss == straight_result.val_loss
    log = read_log(run / "log.jsonl")
    assert [r["step"] for r in log] == [3, 6, 9, 10, 12, 15, 18, 20]
    reference = {r["step"]: r["loss"] for r in read_log(straight_dir / "log.jsonl")}
    assert [r["loss"] for r in log] == [reference[r["step"]] for r in log]
    assert not [n for n in os.listdir(run / "checkpoints") if n.startswith(".")]
    assert not [n for n in os.listdir(run) if n.endswith(".tmp")]  # removed on resume


def test_library_train_checks_run_paths_before_data_preparation(tmp_path):
    """`train()` itself (not only the command line) refuses a run folder holding a file where the
    run writes a folder, before it prepares any data."""
    run, cache = tmp_path / "run", tmp_path / "cache"
    run.mkdir()
    (run / "checkpoints").write_text("not a folder")
    with pytest.raises(UserError, match="checkpoints"):
        train(tiny_config(run, cache))
    assert not cache.exists()


def test_cpu_optimizer_is_fused_but_not_for_sharded_parameters():
    """On a CPU the trainer's AdamW is the fused one (one call for all parameters, and it skips a
    non-finite step itself); FSDP2's DTensors (a `device_mesh`) keep the default implementation."""
    from deltalearn.train.config import OptimConfig
    from deltalearn.train.optim import build_optimizer

    assert build_optimizer(torch.nn.Linear(4, 4), OptimConfig()).defaults["fused"] is True
    sharded = torch.nn.Linear(4, 4)
    sharded.weight.device_mesh = "mesh"  # what marks a DTensor here
    assert not build_optimizer(sharded, OptimConfig()).defaults.get("fused")
