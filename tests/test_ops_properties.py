"""The facts of SPEC §1 as executable checks, on random shapes (vector and matrix states, odd d)."""

from __future__ import annotations

import pytest
import torch

from deltalearn.ops import (
    delta_operator,
    delta_rewrite,
    delta_rewrite_reference,
    normalize_direction,
    shortcut_spectrum,
    write_only,
    write_only_reference,
)

REWRITES = {"fused": delta_rewrite, "reference": delta_rewrite_reference}
# (leading shape, d, dv); dv=None is a vector state.
SHAPES = [
    ((3,), 7, None),
    ((2, 5), 8, 1),
    ((4,), 9, 4),
    ((2, 3), 16, 4),
    ((), 5, 3),
    ((6,), 1, None),
]


def _operands(lead, d, dv, dtype=torch.float64, beta=None):
    k = normalize_direction(torch.randn((*lead, d), dtype=dtype), eps=0.0)
    b = torch.rand(lead, dtype=dtype) * 2 if beta is None else torch.full(lead, beta, dtype=dtype)
    if dv is None:
        X, v = torch.randn((*lead, d), dtype=dtype), torch.randn(lead, dtype=dtype)
    else:
        X, v = torch.randn((*lead, d, dv), dtype=dtype), torch.randn((*lead, dv), dtype=dtype)
    return X, k, b, v


def _mirror_pair(lead, d, dtype=torch.float64):
    """Random a, b with ‖a‖ = ‖b‖ and the unit normal k = (a − b)/‖a − b‖ of the plane between them."""
    a = torch.randn((*lead, d), dtype=dtype)
    b = torch.randn((*lead, d), dtype=dtype)
    b = b * (a.norm(dim=-1, keepdim=True) / b.norm(dim=-1, keepdim=True))
    if d == 1:
        b = -a  # the only other vector of the same norm
    k = (a - b) / (a - b).norm(dim=-1, keepdim=True)
    return a, b, k


def _orthogonal_to(k, n):
    """n random vectors orthogonal to k (Gram-Schmidt against k): `(..., d, n)`."""
    r = torch.randn((*k.shape, n), dtype=k.dtype)
    return r - k[..., :, None] * (k[..., :, None] * r).sum(-2, keepdim=True)


def _readout(k, X):
    return (k * X).sum(-1) if X.dim() == k.dim() else torch.einsum("...d,...dv->...v", k, X)


def _shape_id(p):
    lead, d, dv = p
    return f"lead{'x'.join(map(str, lead)) or '0'}-d{d}-" + ("vec" if dv is None else f"dv{dv}")


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
@pytest.mark.parametrize("impl", list(REWRITES), ids=str)
class TestRewriteFacts:
    def test_beta_zero_is_identity(self, shape, impl):
        X, k, b, v = _operands(*shape, beta=0.0)
        torch.testing.assert_close(REWRITES[impl](X, k, b, v), X, rtol=0, atol=0)

    def test_beta_one_overwrites_readout_with_target(self, shape, impl):
        X, k, b, v = _operands(*shape, beta=1.0)
        Y = REWRITES[impl](X, k, b, v)
        torch.testing.assert_close(_readout(k, Y), v, rtol=1e-12, atol=1e-12)

    def test_beta_two_shortcut_is_householder_reflection(self, shape, impl):
        # β = 2 with v = 0 leaves only the shortcut, which must be the mirror with normal k: it swaps
        # any two vectors a, b of equal norm with k ∥ a − b, and fixes every vector orthogonal to k.
        lead, d, dv = shape
        a, b, k = _mirror_pair(lead, d)
        beta = torch.full(lead, 2.0, dtype=k.dtype)
        if dv is None:
            X, want = a, b
        else:
            w = _orthogonal_to(k, dv)  # (..., d, dv)
            X = torch.cat([a[..., None], b[..., None], w], -1)[..., :dv]
            want = torch.cat([b[..., None], a[..., None], w], -1)[..., :dv]
        v = torch.zeros((*lead, dv) if dv else lead, dtype=k.dtype)
        torch.testing.assert_close(REWRITES[impl](X, k, beta, v), want)

    def test_error_contracts_by_one_minus_beta(self, shape, impl):
        X, k, b, v = _operands(*shape)
        Y = REWRITES[impl](X, k, b, v)
        e_pre, e_post = _readout(k, X) - v, _readout(k, Y) - v
        scale = (1 - b) if X.dim() == k.dim() else (1 - b)[..., None]
        torch.testing.assert_close(e_post, scale * e_pre)

    def test_components_orthogonal_to_k_are_untouched(self, shape, impl):
        X, k, b, v = _operands(*shape)
        delta = REWRITES[impl](X, k, b, v) - X
        if X.dim() == k.dim():
            delta = delta[..., None]
        P = torch.eye(k.shape[-1], dtype=k.dtype) - k[..., :, None] * k[..., None, :]
        torch.testing.assert_close(P @ delta, torch.zeros_like(delta), atol=1e-12, rtol=0)

    def test_equals_operator_form(self, shape, impl):
        X, k, b, v = _operands(*shape)
        Y = REWRITES[impl](X, k, b, v)
        A = delta_operator(k, b)
        if X.dim() == k.dim():
            expected = (A @ X[..., None])[..., 0] + (b * v)[..., None] * k
        else:
            expected = A @ X + b[..., None, None] * k[..., :, None] * v[..., None, :]
        torch.testing.assert_close(Y, expected)


