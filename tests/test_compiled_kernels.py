"""The Triton rewrite and read kernels as custom ops inside a compiled graph
(`ops/compiled_kernels.py`, `DELTALEARN_COMPILED_KERNELS=on`): the ops' registration (`torch.library.opcheck`: schema, fake
tensors, autograd), their values and gradients against the reference, and compiled models that
call them and train on the eager gradients. The kernels run under Triton's interpreter on CPU
tensors, in a subprocess (`tests/triton_interpreter.py`)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

from chain_helpers import rewrite_stack_loss  # noqa: E402
from model_helpers import assert_compiled_gradients_are_eager  # noqa: E402
from triton_interpreter import (  # noqa: E402
    require_interpreter,
    run_kernel_tests_in_child,
    skip_in_child_unless_interpreted,
)

from deltalearn import DeltaLM, DeltaLMConfig  # noqa: E402
from deltalearn.ops import compiled_kernels, state_chain, state_tape  # noqa: E402
from deltalearn.ops import epilogue as ep  # noqa: E402
from deltalearn.ops.mixing import channel_mix_reference  # noqa: E402
from deltalearn.ops.state_chain import StateChain  # noqa: E402
from deltalearn.ops.token_mixing import token_mix_reference  # noqa: E402

REWRITE, READ = "deltalearn.rewrite_forward.default", "deltalearn.read_forward.default"
CHAINED = "deltalearn.chained_rewrite_forward.default"
CHAINED_BACKWARD = "deltalearn.chained_rewrite_backward.default"
READ_BACKWARD = "deltalearn.read_backward.default"


@pytest.fixture
def interpreted(monkeypatch):
    """The custom ops on: their kernels run by the interpreter on CPU tensors."""
    require_interpreter()
    monkeypatch.setattr(compiled_kernels, "COMPILED_KERNELS", "on")
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _child_runs_kernel_tests_only(request):
    skip_in_child_unless_interpreted(request)


def test_kernels_under_the_interpreter():
    run_kernel_tests_in_child(__file__, min_passed=35)


CASES = [  # (d, dv, compress, rule, value_head): odd widths, every state kind, both rules and heads
    (24, 1, False, "delta", "paper"),
    (24, 1, False, "write_only", "official"),
    (96, 4, True, "delta", "official"),
    (200, 4, False, "write_only", "paper"),
    (40, 2, True, "write_only", "official"),
    (40, 8, True, "delta", "paper"),
]


def _operands(d, dv, compress):
    torch.manual_seed(d + dv)
    lead = (2, 3)
    X = torch.randn(*lead, d, dv) if dv > 1 else torch.randn(*lead, d)
    p = torch.randn(*lead, dv) if dv > 1 else torch.randn(*lead)
    C = torch.randn(d, dv) / dv if compress else None
    return X, torch.randn(*lead, d) * 3, torch.randn(*lead) * 2, p, C


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_forward_op_passes_torch_library_checks(interpreted, case):
    d, dv, compress, rule, value_head = case
    X, h, z, p, C = (t if t is None else t.requires_grad_() for t in _operands(d, dv, compress))
    options = (rule == "delta", value_head == "official", 4.0, 1e-5)
    torch.library.opcheck(compiled_kernels.rewrite_forward, (X, h, z, p, C, *options))


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_ops_give_the_reference_values_and_gradients(interpreted, case):
    d, dv, compress, rule, value_head = case
    operands = _operands(d, dv, compress)
    leaves = [t.requires_grad_() for t in operands if t is not None]
    X, h, z, p, C = operands
    options = {"rule": rule, "value_head": value_head, "value_scale": 4.0, "k_eps": 1e-5}
    out = compiled_kernels.rewrite(X, h, z, p, C, **options)
    ref = ep.rewrite_epilogue_reference(X, h, z, p, compress=C, **options)
    outs, refs = (out, ref) if compress else ((out,), (ref,))
    ups = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, ups)
    ref_grads = torch.autograd.grad(refs, leaves, ups)
    for actual, expected in zip((*outs, *grads), (*refs, *ref_grads), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


READS = [  # (kind, d, dv, K, past): the TC token read with history, the CC channel read
    ("token", 40, 4, 3, 2),
    ("token", 24, 2, 4, 0),
    ("channel", 40, 4, 1, 0),
    ("channel", 96, 8, 1, 0),
]


def _read_operands(kind, d, dv, K, past):
    torch.manual_seed(d + dv + K)
    xs = torch.randn(2, past + 5, d, dv)
    W = torch.randn(d, dv, K) if kind == "token" else torch.randn(d, dv)
    return xs.requires_grad_(), W.requires_grad_()


@pytest.mark.parametrize("case", READS, ids=lambda c: "-".join(map(str, c)))
def test_read_op_passes_torch_library_checks(interpreted, case):
    xs, W = _read_operands(*case)
    torch.library.opcheck(compiled_kernels.read_forward, (xs, W, case[-1]))


@pytest.mark.parametrize("case", READS, ids=lambda c: "-".join(map(str, c)))
def test_read_op_gives_the_reference_values_and_gradients(interpreted, case):
    kind, past = case[0], case[-1]
    xs, W = _read_operands(*case)
    out = compiled_kernels.value_read(xs, W, past)
    if kind == "token":
        ref = token_mix_reference(xs, W, past)
    else:
        ref = channel_mix_reference(xs, W)
    G = torch.randn_like(out)
    grads = torch.autograd.grad(out, (xs, W), G)
    ref_grads = torch.autograd.grad(ref, (xs, W), G)
    for actual, expected in zip((out, *grads), (ref, *ref_grads), strict=True):
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-4)


def _model_and_ids(variant: str, layers: int) -> tuple[DeltaLM, torch.Tensor]:
    torch.manual_seed(0)
    config = DeltaLMConfig.preset(variant, "tiny", num_layers=layers, vocab_size=256)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(1))
    return DeltaLM(config).train(), ids


def _ops_in_graph(model: DeltaLM, ids: torch.Tensor, nested: bool = False) -> list[str]:
    """The deltalearn ops dynamo's graph calls; `nested`: also those inside the forward and
    backward graphs it traced of autograd Functions (the state chain's)."""
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend=capture)(ids, labels=ids)
    if nested:
        graphs = [m for gm in graphs for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    return [str(n.target) for gm in graphs for n in gm.graph.nodes if "deltalearn" in str(n.target)]


@pytest.mark.parametrize(
    ("variant", "layers", "reads"),
    [("ddl", 1, 0), ("ddl-cc", 2, 1), ("ddl-tc", 1, 3), ("write-only-cc", 1, 1)],
)
def test_compiled_model_calls_the_ops_and_trains_on_the_eager_gradients(
    interpreted, variant, layers, reads
):
    """Every sublayer's rewrite is one op call, every read not fused into a rewrite another (CC:
    the first only, the rewrites make the others, across blocks too; TC: a read a sublayer and
    the final one), and Inductor's graph around them gives the eager path's gradients."""
    model, ids = _model_and_ids(variant, layers)
    ops = _ops_in_graph(model, ids)
    assert (ops.count(REWRITE), ops.count(READ)) == (2 * layers, reads)
    assert len(ops) == 2 * layers + reads
    torch._dynamo.reset()
    assert_compiled_gradients_are_eager(model, ids)


def test_switched_off_the_compiled_graph_traces_the_rewrite(interpreted, monkeypatch):
    monkeypatch.setattr(compiled_kernels, "COMPILED_KERNELS", "off")
    assert _ops_in_graph(*_model_and_ids("ddl-tc", 1)) == []


def test_switch_is_off_by_default_and_names_a_bad_value(monkeypatch):
    monkeypatch.setattr(compiled_kernels, "COMPILED_KERNELS", None)
    monkeypatch.delenv("DELTALEARN_COMPILED_KERNELS", raising=False)
    assert not compiled_kernels.enabled()
    monkeypatch.setenv("DELTALEARN_COMPILED_KERNELS", "on")
    assert compiled_kernels.enabled()
    monkeypatch.setenv("DELTALEARN_COMPILED_KERNELS", "yes")
    with pytest.raises(ValueError, match="DELTALEARN_COMPILED_KERNELS.*'yes'"):
        compiled_kernels.enabled()


def test_eager_calls_never_take_the_ops(monkeypatch):
    """Outside torch.compile the eager paths run (Triton Functions with the state tape on CUDA,
    the C kernels on a CPU), switch or not."""
    monkeypatch.setattr(compiled_kernels, "COMPILED_KERNELS", "on")
    X, h, z, p, _ = _operands(24, 1, False)
    assert not compiled_kernels.applies([X, h, z, p], "auto")


def test_backward_op_returns_tensors_of_its_own_as_its_fake_says(interpreted):
    """Write-only without a read, ∂X is the upstream gradient itself: the op returns a contiguous
    copy (an op may not return an input, and Inductor plans with the fake's strides); no gradient
    at all gives zeros."""
    X, h, z, p, _ = _operands(24, 1, False)
    G = torch.randn(3, 2, 24).transpose(0, 1)  # (2, 3, 24), not contiguous
    options = (False, False, 4.0, 1e-5)
    gX, *rest = compiled_kernels.rewrite_backward(X, h, z, p, None, G, None, *options)
    assert gX.is_contiguous() and gX.data_ptr() != G.data_ptr() and torch.equal(gX, G)
    grads = compiled_kernels.rewrite_backward(X, h, z, p, None, None, None, *options)
    assert [tuple(g.shape) for g in grads] == [(2, 3, 24), (2, 3, 24), (2, 3), (2, 3), (0,)]
    assert all(g.is_contiguous() and not g.any() for g in grads)


def test_ops_leave_a_recording_state_tape_alone(interpreted):
    """The ops save X for their backward as autograd does: a state tape recording around them
    (an eager model's forward) must not take their output for a state it could rebuild."""
    X, h, z, p, C = _operands(40, 4, True)
    options = {"rule": "delta", "value_head": "paper", "value_scale": 4.0, "k_eps": 1e-5}
    with state_tape.recording() as tape:
        Y, _ = compiled_kernels.rewrite(X, h, z, p, C, **options)
        assert not tape.registered(Y)


@pytest.mark.parametrize("variant", ["ddl-cc", "ddl-tc"])
def test_compiled_checkpointed_model_with_the_ops_trains_on_the_eager_gradients(
    interpreted, variant
):
    """`--compile --activation-checkpointing` with the ops: backward recomputes each block's
    forward, the ops' calls included."""
    assert_compiled_gradients_are_eager(*_model_and_ids(variant, 2), checkpointed=True)


# ---- the state chain (ops/state_chain.py) by the kernels: X rebuilt by the backward kernel ------


def _chained_stack_loss(official: bool, read: bool, chained: bool, operands):
    """A loss over three delta rewrites from X0, each read (with `read`) and the last state in it:
    on a state chain by the chained kernel ops, or by the reference epilogue."""
    X0, C, *operands = operands
    head = "official" if official else "paper"

    def rewrite(chain, X, layer, C):
        if chain is None:
            return ep.rewrite_epilogue_reference(X, *layer, compress=C, value_head=head)
        return chain.rewrite_kernel(X, *layer, C, official, 4.0, 1e-5)

    layers = list(zip(*(iter(operands),) * 3, strict=True))  # (h, z, p) a layer
    return rewrite_stack_loss(X0, C, layers, rewrite, read, chained)


@pytest.mark.parametrize("read", [True, False], ids=["with-read", "no-read"])
@pytest.mark.parametrize("official", [False, True], ids=["paper", "official"])
def test_chained_kernel_rewrites_give_the_reference_values_and_gradients(
    interpreted, official, read
):
    """Three rewrites on a chain: each backward rebuilds its input from its output, which the
    next one handed back; every gradient (the first state's too) as the reference's."""
    torch.manual_seed(0)
    d, dv = 40, 4
    leaves = [torch.randn(2, 5, d, dv), torch.randn(d, dv) / dv]
    for _ in range(3):
        leaves += [torch.randn(2, 5, d) * 3, torch.randn(2, 5) * 2, torch.randn(2, 5, dv)]
    leaves = [t.requires_grad_() for t in leaves]
    loss = _chained_stack_loss(official, read, True, leaves)
    expected = _chained_stack_loss(official, read, False, leaves)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=0)
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    ref_grads = torch.autograd.grad(expected, leaves, allow_unused=True)
    for actual, wanted in zip(grads, ref_grads, strict=True):
        if wanted is None:  # C without the read
            assert actual is None or not actual.any()
            continue
        torch.testing.assert_close(actual, wanted, rtol=1e-4, atol=1e-4)


