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
