"""The rewrite epilogue's PyTorch path (`ops/fused_epilogue.py`: CPU bf16, `torch.compile`, no C
compiler) against the plain composition `rewrite_epilogue_reference`: values, every input gradient,
float64 gradcheck, bf16, odd widths, strided inputs, and what it keeps alive for backward."""

from __future__ import annotations

import pytest
import torch

from deltalearn.ops import backend, rewrite_epilogue, rewrite_epilogue_reference


@pytest.fixture(autouse=True)
def _pytorch_functions(monkeypatch):
    """These tests hold the PyTorch Functions (the fallback) to the reference; on CPU the default
    path is the C kernels, tested in test_ops_native.py."""
    monkeypatch.setattr(backend, "BACKEND", "torch")


RULES = ["delta", "write_only"]
HEADS = ["paper", "official"]


def _leaves(lead, d, dv, dtype=torch.float32, *, seed=0):
    """X, h, z, p: a vector state for dv = 1, else a matrix state; z in fp32 as GateHead gives it."""
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(*lead, d, dv, generator=gen) if dv > 1 else torch.randn(*lead, d, generator=gen)
    h = 3 * torch.randn(*lead, d, generator=gen)
    z = 2 * torch.randn(*lead, generator=gen)
    p = torch.randn(*lead, dv, generator=gen) if dv > 1 else torch.randn(*lead, generator=gen)
    return [X.to(dtype), h.to(dtype), z, p.to(dtype)]


def _outputs_and_grads(fn, leaves, up, **options):
    leaves = [t.detach().requires_grad_() for t in leaves]
    Y = fn(*leaves, **options)
    return Y, torch.autograd.grad(Y, leaves, up)


@pytest.mark.parametrize("value_head", HEADS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dv", [1, 2, 4, 8])
@pytest.mark.parametrize("d", [96, 200])
def test_matches_the_reference_fp32(d, dv, rule, value_head):
    leaves = _leaves((3, 5), d, dv)
    options = dict(rule=rule, value_head=value_head, value_scale=3.0)
    up = torch.randn(leaves[0].shape)
    Y, grads = _outputs_and_grads(rewrite_epilogue, leaves, up, **options)
    Y_ref, grads_ref = _outputs_and_grads(rewrite_epilogue_reference, leaves, up, **options)
    torch.testing.assert_close(Y, Y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dv", [1, 4])
def test_matches_the_reference_bf16(dv, rule):
    """bf16 X, h, p (fp32 z): both sides compute in fp32 and round once, so at most one bf16 step
    apart; every gradient comes back in its input's dtype."""
    leaves = _leaves((4, 6), 200, dv, torch.bfloat16)
    up = torch.randn(leaves[0].shape).to(torch.bfloat16)
    Y, grads = _outputs_and_grads(rewrite_epilogue, leaves, up, rule=rule, value_head="official")
    Y_ref, grads_ref = _outputs_and_grads(
        rewrite_epilogue_reference, leaves, up, rule=rule, value_head="official"
    )
    ulp = 2.0**-7
    torch.testing.assert_close(Y, Y_ref, rtol=2 * ulp, atol=ulp * Y_ref.abs().max().item())
    for leaf, got, want in zip(leaves, grads, grads_ref, strict=True):
        assert got.dtype == leaf.dtype
        scale = want.float().abs().max().item()
        torch.testing.assert_close(got, want, rtol=2 * ulp, atol=ulp * scale)


@pytest.mark.parametrize("value_head", HEADS)
@pytest.mark.parametrize("rule", RULES)
def test_gradcheck_float64(rule, value_head):
    for lead, d, dv in (((3,), 7, 1), ((2, 2), 7, 3)):
        leaves = [t.double().requires_grad_() for t in _leaves(lead, d, dv)]

        def f(X, h, z, p):
            return rewrite_epilogue(X, h, z, p, rule=rule, value_head=value_head, value_scale=3.0)

        assert torch.autograd.gradcheck(f, leaves)


def test_gradient_of_h_alone_when_only_h_needs_one():
    """The backward skips what no input needs (here all but ∂h) and still gets ∂h right."""
    X, h, z, p = _leaves((4,), 16, 4)
    h.requires_grad_()
    Y = rewrite_epilogue(X, h, z, p)
    (gh,) = torch.autograd.grad(Y.square().sum(), [h])
    hr = h.detach().requires_grad_()
    (gh_ref,) = torch.autograd.grad(rewrite_epilogue_reference(X, hr, z, p).square().sum(), [hr])
    torch.testing.assert_close(gh, gh_ref, rtol=1e-5, atol=1e-5)


def test_strided_inputs():
    """A state in value-major memory and a direction sliced out of a wider tensor."""
    X, h, z, p = _leaves((6,), 40, 4)
    X_strided = X.transpose(-1, -2).contiguous().transpose(-1, -2)
    h_strided = torch.cat([h, torch.zeros_like(h)], -1)[..., :40]
    assert not X_strided.is_contiguous() and not h_strided.is_contiguous()
    up = torch.randn(X.shape)
    Y, grads = _outputs_and_grads(rewrite_epilogue, [X_strided, h_strided, z, p], up)
    Y_ref, grads_ref = _outputs_and_grads(rewrite_epilogue_reference, [X, h, z, p], up)
    torch.testing.assert_close(Y, Y_ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dv", [1, 4])
def test_keeps_one_direction_per_row_for_backward(dv):
    """Besides the state (which the next sublayer keeps anyway), backward holds k and a few numbers
    per row — not h and k, as autograd through the direction normalisation would."""
    rows, d = 32, 64
    X, h, z, p = _leaves((rows,), d, dv)
    h.requires_grad_()
    X.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rewrite_epilogue(X, h, z, p)
    extra = sum(t.numel() for t in saved if t.data_ptr() != X.data_ptr())
    assert extra <= rows * d + rows * (2 + 2 * dv), [tuple(t.shape) for t in saved]


def test_a_bf16_branch_output_is_kept_in_bf16():
    """As under autocast (fp32 state, bf16 h): the row-sized tensor kept for backward is h itself,
    2 bytes an element, not the fp32 k; k is recomputed from it, and the gradients are the
    reference's (the bf16 case above checks them; here the fp32-state mix)."""
    rows, d, dv = 32, 64, 4
    X, h, z, p = _leaves((rows,), d, dv)
    h = h.to(torch.bfloat16)
    leaves = [t.requires_grad_() for t in (X, h, z, p)]
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        rewrite_epilogue(*leaves)
    row_sized = [dt for shape, dt in saved if shape == (rows, d)]
    assert row_sized == [torch.bfloat16], saved
    up = torch.randn(rows, d, dv)
    _, grads = _outputs_and_grads(rewrite_epilogue, leaves, up)
    _, want = _outputs_and_grads(rewrite_epilogue_reference, leaves, up)
    for got, ref in zip(grads, want, strict=True):
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


def test_bf16_autocast_beta_one_writes_the_target():
    """Under CPU bf16 autocast the readout stays fp32: with β = 1, kᵀY = v on an fp32 state."""
    X, h, _, p = _leaves((64,), 256, 4)
    X = 30 * X  # a state of the magnitude a trained residual stream reaches
    z = torch.zeros(64)  # β = 2σ(0) = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Y = rewrite_epilogue(X, h, z, p)
    assert Y.dtype == torch.float32
    k = h / torch.sqrt(h.square().sum(-1, keepdim=True) + 1e-10)
    readout = torch.einsum("nd,ndv->nv", k, Y)
    torch.testing.assert_close(readout, p, rtol=0, atol=1e-4)
