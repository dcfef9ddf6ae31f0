"""The compressor-read kernels (`ops/triton_mixing.py`), run by Triton's interpreter on CPU tensors
(`tests/triton_interpreter.py`), against the plain forms `channel_mix_reference` and
`token_mix_reference`: values and every input gradient, odd widths, every dv, fp32 and bf16, strided
states, a decoding history, and whole DeltaLM models whose reads go through them.

Tolerances: fp32 1e-5 (the same sums in another order); a bf16 state is read in fp32 on both sides,
so the outputs agree to fp32 round-off too, while ∂xs is rounded to bf16 once on each side (one
ulp apart at most).
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("triton")

from model_helpers import tiny_model  # noqa: E402
from triton_interpreter import (  # noqa: E402
    require_interpreter,
    run_kernel_tests_in_child,
    skip_in_child_unless_interpreted,
)

from deltalearn.ops import _shapes as shapes  # noqa: E402
from deltalearn.ops import (  # noqa: E402
    backend,
    channel_mix,
    channel_mix_reference,
    no_graph,
    token_mix,
    token_mix_reference,
)
from deltalearn.ops import triton_mixing as tm  # noqa: E402

read_kernel = tm.value_read_triton

BF16_ULP = 2.0**-7


@pytest.fixture
def interpreted(monkeypatch):
    """Route `channel_mix` and `token_mix` to the kernels, run by the interpreter on CPU tensors,
    at every size (small states otherwise take the plain form); returns the list of kernel calls."""
    require_interpreter()
    monkeypatch.setattr(backend, "BACKEND", "triton")
    monkeypatch.setattr(shapes, "SMALL_STATE", 0)
    calls = []

    def counted(xs, W, past=0):
        calls.append(tuple(xs.shape))
        return read_kernel(xs, W, past)

    monkeypatch.setattr(tm, "value_read_triton", counted)
    return calls


@pytest.fixture(autouse=True)
def _child_runs_kernel_tests_only(request):
    skip_in_child_unless_interpreted(request)


def test_kernels_under_the_interpreter():
    run_kernel_tests_in_child(__file__, min_passed=30)


def _assert_same(got, want, grads_got, grads_want, bf16=False):
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_got, grads_want, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape
        if a.dtype == torch.bfloat16:
            scale = b.abs().max().item()
            torch.testing.assert_close(a, b, rtol=2 * BF16_ULP, atol=BF16_ULP * scale)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * max(b.abs().max().item(), 1))


def _compare(op, reference, xs, W, *args):
    leaves = [t for t in (xs, W) if t.requires_grad]
    got, want = op(xs, W, *args), reference(xs, W, *args)
    G = torch.randn_like(want)
    _assert_same(
        got,
        want,
        torch.autograd.grad(got, leaves, G),
        torch.autograd.grad(want, leaves, G),
    )


@pytest.mark.parametrize("d", [96, 200])
@pytest.mark.parametrize("dv", [1, 2, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_channel_mix_kernel_matches_the_reference(interpreted, d, dv, dtype):
    X = torch.randn(2, 19, d, dv).to(dtype).requires_grad_()
    C = torch.randn(d, dv, requires_grad=True)
    _compare(channel_mix, channel_mix_reference, X, C)
    assert interpreted == [(2, 19, d, dv)]


# (past, new tokens, taps): no history, a full history, more history than the taps reach, fewer
# new tokens than taps, one token, one tap.
TOKEN_CASES = [(0, 21, 4), (3, 6, 4), (6, 3, 4), (0, 2, 4), (3, 1, 4), (0, 9, 1)]


@pytest.mark.parametrize(("past", "new", "K"), TOKEN_CASES)
@pytest.mark.parametrize("dv", [1, 4])
def test_token_mix_kernel_matches_the_reference(interpreted, past, new, K, dv):
    xs = torch.randn(3, past + new, 40, dv, requires_grad=True)
    W = torch.randn(40, dv, K, requires_grad=True)
    _compare(token_mix, token_mix_reference, xs, W, past)


def test_token_mix_kernel_bf16_state_fp32_taps(interpreted):
    xs = torch.randn(2, 37, 96, 4).to(torch.bfloat16).requires_grad_()
    W = torch.randn(96, 4, 4, requires_grad=True)
    out = token_mix(xs, W)
    assert out.dtype == torch.float32
    _compare(token_mix, token_mix_reference, xs, W)


def test_strided_states(interpreted):
    """A state laid out token-minor, and a sliced one: the kernels take the strides as they are."""
    base = torch.randn(24, 2, 40, 4).permute(1, 2, 0, 3)  # (2, 40, 24, 4), token axis strided
    assert not base.is_contiguous()
    _compare(token_mix, token_mix_reference, base.requires_grad_(), torch.randn(24, 4, 4))
    sliced = torch.randn(2, 40, 24, 8)[..., ::2]  # value axis of stride 2
    C = torch.randn(24, 4, requires_grad=True)
    _compare(channel_mix, channel_mix_reference, sliced.requires_grad_(), C)


def test_dense_tokens_apart(interpreted):
    """Tokens that are contiguous `(d, dv)` blocks further apart than d·dv: the kernels take the
    in-token strides as constants (vector loads on a GPU) and the token stride as it is."""
    xs = torch.randn(2, 19, 30, 4)[:, :, :24]
    assert tm._dense_tokens(xs) and not xs.is_contiguous()
    assert not tm._dense_tokens(torch.randn(2, 19, 4, 24).transpose(-1, -2))
    _compare(token_mix, token_mix_reference, xs.requires_grad_(), torch.randn(24, 4, 4), 3)
    C = torch.randn(24, 4, requires_grad=True)
    _compare(channel_mix, channel_mix_reference, xs, C)


def test_strided_upstream_gradient(interpreted):
    X = torch.randn(4, 11, 24, 4, requires_grad=True)
    C = torch.randn(24, 4, requires_grad=True)
    G = torch.randn(11, 4, 24).transpose(0, 1)  # (4, 11, 24), not contiguous
    got = torch.autograd.grad(channel_mix(X, C), (X, C), G)
    want = torch.autograd.grad(channel_mix_reference(X, C), (X, C), G)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["state", "weights"])
def test_one_input_needs_a_gradient(interpreted, which):
    xs = torch.randn(2, 9, 24, 4, requires_grad=which == "state")
    W = torch.randn(24, 4, 4, requires_grad=which == "weights")
    _compare(token_mix, token_mix_reference, xs, W)


@pytest.mark.parametrize("programs", [1, 3])
def test_weight_gradient_is_deterministic_over_row_blocks(interpreted, monkeypatch, programs):
    """Few programs, each summing ∂W over several row blocks: the reference's value, bitwise the
    same twice."""
    monkeypatch.setattr(tm, "WEIGHT_GRAD_PROGRAMS", programs)
    monkeypatch.setattr(tm, "MAX_TILE", 256)  # several row blocks at this size
    xs = torch.randn(2, 50, 40, 4)
    W = torch.randn(40, 4, 4, requires_grad=True)
    G = torch.randn(2, 50, 40)
    first = torch.autograd.grad(token_mix(xs, W), W, G)[0]
    second = torch.autograd.grad(token_mix(xs, W), W, G)[0]
    assert torch.equal(first, second)
    want = torch.autograd.grad(token_mix_reference(xs, W), W, G)[0]
    torch.testing.assert_close(first, want, rtol=1e-5, atol=1e-4)


def test_no_new_tokens(interpreted):
    xs = torch.randn(2, 3, 24, 4, requires_grad=True)
    W = torch.randn(24, 4, 4, requires_grad=True)
    out = token_mix(xs, W, past=3)
    assert out.shape == (2, 0, 24)
    gxs, gW = torch.autograd.grad(out.sum(), (xs, W))
    assert not gxs.any() and not gW.any()


@pytest.mark.parametrize("past", [0, 3])
def test_inference_reads_without_an_autograd_function(interpreted, monkeypatch, past):
    """Under no_grad the reads launch their kernel without `_ValueRead.apply` (host time bounds
    decoding on a GPU): grad mode's values, bit for bit."""
    xs = torch.randn(2, past + 5, 40, 4, requires_grad=True)
    W = torch.randn(40, 4, 4, requires_grad=True)
    C = torch.randn(40, 4, requires_grad=True)
    applied = []
    real = no_graph.apply_direct  # how the reads apply their Function where a graph is recorded
    monkeypatch.setattr(no_graph, "apply_direct", lambda fn, *a: applied.append(fn) or real(fn, *a))
    recorded = [token_mix(xs, W, past), channel_mix(xs, C)]
    assert applied == [tm._ValueRead] * 2
    with torch.no_grad():
        inferred = [token_mix(xs, W, past), channel_mix(xs, C)]
    assert len(applied) == 2
    for a, b in zip(inferred, recorded, strict=True):
        assert a.grad_fn is None
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_launch_config_keeps_the_tile_bound():
    for d, dv in [(96, 1), (200, 3), (768, 4), (8192, 8), (1, 1)]:
        block_t, block_d, block_v = tm.read_launch_config(d, dv)
        assert block_v >= dv and block_d <= tm.MAX_COLUMNS and block_t >= 1
        assert block_t * block_d * block_v <= tm.MAX_TILE


