"""DeltaLM on a CUDA device (skipped without one): cached decoding, left padding and bf16 training
for every variant — the paths CPU CI cannot reach."""

from __future__ import annotations

import pytest
import torch
from model_helpers import ALL_VARIANTS, random_ids, tiny_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    # TF32 would make the chunked-vs-one-pass comparison differ by ~1e-3, not by round-off
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@torch.no_grad()
def test_cached_decoding_equals_full_forward_on_cuda(variant):
    model = tiny_model(variant).cuda()
    ids = random_ids(3, 12).cuda()
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # one left-padded row
    full = model(ids, attention_mask=mask).logits
    out = model(ids[:, :2], attention_mask=mask[:, :2], use_cache=True)
    steps = [out.logits]
    for t in range(2, ids.shape[1]):
        out = model(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.cache)
        steps.append(out.logits)
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], rtol=0, atol=1e-4)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_bf16_autocast_training_step_is_finite_and_learns(variant):
    model = tiny_model(variant).cuda().train()
    ids = random_ids(4, 32).cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("variant", ["baseline", "ddl", "ddl-cc", "ddl-tc"])
def test_generate_on_cuda_in_bf16(variant):
    model = tiny_model(variant).cuda().to(torch.bfloat16)
    prompt = random_ids(2, 3).cuda()
    out = model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=5)
    assert out.shape == (2, 8)
