"""Expanded-state modules: CC equals its conv-along-dv definition, TC/EC chunked equals one pass,
identity inits start as repetition / the uniform average."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from model_helpers import ALL_VARIANTS, random_ids, tiny_model

from deltalearn.nn import ChannelCompressor, EmbeddingConv, TokenCompressor, repeat_expansion
from deltalearn.nn.state import _fold_traced, causal_conv
from deltalearn.ops import _shapes, backend


@pytest.mark.parametrize("kernel", [1, 2, 3, 4])
def test_channel_compressor_is_a_same_padded_conv_along_dv_then_read(kernel):
    d, dv = 5, 4
    cc = ChannelCompressor(d, dv, kernel)
    with torch.no_grad():
        cc.weight.normal_()
        cc.read.normal_()
    X = torch.randn(2, 3, d, dv)
    left = (kernel - 1) // 2
    x = F.pad(X.reshape(-1, d, dv), (left, kernel - 1 - left))  # (N, d, dv + K - 1)
    conv = F.conv1d(x, cc.weight[:, None, :], groups=d)  # (N, d, dv)
    want = (conv * cc.read).sum(-1).reshape(2, 3, d)
    got = cc(X)
    torch.testing.assert_close(got, want)
    G = torch.randn_like(want)  # the folded weights' gradients are the conv's
    for a, b in zip(
        torch.autograd.grad(got, [cc.weight, cc.read], G),
        torch.autograd.grad(want, [cc.weight, cc.read], G),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kernel", [1, 2, 3, 4])
def test_the_traced_fold_equals_the_eager_one(kernel):
    """The fold `torch.compile` traces (written out column by column) gives the eager fold's
    matrix and gradients; compiled, the compressor reads as the eager one does."""
    cc = ChannelCompressor(5, 4, kernel)
    with torch.no_grad():
        cc.weight.normal_()
        cc.read.normal_()
    eager = cc.mixing_matrix()
    traced = _fold_traced(cc.weight, cc.read, (kernel - 1) // 2)
    torch.testing.assert_close(traced, eager)
    G = torch.randn_like(eager)
    params = [cc.weight, cc.read]
    grads = torch.autograd.grad(traced, params, G), torch.autograd.grad(eager, params, G)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b)
    if kernel == 3:
        torch._dynamo.reset()
        X = torch.randn(2, 3, 5, 4)
        torch.testing.assert_close(torch.compile(cc, fullgraph=True)(X), cc(X))


def test_channel_compressor_starts_as_the_average():
    X = torch.randn(2, 3, 6, 4)
    torch.testing.assert_close(ChannelCompressor(6, 4)(X), X.mean(-1))


def test_channel_compressor_reuses_its_fold_in_inference_until_a_parameter_changes():
    """Decoding folds the mixing matrix once per block and token: under no_grad the fold is reused
    while neither parameter changed; an in-place update (an optimizer step) or a training-mode
    call folds again."""
    cc = ChannelCompressor(6, 4, 3)
    with torch.no_grad():
        cc.weight.normal_()
        first = cc.mixing_matrix()
        assert cc.mixing_matrix() is first
        cc.read.mul_(2.0)  # in place: _version moves
        second = cc.mixing_matrix()
    torch.testing.assert_close(second, 2 * first)
    trained = cc.mixing_matrix()  # grad enabled: a fresh fold that autograd can follow
    assert trained.requires_grad and trained is not second
    torch.testing.assert_close(trained, second)


@pytest.mark.parametrize("history", [False, True])
def test_causal_conv_of_a_few_tokens_equals_the_grouped_conv(monkeypatch, history):
    """Without the C kernels, small inputs (one decoded token) take a product over the token
    window instead of oneDNN's grouped conv: the same values and gradients."""
    monkeypatch.setattr(backend, "BACKEND", "torch")
    x = torch.randn(2, 3, 5, requires_grad=True)
    weight = torch.randn(5 * 4, 1, 3, requires_grad=True)
    past = torch.randn(2, 2, 5) if history else None
    results = []
    for small in (1 << 30, 0):
        monkeypatch.setattr(_shapes, "SMALL_STATE", small)
        y, new_history = causal_conv(x, weight, past)
        grads = torch.autograd.grad((y * torch.arange(y.numel()).view_as(y)).sum(), [x, weight])
        results.append((y, new_history, *grads))
    for few, conv in zip(*results, strict=True):
        torch.testing.assert_close(few, conv)


def test_channel_compressor_rejects_a_kernel_longer_than_dv():
    with pytest.raises(ValueError, match=r"kernel_size of the channel compressor must lie in"):
        ChannelCompressor(6, 4, 5)


@pytest.mark.parametrize("module", ["tc", "ec"])
def test_token_axis_convs_chunked_equal_one_pass(module):
    d, dv, k = 6, 3, 4
    m = TokenCompressor(d, dv, k) if module == "tc" else EmbeddingConv(d, dv, k)
    with torch.no_grad():
        m.weight.normal_()
    shape = (2, 9, d, dv) if module == "tc" else (2, 9, d)
    x = torch.randn(shape)
    full = m(x)
    history, parts = None, []
    for a, b in [(0, 1), (1, 3), (3, 4), (4, 9)]:  # first chunks shorter than the kernel
        y, history = m.forward_cached(x[:, a:b], history)
        parts.append(y)
    torch.testing.assert_close(torch.cat(parts, 1), full)
    assert history.shape == (2, k - 1, *shape[2:])


def test_identity_inits():
    e = torch.randn(2, 5, 6)
    torch.testing.assert_close(EmbeddingConv(6, 4)(e), repeat_expansion(e, 4))
    X = torch.randn(2, 5, 6, 4)
    torch.testing.assert_close(TokenCompressor(6, 4)(X), X.mean(-1))


@pytest.mark.parametrize("module", ["ec", "tc", "cc"])
def test_state_modules_keep_fp32_under_bf16_autocast(module):
    """EC, TC and CC read or write the residual state: under autocast they must neither lower it to
    bf16 nor round their weights (the EC variants used to carry a bf16 state, the others fp32)."""
    d, dv = 6, 4
    m = {"ec": EmbeddingConv, "tc": TokenCompressor, "cc": ChannelCompressor}[module](d, dv)
    with torch.no_grad():
        for p in m.parameters():
            p.normal_()
    x = torch.randn((2, 9, d) if module == "ec" else (2, 9, d, dv)) * 10
    want = m(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = m(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)  # bf16 would be off by ~0.1


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_residual_state_is_token_major_contiguous(variant):
    """Every block reads a contiguous `(B, T, d[, dv])` state: a token-minor layout left by the EC
    conv would make every per-token reduction of the rewrite stride through memory."""
    model = tiny_model(variant).eval()
    layouts = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda mod, args: layouts.append(args[0].is_contiguous()))
    with torch.no_grad():
        model(random_ids(2, 9))
    assert layouts == [True] * len(model.layers)
