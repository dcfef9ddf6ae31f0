"""Data parallel on CPU: 2 gloo processes train exactly like 1 process with the same global batch."""

import os
import subprocess
import sys

import pytest
from train_helpers import tiny_train_args

from deltalearn.train.logging import read_log

pytestmark = pytest.mark.slow


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
