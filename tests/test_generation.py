"""Incremental decoding with DeltaLMCache equals a full forward, for every variant; left padding
does not leak; `generate` works greedy, sampling and with beams."""

from __future__ import annotations

import pytest
import torch
from model_helpers import ALL_VARIANTS, random_ids, tiny_model
from transformers import DynamicCache

from deltalearn.models import DeltaLMCache

ATOL = 2e-5  # fp32 round-off between a chunked and a one-pass forward


def _stepwise_logits(model, ids, prompt_len, attention_mask=None):
    """Logits from a prefill of `prompt_len` tokens, then one token at a time through the cache."""
    mask = attention_mask
    out = model(
        ids[:, :prompt_len],
        attention_mask=None if mask is None else mask[:, :prompt_len],
        use_cache=True,
    )
    assert isinstance(out.cache, DeltaLMCache)
    logits = [out.logits]
    for t in range(prompt_len, ids.shape[1]):
        out = model(
            ids[:, t : t + 1],
            attention_mask=None if mask is None else mask[:, : t + 1],
            past_key_values=out.cache,
        )
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("prompt_len", [1, 2, 6], ids=lambda n: f"prompt{n}")
@pytest.mark.parametrize("variant", ALL_VARIANTS)
@torch.no_grad()
def test_cached_decoding_equals_full_forward(variant, prompt_len):
    # prompts 1 and 2 are shorter than the conv kernels' history (K - 1 = 3)
    model = tiny_model(variant)
    ids = random_ids(2, 9)
    full = model(ids).logits
    torch.testing.assert_close(_stepwise_logits(model, ids, prompt_len), full, rtol=0, atol=ATOL)