@pytest.mark.parametrize("shape", SHAPES, ids=_shape_id)
def test_write_only_has_no_erase_term(shape):
    X, k, b, v = _operands(*shape)
    for fn in (write_only, write_only_reference):
        Y = fn(X, k, b, v)
        kv = (
            k * (b * v)[..., None]
            if X.dim() == k.dim()
            else b[..., None, None] * k[..., :, None] * v[..., None, :]
        )
        torch.testing.assert_close(Y, X + kv)
        # the readout grows by β·v regardless of what X already holds along k
        expected = _readout(k, X) + (b * v if X.dim() == k.dim() else b[..., None] * v)
        torch.testing.assert_close(_readout(k, Y), expected)


@pytest.mark.parametrize("d", [1, 2, 5, 13])
def test_delta_operator_at_beta_two_is_the_mirror(d):
    a, b, k = _mirror_pair((4,), d)
    H = delta_operator(k, torch.full((4,), 2.0, dtype=k.dtype))
    apply = lambda x: (H @ x[..., None])[..., 0]  # noqa: E731
    torch.testing.assert_close(apply(a), b)
    torch.testing.assert_close(apply(b), a)
    torch.testing.assert_close(apply(k), -k)
    w = _orthogonal_to(k, 3)
    torch.testing.assert_close(H @ w, w)
    # a reflection is orthogonal, symmetric and its own inverse
    eye = torch.eye(d, dtype=k.dtype).expand_as(H)
    torch.testing.assert_close(H @ H.transpose(-1, -2), eye)
    torch.testing.assert_close(H, H.transpose(-1, -2))
    torch.testing.assert_close(torch.linalg.det(H), torch.full((4,), -1.0, dtype=k.dtype))


@pytest.mark.parametrize("d", [1, 2, 5, 8, 13])
def test_spectrum_matches_eigvalsh_and_determinant(d):
    k = normalize_direction(torch.randn(6, d, dtype=torch.float64), eps=0.0)
    beta = torch.tensor([0.0, 0.3, 1.0, 1.5, 2.0, 1.99], dtype=torch.float64)
    A = delta_operator(k, beta)
    closed = shortcut_spectrum(k, beta)
    torch.testing.assert_close(closed, torch.linalg.eigvalsh(A))
    torch.testing.assert_close(torch.linalg.det(A), 1 - beta)
    assert torch.all(closed[..., 1:] >= closed[..., :-1])
    # k is the eigenvector for 1 − β
    torch.testing.assert_close((A @ k[..., None])[..., 0], (1 - beta)[:, None] * k)


def test_matrix_state_shortcut_is_kronecker_of_identity_and_A():
    d, dv = 5, 3
    k = normalize_direction(torch.randn(d, dtype=torch.float64), eps=0.0)
    beta = torch.tensor(0.7, dtype=torch.float64)
    X = torch.randn(d, dv, dtype=torch.float64)
    Y = delta_rewrite(X, k, beta, torch.zeros(dv, dtype=torch.float64))
    big = torch.kron(torch.eye(dv, dtype=torch.float64), delta_operator(k, beta))
    # column-major vec(X): stacking the dv columns
    torch.testing.assert_close(Y.T.reshape(-1), big @ X.T.reshape(-1))


def test_normalize_direction_is_unit_and_guards_zero():
    k = normalize_direction(torch.randn(4, 9) * 10)
    torch.testing.assert_close(k.norm(dim=-1), torch.ones(4), atol=1e-5, rtol=0)
    z = torch.zeros(3, 9, requires_grad=True)
    out = normalize_direction(z)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()
    assert torch.equal(out, torch.zeros_like(out))
