"""ConvDeltaResidual: the vector (matrix) form of DeltaResidual applied at each spatial position."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from deltalearn.nn import (
    ConvDeltaResidual,
    DeltaResidual,
    conv_repeat_expansion,
    repeat_expansion,
    to_channels_first,
    to_channels_last,
)

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def _pointwise_pair(channels: int, dv: int, spatial: int, **kwargs):
    """A ConvDeltaResidual with a 1×1-conv branch and a DeltaResidual with the same weights."""
    conv = CONV[spatial]
    branch = nn.Sequential(
        conv(channels, 2 * channels, 1), nn.GELU(), conv(2 * channels, channels, 1)
    )
    layer = ConvDeltaResidual(channels, branch, dv, **kwargs).double()
    lin = nn.Sequential(
        nn.Linear(channels, 2 * channels), nn.GELU(), nn.Linear(2 * channels, channels)
    )
    vector = DeltaResidual(channels, lin, dv, **kwargs).double()
    state = {
        name: (t.flatten(1) if name.startswith("branch.") and t.dim() > 2 else t)
        for name, t in layer.state_dict().items()
    }
    vector.load_state_dict(state)
    return layer, vector


@pytest.mark.parametrize("rule", ["delta", "write_only", "additive"])
@pytest.mark.parametrize("dv", [1, 3])
@pytest.mark.parametrize("fused", [True, False])
def test_conv_form_equals_vector_form_per_position(rule, dv, fused):
    torch.manual_seed(0)
    C, B, H, W = 6, 2, 5, 4
    layer, vector = _pointwise_pair(C, dv, 2, rule=rule, fused=fused, value_head="official")
    if dv == 1:
        X = torch.randn(B, C, H, W, dtype=torch.float64, requires_grad=True)
    else:
        X = conv_repeat_expansion(torch.randn(B, C, H, W, dtype=torch.float64), dv)
        X = (X + 0.2 * torch.randn_like(X)).requires_grad_()
    Y = layer(X)
    assert Y.shape == X.shape
    # The vector form on every position's channel vector (matrix), as a flat batch of B·H·W rows.
    rows = to_channels_last(X.detach(), dv).reshape(B * H * W, C, *(() if dv == 1 else (dv,)))
    rows.requires_grad_()
    want = vector(rows)
    got = to_channels_last(Y, dv).reshape(want.shape)
    torch.testing.assert_close(got, want)
    up = torch.randn_like(want)
    (got * up).sum().backward()
    (want * up).sum().backward()
    torch.testing.assert_close(to_channels_last(X.grad, dv).reshape(rows.shape), rows.grad)
    named = zip(layer.named_parameters(), vector.named_parameters(), strict=True)
    for (n, pc), (_, pv) in named:
        torch.testing.assert_close(pc.grad.reshape(pv.grad.shape), pv.grad, msg=f"{n}")
    if rule != "additive":
        rec, ref = layer.last_gates, vector.last_gates
        assert rec.beta.shape == (B, H, W)
        torch.testing.assert_close(rec.beta.reshape(-1), ref.beta)
        torch.testing.assert_close(rec.discrepancy.reshape(ref.discrepancy.shape), ref.discrepancy)


@pytest.mark.parametrize("spatial", [1, 3])
def test_any_number_of_spatial_axes(spatial):
    torch.manual_seed(1)
    layer, vector = _pointwise_pair(4, 1, spatial)
    X = torch.randn(2, 4, *([3] * spatial), dtype=torch.float64)
    want = vector(to_channels_last(X))
    torch.testing.assert_close(to_channels_last(layer(X)), want)


def test_spatial_branch_matches_the_rewrite_written_out():
    """A 3×3 branch mixes positions; the rewrite itself still acts per position across channels."""
    torch.manual_seed(2)
    C = 5
    branch = nn.Sequential(nn.Conv2d(C, C, 3, padding=1), nn.Tanh(), nn.Conv2d(C, C, 3, padding=1))
    layer = ConvDeltaResidual(C, branch).double()
    X = torch.randn(3, C, 6, 6, dtype=torch.float64)
    Y = layer(X)
    g = layer.norm.weight
    c = X * torch.rsqrt(X.pow(2).mean(1, keepdim=True) + 1e-6) * g[:, None, None]  # RMSNorm over C
    h = branch(c)
    k = h / torch.sqrt(h.pow(2).sum(1, keepdim=True) + 1e-10)
    upd = layer.update
    v = torch.einsum("bchw,c->bhw", c, upd.value.proj.weight[0])  # a 1×1 projection
    z = torch.einsum("bchw,c->bhw", c, upd.gate.out.weight[0]) + upd.gate.out.bias
    beta = 2 * torch.sigmoid(z)
    readout = (k * X).sum(1)
    expected = X + (beta * (v - readout))[:, None] * k
    torch.testing.assert_close(Y, expected)
    # Directions orthogonal to k at each position are untouched.
    dY = Y - X
    torch.testing.assert_close(dY - (k * dY).sum(1, keepdim=True) * k, torch.zeros_like(dY))


def test_layout_helpers_round_trip():
    X = torch.randn(2, 3, 4, 5, 6)
    assert to_channels_last(X).shape == (2, 4, 5, 6, 3)
    assert to_channels_last(X, 4).shape == (2, 5, 6, 3, 4)
    assert torch.equal(to_channels_first(to_channels_last(X, 4), 4), X)
    x = torch.randn(2, 3, 5, 6)
    E = conv_repeat_expansion(x, 4)
    assert torch.equal(to_channels_last(E, 4), repeat_expansion(to_channels_last(x), 4))


class TestBadInput:
    def test_state_with_wrong_channels(self):
        layer = ConvDeltaResidual(8, nn.Conv2d(8, 8, 1))
        with pytest.raises(ValueError, match=r"\(8,\) after B, got \(2, 6, 4, 4\)"):
            layer(torch.randn(2, 6, 4, 4))

    def test_vector_state_given_to_matrix_layer(self):
        layer = ConvDeltaResidual(8, nn.Conv2d(8, 8, 1), value_channels=4)
        with pytest.raises(ValueError, match=r"\(8, 4\) after B, got \(2, 8, 5, 5\)"):
            layer(torch.randn(2, 8, 5, 5))

    def test_branch_that_changes_channels(self):
        layer = ConvDeltaResidual(8, nn.Conv2d(8, 4, 1))
        with pytest.raises(ValueError, match="same shape"):
            layer(torch.randn(2, 8, 3, 3))

    def test_bad_expansion(self):
        with pytest.raises(ValueError, match="value_channels must be >= 1, got 0"):
            conv_repeat_expansion(torch.randn(2, 3, 4), 0)
