"""The Triton rewrite and read kernels as custom ops inside a compiled graph
(`ops/compiled_kernels.py`, `DELTALEARN_COMPILED_KERNELS=on`): the ops' registration (`torch.library.opcheck`: schema, fake
tensors, autograd), their values and gradients against the reference, and compiled models that
call them and train on the eager gradients. The kernels run under Triton's interpreter on CPU
tensors, in a subprocess (`tests/triton_interpreter.py`)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from model_helpers import assert_compiled_gradients_are_eager  # noqa: E402
from triton_interpreter import (  # noqa: E402
    require_interpreter,
    run_kernel_tests_in_child,
    skip_in_child_unless_interpreted,
)

from deltalearn import DeltaLM, DeltaLMConfig  # noqa: E402
from deltalearn.ops import compiled_kernels, state_tape  # noqa: E402
from deltalearn.ops import epilogue as ep  # noqa: E402
from deltalearn.ops.mixing import channel_mix_reference  # noqa: E402
from deltalearn.ops.token_mixing import token_mix_reference  # noqa: E402

REWRITE, READ = "deltalearn.rewrite_forward.default", "deltalearn.read_forward.default"


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
    run_kernel_tests_in_child(__file__, min_passed=26)


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


def _ops_in_graph(model: DeltaLM, ids: torch.Tensor) -> list[str]:
    graphs = []

    def capture(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    torch.compile(model, fullgraph=True, backend=capture)(ids, labels=ids)
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
