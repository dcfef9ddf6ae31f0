"""The C++ inference extension (`ops/extension.py`, `ops/inference_ext.cpp`): a DeltaUpdate without
autograd on CPU in one call, with the numbers of the general path for every value axis, rule, value
head, dtype and the fused compressor read; taken while decoding; declining (None, the caller's
general path) whatever a C kernel cannot read; and, without a C++ compiler, a warning and the
prepared ctypes call instead."""

from __future__ import annotations

import types
import warnings

import pytest
import torch
from kernel_helpers import assert_outputs_close, assert_warns_once, on_pytorch_path
from model_helpers import random_ids, tiny_model

from deltalearn.nn import ChannelCompressor, DeltaUpdate, EmbeddingConv, TokenCompressor
from deltalearn.ops import backend, extension, native_build

if native_build.compiler() is None or extension.cxx_compiler() is None:
    pytest.skip("no C or C++ compiler: the extension cannot be built here", allow_module_level=True)

FUNCTIONS = ("update", "channel_read", "token_read", "expand")


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.setattr(backend, "BACKEND", None)
    monkeypatch.delenv("DELTALEARN_EPILOGUE", raising=False)


@pytest.fixture
def taken(monkeypatch):
    """How many calls of each of the extension's functions ran (returned a result)."""
    real = extension.loaded()
    assert real is not None, "the extension failed to build (see the warning)"
    counts = {name: 0 for name in FUNCTIONS}

    def counted(name):
        def call(*args):
            out = getattr(real, name)(*args)
            counts[name] += out is not None
            return out

        return call

    fake = types.SimpleNamespace(**{name: counted(name) for name in FUNCTIONS})
    monkeypatch.setattr(extension, "loaded", lambda: fake)
    return counts


def _update_and_inputs(dv, rule="delta", head="paper", dtype=torch.float32, rows=(3, 5), d=40):
    torch.manual_seed(0)
    update = DeltaUpdate(d, dv, rule=rule, value_head=head).to(dtype)
    with torch.no_grad():
        for p in update.parameters():
            p.normal_()
    gen = torch.Generator().manual_seed(8)
    X = torch.randn(*rows, d, *((dv,) if dv > 1 else ()), generator=gen, dtype=dtype)
    h, c, u = (torch.randn(*rows, d, generator=gen, dtype=dtype) for _ in range(3))
    return update, (X, h, c, u)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("head", ["paper", "official"])
@pytest.mark.parametrize("rule", ["delta", "write_only"])
@pytest.mark.parametrize(("dv", "compress"), [(1, False), (2, False), (4, True), (8, True)])
def test_update_equals_the_general_path(taken, dv, compress, rule, head, dtype):
    update, args = _update_and_inputs(dv, rule, head, dtype)
    if compress:
        args += (torch.randn(40, dv, dtype=dtype),)
    with torch.no_grad():
        fast = update(*args)
    assert taken["update"] == 1
    assert_outputs_close(fast, on_pytorch_path(update, args))


def test_a_large_update_agrees(taken):
    """Past RELEASE_GIL_FROM state elements the kernel runs without the GIL: the same numbers."""
    update, args = _update_and_inputs(4, rows=(8, 300), d=64)  # 76800 state elements
    with torch.no_grad():
        fast = update(*args)
    assert taken["update"] == 1
    assert_outputs_close(fast, on_pytorch_path(update, args))


def test_the_weights_are_read_at_every_call(taken):
    """No state is kept: an in-place change and a replaced parameter both count at once."""
    update, args = _update_and_inputs(4)
    with torch.no_grad():
        first = update(*args)
        update.gate.out.bias.add_(3.0)
        moved = update(*args)
        assert_outputs_close(moved, on_pytorch_path(update, args))
        update.value.proj.weight = torch.nn.Parameter(torch.randn_like(update.value.proj.weight))
        assert_outputs_close(update(*args), on_pytorch_path(update, args))
    assert taken["update"] == 3
    with pytest.raises(AssertionError):
        assert_outputs_close(moved, first)


