"""GPU paths of the operator (skipped without CUDA), each compared with the CPU reference on the
same inputs: the fused op on the device against a float64 computation on the CPU, and a DDL
residual under bf16 autocast on the device against the same layer in fp32 on the CPU."""

from __future__ import annotations

import copy

import pytest
import torch
from model_helpers import assert_within_rounding, random_ids, tiny_model

from deltalearn.nn import DeltaResidual, repeat_expansion
from deltalearn.ops import (
    backend,
    channel_mix,
    channel_mix_reference,
    delta_rewrite,
    delta_rewrite_reference,
    normalize_direction,
    token_mix,
    token_mix_reference,
)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    # TF32 rounds matmul inputs to 10 mantissa bits: not the fp32 the bounds below assume
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_on_cuda_is_within_rounding_of_float64_on_cpu(dtype):
    shape, d = (4, 128, 96, 4), 96  # (B, T, d, dv)
    g = torch.Generator().manual_seed(0)
    leaves = [
        torch.randn(shape, generator=g).to(dtype),
        normalize_direction(torch.randn(shape[:-1], generator=g)).to(dtype),
        torch.rand(shape[:-2], generator=g) * 2,
        torch.randn((*shape[:-2], 4), generator=g).to(dtype),
    ]
    upstream = torch.randn(shape, generator=g).to(dtype)
    cuda = [t.cuda().requires_grad_() for t in leaves]
    out = delta_rewrite(*cuda)
    grads = torch.autograd.grad(out, cuda, upstream.cuda())
    # the CPU reference in float64 from the very same (rounded) inputs
    cpu = [t.double().requires_grad_() for t in leaves]
    out64 = delta_rewrite_reference(*cpu)
    grads64 = torch.autograd.grad(out64, cpu, upstream.double())
    eps = torch.finfo(dtype).eps
    assert out.dtype == dtype
    assert_within_rounding(out, out64, eps, d, "values")
    for name, gr, gr64 in zip(["X", "k", "beta", "v"], grads, grads64, strict=True):
        assert_within_rounding(gr, gr64, torch.finfo(gr.dtype).eps, d, f"d/d{name}")


@pytest.mark.parametrize("value_head", ["paper", "official"])
@pytest.mark.parametrize(("d", "dv", "compress"), [(96, 1, False), (200, 4, True), (768, 4, False)])
def test_whole_update_kernel_on_cuda_equals_float64_on_cpu(d, dv, compress, value_head):
    """A DeltaUpdate on CUDA (the projections inside the Triton forward kernel, their gradients by
    cuBLAS) against the same module's general path in float64 on the CPU: values and every
    gradient, fp32 inputs."""
    from deltalearn.nn import DeltaUpdate
    from deltalearn.ops import triton_epilogue

    torch.manual_seed(0)
    update = DeltaUpdate(d, dv, value_head=value_head)
    update.record = False
    with torch.no_grad():
        for param in update.parameters():
            param.copy_(torch.randn(param.shape) / d**0.5)
    X = torch.randn(4, 64, d, dv) if dv > 1 else torch.randn(4, 64, d)
    leaves = [X, torch.randn(4, 64, d) * 3, torch.randn(4, 64, d), torch.randn(4, 64, d)]
    leaves.append(torch.randn(d, dv) / dv)

    def results(module, tensors):
        tensors = [t.detach().requires_grad_() for t in tensors]
        args = tensors if compress else tensors[:4]
        out = module(*args)
        outs = out if isinstance(out, tuple) else (out,)
        gen = torch.Generator().manual_seed(1)
        ups = [torch.randn(o.shape, generator=gen).to(o) for o in outs]
        grads = torch.autograd.grad(
            outs, [*args, *module.parameters()], ups, allow_unused=True, materialize_grads=True
        )
        return [o.detach() for o in outs] + list(grads)

    calls = []
    real = triton_epilogue.update_triton
    triton_epilogue.update_triton = lambda *a, **k: calls.append(1) or real(*a, **k)
    try:
        on_cuda = results(copy.deepcopy(update).cuda(), [t.cuda() for t in leaves])
    finally:
        triton_epilogue.update_triton = real
    assert calls == [1]
    backend_before = backend.BACKEND
    backend.BACKEND = "reference"
    try:
        on_cpu = results(update.double(), [t.double() for t in leaves])
    finally:
        backend.BACKEND = backend_before
    for a, b in zip(on_cuda, on_cpu, strict=True):
        if not b.any():  # u's gradient under the paper head, which does not read u
            assert not a.any()
            continue
        # fp32 sums over d features and over the 256 rows (the weight gradients)
        assert_within_rounding(a.cpu(), b, torch.finfo(torch.float32).eps, max(d, 256), "update")


