"""The rewrite epilogue as `torch.compile` traces it for a matrix state (`ops/traced_epilogue.py`):
plain ops, one value channel at a time, whose gradients autograd derives. Held to the plain
composition `rewrite_epilogue_reference` — the new state, the next channel read and every input's
gradient — run as it is, under bf16 autocast, and compiled inside `rewrite_epilogue`."""

from __future__ import annotations

import pytest
import torch

from deltalearn.ops import epilogue, rewrite_epilogue, rewrite_epilogue_reference
from deltalearn.ops.traced_epilogue import rewrite_epilogue_traced


def _leaves(d, dv, *, compress, seed=0):
    gen = torch.Generator().manual_seed(seed)
    leaves = [
        torch.randn(3, 5, d, dv, generator=gen),  # X
        3 * torch.randn(3, 5, d, generator=gen),  # h
        2 * torch.randn(3, 5, generator=gen),  # z
        torch.randn(3, 5, dv, generator=gen),  # p
    ]
    if compress:
        leaves.append(torch.randn(d, dv, generator=gen))
    return [t.requires_grad_() for t in leaves]


def _run(fn, leaves, **options):
    """The outputs and the gradient of every leaf under a random weighting of the outputs."""
    X, h, z, p, *C = leaves
    out = fn(X, h, z, p, **options, compress=C[0] if C else None)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(1)
    loss = sum((o * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    return outs, torch.autograd.grad(loss, leaves)


def _traced(X, h, z, p, *, rule, value_head, value_scale, compress):
    k, beta, v = epilogue.epilogue_generators(
        h, z, p, value_head=value_head, value_scale=value_scale
    )
    return rewrite_epilogue_traced(X, k, beta, v, rule, compress)


@pytest.mark.parametrize("compress", [False, True], ids=["plain", "with-read"])
@pytest.mark.parametrize("value_head", ["paper", "official"])
@pytest.mark.parametrize("rule", ["delta", "write_only"])
@pytest.mark.parametrize(("d", "dv"), [(96, 4), (200, 3), (64, 8)])
def test_equals_the_reference(d, dv, rule, value_head, compress):
    leaves = _leaves(d, dv, compress=compress)
    options = dict(rule=rule, value_head=value_head, value_scale=3.0)
    outs, grads = _run(_traced, leaves, **options)
    outs_ref, grads_ref = _run(rewrite_epilogue_reference, leaves, **options)
    assert len(outs) == len(outs_ref) == (2 if compress else 1)
    for got, want in zip((*outs, *grads), (*outs_ref, *grads_ref), strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5 * want.abs().max().item())


def test_beta_one_writes_the_target_under_bf16_autocast():
    """The reductions run in fp32 with autocast off: a β = 1 rewrite of a state of magnitude ~30
    reads back v, and the state and the read keep fp32."""
    X, h, _, p, C = _leaves(200, 4, compress=True)
    X = 30 * X.detach()
    z = torch.zeros(3, 5)  # β = 2σ(0) = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        Y, x_next = _traced(
            X, h.detach().bfloat16(), z, p.detach(), rule="delta", value_head="paper",
            value_scale=4.0, compress=C.detach(),
        )  # fmt: skip
    k = h.detach().bfloat16().float()
    k = k / k.norm(dim=-1, keepdim=True)
    readout = (k[..., None] * Y).sum(-2)
    assert Y.dtype == x_next.dtype == torch.float32
    torch.testing.assert_close(readout, p.detach(), rtol=0, atol=1e-4)


def test_compiled_epilogue_takes_the_traced_form_and_equals_the_reference(monkeypatch):
    """Under `torch.compile`, `rewrite_epilogue` of a matrix state runs the traced form: the same
    state, read and gradients as the reference, compiled by Inductor; a one-token step does not."""
    traced = []

    def spy(*args):
        traced.append(True)
        return rewrite_epilogue_traced(*args)

    monkeypatch.setattr(epilogue, "rewrite_epilogue_traced", spy)
    leaves = _leaves(96, 4, compress=True)
    options = dict(rule="delta", value_head="official", value_scale=4.0)
    torch._dynamo.reset()
    compiled = torch.compile(rewrite_epilogue, fullgraph=True)
    outs, grads = _run(compiled, leaves, **options)
    assert traced
    outs_ref, grads_ref = _run(rewrite_epilogue_reference, leaves, **options)
    for got, want in zip((*outs, *grads), (*outs_ref, *grads_ref), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item())
    # One token a sequence (a decoding step, `(B, 1, d, dv)`): the Function's form, fewer kernels.
    traced.clear()
    X, h, z, p = (t.detach()[:, :1] for t in leaves[:4])
    C = leaves[4].detach()
    Y, x_next = compiled(X, h, z, p, **options, compress=C)
    Y_ref, x_next_ref = rewrite_epilogue_reference(X, h, z, p, **options, compress=C)
    assert not traced
    torch.testing.assert_close(Y, Y_ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x_next, x_next_ref, rtol=1e-5, atol=1e-5)
    torch._dynamo.reset()
