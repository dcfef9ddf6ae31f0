"""DeltaLM on a CUDA device (skipped without one), always compared with the same weights on the CPU:
fp32 logits, cached decoding with left padding, bf16 autocast training, greedy and bf16 generation,
and a forward that never synchronises with the host."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
from model_helpers import ALL_VARIANTS, VOCAB, random_ids, tiny_model

from deltalearn.ops import compiled_kernels, state_chain

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# fp32 on two devices: different kernels sum in different orders. Logits are ~0.4 in size, so this
# is ~2e-4 relative; a wrong mask, position or conv history moves them by 1e-2 or more.
FP32_ATOL = 1e-4
BF16_EPS = torch.finfo(torch.bfloat16).eps


@pytest.fixture(autouse=True)
def _exact_fp32_matmul():
    # TF32 would make fp32 results differ by ~1e-3, not by round-off
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _on_both(variant: str):
    """The same tiny model on the CPU and (a copy) on the GPU."""
    cpu = tiny_model(variant)
    return cpu, copy.deepcopy(cpu).cuda()


def _left_padded(batch: int = 3, length: int = 12):
    ids = random_ids(batch, length)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # one left-padded row
    ids[1, :4] = 0
    return ids, mask


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@torch.no_grad()
def test_forward_on_cuda_equals_cpu(variant):
    cpu, gpu = _on_both(variant)
    ids, mask = _left_padded()
    want = cpu(ids, attention_mask=mask).logits
    got = gpu(ids.cuda(), attention_mask=mask.cuda()).logits
    real = mask.bool()
    torch.testing.assert_close(got.cpu()[real], want[real], rtol=0, atol=FP32_ATOL)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@torch.no_grad()
def test_cached_decoding_on_cuda_equals_cpu_full_forward(variant, monkeypatch):
    """... and never asks for the CPU inference extension (its calls would only decline CUDA
    tensors: host time)."""
    from deltalearn.ops import extension

    cpu, gpu = _on_both(variant)
    ids, mask = _left_padded()
    want = cpu(ids, attention_mask=mask).logits
    asked = []
    monkeypatch.setattr(extension, "loaded", lambda: asked.append(1))
    ids, mask = ids.cuda(), mask.cuda()
    out = gpu(ids[:, :2], attention_mask=mask[:, :2], use_cache=True)
    steps = [out.logits]
    for t in range(2, ids.shape[1]):
        out = gpu(ids[:, t : t + 1], attention_mask=mask[:, : t + 1], past_key_values=out.cache)
        steps.append(out.logits)
    real = mask.bool().cpu()
    got = torch.cat(steps, 1).cpu()
    torch.testing.assert_close(got[real], want[real], rtol=0, atol=FP32_ATOL)
    assert asked == []


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@torch.no_grad()
def test_forward_never_synchronises_with_the_host(variant):
    """The id check is a device-side assert and the mask is applied without reading it."""
    gpu = tiny_model(variant).cuda()
    ids, mask = (t.cuda() for t in _left_padded())
    ones = torch.ones_like(ids)
    # The prefill runs outside: transformers' cache copies an empty tensor to the device once.
    cache = gpu(ids[:, :6], attention_mask=mask[:, :6], use_cache=True).cache
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call now raises
    try:
        gpu(ids, attention_mask=mask, output_gates=True)
        gpu(ids[:, 6:7], attention_mask=mask[:, :7], past_key_values=cache)
        gpu(ids, attention_mask=ones)  # no padding: the mask is applied rather than read
        gpu(ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")


def test_out_of_range_ids_on_cuda_trip_a_device_side_assert():
    # In a fresh process: a device-side assert leaves the CUDA context unusable.
    code = (
        "import torch\n"
        "from deltalearn import DeltaLM, DeltaLMConfig\n"
        "cfg = DeltaLMConfig.preset('ddl', 'tiny', num_layers=1, hidden_size=32, num_heads=2,\n"
        f"                          head_dim=16, vocab_size={VOCAB})\n"
        "model = DeltaLM(cfg).cuda()\n"
        f"model(torch.tensor([[1, {VOCAB}]], device='cuda'))\n"
        "torch.cuda.synchronize()\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "device-side assert" in proc.stdout + proc.stderr, proc.stderr[-2000:]


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_bf16_autocast_training_matches_cpu_fp32_and_learns(variant):
    cpu, gpu = _on_both(variant)
    cpu.train()
    gpu.train()
    ids = random_ids(4, 32)
    with torch.no_grad():
        want = cpu(ids, labels=ids)
    ids = ids.cuda()
    states = []
    hooks = [
        b.register_forward_pre_hook(lambda m, a: states.append(a[0].dtype)) for b in gpu.layers
    ]
    opt = torch.optim.AdamW(gpu.parameters(), lr=3e-3)
    losses = []
    for step in range(20):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = gpu(ids, labels=ids)
        if step == 0:
            for h in hooks:
                h.remove()
            assert states == [torch.float32] * len(gpu.layers)  # the state stays fp32
            # the branches in bf16 move the logits by a few bf16 ulps of their size (on CPU
            # autocast: at most 5); cross-entropy moves by at most twice the largest logit change
            logit_tol = 16 * BF16_EPS * want.logits.abs().max().item()
            err = (out.logits.float().cpu() - want.logits).abs().max().item()
            assert err <= logit_tol, err
            assert abs(out.loss.item() - want.loss.item()) <= 2 * logit_tol
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0], losses


@pytest.mark.parametrize("variant", ["baseline", "ddl", "ddl-cc", "ddl-tc"])
@torch.no_grad()
def test_generate_on_cuda(variant):
    cpu, gpu = _on_both(variant)
    prompt = random_ids(2, 3)
    greedy = dict(
        max_new_tokens=5, do_sample=False, output_scores=True, return_dict_in_generate=True
    )
    want = cpu.generate(prompt, **greedy)
    got = gpu.generate(prompt.cuda(), **greedy)
    # the CPU's top-2 logits differ by >= 1e-3 at every step: far above the fp32 tolerance
    for s_got, s_want in zip(got.scores, want.scores, strict=True):
        torch.testing.assert_close(s_got.cpu(), s_want, rtol=0, atol=FP32_ATOL)
    assert torch.equal(got.sequences.cpu(), want.sequences)
    # a model cast to bf16: logits within a few bf16 ulps, sampling runs and keeps the prompt
    gpu = gpu.to(torch.bfloat16)
    ids = random_ids(2, 8)
    ref = cpu(ids).logits
    err = (gpu(ids.cuda()).logits.float().cpu() - ref).abs().max().item()
    assert err <= 16 * BF16_EPS * ref.abs().max().item(), err
    sampled = gpu.generate(prompt.cuda(), max_new_tokens=5, do_sample=True, top_k=5)
    assert sampled.shape == (2, 8)
    assert torch.equal(sampled[:, :3].cpu(), prompt)
    assert ((sampled >= 0) & (sampled < VOCAB)).all()


def test_trainer_optimizer_is_fused_on_cuda():
    """On CUDA the trainer's AdamW is the fused one, which skips a non-finite step on the device."""
    from deltalearn.train.config import OptimConfig
    from deltalearn.train.optim import build_optimizer

    opt = build_optimizer(tiny_model("ddl-cc").cuda(), OptimConfig())
    assert opt.defaults["fused"] is True
    assert getattr(opt, "_step_supports_amp_scaling", False)


