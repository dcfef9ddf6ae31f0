"""`token_mix` (the token compressor's read) equals its plain form on values and gradients, with and
without a decoding history, and `TokenCompressor` reads through it."""

from __future__ import annotations

import pytest
import torch

from deltalearn.nn import TokenCompressor
from deltalearn.ops import _shapes, backend
from deltalearn.ops import token_mixing as token_mix_module
from deltalearn.ops.token_mixing import token_mix, token_mix_reference, token_mix_traced


@pytest.fixture(autouse=True)
def _pytorch_functions(monkeypatch):
    """These tests hold the PyTorch Functions (the fallback) to the reference; on CPU the default
    path is the C kernels, tested in test_ops_native.py."""
    monkeypatch.setattr(backend, "BACKEND", "torch")
    monkeypatch.setattr(_shapes, "SMALL_STATE", 0)  # the Function even on these small states


# (past, new tokens, kernel size): no history, a full history, more history than the kernel
# reaches, fewer new tokens than taps, one token, and a kernel of one tap (a channel mix).
CASES = [(0, 9, 4), (3, 6, 4), (6, 3, 4), (0, 2, 4), (2, 1, 4), (0, 5, 1)]


@pytest.mark.parametrize(("past", "new", "K"), CASES)
@pytest.mark.parametrize("dv", [1, 4])
def test_values_and_gradients_equal_the_reference(past, new, K, dv):
    torch.manual_seed(past + new + K)
    xs = torch.randn(2, past + new, 24, dv, requires_grad=True)
    W = torch.randn(24, dv, K, requires_grad=True)
    G = torch.randn(2, new, 24)
    got, want = token_mix(xs, W, past), token_mix_reference(xs, W, past)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    for a, b in zip(
        torch.autograd.grad(got, (xs, W), G), torch.autograd.grad(want, (xs, W), G), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("past", "new", "K"), CASES)
@pytest.mark.parametrize("dv", [1, 4])
def test_the_traced_form_equals_the_reference(past, new, K, dv):
    """`token_mix_traced`, the form `torch.compile` traces: values, and gradients by autograd
    (float64 gradcheck)."""
    torch.manual_seed(past + new + K)
    xs = torch.randn(2, past + new, 6, dv, dtype=torch.float64, requires_grad=True)
    W = torch.randn(6, dv, K, dtype=torch.float64, requires_grad=True)
    torch.testing.assert_close(token_mix_traced(xs, W, past), token_mix_reference(xs, W, past))
    assert torch.autograd.gradcheck(lambda a, b: token_mix_traced(a, b, past), (xs, W))


@pytest.mark.parametrize("choice", ["torch", "reference"])
@pytest.mark.parametrize(("past", "new"), [(0, 9), (6, 3)])
def test_compiled_read_equals_the_reference(past, new, choice, monkeypatch):
    """`token_mix` compiled by Inductor (the traced form), forward and backward — with every fast
    path off too (`DELTALEARN_EPILOGUE=reference`): the reference's own unfold, compiled with its
    backward by Inductor's CPU backend, corrupted the heap (torch 2.13.0)."""
    monkeypatch.setattr(backend, "BACKEND", choice)
    torch.manual_seed(past + new)
    xs = torch.randn(2, past + new, 128, 4, requires_grad=True)
    W = torch.randn(128, 4, 4, requires_grad=True)
    torch._dynamo.reset()
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the heap corruption was in the code for more than one thread
    try:
        got = torch.compile(token_mix, fullgraph=True)(xs, W, past)
        G = torch.randn_like(got)
        got_grads = torch.autograd.grad(got, (xs, W), G)
    finally:
        torch.set_num_threads(threads)
    want = token_mix_reference(xs, W, past)
    torch.testing.assert_close(got, want)
    for a, b in zip(got_grads, torch.autograd.grad(want, (xs, W), G), strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(("past", "new", "K"), [(0, 5, 4), (3, 2, 4)])
def test_float64_gradcheck_on_a_strided_state(past, new, K):
    xs = torch.randn(past + new, 2, 5, 3, dtype=torch.float64).transpose(0, 1).requires_grad_()
    W = torch.randn(5, 3, K, dtype=torch.float64, requires_grad=True)
    assert not xs.is_contiguous()
    assert torch.autograd.gradcheck(lambda x, w: token_mix(x, w, past), (xs, W))


def test_bf16_state_promotes_with_fp32_taps():
    xs = torch.randn(2, 7, 8, 4).to(torch.bfloat16).requires_grad_()
    W = torch.randn(8, 4, 4, requires_grad=True)
    out = token_mix(xs, W)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, token_mix_reference(xs, W), rtol=1e-5, atol=1e-5)
    gxs, gW = torch.autograd.grad(out.sum(), (xs, W))
    assert gxs.dtype == torch.bfloat16 and gW.dtype == torch.float32


def test_bad_shapes_name_the_values():
    with pytest.raises(ValueError, match=r"\(2, 5, 8, 4\).*\(8, 3, 4\)"):
        token_mix(torch.randn(2, 5, 8, 4), torch.randn(8, 3, 4))
    with pytest.raises(ValueError, match="past must lie in \\[0, 5\\].*got 6"):
        token_mix(torch.randn(2, 5, 8, 4), torch.randn(8, 4, 4), past=6)


def test_token_compressor_reads_through_token_mix(monkeypatch):
    """A full-length state takes the hand-written Function (a decoded token takes the plain form)
    and gives the plain form's values and gradients."""
    calls = []
    real = token_mix_module._TokenMix.apply

    def spy(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(token_mix_module._TokenMix, "apply", spy)
    torch.manual_seed(0)
    tc = TokenCompressor(64, 4, 4)
    with torch.no_grad():
        tc.weight.normal_()
    X = torch.randn(4, 128, 64, 4, requires_grad=True)  # 131072 elements: past SMALL_STATE
    got = tc(X)
    assert calls == [X.shape]
    want = token_mix_reference(X, tc.weight * tc.read[:, None])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