# Reads a step in two blocks: before each sublayer and before the head (2 · 2 + 1). Through the
# read's own Function: with the fused reads (on by default) the first block's attention read only,
# the others come out of the rewrite before them (ddl-cc's in its kernel, ddl-tc's in its
# Function); ddl-tc with the fused token read off, every read.
@pytest.mark.parametrize(
    ("variant", "token_reads", "reads"),
    [("ddl-cc", "on", 1), ("ddl-tc", "on", 1), ("ddl-tc", "off", 5)],
)
def test_deltalm_reads_through_the_kernels(interpreted, monkeypatch, variant, token_reads, reads):
    """A whole model with every compressor read (and rewrite) on the kernels: the loss and every
    parameter gradient of the PyTorch path."""
    monkeypatch.setenv("DELTALEARN_FUSED_TOKEN_READ", token_reads)
    ids = torch.randint(0, 61, (2, 12))
    results = []
    for choice in ("triton", "torch"):
        monkeypatch.setattr(backend, "BACKEND", choice)
        model = tiny_model(variant)
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        results.append((loss.detach(), grads))
    (loss_k, grads_k), (loss_t, grads_t) = results
    assert len(interpreted) == reads
    torch.testing.assert_close(loss_k, loss_t, rtol=1e-5, atol=1e-5)
    assert grads_k.keys() == grads_t.keys()
    for name in grads_t:
        torch.testing.assert_close(grads_k[name], grads_t[name], rtol=1e-4, atol=1e-5, msg=name)