def test_training_recording_autocast_and_other_backends_skip_it(taken, monkeypatch):
    update, args = _update_and_inputs(4)
    X, h, c, u = args
    assert update(X.requires_grad_(), h, c, u).requires_grad
    with torch.no_grad():
        update.record = True
        update(*args)
        assert update.last_record is not None
        update.record = False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            update(*args)
        for choice in ("torch", "reference"):
            monkeypatch.setattr(backend, "BACKEND", choice)
            update(*args)
        monkeypatch.setattr(backend, "BACKEND", None)
        update.fused = False
        update(*args)
    assert taken["update"] == 0


def test_an_mlp_gate_takes_the_general_path(taken):
    torch.manual_seed(0)
    update = DeltaUpdate(24, 4, gate="mlp", gate_hidden=8)
    X, h, c, u = torch.randn(2, 3, 24, 4), *(torch.randn(2, 3, 24) for _ in range(3))
    with torch.no_grad():
        fast = update(X, h, c, u)
    assert taken["update"] == 0
    assert_outputs_close(fast, on_pytorch_path(update, (X, h, c, u)))


def test_what_a_kernel_cannot_read_is_declined():
    """None (the caller's general path) for each input the kernel must not read as it lies."""
    fast = extension.loaded().update
    update, (X, h, c, u) = _update_and_inputs(4)
    weights = update._linear_gate_weights()
    C = torch.randn(40, 4)

    def call(X=X, h=h, c=c, u=u, weights=weights, C=None, grad=False):
        with torch.set_grad_enabled(grad):
            return fast(X, h, c, u, *weights, C, True, False, 4.0, 1e-5)

    assert call() is not None and len(call(C=C)) == 2
    assert call(grad=True) is None  # autograd on
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert fast(X, h, c, u, *weights, None, True, False, 4.0, 1e-5) is None
    assert call(X=X.transpose(0, 1)) is None  # not contiguous
    assert call(h=h.double()) is None  # dtypes disagree
    assert call(X=X.bfloat16(), h=h.bfloat16(), c=c.bfloat16(), u=u.bfloat16()) is None
    assert call(c=c[:, :4]) is None  # shapes disagree
    assert call(X=X[..., :2].contiguous()) is None  # value axis of the wrong length
    assert call(h=h._neg_view()) is None  # a lazy negation
    assert call(u=torch.empty_like(u, device="meta")) is None
    assert call(C=C[:20]) is None
    assert call(weights=(weights[0][:, :8], *weights[1:])) is None
    assert call(X="X") is None
    with pytest.raises(TypeError, match="13 arguments"):
        fast(X, h)


def test_a_vmapped_tensor_is_declined():
    """Inside vmap the state is a functorch wrapper whose data no C kernel can read."""
    fast = extension.loaded().update
    update, (X, h, c, u) = _update_and_inputs(1)
    weights = update._linear_gate_weights()
    seen = []

    def probe(x):
        seen.append(fast(x, h[0], c[0], u[0], *weights, None, True, False, 4.0, 1e-5))
        return x

    with torch.no_grad():
        torch.func.vmap(probe)(X)
    assert seen == [None]


# The extension's calls while generating 5 tokens from an 8-token prompt (the prefill and 4 decoded
# tokens; 2 layers): 4 updates and 5 reads a forward, the appending ones (TC, EC) from the third
# forward on (the prefill keeps its inputs as they are, the first token moves them into a buffer).
DECODE_CALLS = {
    "ddl": {"update": 20, "channel_read": 0, "token_read": 0, "expand": 0},
    # Prefill: the first block's read only (the next block's and the final read come out of the
    # rewrites); then 3 a decoded token (one new token: each block's first read and the final one).
    "ddl-cc": {"update": 20, "channel_read": 13, "token_read": 0, "expand": 3},
    "ddl-tc": {"update": 20, "channel_read": 0, "token_read": 15, "expand": 3},
    # The expanded additive control: no rewrite to fuse its reads into, the same expansion.
    "additive-cc": {"update": 0, "channel_read": 25, "token_read": 0, "expand": 3},
}