def test_chained_rewrite_ops_pass_torch_library_checks_and_rebuild_the_state(interpreted):
    X, h, z, p, C = _operands(40, 4, True)
    options = (True, 4.0, 1e-5)
    torch.library.opcheck(compiled_kernels.chained_rewrite_forward, (X, h, z, p, C, *options))
    Y, x_next, rho, beta, e = compiled_kernels.chained_rewrite_forward(X, h, z, p, C, *options)
    grads = (torch.randn_like(Y), torch.randn_like(x_next))
    args = (Y, h, z, p, C, rho, beta, e, *grads, *options)
    torch.library.opcheck(compiled_kernels.chained_rewrite_backward, args)
    *_, X_rebuilt = compiled_kernels.chained_rewrite_backward(*args)
    torch.testing.assert_close(X_rebuilt, X, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    ("variant", "reads", "chained_reads"), [("ddl-cc", 1, 0), ("ddl-tc", 5, 5)]
)
def test_compiled_model_on_the_state_chain_calls_the_kernels_and_trains_on_the_eager_gradients(
    interpreted, monkeypatch, variant, reads, chained_reads
):
    """Both switches on: every rewrite is a chained kernel op each way, and with TC every read a
    read op each way inside the chain's Functions; CC's first read (of the chain's first state,
    which is kept) an op of its own. The gradients are the eager ones."""
    monkeypatch.setattr(state_chain, "COMPILED_REBUILD", "on")
    model, ids = _model_and_ids(variant, 2)
    ops = _ops_in_graph(model, ids, nested=True)
    assert ops.count(CHAINED) == ops.count(CHAINED_BACKWARD) == 4
    assert ops.count(READ_BACKWARD) == chained_reads
    assert ops.count(READ) == reads
    assert REWRITE not in ops
    torch._dynamo.reset()
    assert_compiled_gradients_are_eager(model, ids)


