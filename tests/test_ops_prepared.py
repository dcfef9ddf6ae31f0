"""Prepared kernel calls (`ops/prepared.py`): a DeltaUpdate, a compressor read and the EC expansion
keep their inference kernel call between calls, and must never run a stale one — after an in-place
weight update, a replaced parameter, a new shape, with autograd, while recording, under autocast
or with another backend chosen they take the general path (and the numbers follow). A module that
holds one still pickles and deep-copies. Decoding reads the convolution windows straight out of
the cache's buffer: the same tokens and logits as the full forward."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from kernel_helpers import assert_outputs_close, on_pytorch_path, record_kernel_calls
from model_helpers import random_ids, tiny_model

from deltalearn.models.cache import DeltaLMCache
from deltalearn.nn import ChannelCompressor, DeltaUpdate, EmbeddingConv, TokenCompressor
from deltalearn.ops import backend, extension, native_build, prepared

if native_build.compiler() is None:
    pytest.skip("no C compiler: the CPU kernels cannot be built here", allow_module_level=True)


@pytest.fixture(autouse=True)
def _default_backend(monkeypatch):
    monkeypatch.setattr(backend, "BACKEND", None)
    monkeypatch.delenv("DELTALEARN_EPILOGUE", raising=False)
    # The prepared calls are the C++ extension's fallback (tests/test_ops_extension.py).
    monkeypatch.setattr(extension, "loaded", lambda: None)


@pytest.fixture
def runs(monkeypatch):
    """The names of the prepared calls that run."""
    names = []
    record_kernel_calls(monkeypatch, names, general=False)
    return names


def _update_and_inputs(dv: int, compress: bool):
    torch.manual_seed(0)
    update = DeltaUpdate(24, dv)
    with torch.no_grad():
        for p in update.parameters():
            p.normal_()
    X = torch.randn(2, 1, 24, *((dv,) if dv > 1 else ()))
    h, c, u = (torch.randn(2, 1, 24) for _ in range(3))
    C = torch.randn(24, dv) if compress else None
    return update, (X, h, c, u) + ((C,) if compress else ())


@pytest.mark.parametrize(("dv", "compress"), [(1, False), (4, False), (4, True)])
def test_update_prepares_once_and_follows_its_weights(runs, dv, compress):
    update, args = _update_and_inputs(dv, compress)
    with torch.no_grad():
        first = update(*args)
        plan = update._inference_plan
        assert isinstance(plan, prepared.InferenceUpdate)
        again = update(*args)
        assert update._inference_plan is plan and runs == ["update_forward_packed"] * 2
        assert_outputs_close(again, first)
        assert_outputs_close(first, on_pytorch_path(update, args))
        update.gate.out.bias.add_(3.0)  # in place: a new version, the same storage
        moved = update(*args)
        assert update._inference_plan is not plan
        assert_outputs_close(moved, on_pytorch_path(update, args))
        with pytest.raises(AssertionError):
            assert_outputs_close(moved, first)
        plan = update._inference_plan
        update.value.proj.weight = torch.nn.Parameter(torch.randn_like(update.value.proj.weight))
        assert_outputs_close(update(*args), on_pytorch_path(update, args))
        assert update._inference_plan is not plan


def test_update_takes_the_general_path_where_the_prepared_call_does_not_apply(runs):
    update, args = _update_and_inputs(4, False)
    with torch.no_grad():
        update(*args)
    runs.clear()
    X, h, c, u = args
    grads = update(X.requires_grad_(), h, c, u)  # autograd: the update's Function
    assert grads.requires_grad and runs == []
    with torch.no_grad():
        update.record = True  # the same call, and the record beside it
        update(*args)
        assert update.last_record is not None and runs == ["update_forward_packed"]
        runs.clear()
        update.record = False
        with torch.autocast("cpu", dtype=torch.bfloat16):
            update(*args)
        backend.BACKEND = "torch"
        update(*args)
        backend.BACKEND = None
        update.fused = False  # the plain reference composition
        update(*args)
        update.fused = True
        assert runs == []
        update(X[:1], h[:1], c[:1], u[:1])  # another shape: prepared anew
        assert runs == ["update_forward_packed"]


def test_environment_variable_is_read_at_every_call(monkeypatch, runs):
    update, args = _update_and_inputs(1, False)
    with torch.no_grad():
        update(*args)
        monkeypatch.setenv("DELTALEARN_EPILOGUE", "torch")
        assert backend.backend() == "torch"
        update(*args)
        monkeypatch.delenv("DELTALEARN_EPILOGUE")
        assert backend.backend() == "auto"
        update(*args)
    assert runs == ["update_forward_packed"] * 2


def test_compressor_reads_and_expansion_prepare_once_and_follow_their_weights(runs):
    torch.manual_seed(0)
    cases = [
        (ChannelCompressor(16, 4), torch.randn(2, 1, 16, 4), lambda m, x: m(x)),
        (TokenCompressor(16, 4), torch.randn(2, 4, 16, 4), lambda m, x: m.read_inputs(x, 3)),
        (EmbeddingConv(16, 4), torch.randn(2, 4, 16), lambda m, x: m.expand_inputs(x)),
    ]
    for module, x, call in cases:
        with torch.no_grad():
            for p in module.parameters():
                p.normal_()
            first = call(module, x)
            runs.clear()
            assert torch.equal(call(module, x), first) and len(runs) == 1
            module.weight.mul_(2.0)
            backend.BACKEND = "torch"
            expected = call(module, x)
            backend.BACKEND = None
            assert_outputs_close(call(module, x), expected)
            with pytest.raises(AssertionError):
                assert_outputs_close(expected, first)


@pytest.mark.parametrize("variant", ["ddl", "ddl-cc", "ddl-tc"])
def test_a_model_holding_prepared_calls_pickles_and_copies(variant):
    model = tiny_model(variant)
    ids = random_ids(1, 6)
    with torch.no_grad():
        model(ids, use_cache=True)
    assert any(getattr(m, "_inference_plan", None) is not None for m in model.modules())
    for twin in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        assert all(getattr(m, "_inference_plan", None) is None for m in twin.modules())
        with torch.no_grad():
            torch.testing.assert_close(twin(ids).logits, model(ids).logits)


@pytest.mark.parametrize("variant", ["ddl-cc", "ddl-tc"])
def test_decoding_reads_the_cache_buffer_like_the_full_forward(variant):
    """Token by token with a DeltaLMCache (windows read from its buffer after appending) gives the
    logits of one full forward, and the cache keeps every input for `crop`."""
    model = tiny_model(variant)
    ids = random_ids(2, 9)
    with torch.no_grad():
        full = model(ids).logits
        cache = DeltaLMCache()
        steps = [model(ids[:, :3], cache=cache, use_cache=True).logits]
        for t in range(3, 9):
            steps.append(model(ids[:, t : t + 1], cache=cache, use_cache=True).logits)
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    assert cache._conv_inputs["embed"].shape[1] == 9
