"""`deltalearn train --cuda-graphs`: the step recorded once and replayed (`train.cuda_graph`).

On a CPU there is no graph: the trainer runs with `StepGraph`'s stand-in (each call runs the step
and copies its outputs into the tensors the recorded call returned, as a replay overwrites them),
so what the trainer must do for a graph — the batch copied into the same tensors, the lr a tensor,
the outputs taken before the next call — is checked here, and so is the GPU path's step (the
Triton kernels, launches recorded) for operators a graph cannot hold. The tests at the end replay a
real graph on a GPU.
"""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train_resume import _nan_on_call, assert_bitwise_equal, final_weights
from train_helpers import tiny_config, tiny_train_args

from deltalearn.cli import main as cli_main
from deltalearn.errors import ConfigError, NonFiniteLossError
from deltalearn.train import checkpoint as ckpt
from deltalearn.train import cuda_graph
from deltalearn.train import trainer as trainer_mod
from deltalearn.train.config import TrainConfig
from deltalearn.train.logging import read_log
from deltalearn.train.optim import lr_at
from deltalearn.train.trainer import train


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("data-cache")


@pytest.fixture
def stand_in(monkeypatch):
    """Let the trainer record its step on a CPU (the stand-in graph); returns the StepGraphs made."""
    made = []

    class Recorded(cuda_graph.StepGraph):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(trainer_mod, "check_graphable", lambda *args, **kwargs: None)
    monkeypatch.setattr(trainer_mod, "StepGraph", Recorded)
    return made


def _losses(run) -> list[float]:
    return [r["loss"] for r in read_log(run / "log.jsonl")]


@pytest.mark.parametrize("accum", [1, 2], ids=["one-batch", "accumulated"])
def test_recorded_step_trains_as_the_eager_step(tmp_path, cache, stand_in, accum):
    """Bitwise the eager run's losses, validation loss and weights, with the lr schedule, through
    the warm-up calls, the recording and ten replays."""
    steps = cuda_graph.WARMUP_CALLS + 11
    common = dict(steps=steps, grad_accum=accum, log_interval=1, eval_interval=steps)
    eager = train(tiny_config(tmp_path / "eager", cache, **common))
    graphed = train(tiny_config(tmp_path / "graphed", cache, cuda_graphs=True, **common))
    assert len(stand_in) == 1 and stand_in[0].recorded and stand_in[0].calls == steps
    # A replay reads the lr from the one tensor recorded (a float would be frozen in the graph).
    trainer = stand_in[0]._step.func.__self__
    groups, cfg = trainer.optimizer.param_groups, trainer.cfg
    assert all(g["lr"] is trainer._lr and g["capturable"] for g in groups)
    assert float(trainer._lr) == lr_at(steps - 1, cfg.optim.lr, steps, cfg.schedule)
    assert _losses(tmp_path / "graphed") == _losses(tmp_path / "eager")
    assert len(set(_losses(tmp_path / "eager"))) == steps  # every step its own loss
    assert graphed.val_loss == eager.val_loss
    assert_bitwise_equal(final_weights(tmp_path / "eager"), final_weights(tmp_path / "graphed"))


def test_each_pending_step_keeps_its_own_numbers(tmp_path, cache, stand_in, monkeypatch):
    """A log line every 4 steps: the NaN of step 6, a replay, is named at step 8's read-back —
    the numbers of steps 5-7 were taken before the replays after them overwrote the graph's."""
    monkeypatch.setattr(trainer_mod, "next_token_loss", _nan_on_call(6))
    cfg = tiny_config(tmp_path / "run", cache, steps=12, log_interval=4, cuda_graphs=True)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 6;"):
        train(cfg)
    assert stand_in[0].recorded


