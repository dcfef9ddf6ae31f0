"""States rebuilt in backward (`ops.state_tape`): the same gradients as keeping them, while a
training forward keeps only its last state."""

from __future__ import annotations

import contextlib
import weakref

import pytest
import torch
from model_helpers import random_ids, tiny_model

from deltalearn.ops import backend, epilogue, native, native_build, state_tape
from deltalearn.ops.epilogue import rewrite_epilogue

REWRITING = ["ddl", "ddl-cc", "ddl-tc", "write-only-cc", "ddl-cc-noec", "write-only"]


def _grads(model, ids, rebuild: str, monkeypatch) -> dict[str, torch.Tensor]:
    monkeypatch.setattr(state_tape, "REBUILD", rebuild)
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_same_grads(on: dict, off: dict, rtol: float) -> None:
    assert on.keys() == off.keys()
    for name, g in off.items():
        scale = g.abs().max().clamp_min(1e-30)
        assert ((on[name] - g).abs().max() / scale).item() < rtol, name


@pytest.mark.parametrize("impl", ["auto", "torch"])
@pytest.mark.parametrize("variant", REWRITING)
def test_rebuilt_states_give_the_kept_states_gradients(variant, impl, monkeypatch):
    monkeypatch.setattr(backend, "BACKEND", impl)
    model = tiny_model(variant).double().train()
    ids = random_ids(2, 12)
    off = _grads(model, ids, "off", monkeypatch)
    on = _grads(model, ids, "on", monkeypatch)
    _assert_same_grads(on, off, 1e-11)  # float64: round-off of the rebuild only


def test_rebuilt_states_in_fp32_and_under_bf16_autocast(monkeypatch):
    model = tiny_model("ddl-cc").train()
    ids = random_ids(2, 12)
    _assert_same_grads(
        _grads(model, ids, "on", monkeypatch), _grads(model, ids, "off", monkeypatch), 1e-4
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):
        on = _grads(model, ids, "on", monkeypatch)
        off = _grads(model, ids, "off", monkeypatch)
    _assert_same_grads(on, off, 2e-2)


def _block_outputs(model, ids, rebuild: str, monkeypatch):
    """Weak references to each block's output state after a training forward, and the loss."""
    monkeypatch.setattr(state_tape, "REBUILD", rebuild)
    refs = []
    hooks = [
        block.register_forward_hook(lambda m, a, out: refs.append(weakref.ref(out)))
        for block in model.layers
    ]
    try:
        loss = model(ids, labels=ids).loss
    finally:
        for hook in hooks:
            hook.remove()
    return refs, loss


@pytest.mark.parametrize("variant", ["ddl", "ddl-cc", "ddl-tc"])
def test_a_training_forward_keeps_only_its_last_state(variant, monkeypatch):
    model = tiny_model(variant, num_layers=3).train()
    ids = random_ids(2, 12)
    refs, loss = _block_outputs(model, ids, "off", monkeypatch)
    assert all(r() is not None for r in refs)  # kept for backward
    refs, loss = _block_outputs(model, ids, "on", monkeypatch)
    # None of the block outputs is held any more (the tape keeps a detached alias of the last one,
    # which backward rebuilds the others from).
    assert not any(r() is not None for r in refs)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_backward_twice_through_a_retained_graph(monkeypatch):
    model = tiny_model("ddl-cc").double().train()
    ids = random_ids(2, 12)
    monkeypatch.setattr(state_tape, "REBUILD", "on")
    loss = model(ids, labels=ids).loss
    first = torch.autograd.grad(loss, list(model.parameters()), retain_graph=True)
    second = torch.autograd.grad(loss, list(model.parameters()))
    for a, b in zip(first, second, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_second_order_gradients_are_refused_with_the_way_out(monkeypatch):
    model = tiny_model("ddl").double().train()
    monkeypatch.setattr(state_tape, "REBUILD", "on")
    loss = model(random_ids(1, 6), labels=random_ids(1, 6)).loss
    with pytest.raises(RuntimeError, match="DELTALEARN_REBUILD_STATES=off"):
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)


