"""The C++ inference extension (`ops/extension.py`, `ops/inference_ext.cpp`): a DeltaUpdate without
autograd on CPU in one call, with the numbers of the general path for every value axis, rule, value
head, dtype and the fused compressor read; taken while decoding; declining (None, the caller's
general path) whatever a C kernel cannot read; and, without a C++ compiler, a warning and the
prepared ctypes call instead."""

from __future__ import annotations

import warnings

import pytest
import torch
from model_helpers import random_ids, tiny_model

from deltalearn.nn import DeltaUpdate, residual
from deltalearn.ops import backend, extension, native_build

if native_build.compiler() is None or extension.cxx_compiler() is None:
    pytest.skip("no C or C++ compiler: the extension cannot be built here", allow_module_level=True)


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.setattr(backend, "BACKEND", None)
    monkeypatch.delenv("DELTALEARN_EPILOGUE", raising=False)


@pytest.fixture
def taken(monkeypatch):
    """How many DeltaUpdate calls the extension ran (returned a result for)."""
    real = extension.update_function()
    assert real is not None, "the extension failed to build (see the warning)"
    count = [0]

    def counted(*args):
        out = real(*args)
        count[0] += out is not None
        return out

    monkeypatch.setattr(residual, "update_function", lambda: counted)
    return count


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


def _general(update, args):
    saved = backend.BACKEND
    backend.BACKEND = "torch"
    try:
        with torch.no_grad():
            return update(*args)
    finally:
        backend.BACKEND = saved


def _close(actual, expected):
    pairs = zip(
        actual if isinstance(actual, tuple) else (actual,),
        expected if isinstance(expected, tuple) else (expected,),
        strict=True,
    )
    for a, e in pairs:
        tol = 2e-5 if e.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


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
    assert taken[0] == 1
    _close(fast, _general(update, args))


def test_a_large_update_runs_without_the_gil_and_agrees(taken):
    update, args = _update_and_inputs(4, rows=(8, 300), d=64)  # 76800 state elements
    with torch.no_grad():
        fast = update(*args)
    assert taken[0] == 1
    _close(fast, _general(update, args))


def test_the_weights_are_read_at_every_call(taken):
    """No state is kept: an in-place change and a replaced parameter both count at once."""
    update, args = _update_and_inputs(4)
    with torch.no_grad():
        first = update(*args)
        update.gate.out.bias.add_(3.0)
        moved = update(*args)
        _close(moved, _general(update, args))
        update.value.proj.weight = torch.nn.Parameter(torch.randn_like(update.value.proj.weight))
        _close(update(*args), _general(update, args))
    assert taken[0] == 3
    with pytest.raises(AssertionError):
        _close(moved, first)


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
        for choice in ("torch", "reference", "triton"):
            if choice == "triton" and not backend.triton_available():
                continue
            monkeypatch.setattr(backend, "BACKEND", choice)
            if choice != "triton":  # forced Triton on CPU tensors needs the interpreter
                update(*args)
        monkeypatch.setattr(backend, "BACKEND", None)
        update.fused = False
        update(*args)
    assert taken[0] == 0


def test_what_a_kernel_cannot_read_is_declined():
    """None (the caller's general path) for each input the kernel must not read as it lies."""
    fast = extension.update_function()
    update, (X, h, c, u) = _update_and_inputs(4)
    weights = update._inference_weights()
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
    fast = extension.update_function()
    update, (X, h, c, u) = _update_and_inputs(1)
    weights = update._inference_weights()
    seen = []

    def probe(x):
        seen.append(fast(x, h[0], c[0], u[0], *weights, None, True, False, 4.0, 1e-5))
        return x

    with torch.no_grad():
        torch.func.vmap(probe)(X)
    assert seen == [None]


@pytest.mark.parametrize("variant", ["ddl", "ddl-cc", "ddl-tc"])
def test_decoding_takes_it_and_gives_the_pytorch_paths_tokens(taken, monkeypatch, variant):
    ids = random_ids(1, 8)
    model = tiny_model(variant)
    tokens = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert taken[0] == 2 * model.config.num_layers * 5  # every update of the prefill and 4 tokens
    monkeypatch.setattr(backend, "BACKEND", "torch")
    assert torch.equal(tokens, model.generate(ids, max_new_tokens=5, do_sample=False))


def test_without_a_cxx_compiler_it_warns_once_and_the_prepared_call_runs(monkeypatch):
    monkeypatch.setattr(extension, "cxx_compiler", lambda: None)
    extension.update_function.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler"):
            assert extension.update_function() is None
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert extension.update_function() is None  # said once
            update, args = _update_and_inputs(1)
            with torch.no_grad():
                update(*args)
            assert update._inference_plan is not None
    finally:
        extension.update_function.cache_clear()


def test_a_failed_build_names_the_compiler_error(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(extension, "SOURCE", broken)
    with pytest.raises(native_build.NativeBuildError, match="broken.cpp"):
        extension.build(extension.cxx_compiler(), tmp_path / "out" / "m.so")
    assert not (tmp_path / "out" / "m.so").exists()