def _left_pad(ids: torch.Tensor, pads: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    padded, mask = ids.clone(), torch.ones_like(ids)
    for row, n in enumerate(pads):
        padded[row, :n], mask[row, :n] = 0, 0
    return padded, mask


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@torch.no_grad()
def test_left_padding_does_not_leak(variant):
    model = tiny_model(variant)
    ids = random_ids(3, 10)
    pads = [0, 3, 7]
    padded, mask = _left_pad(ids, pads)
    full = model(padded, attention_mask=mask).logits
    for row, n in enumerate(pads):  # each row equals the same tokens without padding
        alone = model(ids[row : row + 1, n:]).logits[0]
        torch.testing.assert_close(full[row, n:], alone, rtol=0, atol=ATOL)
    stepwise = _stepwise_logits(model, padded, 8, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(stepwise[real], full[real], rtol=0, atol=ATOL)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@torch.no_grad()
def test_generate_greedy_cached_equals_uncached(variant):
    model = tiny_model(variant)
    prompt = random_ids(2, 3)
    cached = model.generate(prompt, max_new_tokens=6, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False)
    assert cached.shape == (2, 9)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("variant", ["ddl", "ddl-tc", "ddl-cc"])
@torch.no_grad()
def test_generate_batched_left_padded_equals_one_by_one(variant):
    model = tiny_model(variant)
    ids = random_ids(2, 6)
    padded, mask = _left_pad(ids, [0, 4])
    batch = model.generate(padded, attention_mask=mask, max_new_tokens=5, do_sample=False)
    for row, n in enumerate([0, 4]):
        alone = model.generate(ids[row : row + 1, n:], max_new_tokens=5, do_sample=False)
        assert torch.equal(batch[row, 6:], alone[0, 6 - n :])


@pytest.mark.parametrize("variant", ["ddl-tc", "ddl-cc-noec"])
@torch.no_grad()
def test_generate_sampling_and_beams(variant):
    model = tiny_model(variant)
    prompt = random_ids(2, 4)
    torch.manual_seed(0)
    sampled = model.generate(
        prompt, max_new_tokens=5, do_sample=True, top_k=10, num_return_sequences=2
    )
    assert sampled.shape == (4, 9)
    assert torch.equal(sampled[::2, :4], prompt)
    beams = model.generate(prompt, max_new_tokens=4, num_beams=3, do_sample=False)
    beams_nocache = model.generate(
        prompt, max_new_tokens=4, num_beams=3, do_sample=False, use_cache=False
    )
    assert torch.equal(beams, beams_nocache)


@torch.no_grad()
def test_plain_dynamic_cache_is_refused_when_conv_history_is_needed():
    ids = random_ids(1, 3)
    tiny_model("ddl-cc-noec")(ids, cache=DynamicCache())  # no token-axis conv: fine
    with pytest.raises(ValueError, match="pass a DeltaLMCache"):
        tiny_model("ddl-tc")(ids, cache=DynamicCache())
    with pytest.raises(ValueError, match="not both"):
        tiny_model("ddl")(ids, cache=DeltaLMCache(), past_key_values=DeltaLMCache())


@torch.no_grad()
def test_cache_holds_the_conv_histories():
    model = tiny_model("ddl-tc")
    cache = model(random_ids(2, 5), use_cache=True).cache
    assert set(cache.conv) == {"embed", "0.attn", "0.mlp", "1.attn", "1.mlp", "final"}
    assert cache.conv["embed"].shape == (2, 3, 32)
    assert cache.conv["0.attn"].shape == (2, 3, 32, 4)
    assert cache.get_seq_length() == 5
    assert cache.is_croppable  # the conv inputs are kept per token, so a crop is exact
    cache.batch_select_indices(torch.tensor([1]))
    assert cache.conv["final"].shape[0] == 1 and cache.layers[0].keys.shape[0] == 1


@pytest.mark.parametrize("variant", ["ddl", "ddl-tc"])
@torch.no_grad()
def test_lm_evaluation_harness_calls(variant):
    """What lm-evaluation-harness's `hf` model does: `model(ids)` (sometimes with an attention
    mask) for log-likelihoods, and `generate` with a mask, `max_length`, `pad_token_id`, a cache."""
    model = tiny_model(variant)
    ids = random_ids(2, 6)
    logits = model(ids).logits
    mask = torch.ones_like(ids)
    torch.testing.assert_close(model(ids, attention_mask=mask).logits, logits, rtol=0, atol=0)
    out = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_length=10,
        pad_token_id=0,
        use_cache=True,
        do_sample=False,
    )
    assert torch.equal(out, model.generate(ids, max_new_tokens=4, do_sample=False))


@torch.no_grad()
def test_generate_refuses_what_the_model_cannot_return():
    model = tiny_model("ddl-cc")
    prompt = random_ids(1, 3)
    with pytest.raises(ValueError, match="output_attentions=True is not supported"):
        model.generate(
            prompt, max_new_tokens=2, output_attentions=True, return_dict_in_generate=True
        )
    with pytest.raises(ValueError, match="output_gate"):  # generate checks against forward's names
        model.generate(prompt, max_new_tokens=2, output_gate=True)


def test_conv_inputs_grow_without_copying_everything_per_token():
    """Appending one token at a time keeps every input exactly (for `crop`) while reallocating
    only when the buffer is full (doubling: a handful of copies for 100 tokens, not 100);
    under autograd it concatenates instead, leaving nothing written in place."""
    cache = DeltaLMCache()
    steps = [torch.randn(2, 1, 3, 4) for _ in range(100)]
    buffers = set()
    for x in steps:
        cache.append_conv("0.attn", x, 3)
        spare = cache._conv_spare.get("0.attn")  # none after the first input
        buffers.add(None if spare is None else spare.data_ptr())
    torch.testing.assert_close(cache._conv_inputs["0.attn"], torch.cat(steps, 1), rtol=0, atol=0)
    assert len(buffers) <= 8  # no buffer, then sizes 4, 6, 10, 18, 34, 66, 130
    torch.testing.assert_close(cache.conv_history("0.attn", 3), torch.cat(steps[-3:], 1))
    buffer = cache._conv_spare["0.attn"].data_ptr()
    cache._crop_conv(40)  # what `crop` does to them
    cache.append_conv("0.attn", steps[0], 3)  # after a crop: the same buffer, the kept inputs
    torch.testing.assert_close(
        cache._conv_inputs["0.attn"], torch.cat(steps[:40] + steps[:1], 1), rtol=0, atol=0
    )
    assert cache._conv_spare["0.attn"].data_ptr() == buffer
    x = torch.randn(2, 1, 3, 4, requires_grad=True)
    cache.append_conv("0.attn", x, 3)
    assert "0.attn" not in cache._conv_spare and cache._conv_inputs["0.attn"].requires_grad
