"""Data parallel on CPU: 2 gloo processes train exactly like 1 process with the same global batch,
split the evaluation between them, and run every collective on the rank's own device."""

import os
import subprocess
import sys
from dataclasses import asdict

import pytest
import torch
from train_helpers import run_ranks, tiny_config, tiny_train_args

from deltalearn.train import distributed
from deltalearn.train.build import prepare_data
from deltalearn.train.distributed import DistEnv
from deltalearn.train.logging import read_log
from deltalearn.train.trainer import Trainer


def train_args(out, cache, *extra):
    return tiny_train_args(out, cache, *extra, steps=5, eval_interval=5)


def run(cmd, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(out):
    log = read_log(out / "log.jsonl")
    return [r["loss"] for r in log], log[-1]["val_loss"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def single(tmp_path_factory, cache):
    root = tmp_path_factory.mktemp("ddp")
    run([sys.executable, "-m", "deltalearn.cli", *train_args(root / "one", cache)])
    return root


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra",
    [[], ["--grad-accum", "2"], ["--fsdp"], ["--fsdp", "--grad-accum", "2"]],
    ids=["ddp", "ddp-grad-accum", "fsdp2", "fsdp2-grad-accum"],
)
def test_two_processes_match_one(single, cache, extra):
    out = single / ("two" + "".join(extra).replace("-", "_"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run([*torchrun, "-m", "deltalearn.cli", *train_args(out, cache, *extra)])
    one, one_val = losses(single / "one")
    two, two_val = losses(out)
    assert len(two) == 5
    assert two == pytest.approx(one, rel=1e-4)
    assert two_val == pytest.approx(one_val, rel=1e-4)
    assert (out / "model" / "config.json").is_file()  # written once, by rank 0
    assert len(list((out / "checkpoints").iterdir())) == 1


# ---- evaluation split between ranks ---------------------------------------------------------------


def _evaluate_on_rank(cfg_dict: dict) -> dict:
    """On one of 2 gloo ranks: the validation loss of the freshly initialised model, with DDP and
    with FSDP2, and how many validation forwards (and rows) this rank ran."""
    from deltalearn.train.config import config_from_dict
    from deltalearn.train.distributed import init_distributed, shutdown, unwrap

    out = {}
    env = init_distributed("cpu")
    try:
        for fsdp in (False, True):
            cfg = config_from_dict(cfg_dict)
            cfg.run.fsdp = fsdp
            trainer = Trainer(cfg, env, prepare_data(cfg, progress=False))
            seen = []

            def count(module, args, kwargs, seen=seen):
                if not kwargs.get("output_gates"):  # the β forward is not part of the loss
                    seen.append(args[0].shape[0])

            unwrap(trainer.model).register_forward_pre_hook(count, with_kwargs=True)
            result = trainer.evaluate()
            out["fsdp" if fsdp else "ddp"] = {
                "val_loss": result["val_loss"],
                "beta_mean": result.get("beta_mean"),
                "forwards": len(seen),
                "rows": sum(seen),
            }
    finally:
        shutdown()
    return out


@pytest.mark.slow
def test_evaluation_is_split_between_ranks(tmp_path, cache):
    """3 validation batches of 4 windows: rank 0 evaluates batches 0 and 2, rank 1 batch 1 (and,
    under FSDP, one weight-0 forward to keep step with rank 0); the summed loss equals one
    process within 1e-6."""
    cfg = tiny_config(tmp_path / "run", cache, eval_batches=3)
    cpu = DistEnv(0, 1, 0, torch.device("cpu"))
    expected = Trainer(cfg, cpu, prepare_data(cfg, progress=False)).evaluate()
    ranks = run_ranks(_evaluate_on_rank, 2, tmp_path / "ranks", asdict(cfg))
    for kind in ("ddp", "fsdp"):
        got = [r[kind] for r in ranks]
        for g in got:
            assert abs(g["val_loss"] - expected["val_loss"]) <= 1e-6, (kind, g, expected)
        assert got[0]["beta_mean"] == pytest.approx(expected["beta_mean"], abs=1e-6)
    assert [r["ddp"]["forwards"] for r in ranks] == [2, 1]
    assert [r["ddp"]["rows"] for r in ranks] == [8, 4]  # 12 windows in all, each once
    assert [r["fsdp"]["forwards"] for r in ranks] == [2, 2]  # lockstep: FSDP gathers in forward
    assert [r["fsdp"]["rows"] for r in ranks] == [8, 8]  # rank 1 repeats its batch, weight 0


# ---- every collective on env.device -----------------------------------------------------------------


def test_every_collective_runs_on_env_device(tmp_path, cache, monkeypatch):
    """NCCL serves CUDA tensors only. On a CPU machine env.device is the CPU too, so the test
    puts the trainer on the meta device and fails if any collective of a training step, of the
    stop check or of the evaluation is handed a tensor that is not on env.device."""
    meta = torch.device("meta")
    cfg = tiny_config(tmp_path / "run", cache, variant="baseline")
    trainer = Trainer(cfg, DistEnv(0, 1, 0, meta), prepare_data(cfg, progress=False))
    trainer.env = DistEnv(0, 2, 0, meta)  # from here on one of two ranks: collectives run
    seen = []

    def all_reduce(tensor, op=None, group=None, async_op=False):
        seen.append(tensor.device)
        assert tensor.device == meta, f"a collective got a tensor on {tensor.device}, not {meta}"

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    trainer._stop_requested()  # the stop flag
    trainer.train_step(0)  # the loss of the step
    trainer._val_loss_sums()  # the evaluation sums
    assert seen == [meta] * 3


def test_collective_helpers_refuse_other_devices(monkeypatch):
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: None)
    env = DistEnv(0, 2, 0, torch.device("meta"))
    for reduce in (distributed.all_reduce_sum, distributed.all_reduce_mean):
        with pytest.raises(RuntimeError, match="on cpu, but this rank's collectives run on meta"):
            reduce(torch.zeros(1), env)
        assert reduce(torch.zeros(1, device="meta"), env).device.type == "meta"
    with pytest.raises(RuntimeError, match="env.device"):
        distributed.all_reduce_max(torch.zeros(1), env)
    cuda0 = DistEnv(0, 1, 0, torch.device("cuda"))  # a bare "cuda" matches any index
    with pytest.raises(RuntimeError):
        distributed.all_reduce_max(torch.zeros(1), cuda0)
