"""The state chain (`ops/state_chain.py`): rewrites that rebuild their input states in backward
through autograd, so that a compiled training step keeps no state but the last.

Op level: a stack of chained rewrites gives the plain traced rewrites' values and gradients (float64,
both rules, with and without the next channel read; gradcheck), and refuses states it cannot
rebuild. Model level: a compiled ddl-cc / write-only-cc step with DELTALEARN_COMPILED_REBUILD=on
takes the chain at every rewrite, trains on the eager gradients, and peaks lower than without it;
the chain stays off by default and where a state is read outside the rewrites."""

from __future__ import annotations

import pytest
import torch
from chain_helpers import rewrite_stack_loss
from model_helpers import assert_compiled_gradients_are_eager

from deltalearn import DeltaLM, DeltaLMConfig
from deltalearn.bench.model import step_peak_bytes
from deltalearn.ops import epilogue, state_chain
from deltalearn.ops.state_chain import StateChain
from deltalearn.ops.token_mixing import token_mix_traced
from deltalearn.ops.traced_epilogue import rewrite_epilogue_traced

LAYERS = 3


@pytest.fixture(autouse=True)
def _fresh_dynamo(monkeypatch):
    monkeypatch.delenv("DELTALEARN_COMPILED_REBUILD", raising=False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _operands(d: int = 7, dv: int = 3, dtype=torch.float64):
    """A first state and each layer's k (unit), β, v, and a mixing matrix: leaves with gradients."""
    g = torch.Generator().manual_seed(0)

    def leaf(*shape, unit=False):
        t = torch.randn(*shape, generator=g, dtype=dtype)
        return (torch.nn.functional.normalize(t, dim=-1) if unit else t).requires_grad_()

    X0 = leaf(2, 5, d, dv)
    ks = [leaf(2, 5, d, unit=True) for _ in range(LAYERS)]
    betas = [torch.rand(2, 5, generator=g, dtype=dtype).mul(2).requires_grad_() for _ in ks]
    vs = [leaf(2, 5, dv) for _ in ks]
    return (X0, leaf(d, dv), *ks, *betas, *vs)


def _stack(rule: str, read: bool, chained: bool):
    """A loss over LAYERS rewrites from X0: each read (with `read`) and the last state enter it."""

    def rewrite(chain, X, layer, C):
        if chain is None:
            return rewrite_epilogue_traced(X, *layer, rule, C)
        return chain.rewrite(X, *layer, rule, C)

    def loss(X0, C, *generators):
        ks, betas, vs = (generators[i * LAYERS : (i + 1) * LAYERS] for i in range(3))
        layers = list(zip(ks, betas, vs, strict=True))
        return rewrite_stack_loss(X0, C, layers, rewrite, read, chained)

    return loss


@pytest.mark.parametrize("read", [True, False], ids=["with-read", "no-read"])
@pytest.mark.parametrize("rule", ["delta", "write_only"])
def test_a_chained_stack_has_the_traced_stacks_values_and_gradients(rule, read):
    operands = _operands()
    plain = _stack(rule, read, chained=False)(*operands)
    chained = _stack(rule, read, chained=True)(*operands)
    torch.testing.assert_close(chained, plain, rtol=1e-12, atol=1e-12)
    # Without the read, C is unused: zeros both ways.
    want = torch.autograd.grad(plain, operands, allow_unused=True, materialize_grads=True)
    got = torch.autograd.grad(chained, operands, allow_unused=True, materialize_grads=True)
    for name, g, w in zip(["X0", "C", *["generator"] * 3 * LAYERS], got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("rule", ["delta", "write_only"])
def test_chained_rewrites_pass_gradcheck(rule):
    operands = _operands(d=4, dv=2)
    assert torch.autograd.gradcheck(_stack(rule, True, chained=True), operands)


def _token_read_stack(chained: bool):
    """Per layer a TC read of the state and a rewrite from it: ddl-tc's order of ops."""

    def loss(X0, W, *generators):
        ks, betas, vs = (generators[i * LAYERS : (i + 1) * LAYERS] for i in range(3))
        chain = StateChain(X0) if chained else None
        X, total = X0, 0
        for i, (k, beta, v) in enumerate(zip(ks, betas, vs, strict=True)):
            x = chain.token_read(X, W) if chained else token_mix_traced(X, W)
            total = total + (x.square() * (i + 1)).sum()
            args = (X, k * x.tanh().mean(), beta, v, "delta")  # k depends on the read
            X = chain.rewrite(*args) if chained else rewrite_epilogue_traced(*args)
        x = chain.token_read(X, W) if chained else token_mix_traced(X, W)
        if chained:
            x = chain.finish(x)
        return total + x.pow(3).sum()

    return loss


def test_chained_token_reads_have_the_traced_reads_values_and_gradients():
    X0, _, *generators = _operands()
    W = torch.randn(7, 3, 4, dtype=torch.float64, requires_grad=True)  # K = 4 taps
    operands = (X0, W, *generators)
    plain = _token_read_stack(chained=False)(*operands)
    chained = _token_read_stack(chained=True)(*operands)
    torch.testing.assert_close(chained, plain, rtol=1e-12, atol=1e-12)
    for g, w in zip(
        torch.autograd.grad(chained, operands), torch.autograd.grad(plain, operands), strict=True
    ):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    small = _operands(d=4, dv=2)
    taps = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(_token_read_stack(chained=True), (small[0], taps, *small[2:]))


def test_the_chain_refuses_states_it_cannot_rebuild():
    X0, C, k, *_ = _operands(dtype=torch.float32)
    beta, v = torch.ones(2, 5), torch.randn(2, 5, 3)
    chain = StateChain(X0)
    with pytest.raises(RuntimeError, match="a state the chain did not make"):
        chain.rewrite(X0.detach().clone(), k, beta, v, "delta", C)
    half = StateChain(X0.to(torch.bfloat16))
    with pytest.raises(ValueError, match="fp32 or float64 states only, got torch.bfloat16"):
        half.rewrite(half.state, k, beta, v, "delta", C)
    vector = StateChain(torch.randn(2, 5, 7))
    with pytest.raises(ValueError, match="matrix states only"):
        epilogue.rewrite_epilogue(
            vector.state, torch.randn(2, 5, 7), torch.zeros(2, 5), torch.randn(2, 5), chain=vector
        )


def test_the_switch_is_off_by_default_and_names_a_bad_value(monkeypatch):
    assert not state_chain.enabled()
    monkeypatch.setenv("DELTALEARN_COMPILED_REBUILD", "yes")
    with pytest.raises(ValueError, match="DELTALEARN_COMPILED_REBUILD.*got 'yes'"):
        state_chain.enabled()


def _model(variant: str, layers: int = 2, width: int = 64) -> DeltaLM:
    torch.manual_seed(0)
    fields = dict(num_layers=layers, vocab_size=256, hidden_size=width, num_heads=width // 32)
    return DeltaLM(DeltaLMConfig.preset(variant, "tiny", **fields)).train()


def _ids(batch: int = 2, tokens: int = 16) -> torch.Tensor:
    return torch.randint(0, 256, (batch, tokens), generator=torch.Generator().manual_seed(1))


# Rewrites and reads taken on a chain, one entry each: a module-level list, whose appends dynamo replays after
# the graph runs (it dropped those to a list in a test function's closure under pytest).
_CHAINED: list[int] = []


def _count_chained(monkeypatch) -> list[int]:
    """`_CHAINED`, emptied, counting from now on."""
    _CHAINED.clear()
    rewrite, token_read = StateChain.rewrite, StateChain.token_read

    def counted_rewrite(self, *args):
        _CHAINED.append(1)
        return rewrite(self, *args)

    def counted_read(self, *args):
        _CHAINED.append(1)
        return token_read(self, *args)

    monkeypatch.setattr(StateChain, "rewrite", counted_rewrite)
    monkeypatch.setattr(StateChain, "token_read", counted_read)
    return _CHAINED


@pytest.mark.slow  # two compiles of a two-layer model: ~30 s on 2 cold cores
@pytest.mark.parametrize("variant", ["ddl-cc", "write-only-cc", "ddl-tc"])
def test_a_compiled_step_on_the_chain_trains_on_the_eager_gradients(variant, monkeypatch):
    monkeypatch.setattr(state_chain, "COMPILED_REBUILD", "on")
    counts = _count_chained(monkeypatch)
    assert_compiled_gradients_are_eager(_model(variant), _ids())
    # every rewrite of two blocks on the chain, and with TC every read (the final one too)
    assert len(counts) == (4 + 5 if variant == "ddl-tc" else 4)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ["ddl-cc", "ddl-tc"])
def test_the_chain_lowers_a_compiled_steps_peak(variant, monkeypatch):
    """Four blocks: eight rewrites, whose input states the chain does not keep (but the first):
    the peak falls by more than three of them (ddl-cc 4.4 measured; the backward's own
    state-sized buffers and the states it rebuilds are alive at its peak either way)."""
    model, ids = _model(variant, layers=4, width=128), _ids(batch=4, tokens=64)
    compiled = torch.compile(model, fullgraph=True)

    def step():
        model.zero_grad(set_to_none=True)
        compiled(ids, labels=ids).loss.backward()

    peaks = {}
    for setting in ("off", "on"):
        monkeypatch.setattr(state_chain, "COMPILED_REBUILD", setting)
        torch._dynamo.reset()
        step()  # compiles
        peaks[setting] = step_peak_bytes(step, torch.device("cpu"))
    state_bytes = ids.numel() * 128 * 4 * 4  # one fp32 (B, T, d, dv) state
    assert peaks["off"] - peaks["on"] > 3 * state_bytes, (peaks, state_bytes)


@pytest.mark.parametrize("variant", ["ddl-cc", "ddl-tc", "ddl", "additive-cc"])
def test_the_chain_starts_only_where_every_state_is_read_on_it(variant, monkeypatch):
    """On where switched on for ddl-cc (its reads carried into the rewrites) and ddl-tc (token
    reads on the chain); never for ddl (a vector state the norm reads), additive-cc (no
    rewrites), with padding, without autograd, checkpointed or with a hook on a block — traced
    only, nothing compiled."""
    counts = _count_chained(monkeypatch)
    model, ids = _model(variant), _ids()
    torch._dynamo.explain(model)(ids, labels=ids)  # switched off: no chain
    assert not counts
    monkeypatch.setattr(state_chain, "COMPILED_REBUILD", "on")
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(ids, labels=ids)
    assert explained.graph_break_count == 0
    assert len(counts) == {"ddl-cc": 4, "ddl-tc": 9}.get(variant, 0)
    counts.clear()
    padded = torch.ones_like(ids)
    padded[0, :3] = 0  # left padding
    torch._dynamo.explain(model)(ids, attention_mask=padded, labels=ids)
    with torch.no_grad():
        torch._dynamo.explain(model)(ids)
    model.gradient_checkpointing_enable()
    torch._dynamo.explain(model)(ids, labels=ids)
    model.gradient_checkpointing_disable()
    hook = model.layers[0].register_forward_hook(lambda *args: None)
    torch._dynamo.explain(model)(ids, labels=ids)  # a hook could hand on a state of its own
    hook.remove()
    assert not counts


@pytest.mark.slow
def test_under_bf16_autocast_the_chain_is_as_close_to_eager_as_keeping_states(monkeypatch):
    """ddl-tc (reads and rewrites on the chain) under CPU bf16 autocast: the branches round, so
    compiled gradients differ from eager ones by ~1% of their norm either way (0.85% kept, 0.85%
    rebuilt, measured); a chain that handed on a wrong state would be far off."""
    grads = {}
    for way in ("eager", "chain"):
        monkeypatch.setattr(state_chain, "COMPILED_REBUILD", "on")
        torch._dynamo.reset()
        model, ids = _model("ddl-tc"), _ids()
        forward = model if way == "eager" else torch.compile(model, fullgraph=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = forward(ids, labels=ids).loss
        loss.backward()
        grads[way] = torch.cat([p.grad.flatten() for p in model.parameters()])
    error = (grads["chain"] - grads["eager"]).norm() / grads["eager"].norm()
    assert error < 0.03, error.item()