@pytest.mark.parametrize("variant", list(DECODE_CALLS))
def test_decoding_takes_it_and_gives_the_pytorch_paths_numbers(taken, monkeypatch, variant):
    ids = random_ids(2, 8)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding in the second row
    model = tiny_model(variant)
    assert model.config.num_layers == 2

    def generate():
        out = model.generate(
            ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
            output_scores=True, return_dict_in_generate=True,
        )  # fmt: skip
        return out.sequences, torch.stack(out.scores)

    tokens, scores = generate()
    assert taken == DECODE_CALLS[variant]
    monkeypatch.setattr(backend, "BACKEND", "torch")
    tokens_ref, scores_ref = generate()
    assert torch.equal(tokens, tokens_ref)
    torch.testing.assert_close(scores, scores_ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("variant", ["ddl-tc", "ddl-cc"])
def test_decoding_under_inference_mode_gives_the_no_grad_numbers(taken, variant):
    """Inference tensors carry no version counter: the buffers' fronts the appending reads hand
    back are made without one there."""
    model, ids = tiny_model(variant), random_ids(2, 6)

    def generate():
        out = model.generate(
            ids, max_new_tokens=4, do_sample=False, output_scores=True,
            return_dict_in_generate=True,
        )  # fmt: skip
        return out.sequences, torch.stack(out.scores)

    with torch.no_grad():
        expected = generate()
    calls = dict(taken)
    with torch.inference_mode():
        tokens, scores = generate()
    assert taken == {name: 2 * n for name, n in calls.items()} and calls["expand"] > 0
    assert torch.equal(tokens, expected[0])
    torch.testing.assert_close(scores, expected[1], rtol=0, atol=0)


def test_a_model_calls_the_extension_directly_unless_a_module_call_does_more(taken, monkeypatch):
    """Without autograd DeltaLM checks once a forward that the extension may run and then calls it
    for each rewrite and the final read itself, skipping their module calls — except where such a
    call does more than `forward`: a hook on the module, a global forward hook, a subclass's own
    forward. Those still run, for every rewrite and every forward, with the same numbers."""
    model = tiny_model("ddl-cc").eval()
    ids = random_ids(1, 6)
    forwards = []
    real_forward = DeltaUpdate.forward

    def spy(self, *args):
        forwards.append(self)
        return real_forward(self, *args)

    monkeypatch.setattr(DeltaUpdate, "forward", spy)
    with torch.no_grad():
        expected = model(ids).logits
    assert forwards == [] and taken["update"] == 4  # 2 layers, each update called directly

    update = model.layers[1].mlp_update
    hooked, final_reads = [], []
    handles = [
        update.register_forward_hook(lambda module, args, out: hooked.append(module)),
        model.final_compress.register_forward_hook(lambda m, args, out: final_reads.append(out)),
    ]
    with torch.no_grad():
        logits = model(ids).logits
    # The hooked final read runs on its own, not inside the last rewrite: round-off apart.
    torch.testing.assert_close(logits, expected)
    assert forwards == [update] and hooked == [update] and len(final_reads) == 1
    for handle in handles:
        handle.remove()

    forwards.clear()
    hook = torch.nn.modules.module.register_module_forward_hook(lambda module, args, out: None)
    with hook, torch.no_grad():
        model(ids)
    assert len(forwards) == 4

    class Counted(DeltaUpdate):
        def forward(self, *args):
            forwards.append(self)
            return super().forward(*args)

    forwards.clear()
    update.__class__ = Counted
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, expected, rtol=0, atol=0)
    assert forwards == [update, update]  # the subclass's forward, then DeltaUpdate's (the spy)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(("dv", "K"), [(1, 1), (2, 2), (3, 2), (4, 3), (4, 4), (8, 5)])