def _chain_gradients(rows: int, d: int, dv: int, rewrites: int, loss_of) -> tuple[list, list, int]:
    """Gradients of `loss_of(states)` over a chain of `rewrites` fused rewrites from a random
    float64 state (its first state with a graph of its own), with the tape recording and without;
    and the number of states the tape still held after the forward."""
    torch.manual_seed(0)
    X0 = torch.randn(rows, d, dv, dtype=torch.float64, requires_grad=True)
    params = [
        [torch.randn(rows, *s, dtype=torch.float64, requires_grad=True) for s in ((d,), (), (dv,))]
        for _ in range(rewrites)
    ]
    leaves = [X0, *sum(params, [])]
    results, kept = [], 0
    for rebuild in (True, False):
        with state_tape.recording() if rebuild else contextlib.nullcontext() as tape:
            states = [X0 * 1.0]
            if tape is not None:
                tape.add(states[0])
            for h, z, p in params:
                states.append(rewrite_epilogue(states[-1], h, z, p))
            loss = loss_of(states)
        if tape is not None:
            kept = tape.kept_count()
        results.append(torch.autograd.grad(loss, leaves))
    return *results, kept


def _assert_all_close(on, off) -> None:
    for a, b in zip(on, off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_a_chain_of_rewrites_rebuilds_each_state_and_views_of_it():
    """The tape on its own: three C-kernel rewrites, a view of the first state saved by an op."""

    def loss_of(states):
        side = states[0][..., 1].exp().sum()  # saves a view of the first state
        return (states[-1] * states[-1]).sum() + side

    on, off, kept = _chain_gradients(5, 7, 3, 3, loss_of)
    assert kept == 1  # the last state only
    _assert_all_close(on, off)


def test_a_state_that_is_a_whole_view_is_rebuilt_where_views_of_its_base_are_saved(monkeypatch):
    """The first state of an EC model is an `unflatten` of the expansion's output; an op that
    saves a view made from that output (a reshape of the state) gets a handle to the state too,
    not its memory: the gradients of keeping it."""
    torch.manual_seed(0)
    rows, d, dv = 5, 7, 3
    flat0 = torch.randn(rows, d * dv, dtype=torch.float64, requires_grad=True)
    shapes = ((d,), (), (dv,))
    h, z, p = (torch.randn(rows, *s, dtype=torch.float64, requires_grad=True) for s in shapes)
    packed, real_pack = [], state_tape.StateTape.pack
    monkeypatch.setattr(
        state_tape.StateTape,
        "pack",
        lambda tape, t: packed.append((t, real_pack(tape, t))) or packed[-1][1],
    )
    results = []
    for rebuild in (True, False):
        with state_tape.recording() if rebuild else contextlib.nullcontext() as tape:
            state = (flat0 * 1.0).unflatten(-1, (d, dv))  # a whole view of its base
            if tape is not None:
                tape.add(state)
            side = state.flatten(-2)[:, 1::3].pow(3).sum()  # saves a view whose base is not state
            loss = rewrite_epilogue(state, h, z, p).square().sum() + side
        if rebuild:
            ptr = state.untyped_storage().data_ptr()
            shared = [out for t, out in packed if t.untyped_storage().data_ptr() == ptr]
            assert shared and all(type(out) is state_tape._Handle for out in shared)
        results.append(torch.autograd.grad(loss, [flat0, h, z, p]))
    _assert_all_close(*results)


@pytest.mark.skipif(native_build.library() is None, reason="no C compiler for the CPU kernels")
def test_the_c_kernel_rewrite_links_its_state():
    X = torch.randn(3, 8, 2, dtype=torch.float64, requires_grad=True)
    h, z, p = torch.randn(3, 8), torch.randn(3), torch.randn(3, 2)
    h, z, p = h.double(), z.double(), p.double()
    with state_tape.recording() as tape:
        X1 = X * 2.0
        tape.add(X1)
        Y = native.rewrite_epilogue_native(X1, h, z, p, None, "delta", "paper", 4.0, 1e-5)
    assert tape.kept_count() == 1
    torch.testing.assert_close(tape.state(0), X1.detach(), rtol=0, atol=1e-14)
    assert tape.state(1) is not None and tape.state(1).data_ptr() == Y.data_ptr()


def test_bad_switch_value_is_named(monkeypatch):
    monkeypatch.setattr(state_tape, "REBUILD", None)
    monkeypatch.setenv("DELTALEARN_REBUILD_STATES", "yes")
    with pytest.raises(ValueError, match="DELTALEARN_REBUILD_STATES.*'yes'"):
        state_tape.rebuild_enabled()


def test_a_callers_saved_tensor_hooks_take_precedence(monkeypatch):
    """Under `save_on_cpu` (or any hooks of the caller's) the model saves through them, as before."""
    monkeypatch.setattr(state_tape, "REBUILD", "on")
    model = tiny_model("ddl-cc").train()
    ids = random_ids(2, 12)
    packed = []

    def pack(t):
        packed.append(t.shape)
        return t.detach()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(ids, labels=ids).loss
    loss.backward()
    state = (2, 12, model.config.hidden_size, model.config.value_channels)
    assert sum(s == state for s in packed) >= 2 * model.config.num_layers


def test_no_recording_where_hooks_are_refused_or_taken():
    """torch.func transforms refuse saved-tensor hooks, and a caller's hooks come first."""
    seen = []

    def f(x):
        seen.append(state_tape.can_record())
        return (x * x).sum()

    torch.func.grad(f)(torch.randn(3))
    assert seen == [False]
    assert state_tape.can_record()
    with torch.autograd.graph.save_on_cpu():
        assert not state_tape.can_record()


def test_the_tape_dies_with_the_graph(monkeypatch):
    """No reference cycle: the tape (and the last state it keeps) goes once the graph does."""
    monkeypatch.setattr(state_tape, "REBUILD", "on")
    model = tiny_model("ddl-cc").train()
    tapes = []
    hook = model.layers[0].register_forward_hook(
        lambda m, a, out: tapes.append(weakref.ref(state_tape.active()))
    )
    ids = random_ids(2, 8)
    loss = model(ids, labels=ids).loss
    hook.remove()
    assert tapes[0]() is not None  # the graph holds it
    loss.backward()
    del loss
    assert tapes[0]() is None


@pytest.mark.parametrize("value_channels", [1, 4])
def test_a_stack_of_drop_in_residuals_under_recording(value_channels):
    """The README's recipe for your own network: DeltaResidual layers inside `recording()`."""
    from deltalearn.nn import DeltaResidual, repeat_expansion

    torch.manual_seed(0)
    d = 24
    layers = torch.nn.ModuleList(
        DeltaResidual(d, torch.nn.Linear(d, d), value_channels, record_gates=False)
        for _ in range(4)
    ).double()
    x = torch.randn(5, 7, d, dtype=torch.float64)

    def run(rebuild: bool):
        refs = []
        with state_tape.recording() if rebuild else contextlib.nullcontext():
            X = x if value_channels == 1 else repeat_expansion(x, value_channels)
            for layer in layers:
                X = layer(X)
                refs.append(weakref.ref(X))
        loss = (X * X).sum()
        del X
        alive = [r() is not None for r in refs]
        layers.zero_grad(set_to_none=True)
        loss.backward()
        return alive, [p.grad.clone() for p in layers.parameters()]

    alive_off, grads_off = run(False)
    alive_on, grads_on = run(True)
    assert all(alive_off) and not any(alive_on[:-1])  # the last one: the loss keeps it
    for a, b in zip(grads_on, grads_off, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-13)


@pytest.mark.skipif(native_build.library() is None, reason="no C compiler for the CPU kernels")
@pytest.mark.parametrize("variant", ["ddl-cc", "ddl"])
@pytest.mark.parametrize("in_backward", [True, False], ids=["in-backward", "own-pass"])
def test_rebuilt_states_reuse_the_buffers_of_those_done_with(monkeypatch, in_backward, variant):
    """Down a 3-block model, each state after the first two rebuilt ones goes into the buffer of
    one already read by all its consumers (a fresh buffer costs page faults on a CPU) — whether
    the update's backward kernel rebuilds it (the default; a vector state too, which the official
    value head reads as u) or a pass of its own does (the projections apart:
    `DELTALEARN_UPDATE_KERNEL=off`)."""
    monkeypatch.setattr(state_tape, "REBUILD", "on")
    monkeypatch.setattr(epilogue, "UPDATE_KERNEL", "on" if in_backward else "off")
    own_pass, buffers = [], []
    real_pass, real_rebuilt = native.rebuild_state, state_tape.StateTape.rebuilt

    def spy_pass(*args, out=None):
        own_pass.append(out is not None)
        return real_pass(*args, out=out)

    def spy_rebuilt(tape, index, X):
        buffers.append(X.data_ptr())
        return real_rebuilt(tape, index, X)

    monkeypatch.setattr(native, "rebuild_state", spy_pass)
    monkeypatch.setattr(state_tape.StateTape, "rebuilt", spy_rebuilt)
    model = tiny_model(variant, num_layers=3).train()
    ids = random_ids(2, 8)
    model(ids, labels=ids).loss.backward()
    assert len(buffers) == 6 and all(ptr in buffers[:i] for i, ptr in enumerate(buffers) if i > 1)
    assert len(set(buffers[:2])) == 2
    if in_backward:
        assert own_pass == []  # every state rebuilt by the backward kernel that read it
    else:
        assert own_pass == [False, False, True, True, True, True]


def test_a_node_holding_two_states_apart_keeps_its_numbers():
    """An op that saved states two rewrites apart (X_i and X_{i+2}) unpacks the upper one first,
    then the lower one, whose rebuild drops the upper one: its buffer, still held by the node, must
    not take the next rebuilt state."""

    def loss_of(states):
        # each order of saving (and unpacking) the two
        apart = (states[3] * states[1]).sum() + (states[1] * states[3]).exp().sum()
        return apart + (states[-1] * states[-1]).sum()

    on, off, _ = _chain_gradients(6, 8, 2, 4, loss_of)
    _assert_all_close(on, off)


def test_code_that_reads_no_state_runs_without_the_hooks():
    """`outside`: a branch, or the norm of a compressed x_in, saves its tensors as autograd always
    does (no Python hook per saved tensor); code given a state keeps the hooks; hooks come back
    after an error; a caller's own hooks on top are left alone."""
    seen = []

    def saves(x):
        seen.append(torch._C._autograd._top_saved_tensors_default_hooks(False))
        return (x * x).sum()

    X = torch.randn(3, 8, requires_grad=True)
    with state_tape.recording() as tape:
        state = X * 2
        tape.add(state)
        other = X + 1
        state_tape.outside(saves, other)
        state_tape.outside(saves, state)
        state_tape.outside(saves, state[:, :4])  # a view of a state is one too
        with pytest.raises(ZeroDivisionError):
            state_tape.outside(lambda x: 1 / 0, other)
        assert torch._C._autograd._top_saved_tensors_default_hooks(False)[0] == tape.pack
        with torch.autograd.graph.save_on_cpu():
            state_tape.outside(saves, other)
    assert seen[0] is None
    assert seen[1][0] == tape.pack and seen[2][0] == tape.pack
    assert seen[3] is not None and seen[3][0] != tape.pack
    assert state_tape.outside(saves, other) is not None  # no tape: a plain call
    assert torch._C._autograd._top_saved_tensors_default_hooks(False) is None


def test_weights_and_tensors_without_history_are_saved_as_they_are():
    """The pack hook hands back what has no graph (a weight, a kernel's row scalars) itself, a
    detached alias of what has one, a handle for a state."""
    w = torch.nn.Parameter(torch.randn(4))
    x = torch.randn(4, requires_grad=True)
    with state_tape.recording() as tape:
        y = x * 3
        tape.add(y)
        assert tape.pack(w) is w
        plain = torch.randn(4)
        assert tape.pack(plain) is plain
        alias = tape.pack(x * 2)
        assert alias.grad_fn is None and not alias.requires_grad
        assert type(tape.pack(y)).__name__ == "_Handle"
