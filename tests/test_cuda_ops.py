"""GPU paths of the operator (skipped without CUDA): fused vs reference on the device, bf16 autocast."""

from __future__ import annotations

import pytest
import torch

from deltalearn.nn import DeltaResidual, repeat_expansion
from deltalearn.ops import delta_rewrite, delta_rewrite_reference, normalize_direction

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_matches_reference_on_cuda(dtype):
    dev = torch.device("cuda")
    shape = (4, 128, 96, 4)
    leaves = [
        torch.randn(shape, device=dev, dtype=dtype),
        normalize_direction(torch.randn(shape[:-1], device=dev, dtype=dtype)),
        torch.rand(shape[:-2], device=dev) * 2,
        torch.randn((*shape[:-2], 4), device=dev, dtype=dtype),
    ]
    leaves = [t.detach().requires_grad_() for t in leaves]
    up = torch.randn(shape, device=dev, dtype=dtype)
    out_f = delta_rewrite(*leaves)
    grads_f = torch.autograd.grad(out_f, leaves, up)
    out_r = delta_rewrite_reference(*leaves)
    grads_r = torch.autograd.grad(out_r, leaves, up)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    torch.testing.assert_close(out_f, out_r, **tol)
    for gf, gr in zip(grads_f, grads_r, strict=True):
        torch.testing.assert_close(gf, gr, **tol)


def test_delta_residual_under_bf16_autocast_is_finite():
    dev = torch.device("cuda")
    branch = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)
    )
    layer = DeltaResidual(64, branch, value_channels=4).to(dev)
    X = repeat_expansion(torch.randn(8, 32, 64, device=dev), 4)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        Y = layer(X)
    Y.float().square().mean().backward()
    assert torch.isfinite(Y).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)
    assert layer.last_gates.beta.dtype == torch.float32
