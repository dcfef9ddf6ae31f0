"""The fused operator (custom autograd) against the reference: values, every input gradient,
float64 gradcheck, low precision, the ε guard and input validation."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from model_helpers import assert_within_rounding

from deltalearn.ops import (
    delta_rewrite,
    delta_rewrite_reference,
    normalize_direction,
    write_only,
    write_only_reference,
)

PAIRS = {
    "delta": (delta_rewrite, delta_rewrite_reference),
    "write_only": (write_only, write_only_reference),
}
SHAPES = [((3,), 7, None), ((2, 5), 8, 1), ((4,), 9, 4), ((2, 3), 16, 4), ((), 5, 3)]


@pytest.fixture(params=["einsum-readout", "small-state-readout"])
def readout_path(request, monkeypatch):
    """Both forms of the readout kᵀX: the einsum of large states and the product-sum that small
    ones (a decoded token) take up to `ops._shapes.SMALL_STATE` elements."""
    from deltalearn.ops import _shapes

    monkeypatch.setattr(_shapes, "SMALL_STATE", 0 if request.param == "einsum-readout" else 1 << 30)


def _leaves(lead, d, dv, dtype=torch.float64):
    k = normalize_direction(torch.randn((*lead, d), dtype=dtype))
    b = torch.rand(lead, dtype=dtype) * 2
    if dv is None:
        X, v = torch.randn((*lead, d), dtype=dtype), torch.randn(lead, dtype=dtype)
    else:
        X, v = torch.randn((*lead, d, dv), dtype=dtype), torch.randn((*lead, dv), dtype=dtype)
    return [t.detach().requires_grad_() for t in (X, k, b, v)]


def _values_and_grads(fn, leaves, upstream):
    out = fn(*leaves)
    grads = torch.autograd.grad(out, leaves, upstream)
    return out, grads


def _shape_id(p):
    lead, d, dv = p
    return f"lead{'x'.join(map(str, lead)) or '0'}-d{d}-" + ("vec" if dv is None else f"dv{dv}")


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("rule", list(PAIRS))
def test_fused_matches_reference_values_and_all_gradients(rule, shape, readout_path):
    fused, ref = PAIRS[rule]
    leaves = _leaves(*shape)
    upstream = torch.randn_like(leaves[0])
    out_f, grads_f = _values_and_grads(fused, leaves, upstream)
    out_r, grads_r = _values_and_grads(ref, leaves, upstream)
    torch.testing.assert_close(out_f, out_r, rtol=1e-12, atol=1e-12)
    for name, gf, gr in zip(["X", "k", "beta", "v"], grads_f, grads_r, strict=True):
        assert gf.shape == gr.shape, name
        torch.testing.assert_close(
            gf, gr, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"d/d{n}: {m}"
        )


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("rule", list(PAIRS))
def test_gradcheck_float64(rule, shape, readout_path):
    fused, _ = PAIRS[rule]
    assert torch.autograd.gradcheck(fused, tuple(_leaves(*shape)), eps=1e-6, atol=1e-8)


@pytest.mark.parametrize("rule", list(PAIRS))
def test_only_requested_gradients_are_computed(rule):
    fused, ref = PAIRS[rule]
    X, k, b, v = _leaves((4,), 6, 2)
    b_const = b.detach()
    gX_f, gk_f = torch.autograd.grad(fused(X, k, b_const, v.detach()).sum(), (X, k))
    gX_r, gk_r = torch.autograd.grad(ref(X, k, b_const, v.detach()).sum(), (X, k))
    torch.testing.assert_close(gX_f, gX_r)
    torch.testing.assert_close(gk_f, gk_r)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("rule", list(PAIRS))
def test_half_precision_is_within_rounding_of_float64(rule, dtype):
    fused, ref = PAIRS[rule]
    d = 64
    leaves = [t.detach().to(dtype).requires_grad_() for t in _leaves((8, 32), d, 4)]
    upstream = torch.randn_like(leaves[0])
    out = fused(*leaves)
    assert out.dtype == dtype
    grads = torch.autograd.grad(out, leaves, upstream)
    # The reference in float64 from the very same half-precision inputs: what is left is the
    # rounding of an fp32 result to the half dtype, at most one ulp.
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    out64 = ref(*leaves64)
    grads64 = torch.autograd.grad(out64, leaves64, upstream.double())
    eps = torch.finfo(dtype).eps
    assert_within_rounding(out, out64, eps, d, "values")
    for name, g, g64, t in zip(["X", "k", "beta", "v"], grads, grads64, leaves, strict=True):
        assert g.dtype == t.dtype
        assert_within_rounding(g, g64, eps, d, f"d/d{name}")


# ---- autocast: the rewrite's reductions stay fp32 -------------------------------------------------


def _autocast_operands(matrix: bool, beta: float | None = None):
    """fp32 operands with a large state (|X| ~ 30) so that a bf16 readout would be off by ~0.3."""
    g = torch.Generator().manual_seed(7)
    n, d, dv = 64, 128, 4
    X = 30 * torch.randn((n, d, dv) if matrix else (n, d), generator=g)
    k = normalize_direction(torch.randn(n, d, generator=g))
    b = 2 * torch.rand(n, generator=g) if beta is None else torch.full((n,), beta)
    v = torch.randn((n, dv) if matrix else (n,), generator=g)
    return X, k, b, v


def _readout64(k, Y):
    k, Y = k.double(), Y.double()
    return (k * Y).sum(-1) if Y.dim() == k.dim() else torch.einsum("nd,ndv->nv", k, Y)


@pytest.mark.parametrize("matrix", [False, True], ids=["vector", "matrix"])
@pytest.mark.parametrize("rule", list(PAIRS))
def test_bf16_autocast_fused_equals_reference_equals_float64(rule, matrix):
    fused, ref = PAIRS[rule]
    X, k, b, v = _autocast_operands(matrix)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_f, out_r = fused(X, k, b, v), ref(X, k, b, v)
    want = ref(X.double(), k.double(), b.double(), v.double())
    assert out_f.dtype == out_r.dtype == torch.float32  # the state keeps its dtype
    # fp32 round-off on terms of size ~|X|; a bf16 step would be off by ~eps_bf16·|X| ≈ 0.2
    tol = dict(rtol=1e-6, atol=64 * torch.finfo(torch.float32).eps * X.abs().max().item())
    torch.testing.assert_close(out_f.double(), want, **tol)
    torch.testing.assert_close(out_r.double(), want, **tol)
    torch.testing.assert_close(out_f, out_r, **tol)


@pytest.mark.parametrize("matrix", [False, True], ids=["vector", "matrix"])
@pytest.mark.parametrize("impl", ["fused", "reference"])
def test_bf16_autocast_beta_one_overwrites_readout(impl, matrix):
    fn = PAIRS["delta"][0 if impl == "fused" else 1]
    X, k, _, v = _autocast_operands(matrix, beta=1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Y = fn(X, k, torch.ones(X.shape[0]), v)
    miss = (_readout64(k, Y) - v.double()).abs().max().item()
    # bf16 tolerance on the target; the fp32 state gives ~2e-5, a bf16 readout gave 0.26
    assert miss <= torch.finfo(torch.bfloat16).eps * v.abs().max().item(), miss


@pytest.mark.parametrize("rule", list(PAIRS))
def test_bf16_autocast_gradients_are_fp32_accurate(rule):
    """The fused backward runs with autocast off, even when called inside an autocast region."""
    fused, ref = PAIRS[rule]
    leaves = [t.requires_grad_() for t in _autocast_operands(matrix=True)]
    upstream = 30 * torch.randn_like(leaves[0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        grads = torch.autograd.grad(fused(*leaves), leaves, upstream)
    leaves64 = [t.detach().double().requires_grad_() for t in leaves]
    grads64 = torch.autograd.grad(ref(*leaves64), leaves64, upstream.double())
    for name, g, g64 in zip(["X", "k", "beta", "v"], grads, grads64, strict=True):
        assert g.dtype == torch.float32
        rel = ((g.double() - g64).abs().max() / g64.abs().max()).item()
        assert rel < 1e-5, f"d/d{name}: relative error {rel:.2g}"  # bf16 matmuls gave ~3e-3


def test_near_zero_direction_gives_finite_outputs_and_gradients():
    k_raw = torch.full((5, 8), 1e-20, requires_grad=True)
    X = torch.randn(5, 8, 4, requires_grad=True)
    beta = torch.ones(5, requires_grad=True)
    v = torch.randn(5, 4, requires_grad=True)
    out = delta_rewrite(X, normalize_direction(k_raw), beta, v)
    out.square().sum().backward()
    for t in (out, k_raw.grad, X.grad, beta.grad, v.grad):
        assert torch.isfinite(t).all()


class TestBadInput:
    def test_mismatched_state_and_direction_names_both_shapes(self):
        with pytest.raises(ValueError, match=r"X \(3, 6\).*k \(3, 5\)"):
            delta_rewrite(torch.randn(3, 6), torch.randn(3, 5), torch.ones(3), torch.ones(3))

    def test_wrong_value_channels(self):
        with pytest.raises(ValueError, match=r"v of shape \(3, 4\).*\(3, 2\)"):
            delta_rewrite(torch.randn(3, 5, 4), torch.randn(3, 5), torch.ones(3), torch.ones(3, 2))

    def test_zero_dim_tensor(self):
        with pytest.raises(ValueError, match="at least one axis"):
            write_only(torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0), torch.tensor(1.0))

    def test_beta_that_does_not_match_leading_shape(self):
        with pytest.raises(ValueError, match=r"beta .*\(3,\).*got beta \(4,\)"):
            delta_rewrite(torch.randn(3, 5), torch.randn(3, 5), torch.ones(4), torch.ones(3))

    def test_vector_state_with_vector_target(self):
        with pytest.raises(ValueError, match="scalar target"):
            delta_rewrite(torch.randn(3, 5), torch.randn(3, 5), torch.ones(3), torch.ones(3, 2))

    def test_non_tensor(self):
        with pytest.raises(ValueError, match="torch.Tensor"):
            delta_rewrite([1.0], torch.randn(1), torch.ones(()), torch.ones(()))


@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    d=st.integers(1, 12),
    dv=st.one_of(st.none(), st.integers(1, 5)),
    beta=st.floats(0.0, 2.0),
    seed=st.integers(0, 2**16),
)
def test_property_error_contraction_and_fused_equals_reference(lead, d, dv, beta, seed):
    g = torch.Generator().manual_seed(seed)
    lead = tuple(lead)
    k = normalize_direction(torch.randn((*lead, d), generator=g, dtype=torch.float64), eps=0.0)
    b = torch.full(lead, beta, dtype=torch.float64)
    shape_x = (*lead, d) if dv is None else (*lead, d, dv)
    shape_v = lead if dv is None else (*lead, dv)
    X = torch.randn(shape_x, generator=g, dtype=torch.float64)
    v = torch.randn(shape_v, generator=g, dtype=torch.float64)
    Y = delta_rewrite(X, k, b, v)
    torch.testing.assert_close(Y, delta_rewrite_reference(X, k, b, v), rtol=1e-12, atol=1e-12)
    read = (
        (lambda S: (k * S).sum(-1))
        if dv is None
        else (lambda S: torch.einsum("...d,...dv->...v", k, S))
    )
    scale = (1 - b) if dv is None else (1 - b)[..., None]
    torch.testing.assert_close(read(Y) - v, scale * (read(X) - v), rtol=1e-9, atol=1e-9)