def test_channel_read_equals_the_general_path(taken, monkeypatch, dv, K, dtype):
    torch.manual_seed(0)
    compress = ChannelCompressor(24, dv, K).to(dtype)
    with torch.no_grad():
        for p in compress.parameters():
            p.normal_()
        X = torch.randn(2, 3, 24, dv, dtype=dtype)
        x, C = compress.read_with_matrix(X)
        assert taken["channel_read"] == 1
        monkeypatch.setattr(backend, "BACKEND", "torch")
        x_ref, C_ref = compress.read_with_matrix(X)
    assert_outputs_close((x, C), (x_ref, C_ref))


def _window(B, seen, capacity, feature, dtype=torch.float32):
    buffer = torch.full((B, capacity, *feature), float("nan"), dtype=dtype)
    buffer[:, :seen] = torch.randn(B, seen, *feature, dtype=dtype)
    return buffer


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dv", [4, 3])  # 3: the loops that read dv at run time
@pytest.mark.parametrize(
    ("B", "n", "T", "K"), [(1, 0, 5, 4), (2, 2, 1, 4), (2, 1, 2, 4), (3, 9, 2, 3), (1, 6, 1, 1)]
)
def test_token_read_appends_then_reads_as_the_compressor_does(B, n, T, K, dv, dtype):
    """Fewer inputs seen than K − 1 (zeros before the first token), one and several new tokens,
    batch rows a buffer's length apart."""
    torch.manual_seed(0)
    compress = TokenCompressor(12, dv, K).to(dtype)
    with torch.no_grad():
        for p in compress.parameters():
            p.normal_()
    buffer = _window(B, n, n + T + 3, (12, dv), dtype)
    X = torch.randn(B, T, 12, dv, dtype=dtype)
    seen, version = buffer[:, :n].clone(), buffer._version
    with torch.no_grad():
        x_in, front = extension.loaded().token_read(
            buffer, buffer.narrow(1, 0, n), X, compress.weight, compress.read
        )
        expected = compress.forward_cached(X, _history(seen, K - 1))[0]
    assert_outputs_close(x_in, expected)
    assert buffer._version == version + 1  # the write is recorded as copy_ records it
    assert torch.equal(buffer[:, :n], seen) and torch.equal(buffer[:, n : n + T], X)
    assert buffer[:, n + T :].isnan().all()
    _assert_front_of(front, buffer, n + T)


def _assert_front_of(front, buffer, length):
    """`front` is `buffer.narrow(1, 0, length)`: its storage, strides and values, and a write
    into the buffer counts as a write to it, as for a view (made without the dispatcher)."""
    assert front.data_ptr() == buffer.data_ptr() and front.stride() == buffer.stride()
    assert front.shape == (buffer.shape[0], length, *buffer.shape[2:])
    assert torch.equal(front, buffer.narrow(1, 0, length))
    if not buffer.is_inference():
        version = front._version
        buffer.narrow(1, 0, 1).mul_(1)
        assert front._version == version + 1


def _history(seen, length):
    """The last `length` inputs of `seen` `(B, n, ...)`, zero-padded on the left."""
    pad = torch.zeros(
        seen.shape[0], max(length - seen.shape[1], 0), *seen.shape[2:], dtype=seen.dtype
    )
    return torch.cat([pad, seen], 1)[:, -length:] if length else seen[:, :0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("B", "n", "T", "dv"), [(1, 0, 5, 4), (2, 1, 1, 4), (2, 1, 2, 4), (2, 1, 2, 3), (2, 7, 3, 2)]
)
def test_expand_appends_then_expands_as_the_embedding_conv_does(B, n, T, dv, dtype):
    torch.manual_seed(0)
    expand = EmbeddingConv(12, dv, 4).to(dtype)
    with torch.no_grad():
        expand.weight.normal_()
    buffer = _window(B, n, n + T, (12,), dtype)
    e = torch.randn(B, T, 12, dtype=dtype)
    seen = buffer[:, :n].clone()
    with torch.no_grad():
        X, front = extension.loaded().expand(buffer, buffer[:, :n], e, expand.weight)
        expected = expand.forward_cached(e, _history(seen, 3))[0]
    assert_outputs_close(X, expected)
    assert torch.equal(front, torch.cat([seen, e], 1))
    _assert_front_of(front, buffer, n + T)