def test_recorded_run_resumes_bitwise_and_saves_a_float_lr(tmp_path, cache, stand_in):
    """Stopped at step 6 (recorded at step 4) and resumed, recorded anew or eagerly: the straight
    recorded run's weights and losses. The checkpoint's lr is a float and its AdamW not
    capturable, as an eager run saves them."""
    straight = tmp_path / "straight"
    train(tiny_config(straight, cache, steps=12, cuda_graphs=True))
    stopped = tmp_path / "stopped"
    assert train(tiny_config(stopped, cache, steps=12, stop_after=6, cuda_graphs=True)).step == 6
    groups = ckpt.read_state(ckpt.latest_checkpoint(stopped))["optimizer"]["param_groups"]
    assert all(type(g["lr"]) is float and not g["capturable"] for g in groups)
    for recorded in (True, False):
        resumed = tmp_path / f"resumed-{recorded}"
        shutil.copytree(stopped, resumed)
        train(tiny_config(resumed, cache, steps=12, cuda_graphs=recorded), resume=True)
        assert_bitwise_equal(final_weights(straight), final_weights(resumed))
        assert _losses(resumed) == _losses(straight)


def test_stand_in_overwrites_the_recorded_outputs():
    """Warm-up calls return the step's own tensors; from the recording on, the same tensors, which
    each call overwrites (what holding an output past the next replay reads on a GPU)."""
    counter = torch.zeros(())

    def step():
        counter.add_(1)
        return (counter * 10,)

    graph = cuda_graph.StepGraph(step, torch.device("cpu"))
    warm = [graph()[0] for _ in range(cuda_graph.WARMUP_CALLS)]
    assert [float(t) for t in warm] == [10.0 * (i + 1) for i in range(cuda_graph.WARMUP_CALLS)]
    assert not graph.recorded
    (first,) = graph()
    assert graph.recorded
    (second,) = graph()
    assert second is first and float(first) == 10.0 * (cuda_graph.WARMUP_CALLS + 2)


@pytest.mark.parametrize(
    "setting, message",
    [
        ({"device": "cpu"}, "run.cuda_graphs must be false with run.device cpu"),
        ({"compile": True}, "cannot be combined with run.compile"),
        ({"fsdp": True}, "cannot be combined with run.fsdp"),
        ({"activation_checkpointing": True}, "combined with run.activation_checkpointing"),
    ],
    ids=["cpu", "compile", "fsdp", "checkpointing"],
)
def test_config_refuses_what_a_recorded_step_cannot_hold(setting, message):
    cfg = TrainConfig()
    cfg.run.cuda_graphs = True
    for key, value in setting.items():
        setattr(cfg.run, key, value)
    with pytest.raises(ConfigError, match=message):
        cfg.validate()


@pytest.mark.parametrize(
    "device, world, distributed, fused, message",
    [
        ("cpu", 1, False, True, "needs a CUDA device, got 'cpu'"),
        ("cuda", 2, True, True, r"not one under torchrun \(world size 2\)"),
        ("cuda", 1, True, True, r"not one under torchrun \(world size 1\)"),
        ("cuda", 1, False, False, "needs the fused AdamW"),
    ],
    ids=["cpu", "torchrun", "torchrun-one-process", "unfused"],
)
def test_trainer_refuses_an_unrecordable_step(device, world, distributed, fused, message):
    with pytest.raises(ConfigError, match=message):
        cuda_graph.check_graphable(
            torch.device(device), world_size=world, distributed=distributed, fused_optimizer=fused
        )


def test_cli_cuda_graphs_on_a_cpu_is_one_clear_line(tmp_path, cache, capsys):
    args = tiny_train_args(tmp_path / "run", cache, "--cuda-graphs", "--device", "cpu")
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("deltalearn: error: "), err
    assert "run.cuda_graphs must be false with run.device cpu" in lines[0]


# ---- a real graph (skipped without a GPU) ------------------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("variant", ["baseline", "ddl", "ddl-cc", "ddl-tc"])
def test_replayed_cuda_graph_trains_as_the_eager_step(tmp_path, cache, variant, monkeypatch):
    """bf16 autocast, two micro-batches a step, the lr schedule: the replays are the eager run's
    steps (same kernels; the losses within bf16 round-off, compared step by step), and after the
    warm-up and the recording no step runs the training code's Python (the loss function is
    called for the warm-up calls and the recording only)."""
    calls = {"n": 0}
    real = trainer_mod.next_token_loss

    def counted(logits, targets):
        calls["n"] += 1
        return real(logits, targets)

    steps = cuda_graph.WARMUP_CALLS + 9
    common = dict(steps=steps, grad_accum=2, eval_interval=steps, device="cuda")
    eager = train(tiny_config(tmp_path / "eager", cache, variant, **common))
    monkeypatch.setattr(trainer_mod, "next_token_loss", counted)
    graphed = train(tiny_config(tmp_path / "graphed", cache, variant, cuda_graphs=True, **common))
    assert calls["n"] == 2 * (cuda_graph.WARMUP_CALLS + 1)
    want, got = _losses(tmp_path / "eager"), _losses(tmp_path / "graphed")
    assert len(set(got)) == steps
    torch.testing.assert_close(torch.tensor(got), torch.tensor(want), rtol=2e-3, atol=0)
    assert abs(graphed.val_loss - eager.val_loss) < 2e-3 * eager.val_loss


