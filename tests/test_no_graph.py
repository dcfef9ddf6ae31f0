"""`ops.no_graph`: a Function's forward called directly only where nothing can be differentiated."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad

from deltalearn.ops import no_graph


class _Double(torch.autograd.Function):
    calls: list[str] = []

    @staticmethod
    def forward(ctx, x):
        _Double.calls.append(type(ctx).__name__)
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x)
        return 2 * x

    @staticmethod
    def backward(ctx, g):
        return 2 * g


def test_apply_skips_the_function_only_where_no_graph_is_recorded():
    x = torch.randn(3, requires_grad=True)
    _Double.calls.clear()
    y = no_graph.apply(_Double, x)
    assert y.grad_fn is not None and _Double.calls[-1] != "NoGraph"
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(g, torch.full((3,), 2.0))
    for off in (torch.no_grad, torch.inference_mode):
        with off():
            y = no_graph.apply(_Double, x)
        assert y.grad_fn is None and _Double.calls[-1] == "NoGraph"
        torch.testing.assert_close(y, 2 * x.detach())
    # Forward-mode AD: the Function's own apply, which refuses a Function without a jvp.
    with torch.no_grad(), forward_ad.dual_level():
        assert no_graph.records_graph()
        dual = forward_ad.make_dual(torch.randn(3), torch.randn(3))
        with pytest.raises(RuntimeError, match="jvp"):
            no_graph.apply(_Double, dual)


class _Scale(torch.autograd.Function):
    """x · s with a Python-number argument after the tensor (as deltalearn's Functions take)."""

    @staticmethod
    def forward(ctx, x, s):
        ctx.s = s
        return x * s

    @staticmethod
    def backward(ctx, g):
        return g * ctx.s, None


class _ScaleWithSetup(torch.autograd.Function):
    """The same with `setup_context`, the form functorch transforms need."""

    @staticmethod
    def forward(x, s):
        return x * s

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.s = inputs[1]

    @staticmethod
    def backward(ctx, g):
        return g * ctx.s, None

    @staticmethod
    def vmap(info, in_dims, x, s):
        return x * s, in_dims[0]


def test_apply_direct_records_the_same_node_as_apply_and_defers_to_it_elsewhere():
    x = torch.randn(4, requires_grad=True)
    y = no_graph.apply_direct(_Scale, x, 3.0)
    assert type(y.grad_fn).__name__ == "_ScaleBackward"
    (g,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(y, 3.0 * x)
    torch.testing.assert_close(g, torch.full((4,), 3.0))
    # Inside a functorch transform: Function.apply's own path, which refuses a Function without
    # setup_context, as apply would ...
    with pytest.raises(RuntimeError, match="setup_context"):
        torch.func.grad(lambda t: no_graph.apply_direct(_Scale, t, 3.0).sum())(torch.randn(4))
    # ... and runs one with it (a Function with setup_context always goes through apply).
    grad = torch.func.grad(lambda t: no_graph.apply_direct(_ScaleWithSetup, t, 3.0).sum())
    torch.testing.assert_close(grad(torch.randn(4)), torch.full((4,), 3.0))
    out = torch.vmap(lambda t: no_graph.apply_direct(_ScaleWithSetup, t, 2.0))(torch.ones(2, 3))
    torch.testing.assert_close(out, torch.full((2, 3), 2.0))