def test_the_appending_reads_decline_before_writing_anything():
    fast = extension.loaded()
    compress, expand = TokenCompressor(12, 4), EmbeddingConv(12, 4)
    w, r = compress.weight.detach(), compress.read.detach()
    buffer = _window(2, 3, 6, (12, 4))
    seen = buffer[:, :3]
    X = torch.randn(2, 2, 12, 4)
    before = buffer.clone()
    declined = [
        fast.token_read(buffer, buffer[:, :5], X, w, r),  # no room for 2 more after 5
        fast.token_read(None, seen, X, w, r),  # no buffer yet
        fast.token_read(buffer, None, X, w, r),
        fast.token_read(buffer, seen.clone(), X, w, r),  # seen is not the buffer's front
        fast.token_read(buffer, buffer[:, 1:3], X, w, r),
        fast.token_read(buffer, seen, X.double(), w, r),
        fast.token_read(buffer, seen, X[:1], w, r),  # another batch size
        fast.token_read(buffer, seen, X.transpose(2, 3).contiguous().transpose(2, 3), w, r),
        fast.token_read(buffer[:, :, :6], seen[:, :, :6], X[:, :, :6], w, r),  # strided buffer
        fast.token_read(buffer, seen, X, w[:6], r),  # taps of another width
        fast.expand(buffer[..., 0], seen[..., 0], X[..., 0], expand.weight.detach()[:30]),
    ]
    assert declined == [None] * len(declined)
    with torch.enable_grad():
        assert fast.token_read(buffer, seen, X, w.requires_grad_(), r) is None
    assert torch.equal(buffer.nan_to_num(7.0), before.nan_to_num(7.0))


def test_crop_and_reorder_after_extension_decoding(taken):
    """The cache the extension appended to crops and reorders like one appended in Python."""
    model = tiny_model("ddl-tc")
    ids = random_ids(2, 10)
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        for t in range(6, 9):
            out = model(ids[:, t : t + 1], past_key_values=out.past_key_values, use_cache=True)
        cache = out.past_key_values  # 9 tokens
        cache.crop(7)
        again = model(ids[:, 7:9], past_key_values=cache, use_cache=True).logits
        cache.reorder_cache(torch.tensor([1, 0]))
        last = model(ids[[1, 0], 9:], past_key_values=cache).logits
    # Appending calls in three cached forwards (tokens 7 and 8, and after the crop, which keeps
    # the buffers), each reading 2 sublayers x 2 layers + the final read; the prefill, token 6 and
    # the one after the reorder (new tensors) move the inputs into a buffer first.
    assert taken["token_read"] == 3 * (2 * 2 + 1) and taken["expand"] == 3
    torch.testing.assert_close(again, full[:, 7:9], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(last, full[[1, 0], 9:], rtol=1e-4, atol=1e-4)


def test_without_a_cxx_compiler_it_warns_once_and_the_prepared_call_runs(monkeypatch):
    monkeypatch.setattr(extension, "cxx_compiler", lambda: None)
    extension.loaded.cache_clear()
    try:
        assert_warns_once(extension.loaded, "no C\\+\\+ compiler")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            update, args = _update_and_inputs(1)
            with torch.no_grad():
                update(*args)
            assert update._inference_plan is not None
    finally:
        extension.loaded.cache_clear()