# ---- what a CUDA graph cannot hold, looked for on a CPU ----------------------------------------

# Operators a recorded step cannot contain: a read of a device value on the host (a sync; the
# recording would fail), an output shaped by the data, or a tensor made from Python data (on a GPU
# a copy from host memory, not allowed while recording).
UNRECORDABLE = {
    "_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique", "_unique2",
    "unique_dim", "unique_consecutive", "repeat_interleave", "equal", "is_nonzero", "lift_fresh",
    "lift_fresh_copy",
}  # fmt: skip

_SCAN = """
import collections, json, sys
sys.path.insert(0, {tests!r})
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from train_helpers import TINY_MODEL, tiny_config
from deltalearn import DeltaLM
from deltalearn.bench import decode as decode_mod
from deltalearn.ops import backend, triton_aot
from deltalearn.train import cuda_graph, trainer as trainer_mod

class Ops(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.seen[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {{}}))

ops = Ops()
class Scanned(cuda_graph.StepGraph):
    def __call__(self):
        with ops:
            return super().__call__()

backend.BACKEND = "triton"  # the kernels a GPU runs, their launches recorded (triton_aot)
trainer_mod.check_graphable = lambda *args, **kwargs: None
trainer_mod.StepGraph = decode_mod.StepGraph = Scanned
DeltaLM._check_ids = lambda self, ids: None  # on CUDA a device-side assert, no host read
variant, what = {variant!r}, {what!r}
with triton_aot.recording() as launches:
    if what == "train":
        cfg = tiny_config({out!r}, {cache!r}, variant, steps=5, grad_accum=2, cuda_graphs=True,
                          skip_nonfinite=True)  # recorded kernels: no numbers to check
        trainer_mod.train(cfg)
    else:  # a decoded token, as `bench decode --modes static-graphed` records it
        bench = decode_mod.DecodeBench(variants=[variant], overrides=dict(TINY_MODEL, vocab_size=61),
                                       prompt=5, tokens=cuda_graph.WARMUP_CALLS + 2)
        run = decode_mod.DecodeRun(bench, variant, "static-graphed")
        run.decode()
        run.decode()
print(json.dumps({{"ops": dict(ops.seen), "launches": len(launches)}}))
"""


@pytest.mark.parametrize("what", ["train", "decode"])
@pytest.mark.parametrize("variant", ["baseline", "ddl", "ddl-cc", "ddl-tc", "write-only-cc"])
def test_the_gpu_paths_step_holds_nothing_a_cuda_graph_cannot(tmp_path, cache, variant, what):
    """The trainer's recorded step, and `bench decode`'s recorded token, on the GPU path (the
    Triton kernels, their launches recorded, `ops.triton_aot`; in a subprocess, as recording
    stubs the process's kernels), scanned for operators a CUDA graph cannot hold: none, for every
    variant — what lets them be recorded on a GPU, checked without one."""
    pytest.importorskip("triton")
    tests = str(Path(__file__).resolve().parent)
    script = _SCAN.format(
        tests=tests, variant=variant, what=what, out=str(tmp_path / "run"), cache=str(cache)
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    seen = report["ops"]
    assert seen.get("addmm", 0) + seen.get("mm", 0) > 0  # the scan saw the step's work
    assert report["launches"] > 0 or variant == "baseline"  # DDL's kernels, as on a GPU
    assert not UNRECORDABLE & set(seen), {op: seen[op] for op in UNRECORDABLE & set(seen)}
