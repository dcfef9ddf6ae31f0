"""DeltaLM forward: every variant trains, the baseline is a plain pre-norm Transformer, gates are
reported, saving round-trips, bad input is refused."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from model_helpers import ALL_VARIANTS, VOCAB, random_ids, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM

from deltalearn import DeltaLM, DeltaLMConfig
from deltalearn.models import DeltaLMGates


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_forward_backward_and_loss(variant):
    model = tiny_model(variant).train()
    ids = random_ids(2, 9)
    out = model(ids, labels=ids)
    assert out.logits.shape == (2, 9, VOCAB)
    want = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, want)
    out.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_labels_ignore_index():
    model = tiny_model("ddl")
    ids = random_ids(2, 9)
    labels = ids.clone()
    labels[:, 5:] = -100
    out = model(ids, labels=labels)
    want = F.cross_entropy(out.logits[:, :4].reshape(-1, VOCAB), ids[:, 1:5].reshape(-1))
    torch.testing.assert_close(out.loss, want)


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_loss_decreases_on_a_fixed_batch(variant):
    model = tiny_model(variant).train()
    ids = random_ids(4, 16)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_save_load_round_trip(variant, tmp_path):
    model = tiny_model(variant)
    ids = random_ids(2, 7)
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert AutoConfig.from_pretrained(tmp_path).model_type == "deltalm"
    for cls in (DeltaLM, AutoModelForCausalLM):
        loaded = cls.from_pretrained(tmp_path).eval()
        assert isinstance(loaded, DeltaLM)
        assert loaded.lm_head.weight is loaded.embed.weight
        loaded_params = dict(loaded.named_parameters())
        for name, p in model.named_parameters():
            assert torch.equal(loaded_params[name], p), name  # bit-identical weights
        with torch.no_grad():
            # Weights memory-mapped from safetensors are not 64-byte aligned, so BLAS may take
            # another kernel path: identical up to a few ulps.
            torch.testing.assert_close(loaded(ids).logits, want, rtol=0, atol=1e-6)


# ---- the baseline is exactly a plain pre-norm Transformer --------------------------------------


def _rms(x, w, eps=1e-5):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _rope(x, theta=10000.0):
    """Rotate halves of each head of `(B, T, H, D)` by position·θ^(−2i/D), written out directly."""
    T, D = x.shape[1], x.shape[-1]
    freqs = torch.tensor([theta ** (-2 * i / D) for i in range(D // 2)])
    ang = torch.arange(T, dtype=torch.float32)[:, None] * freqs  # (T, D/2)
    cos, sin = ang.cos()[None, :, None], ang.sin()[None, :, None]
    a, b = x[..., : D // 2], x[..., D // 2 :]
    return torch.cat([a * cos - b * sin, a * sin + b * cos], -1)


def _reference_forward(model: DeltaLM, ids: torch.Tensor) -> torch.Tensor:
    """nanoGPT-style pre-norm Transformer with the model's weights and no DDL at all."""
    cfg = model.config
    B, T = ids.shape
    H, D = cfg.num_heads, cfg.head_dim
    x = model.embed.weight[ids]
    causal = torch.ones(T, T).tril().bool()
    for blk in model.layers:
        a = blk.attn
        c = _rms(x, blk.attn_norm.weight)
        q = _rms(_rope((c @ a.q_proj.weight.T).view(B, T, H, D)), a.q_norm.weight)
        k = _rms(_rope((c @ a.k_proj.weight.T).view(B, T, H, D)), a.k_norm.weight)
        v = (c @ a.v_proj.weight.T).view(B, T, H, D)
        s = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(D)
        p = s.masked_fill(~causal, float("-inf")).softmax(-1)
        y = torch.einsum("bhts,bshd->bthd", p, v).reshape(B, T, H * D)
        x = x + y @ a.o_proj.weight.T
        m = blk.mlp
        c = _rms(x, blk.mlp_norm.weight)
        x = x + (F.silu(c @ m.gate_proj.weight.T) * (c @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    return _rms(x, model.norm.weight) @ model.embed.weight.T


def test_additive_baseline_equals_plain_prenorm_transformer():
    model = tiny_model("baseline")
    with torch.no_grad():
        for p in model.parameters():  # move norms off 1 so a missing weight would show
            p.add_(0.05 * torch.randn_like(p))
        ids = random_ids(2, 11)
        torch.testing.assert_close(model(ids).logits, _reference_forward(model, ids))


def test_additive_baseline_has_no_ddl_parameters():
    names = [n for n, _ in tiny_model("baseline").named_parameters()]
    ddl = ("update", "compress", "expand", "gate.", "value.", "read")
    assert not [n for n in names if any(s in n for s in ddl)]
    # ... while a DDL model has exactly the generators on top of the same backbone
    ddl_names = {n for n, _ in tiny_model("ddl").named_parameters()}
    assert set(names) < ddl_names


# ---- gates ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant, dv", [("ddl", 1), ("ddl-cc", 4), ("write-only-cc", 4)])
def test_output_gates_format(variant, dv):
    model = tiny_model(variant)
    out = model(random_ids(3, 5), output_gates=True)
    g = out.gates
    assert isinstance(g, DeltaLMGates)
    assert g.beta.shape == (2, 2, 3, 5)  # (layers, {attn, mlp}, B, T)
    for t in (g.readout, g.target, g.discrepancy):
        assert t.shape == (2, 2, 3, 5, dv)
    assert ((g.beta > 0) & (g.beta < 2)).all()
    assert model(random_ids(3, 5)).gates is None  # off by default
    assert all(not u.record and u.last_record is None for u in model._updates())


def _capture_sublayers(model: DeltaLM) -> tuple[dict, list]:
    """Hooks that keep, per (layer, sublayer), the state X it reads and its branch output h."""
    seen, hooks = {}, []

    def keep(key, pick):
        return lambda _mod, args, *out: seen.__setitem__(key, pick(args, out))

    for i, blk in enumerate(model.layers):
        hooks += [
            blk.register_forward_pre_hook(keep((i, 0, "X"), lambda a, o: a[0])),
            blk.attn.register_forward_hook(keep((i, 0, "h"), lambda a, o: o[0])),
            # the MLP sublayer reads the state the attention rewrite wrote (with the fused
            # compressor read, the first of the rewrite's two outputs)
            blk.attn_update.register_forward_hook(
                keep((i, 1, "X"), lambda a, o: o[0][0] if isinstance(o[0], tuple) else o[0])
            ),
            blk.mlp.register_forward_hook(keep((i, 1, "h"), lambda a, o: o[0])),
        ]
    return seen, hooks


@pytest.mark.parametrize("variant", ["ddl", "ddl-cc", "ddl-tc", "write-only-cc"])
@torch.no_grad()
def test_output_gates_are_the_model_state_read_along_k(variant):
    """β, readout, target and discrepancy recomputed from the SPEC formulas on the states the blocks
    actually read (captured by hooks) and the branch outputs: `k = h/‖h‖`, readout `kᵀX`,
    `v = 4σ(W_v u + b_v)` on the un-normalised `u = Compress(X)`, `β = 2σ(W_β RMSNorm(u) + b_β)`."""
    model = tiny_model(variant)
    cfg = model.config
    seen, hooks = _capture_sublayers(model)
    g = model(random_ids(3, 6), output_gates=True).gates
    for hook in hooks:
        hook.remove()
    for i, blk in enumerate(model.layers):
        subs = [(blk.attn_norm, blk.attn_update), (blk.mlp_norm, blk.mlp_update)]
        for s, (norm, update) in enumerate(subs):
            X, h = seen[i, s, "X"], seen[i, s, "h"]
            k = h / torch.sqrt(h.pow(2).sum(-1, keepdim=True) + cfg.k_eps**2)
            if cfg.expanded:
                readout = (k[..., :, None] * X).sum(-2)  # (B, T, dv)
                u = blk.compress(X)
            else:
                readout, u = (k * X).sum(-1, keepdim=True), X
            c = u * torch.rsqrt(u.pow(2).mean(-1, keepdim=True) + cfg.norm_eps) * norm.weight
            vp, gp = update.value.proj, update.gate.out
            v = 4 * torch.sigmoid(u @ vp.weight.T + vp.bias)
            beta = 2 * torch.sigmoid(c @ gp.weight.T + gp.bias)[..., 0]
            for name, got, want in [
                ("readout", g.readout, readout),
                ("target", g.target, v),
                ("discrepancy", g.discrepancy, v - readout),
                ("beta", g.beta, beta),
            ]:
                where = f"{name}, layer {i}, sublayer {s}"
                torch.testing.assert_close(got[i, s], want, msg=lambda m, w=where: f"{w}: {m}")
            assert readout.abs().max() > 1e-3  # a real readout, not zeros on both sides


def test_gate_starts_at_beta_init():
    model = tiny_model("ddl", beta_init=0.3, init_std_factor=0.0)  # zero weights: β = β₀ exactly
    g = model(random_ids(1, 4), output_gates=True).gates
    torch.testing.assert_close(g.beta, torch.full_like(g.beta, 0.3))


def test_baseline_has_no_gates():
    assert tiny_model("baseline")(random_ids(1, 4), output_gates=True).gates is None


# ---- init and bad input --------------------------------------------------------------------------


def test_init_follows_the_spec():
    torch.manual_seed(0)
    cfg = DeltaLMConfig.preset("ddl-cc", "tiny", num_layers=4)
    model = DeltaLM(cfg)
    std = 0.5 / math.sqrt(cfg.hidden_size)
    blk = model.layers[0]
    assert abs(blk.attn.q_proj.weight.std().item() / std - 1) < 0.05
    assert abs(blk.mlp.down_proj.weight.std().item() / (std / 2) - 1) < 0.05  # / sqrt(L = 4)
    assert abs(model.embed.weight.std().item() / 0.02 - 1) < 0.05
    torch.testing.assert_close(blk.compress.read, torch.full((4,), 0.25))
    assert blk.attn_update.gate.out.bias.item() == 0.0  # logit(1/2) for β₀ = 1
    ec = model.expand.weight
    assert ec[:, 0, -1].eq(1).all() and ec[:, 0, :-1].eq(0).all()  # EC starts as repetition


def test_out_of_range_ids_raise():
    model = tiny_model("ddl")
    ids = random_ids(1, 4)
    ids[0, 2] = VOCAB
    with pytest.raises(
        ValueError, match=f"token id {VOCAB} is out of range for vocab_size {VOCAB}"
    ):
        model(ids)
    with pytest.raises(ValueError, match="token id -3 is out of range"):
        model(torch.tensor([[1, -3]]))


def test_bad_attention_mask_shape_raises():
    with pytest.raises(ValueError, match=r"attention_mask must have shape"):
        tiny_model("ddl")(random_ids(2, 4), attention_mask=torch.ones(2, 3))


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_tiny_preset_is_cpu_sized(variant):
    """The tiny preset exactly as users get it trains on a CPU in minutes.

    Bound: at most 3M parameters (vocabulary included) and at most 25 MFLOP of training compute
    per token (6·N for the weights plus 12·L·ctx·d for attention over the full context). A 2-core
    CPU sustains ~10k tokens/s at that size (README: 9.9k tok/s at 1.3M parameters), so the
    default 300-step run of 16 × 128 tokens takes a few minutes.
    """
    cfg = DeltaLMConfig.preset(variant, "tiny")
    with torch.device("meta"):
        n = sum(p.numel() for p in DeltaLM(cfg).parameters())
    assert n <= 3e6, n
    flops_per_token = 6 * n + 12 * cfg.num_layers * cfg.max_seq_len * cfg.hidden_size
    assert flops_per_token <= 25e6, flops_per_token


# ---- mixed precision: one residual-stream dtype for every variant -------------------------------


@pytest.mark.parametrize("variant", ALL_VARIANTS)
def test_residual_state_is_fp32_under_bf16_autocast_for_every_variant(variant):
    model = tiny_model(variant).train()
    dtypes = []
    hooks = [
        b.register_forward_pre_hook(lambda m, a: dtypes.append(a[0].dtype)) for b in model.layers
    ]
    hooks.append(model.norm.register_forward_pre_hook(lambda m, a: dtypes.append(a[0].dtype)))
    ids = random_ids(2, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, labels=ids)
    for hook in hooks:
        hook.remove()
    assert dtypes == [torch.float32] * (len(model.layers) + 1), dtypes
    out.loss.backward()  # and the backward through every fp32 island works
    assert all(p.grad is not None for p in model.parameters())


# ---- forward accepts exactly its named arguments ------------------------------------------------


def test_unknown_forward_argument_raises_naming_it():
    model = tiny_model("ddl")
    with pytest.raises(TypeError, match="output_gate"):
        model(random_ids(1, 4), output_gate=True)  # a typo of output_gates used to be ignored


@pytest.mark.parametrize("flag", ["output_attentions", "output_hidden_states"])
def test_attentions_and_hidden_states_are_refused_not_ignored(flag):
    model = tiny_model("ddl-cc")
    ids = random_ids(1, 4)
    want = model(ids).logits
    for off in (None, False):  # what generate and other callers pass: fine
        torch.testing.assert_close(model(ids, **{flag: off}).logits, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match=f"{flag}=True is not supported"):
        model(ids, **{flag: True})


def test_return_dict_cache_position_and_inputs_embeds():
    model = tiny_model("ddl-tc")
    ids = random_ids(2, 5)
    out = model(ids, use_cache=True)
    tup = model(ids, use_cache=True, return_dict=False)
    assert isinstance(tup, tuple) and torch.equal(tup[0], out.logits)
    # cache_position (passed by older generate) is redundant with the cache length
    nxt = random_ids(2, 1, seed=3)
    a = model(nxt, past_key_values=out.cache, cache_position=torch.tensor([5])).logits
    b = model(nxt, past_key_values=tup[1]).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"cache_position must hold one position per new token"):
        model(ids, cache_position=torch.arange(3))
    model(ids, inputs_embeds=None)
    with pytest.raises(ValueError, match="inputs_embeds is not supported"):
        model(inputs_embeds=torch.randn(2, 5, 32))


def _loss_logits_and_grads(model, ids):
    model.zero_grad()
    out = model(ids, labels=ids, output_gates=True)
    out.loss.backward()
    grads = [p.grad.clone() for p in model.parameters()]
    return out.logits.detach(), grads, out.gates.beta.detach()


@pytest.mark.parametrize("variant", ["ddl-cc", "write-only-cc"])
def test_fused_compressor_read_gives_the_same_model(variant, monkeypatch):
    """DELTALEARN_FUSED_READ=on hands each block's MLP read to the attention rewrite, and the next
    block's attention read (the final read after the last block) to the MLP rewrite: one read of
    its own a forward, and the same logits, gradients and gate records (here the C kernel's read;
    on CUDA the Triton kernel's)."""
    from deltalearn.nn import ChannelCompressor, DeltaUpdate

    model = tiny_model(variant).train()
    ids = random_ids(2, 12)
    monkeypatch.setenv("DELTALEARN_FUSED_READ", "off")
    assert not model.layers[0]._fuses_read()
    off = _loss_logits_and_grads(model, ids)
    monkeypatch.setenv("DELTALEARN_FUSED_READ", "on")
    assert all(block._fuses_read() for block in model.layers)
    calls = []
    real = DeltaUpdate.forward

    def spy(self, X, h, c, u, compress=None, **kwargs):
        calls.append(compress is not None)
        return real(self, X, h, c, u, compress, **kwargs)

    reads = []
    real_read = ChannelCompressor.read_with_matrix
    monkeypatch.setattr(DeltaUpdate, "forward", spy)
    monkeypatch.setattr(
        ChannelCompressor, "read_with_matrix", lambda *a: reads.append(1) or real_read(*a)
    )
    on = _loss_logits_and_grads(model, ids)
    assert calls == [True, True] * len(model.layers)  # every rewrite reads for the next sublayer
    assert len(reads) == 1  # the first block's attention read only
    torch.testing.assert_close(on[0], off[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(on[1], off[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(on[2], off[2])


def test_fused_token_read_gives_the_same_model(monkeypatch):
    """DELTALEARN_FUSED_TOKEN_READ=on (the default) hands each token-compressor read of a ddl-tc
    model in training to the rewrite before it: on CUDA the Triton update then takes the read's
    gradient into its backward kernel (tests/test_ops_epilogue.py), here the rewrite and then the
    read run as before — the same logits, gradients and gate records. With padding, or under
    activation checkpointing, every sublayer reads for itself."""
    from deltalearn.nn import DeltaUpdate, TokenCompressor

    model = tiny_model("ddl-tc").train()
    ids = random_ids(2, 12)
    taps, reads = [], []
    real, real_read = DeltaUpdate.forward, TokenCompressor.forward

    def spy(self, X, h, c, u, compress=None, **kwargs):
        taps.append(None if compress is None else compress.dim())
        return real(self, X, h, c, u, compress, **kwargs)

    monkeypatch.setattr(DeltaUpdate, "forward", spy)
    monkeypatch.setattr(TokenCompressor, "forward", lambda *a: reads.append(1) or real_read(*a))
    monkeypatch.setenv("DELTALEARN_FUSED_TOKEN_READ", "off")
    off = _loss_logits_and_grads(model, ids)
    rewrites = 2 * len(model.layers)
    assert taps == [None] * rewrites and len(reads) == rewrites + 1
    taps.clear(), reads.clear()
    monkeypatch.delenv("DELTALEARN_FUSED_TOKEN_READ")  # on by default
    on = _loss_logits_and_grads(model, ids)
    # Every rewrite handed taps (here it then rewrites without them, and reads); one read of its
    # own, the first block's attention read.
    assert [t for t in taps if t is not None] == [3] * rewrites and len(reads) == 1
    torch.testing.assert_close(on[0], off[0], rtol=1e-5, atol=1e-5)
    for a, b in zip(on[1], off[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(on[2], off[2])
    taps.clear()
    padded = torch.ones_like(ids)
    padded[0, :3] = 0
    model(ids, attention_mask=padded, labels=ids).loss.backward()
    model.activation_checkpointing_enable()
    model(ids, labels=ids).loss.backward()
    assert len(taps) >= 2 * rewrites and all(t is None for t in taps)  # (and recomputes)


def test_reads_are_handed_across_blocks_only_where_nothing_can_come_between(monkeypatch):
    """A hook on a block (which may change the state it returns), activation checkpointing (a
    block's recompute) and one new token (the extension's read is cheaper) each read the next
    block's state in that block instead: the same model either way."""
    from deltalearn.models.modeling_deltalm import DeltaLMBlock

    monkeypatch.delenv("DELTALEARN_FUSED_READ", raising=False)
    model = tiny_model("ddl-cc").train()
    ids = random_ids(2, 12)
    handed = []
    real = DeltaLMBlock.forward

    def spy(self, X, step):
        handed.append(step.next_read is not None)
        return real(self, X, step)

    monkeypatch.setattr(DeltaLMBlock, "forward", spy)
    plain = _loss_logits_and_grads(model, ids)
    assert handed == [True] * len(model.layers)
    handed.clear()
    hook = model.layers[1].register_forward_hook(lambda m, a, out: out * 1.0)
    hooked = _loss_logits_and_grads(model, ids)
    hook.remove()
    assert handed == [False] * len(model.layers)
    handed.clear()
    model.activation_checkpointing_enable()
    checkpointed = _loss_logits_and_grads(model, ids)
    model.activation_checkpointing_disable()
    assert not any(handed)
    for other in (hooked, checkpointed):
        torch.testing.assert_close(other[0], plain[0], rtol=1e-5, atol=1e-5)
        for a, b in zip(other[1], plain[1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    handed.clear()
    with torch.no_grad():
        model.eval()(random_ids(1, 1))
    assert handed == [False] * len(model.layers)


def test_fused_read_applies_only_where_it_can(monkeypatch):
    monkeypatch.delenv("DELTALEARN_FUSED_READ", raising=False)
    assert tiny_model("ddl-cc").layers[0]._fuses_read()  # on by default
    for variant in ("baseline", "ddl", "ddl-tc"):  # no CC compressor, or no rewrite
        assert not tiny_model(variant).layers[0]._fuses_read(), variant
    model = tiny_model("ddl-cc")
    for block in model.layers:
        block.attn_update.fused = False  # the step-by-step reference path reads separately
    assert not model.layers[0]._fuses_read()


def test_fused_read_switch_names_a_bad_value(monkeypatch):
    monkeypatch.setenv("DELTALEARN_FUSED_READ", "yes")
    with pytest.raises(ValueError, match=r"DELTALEARN_FUSED_READ.*\['on', 'off'\].*'yes'"):
        tiny_model("ddl-cc")(random_ids(1, 4))
