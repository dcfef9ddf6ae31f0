"""`channel_mix` (the channel-compressor read) equals its plain form on values and gradients."""

from __future__ import annotations

import pytest
import torch

from deltalearn.ops import _shapes, backend, channel_mix, channel_mix_reference


@pytest.fixture(autouse=True)
def _pytorch_functions(monkeypatch):
    """These tests hold the PyTorch Functions (the fallback) to the reference; on CPU the default
    path is the C kernels, tested in test_ops_native.py."""
    monkeypatch.setattr(backend, "BACKEND", "torch")


@pytest.fixture(autouse=True, params=["channel-loop", "small-state"])
def _both_paths(request, monkeypatch):
    """Every test on both forms: the per-channel loop with its hand-written backward, and the
    product-sum that states of at most `SMALL_STATE` elements (a decoded token) take."""
    monkeypatch.setattr(_shapes, "SMALL_STATE", 0 if request.param == "channel-loop" else 1 << 30)


@pytest.mark.parametrize("dv", [1, 2, 4, 8])
@pytest.mark.parametrize("d", [5, 96])
def test_values_and_gradients_equal_the_reference(d, dv):
    torch.manual_seed(d + dv)
    X = torch.randn(3, 7, d, dv, requires_grad=True)
    C = torch.randn(d, dv, requires_grad=True)
    G = torch.randn(3, 7, d)
    got = channel_mix(X, C)
    want = channel_mix_reference(X, C)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    gX, gC = torch.autograd.grad(got, (X, C), G)
    rX, rC = torch.autograd.grad(want, (X, C), G)
    torch.testing.assert_close(gX, rX, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gC, rC, rtol=1e-5, atol=1e-5)


def test_float64_gradcheck_and_non_contiguous_state():
    X = torch.randn(4, 6, 3, dtype=torch.float64).transpose(0, 1).requires_grad_()  # (6, 4, 3)
    C = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    assert not X.is_contiguous()
    assert torch.autograd.gradcheck(channel_mix, (X, C))


def test_mixed_dtypes_promote_like_the_reference():
    X = torch.randn(2, 5, 4, dtype=torch.bfloat16)
    C = torch.randn(5, 4)
    out = channel_mix(X, C)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, channel_mix_reference(X, C), rtol=1e-6, atol=1e-6)


def test_shape_mismatch_names_both_shapes():
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(2, 5, 4\)"):
        channel_mix(torch.randn(2, 5, 4), torch.randn(4, 3))


def test_promote_float_is_torch_promote_types_for_every_pair():
    from deltalearn.ops._shapes import promote_float

    dtypes = [torch.float64, torch.float32, torch.bfloat16, torch.float16, torch.int64]
    for a in dtypes:
        for b in dtypes:
            assert promote_float(a, b) == torch.promote_types(a, b), (a, b)
