"""Data parallel on CPU: 2 gloo processes train exactly like 1 process with the same global batch."""

import os
import subprocess
import sys

import pytest

from deltalearn.train.logging import read_log

pytestmark = pytest.mark.slow

OVERRIDES = {"num_layers": 2, "hidden_size": 32, "num_heads": 2, "head_dim": 16}


def train_args(out, cache, *extra):
    args = [
        "train", "--out", str(out), "--variant", "ddl-cc", "--steps", "5", "--batch-size", "4",
        "--seq-len", "32", "--eval-interval", "5", "--eval-batches", "2", "--vocab-size", "300",
        "--cache-dir", str(cache), "--no-progress", "--no-tensorboard", "--warmup-steps", "2",
        "--set", "data.max_chars=100000", *extra,
    ]  # fmt: skip
    return args + [f"--set=model.overrides.{k}={v}" for k, v in OVERRIDES.items()]


def run(cmd, timeout=180):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert done.returncode == 0, done.stderr[-3000:]


def losses(out):
    log = read_log(out / "log.jsonl")
    return [r["loss"] for r in log], log[-1]["val_loss"]


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    run([sys.executable, "-m", "deltalearn.cli", *train_args(root / "one", root / "cache")])
    return root


@pytest.mark.parametrize(
    "extra",
    [[], ["--grad-accum", "2"], ["--fsdp"]],
    ids=["ddp", "ddp-grad-accum", "fsdp2"],
)
def test_two_processes_match_one(single, extra):
    out = single / ("two" + "".join(extra).replace("-", "_"))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run([*torchrun, "-m", "deltalearn.cli", *train_args(out, single / "cache", *extra)])
    one, one_val = losses(single / "one")
    two, two_val = losses(out)
    assert len(two) == 5
    assert two == pytest.approx(one, rel=1e-4)
    assert two_val == pytest.approx(one_val, rel=1e-4)
    assert (out / "model" / "config.json").is_file()  # written once, by rank 0
    assert len(list((out / "checkpoints").iterdir())) == 1