def test_deltalm_rebuilds_states_in_backward_and_hands_reads_on(monkeypatch):
    """A ddl-cc DeltaLM on the Triton kernels: every state rebuilt by the backward kernel of the
    update that consumed it (no rebuild kernel launched) and every read after the first made by
    the rewrite before it — the loss and gradients of keeping each state and reading each apart."""
    from deltalearn.ops import epilogue, state_tape
    from deltalearn.ops import triton_epilogue as te

    torch.manual_seed(0)
    model = tiny_model("ddl-cc").cuda().train()
    ids = random_ids(2, 12).cuda()
    launched = []
    rebuild_kernel = te.rebuild_state_triton
    monkeypatch.setattr(
        te, "rebuild_state_triton", lambda *a, **k: launched.append(1) or rebuild_kernel(*a, **k)
    )

    def loss_and_grads(rebuild: str, fused_read: str):
        monkeypatch.setattr(state_tape, "REBUILD", rebuild)
        monkeypatch.setattr(epilogue, "FUSED_READ", fused_read)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    kept = loss_and_grads("off", "off")
    fast = loss_and_grads("on", "on")
    assert launched == []
    torch.testing.assert_close(fast[0], kept[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(fast[1], kept[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_delta_residual_under_bf16_autocast_matches_fp32_on_cpu():
    torch.manual_seed(0)
    branch = torch.nn.Sequential(
        torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 64)
    )
    cpu_layer = DeltaResidual(64, branch, value_channels=4)
    layer = copy.deepcopy(cpu_layer).cuda()
    X = repeat_expansion(torch.randn(8, 32, 64), 4)
    want = cpu_layer(X)  # fp32 on the CPU, no autocast
    Xc = X.cuda().requires_grad_()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        Y = layer(Xc)
    assert Y.dtype == torch.float32  # the state stays fp32; only the branch runs in bf16
    assert layer.last_gates.beta.dtype == torch.float32
    # The branch in bf16 perturbs k, v, β by a few bf16 ulps; the update is of size |Y − X|.
    # (On CPU bf16 autocast the same comparison gives 0.6 of this bound's eps·|Y − X| unit.)
    eps = torch.finfo(torch.bfloat16).eps
    err = (Y.cpu() - want).abs().max().item()
    assert err <= 4 * eps * (want - X).abs().max().item(), err
    Y.square().mean().backward()
    assert torch.isfinite(Xc.grad).all()
    assert all(torch.isfinite(p.grad).all() for p in layer.parameters() if p.grad is not None)


@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("read", ["channel", "token"])
def test_compressor_read_kernels_on_cuda(state_dtype, read):
    """The CC and TC reads take their Triton kernel on CUDA by default and give the plain form's
    values and gradients at the paper's width (d = 768, dv = 4); ∂W is the same twice, bitwise."""
    pytest.importorskip("triton")
    g = torch.Generator().manual_seed(0)
    xs = torch.randn(4, 300, 768, 4, generator=g).to(state_dtype).cuda().requires_grad_()
    K = 1 if read == "channel" else 4
    W = torch.randn(768, 4, K, generator=g).cuda().requires_grad_()
    if read == "channel":
        op, ref, w = channel_mix, channel_mix_reference, W[..., 0]
    else:
        op, ref, w = token_mix, token_mix_reference, W
    assert backend.use_triton([xs, W])
    G = torch.randn(4, 300, 768, generator=g).cuda()
    got, want = op(xs, w), ref(xs, w)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    grads = [torch.autograd.grad(op(xs, w), (xs, W), G) for _ in range(2)]
    want_grads = torch.autograd.grad(want, (xs, W), G)
    assert torch.equal(grads[0][1], grads[1][1])
    for a, b in zip(grads[0], want_grads, strict=True):
        scale = b.abs().max().item()
        tol = 2.0**-7 if a.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(a, b, rtol=2 * tol, atol=tol * scale)
