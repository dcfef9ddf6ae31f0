"""The fixed-shape cache (`generate(..., cache_implementation="static")`): `DeltaLMStaticCache`
gives the logits of a full forward for every variant, crops, reorders beams, and lets
`torch.compile` trace the decode step once."""

from __future__ import annotations

import pytest
import torch
from model_helpers import ALL_VARIANTS, random_ids, tiny_model
from torch._dynamo.utils import counters
from transformers import CompileConfig, StaticCache

from deltalearn.bench.model import step_peak_bytes
from deltalearn.models import DeltaLMCache, DeltaLMStaticCache

ATOL = 2e-5  # fp32 round-off between a chunked and a one-pass forward


def _left_padded(batch: int, length: int, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    ids, mask = random_ids(batch, length), torch.ones(batch, length, dtype=torch.long)
    for row, n in enumerate(pads):
        mask[row, :n] = 0
    return ids, mask


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@torch.no_grad()
def test_static_cache_stepwise_equals_full_forward(variant):
    model = tiny_model(variant)
    ids, mask = _left_padded(2, 11, [0, 4])
    real = mask.bool()
    full = model(ids, attention_mask=mask).logits
    cache = DeltaLMStaticCache(config=model.config, max_cache_len=16)
    logits = [model(ids[:, :5], attention_mask=mask[:, :5], cache=cache).logits]
    for t in range(5, 11):
        logits.append(model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], cache=cache).logits)
    stepwise = torch.cat(logits, 1)
    torch.testing.assert_close(stepwise[real], full[real], rtol=0, atol=ATOL)
    assert int(cache.get_seq_length()) == 11
    for key, buffer in cache._conv_buffers.items():  # fixed shapes: every slot allocated up front
        assert buffer.shape[:2] == (2, 16), key


@pytest.mark.parametrize("variant", ["baseline", "ddl-tc", "ddl-cc", "ddl-tc-noec"])
@torch.no_grad()
def test_static_cache_crop_and_reset(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 12)
    full = model(ids).logits
    cache = DeltaLMStaticCache(config=model.config, max_cache_len=12)
    model(ids[:, :10], cache=cache)
    cache.crop(-4)  # as assisted decoding does after rejecting draft tokens
    assert int(cache.get_seq_length()) == 6
    out = model(ids[:, 6:12], cache=cache)  # overwrites the stale slots
    torch.testing.assert_close(out.logits, full[:, 6:12], rtol=0, atol=ATOL)
    cache.reset()
    assert int(cache.get_seq_length()) == 0
    again = model(ids, cache=cache)
    torch.testing.assert_close(again.logits, full, rtol=0, atol=ATOL)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@torch.no_grad()
def test_generate_static_equals_dynamic(variant, monkeypatch):
    model = tiny_model(variant)
    ids, mask = _left_padded(2, 7, [0, 3])
    used = []
    prepare = model._prepare_static_cache

    def recording(*args, **kwargs):
        used.append(prepare(*args, **kwargs))
        return used[-1]

    monkeypatch.setattr(model, "_prepare_static_cache", recording)
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)
    assert [type(c) for c in used] == [DeltaLMStaticCache]


@torch.no_grad()
def test_beam_search_with_static_cache_equals_dynamic():
    model = tiny_model("ddl-tc")  # conv histories in the expansion and every compressor
    ids = random_ids(1, 6)
    kwargs = dict(max_new_tokens=6, num_beams=3, do_sample=False)
    dynamic = model.generate(ids, **kwargs)
    static = model.generate(ids, cache_implementation="static", **kwargs)
    assert torch.equal(static, dynamic)


@pytest.mark.parametrize("variant", ["baseline", "ddl-cc", "ddl-tc"])
def test_compiled_decode_step_is_traced_once(variant):
    """`generate` compiles the decode step of a static cache; one graph serves every token
    (fullgraph: no graph break), and the tokens equal eager decoding. The `eager` backend checks
    the tracing without paying for code generation."""
    model = tiny_model(variant)
    ids, mask = _left_padded(2, 6, [0, 2])
    compile_config = CompileConfig(fullgraph=True, backend="eager")
    compile_config._compile_all_devices = True  # transformers compiles on accelerators otherwise
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    torch._dynamo.reset()
    counters.clear()
    with torch.no_grad():
        eager = model.generate(ids, **kwargs)
        compiled = model.generate(
            ids, cache_implementation="static", compile_config=compile_config, **kwargs
        )
    assert torch.equal(compiled, eager)
    assert counters["stats"]["unique_graphs"] == 1
    assert counters["stats"]["calls_captured"] > 0


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda",
            marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        ),
    ],
)
@torch.no_grad()
def test_compiled_decode_step_writes_the_conv_buffers_in_place(device):
    """A compiled static-cache decode step appends each convolution's input in place: nothing it
    allocates is as large as a convolution buffer (`max_cache_len` tokens), so a token's
    convolution work does not grow with the cache. Where the window was read before the append, the old buffer was
    still in use after the write, and Inductor copied each buffer (out and back) every token."""
    model = tiny_model("ddl-tc").to(device)  # the EC buffer and a TC buffer per sublayer
    ids = random_ids(1, 4).to(device)
    cache = DeltaLMStaticCache(config=model.config, max_cache_len=512)
    torch._dynamo.reset()
    step = torch.compile(lambda t, c: model(t, cache=c).logits[:, -1], fullgraph=True)
    next_token = model(ids, cache=cache).logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(2):  # compiled, then run once compiled
        next_token = step(next_token, cache).argmax(-1, keepdim=True)
    smallest = min(b.untyped_storage().nbytes() for b in cache._conv_buffers.values())
    assert len(cache._conv_buffers) == 2 + 2 * model.config.num_layers  # EC, each TC read, final
    peak = step_peak_bytes(lambda: step(next_token, cache), torch.device(device))
    assert 0 < peak < smallest // 4, (peak, smallest)


@torch.no_grad()
def test_plain_static_cache_serves_models_without_conv_history_only():
    ids = random_ids(2, 5)
    baseline = tiny_model("baseline")
    out = baseline(ids, cache=StaticCache(config=baseline.config, max_cache_len=8)).logits
    torch.testing.assert_close(out, baseline(ids).logits, rtol=0, atol=ATOL)
    tc = tiny_model("ddl-tc")
    with pytest.raises(ValueError, match="DeltaLMStaticCache"):
        tc(ids, cache=StaticCache(config=tc.config, max_cache_len=8))


@torch.no_grad()
def test_static_cache_refuses_what_does_not_fit():
    model = tiny_model("ddl-tc")
    cache = DeltaLMStaticCache(config=model.config, max_cache_len=4)
    with pytest.raises(ValueError, match="max_cache_len 4"):
        model(random_ids(1, 6), cache=cache)
    cache = DeltaLMStaticCache(config=model.config, max_cache_len=8)
    with pytest.raises(ValueError, match="max_cache_len = 8"):
        model(random_ids(1, 2), attention_mask=torch.ones(1, 9, dtype=torch.long), cache=cache)


def test_both_caches_expose_the_same_conv_view():
    model = tiny_model("ddl-tc")
    ids = random_ids(2, 5)
    dynamic, static = DeltaLMCache(), DeltaLMStaticCache(config=model.config, max_cache_len=8)
    with torch.no_grad():
        model(ids, cache=dynamic)
        model(ids, cache=static)
    assert dynamic.conv.keys() == static.conv.keys()
    for key, history in dynamic.conv.items():
        torch.testing.assert_close(static.conv[key], history, rtol=0, atol=ATOL)