def test_a_chained_kernel_rewrite_keeps_no_state(interpreted):
    """What its backward keeps: h, z, p, C and row scalars — nothing shaped as the state, which
    arrives in backward as the token's gradient instead (a compiled graph keeps what the Function
    saves; on a CPU under the interpreter, its copies of every operand blur a measured peak)."""
    X, h, z, p, C = (t.requires_grad_() for t in _operands(40, 4, True))
    chain = StateChain(X)
    Y, _ = chain.rewrite_kernel(X, h, z, p, C, False, 4.0, 1e-5)
    saved = Y.grad_fn.saved_tensors
    assert len(saved) == 7 and all(t is None or t.shape != X.shape for t in saved)
    assert sum(t.numel() for t in saved if t is not None) < X.numel() / 2


def test_state_chain_benchmark_runs_the_kernel_modes(interpreted, tmp_path):
    """`benchmarks/compiled_state_chain.py --modes kernels,chain-kernels`, compiled, at a tiny
    size: both on the eager gradients (the GPU check's `compiledrebuild` stage runs it on CUDA)."""
    out = tmp_path / "chain.json"
    root = Path(__file__).resolve().parents[1]
    sizes = ["--rows", "16", "--width", "16", "--channels", "2", "--layers", "2"]
    cmd = [sys.executable, "benchmarks/compiled_state_chain.py", *sizes, "--no-eager",
           "--modes", "kernels,chain-kernels", "--repeats", "1", "--json", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert [row["mode"] for row in rows] == ["kernels", "chain-kernels"]
    assert all(row["worst_gradient_difference"] < 1e-4 for row in rows)