@pytest.mark.parametrize("variant", ["ddl", "ddl-cc", "ddl-tc"])
def test_rebuilt_states_on_cuda_same_gradients_less_memory(variant, monkeypatch):
    """The Triton forward writes the row scalars `ops.state_tape` rebuilds states from: the same
    gradients as keeping every state, and a lower training-step peak."""
    from deltalearn.ops import state_tape

    torch.manual_seed(0)
    model = tiny_model(variant, num_layers=4, hidden_size=128, num_heads=4, head_dim=32)
    model = model.cuda().train()
    ids = random_ids(8, 128).cuda()
    grads, peaks = {}, {}
    for rebuild in ("off", "on"):
        monkeypatch.setattr(state_tape, "REBUILD", rebuild)
        model.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        model(ids, labels=ids).loss.backward()
        torch.cuda.synchronize()
        peaks[rebuild] = torch.cuda.max_memory_allocated() - base
        grads[rebuild] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["on"], grads["off"], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    assert peaks["on"] < peaks["off"], peaks


@pytest.mark.parametrize("kernels", ["off", "on"], ids=["traced", "compiled-kernels"])
@pytest.mark.parametrize("variant", ["ddl", "ddl-cc", "ddl-tc"])
def test_compiled_training_on_cuda_gives_the_triton_gradients(variant, kernels, monkeypatch):
    """`deltalearn train --compile` on a GPU: Inductor's Triton code for the traced rewrite (a
    matrix state one value channel at a time, `ops/traced_epilogue.py`, its backward derived by
    AOT autograd) against the eager step on the hand-written Triton kernels — the loss and every
    parameter's gradient, fp32. Compiled as the trainer compiles (`DeltaLM.compile`: Inductor's
    mix-order reduction off), on 8192 rows (32 × 256): at `small` with it on, torch 2.11's backward
    returned a gate-weight gradient of the wrong shape (`models/compiling.py`). ddl: its vector
    state takes the rewrite's Function under compile, which torch 2.11's dynamo once traced with
    zero gradients (`ops/projections.cast`). "compiled-kernels": the Triton kernels themselves
    as custom ops in the compiled graph (`ops/compiled_kernels.py`)."""
    monkeypatch.setattr(compiled_kernels, "COMPILED_KERNELS", kernels)
    _assert_compiled_step_gives_the_triton_gradients(variant)


@pytest.mark.parametrize("variant", ["ddl-cc", "ddl-tc"])
def test_compiled_training_with_the_kernels_on_the_state_chain_gives_the_triton_gradients(
    variant, monkeypatch
):
    """Both switches on: the chain's rewrites are the chained kernel ops (the backward kernel
    rebuilding each state, `StateChain.rewrite_kernel`), ddl-tc's reads the read ops."""
    monkeypatch.setattr(compiled_kernels, "COMPILED_KERNELS", "on")
    monkeypatch.setattr(state_chain, "COMPILED_REBUILD", "on")
    _assert_compiled_step_gives_the_triton_gradients(variant)


def _assert_compiled_step_gives_the_triton_gradients(variant: str) -> None:
    torch.manual_seed(0)
    model = tiny_model(variant, num_layers=2).cuda().train()
    ids = random_ids(32, 256).cuda()
    eager_loss = model(ids, labels=ids).loss
    eager_loss.backward()
    eager = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    torch._dynamo.reset()
    model.compile(fullgraph=True)
    try:
        loss = model(ids, labels=ids).loss
        loss.backward()
    finally:
        model._compiled_call_impl = None  # nn.Module.compile's own attribute: eager again
        torch._dynamo.reset()
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=FP32_ATOL)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, eager[name], rtol=1e-3, atol=1e-5, msg=name)
