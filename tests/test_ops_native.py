"""The CPU kernels (`ops/native.py`, `ops/native_kernels.c`) against the plain compositions: the
rewrite epilogue (with and without the fused channel read) and the compressor reads, values and
every input gradient, float64 gradcheck, odd widths, every dv, strided inputs, a decoding history,
several threads; which path a CPU user gets by default; and the build (cache, a missing compiler).

Tolerances: fp32 2e-5 relative to the largest value (the same sums in another order: the kernels'
row reductions are vectorised); float64 1e-12. Without a C compiler the kernels cannot exist and
these tests skip; with one, a failed build fails them.
"""

from __future__ import annotations

import pytest
import torch
from kernel_helpers import assert_warns_once, record_kernel_calls
from model_helpers import random_ids, tiny_model

from deltalearn.nn import DeltaUpdate
from deltalearn.nn.state import causal_conv
from deltalearn.ops import _shapes as shapes
from deltalearn.ops import (
    backend,
    channel_mix,
    channel_mix_reference,
    extension,
    native,
    native_build,
    rewrite_epilogue,
    rewrite_epilogue_reference,
    state_tape,
    token_mix,
    token_mix_reference,
)

if native_build.compiler() is None:
    pytest.skip("no C compiler: the CPU kernels cannot be built here", allow_module_level=True)

RULES = ["delta", "write_only"]
HEADS = ["paper", "official"]


@pytest.fixture
def kernel_calls(monkeypatch):
    """Force the kernels (an error if they cannot be built) and record each kernel call's name."""
    monkeypatch.setattr(backend, "BACKEND", "native")
    calls = []
    record_kernel_calls(monkeypatch, calls)
    return calls


def _close(actual, expected, dtype):
    tol = 2e-5 if dtype == torch.float32 else 1e-12
    scale = expected.abs().max().item() + 1e-30
    err = (actual - expected).abs().max().item()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert err <= tol * scale, f"max error {err:.3g} vs scale {scale:.3g}"


def _outputs_and_grads(fn, leaves, seed=3):
    leaves = [t.detach().requires_grad_() for t in leaves]
    out = fn(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(seed)
    ups = [torch.randn(o.shape, generator=gen, dtype=o.dtype) for o in outs]
    return outs, torch.autograd.grad(outs, leaves, ups)


def _epilogue_leaves(lead, d, dv, dtype, vector=False):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(*lead, d, *(() if vector else (dv,)), generator=gen, dtype=dtype)
    h = 3 * torch.randn(*lead, d, generator=gen, dtype=dtype)
    z = 2 * torch.randn(*lead, generator=gen, dtype=dtype)
    p = torch.randn(*lead, *(() if vector else (dv,)), generator=gen, dtype=dtype)
    C = torch.randn(d, dv, generator=gen, dtype=dtype)
    return X, h, z, p, C


def _assert_epilogue_matches(leaves, compress, dtype, **options):
    def run(op):
        def fn(X, h, z, p, *C):
            return op(X, h, z, p, compress=C[0] if C else None, **options)

        return fn

    used = list(leaves) if compress else list(leaves[:4])
    outs, grads = _outputs_and_grads(run(rewrite_epilogue), used)
    ref_outs, ref_grads = _outputs_and_grads(run(rewrite_epilogue_reference), used)
    for actual, expected in zip(outs + grads, ref_outs + ref_grads, strict=True):
        _close(actual, expected, dtype)


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("value_head", HEADS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dv", [1, 2, 3, 4, 8])
@pytest.mark.parametrize("d", [96, 200])
def test_epilogue_matches_the_reference(kernel_calls, d, dv, rule, value_head, compress):
    leaves = _epilogue_leaves((3, 5), d, dv, torch.float32)
    options = dict(rule=rule, value_head=value_head, value_scale=3.0)
    _assert_epilogue_matches(leaves, compress, torch.float32, **options)
    assert kernel_calls == ["epilogue_forward", "epilogue_backward"]


@pytest.mark.parametrize("rule", RULES)
def test_epilogue_on_a_vector_state_and_in_float64(kernel_calls, rule):
    leaves = _epilogue_leaves((4, 3), 37, 1, torch.float32, vector=True)
    _assert_epilogue_matches(leaves, False, torch.float32, rule=rule, value_head="official")
    leaves64 = _epilogue_leaves((2, 3), 37, 4, torch.float64)
    _assert_epilogue_matches(leaves64, True, torch.float64, rule=rule)
    assert kernel_calls.count("epilogue_backward") == 2


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("value_head", HEADS)
@pytest.mark.parametrize("rule", RULES)
def test_epilogue_float64_gradcheck(kernel_calls, rule, value_head, compress):
    X, h, z, p, C = _epilogue_leaves((2, 3), 7, 3, torch.float64)
    leaves = [t.requires_grad_() for t in (X, h, z, p, C)]

    def fn(X, h, z, p, C):
        return rewrite_epilogue(
            X, h, z, p, rule=rule, value_head=value_head, compress=C if compress else None
        )

    assert torch.autograd.gradcheck(fn, leaves)
    assert "epilogue_backward" in kernel_calls


def test_epilogue_strided_inputs_and_one_gradient(kernel_calls):
    X, h, z, p, _ = _epilogue_leaves((6, 5), 40, 4, torch.float32)
    Xt, ht = X.transpose(0, 1), h.transpose(0, 1)  # (5, 6, ...) views, not contiguous
    zt, pt = z.t(), p.transpose(0, 1)
    h_only = ht.detach().requires_grad_()
    Y = rewrite_epilogue(Xt, h_only, zt, pt)
    (g,) = torch.autograd.grad(Y.square().sum(), h_only)
    h_ref = ht.detach().requires_grad_()
    Y_ref = rewrite_epilogue_reference(Xt, h_ref, zt, pt)
    (g_ref,) = torch.autograd.grad(Y_ref.square().sum(), h_ref)
    _close(Y, Y_ref, torch.float32)
    _close(g, g_ref, torch.float32)


def test_epilogue_without_autograd_equals_with_it(kernel_calls):
    X, h, z, p, C = _epilogue_leaves((8,), 64, 4, torch.float32)
    with torch.no_grad():
        Y, x_next = rewrite_epilogue(X, h, z, p, compress=C)
    Y2, x2 = rewrite_epilogue(X, h.requires_grad_(), z, p, compress=C)
    assert torch.equal(Y, Y2) and torch.equal(x_next, x2)
    assert not Y.requires_grad and Y2.requires_grad


@pytest.mark.parametrize("dv", [1, 4, 5])
@pytest.mark.parametrize(
    ("past", "new", "K"), [(0, 9, 4), (3, 2, 4), (0, 2, 4), (5, 1, 3), (0, 6, 1)]
)
def test_token_read_matches_the_reference(kernel_calls, past, new, K, dv):
    gen = torch.Generator().manual_seed(1)
    xs = torch.randn(2, past + new, 23, dv, generator=gen)
    W = torch.randn(23, dv, K, generator=gen)
    outs, grads = _outputs_and_grads(lambda a, b: token_mix(a, b, past), [xs, W])
    ref, ref_grads = _outputs_and_grads(lambda a, b: token_mix_reference(a, b, past), [xs, W])
    for actual, expected in zip(outs + grads, ref + ref_grads, strict=True):
        _close(actual, expected, torch.float32)
    assert kernel_calls == ["read_forward", "read_backward"]


@pytest.mark.parametrize("d", [96, 200])
@pytest.mark.parametrize("dv", [2, 4, 8])
def test_channel_read_matches_the_reference(kernel_calls, d, dv):
    gen = torch.Generator().manual_seed(2)
    X = torch.randn(3, 7, d, dv, generator=gen)[:, ::2]  # strided rows
    C = torch.randn(d, dv, generator=gen)
    outs, grads = _outputs_and_grads(channel_mix, [X, C])
    ref, ref_grads = _outputs_and_grads(channel_mix_reference, [X, C])
    for actual, expected in zip(outs + grads, ref + ref_grads, strict=True):
        _close(actual, expected, torch.float32)
    assert kernel_calls == ["read_forward", "read_backward"]


def test_reads_float64_gradcheck(kernel_calls):
    gen = torch.Generator().manual_seed(4)
    xs = torch.randn(2, 5, 6, 3, generator=gen, dtype=torch.float64).requires_grad_()
    W = torch.randn(6, 3, 4, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(lambda a, b: token_mix(a, b, 2), [xs, W])
    C = torch.randn(6, 3, generator=gen, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(channel_mix, [xs, C])
    assert kernel_calls.count("read_backward") >= 2


def _expansion(x, weight, history, backend_choice, monkeypatch):
    monkeypatch.setattr(backend, "BACKEND", backend_choice)
    leaves = [t.detach().requires_grad_() for t in (x, weight, history)]
    y, _ = causal_conv(*leaves)
    gen = torch.Generator().manual_seed(5)
    return (y, *torch.autograd.grad(y, leaves, torch.randn(y.shape, generator=gen)))


@pytest.mark.parametrize("dv", [1, 4, 5])
def test_embedding_expansion_equals_the_grouped_conv(kernel_calls, monkeypatch, dv):
    """EC's causal conv from d features to d·dv channels: values, ∂x, ∂weight and ∂history."""
    gen = torch.Generator().manual_seed(6)
    x, history = torch.randn(2, 9, 23, generator=gen), torch.randn(2, 3, 23, generator=gen)
    weight = torch.randn(23 * dv, 1, 4, generator=gen)
    monkeypatch.setattr(shapes, "SMALL_STATE", 0)  # not the few-token form
    ours = _expansion(x, weight, history, "native", monkeypatch)
    conv = _expansion(x, weight, history, "torch", monkeypatch)
    for actual, expected in zip(ours, conv, strict=True):
        _close(actual, expected, torch.float32)
    assert kernel_calls == ["expand_forward", "expand_backward"]


def test_embedding_expansion_float64_gradcheck(kernel_calls, monkeypatch):
    monkeypatch.setattr(shapes, "SMALL_STATE", 0)
    gen = torch.Generator().manual_seed(7)
    leaves = [
        torch.randn(*shape, generator=gen, dtype=torch.float64).requires_grad_()
        for shape in ((2, 5, 3), (3 * 2, 1, 3), (2, 2, 3))
    ]
    assert torch.autograd.gradcheck(lambda *a: causal_conv(*a)[0], leaves)
    assert "expand_backward" in kernel_calls


def test_several_threads_give_the_one_thread_result(kernel_calls):
    """Rows split over threads, weight gradients summed per thread then in thread order (the
    epilogue's ∂C, a read's taps, an update's projection weights)."""
    X, h, z, p, C = _epilogue_leaves((64, 32), 96, 4, torch.float32)  # above PARALLEL_MIN
    W = torch.randn(96, 4, 4)
    update, operands = _update_and_operands(96, 4, "delta", "official")
    operands[:4] = [t.repeat(14, 7, *([1] * (t.dim() - 2))) for t in operands[:4]]
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            outs, grads = _outputs_and_grads(
                lambda X, h, z, p, C: rewrite_epilogue(X, h, z, p, compress=C), [X, h, z, p, C]
            )
            read, read_grads = _outputs_and_grads(lambda a, b: token_mix(a, b), [X, W])
            update_grads = _update_outputs_and_grads(update, operands, compress=True)
            results.append(outs + grads + read + read_grads + sum(update_grads, ()))
    finally:
        torch.set_num_threads(threads)
    for one, two in zip(*results, strict=True):
        _close(two, one, torch.float32)


@pytest.mark.parametrize("value_head", HEADS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("dv", "compress"), [(1, False), (4, False), (4, True)])
def test_inference_update_is_one_kernel_equal_to_the_general_path(
    kernel_calls, monkeypatch, dv, rule, value_head, compress
):
    """Under no_grad a DeltaUpdate (gate and value projections, rewrite, read) is one kernel call
    with the numbers of the general path (`gate_and_value`, then the PyTorch epilogue). Here the
    prepared ctypes call (the C++ extension's fallback, tests/test_ops_extension.py)."""
    monkeypatch.setattr(extension, "loaded", lambda: None)
    update = DeltaUpdate(40, dv, rule=rule, value_head=value_head)
    with torch.no_grad():
        for param in update.parameters():
            param.normal_()
    gen = torch.Generator().manual_seed(8)
    X = torch.randn(3, 5, 40, *((dv,) if dv > 1 else ()), generator=gen)
    h, c, u = (torch.randn(3, 5, 40, generator=gen) for _ in range(3))
    args = (X, h, c, u) + ((torch.randn(40, dv, generator=gen),) if compress else ())
    with torch.no_grad():
        fast = update(*args)
        assert kernel_calls == ["update_forward_packed"]
        monkeypatch.setattr(backend, "BACKEND", "torch")
        general = update(*args)
    for actual, expected in zip(
        fast if compress else (fast,), general if compress else (general,), strict=True
    ):
        _close(actual, expected, torch.float32)


def _update_and_operands(d, dv, rule, value_head, dtype=torch.float32, gate="linear"):
    update = DeltaUpdate(d, dv, rule=rule, value_head=value_head, gate=gate).to(dtype)
    update.record = False
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():  # weights of the scale of nn.Linear's: gates neither 0 nor 2
        for param in update.parameters():
            param.copy_(torch.randn(param.shape, generator=gen, dtype=dtype) / d**0.5)
    X = torch.randn(3, 5, d, *((dv,) if dv > 1 else ()), generator=gen, dtype=dtype)
    h, c, u = (torch.randn(3, 5, d, generator=gen, dtype=dtype) for _ in range(3))
    C = torch.randn(d, dv, generator=gen, dtype=dtype)
    return update, [X, h, c, u, C]


def _update_outputs_and_grads(update, operands, compress):
    """Outputs of `update` on `operands` (with the compressor read if `compress`) and the
    gradients of a fixed random loss with respect to each operand and each parameter."""
    leaves = [t.detach().requires_grad_() for t in operands[: 5 if compress else 4]]
    out = update(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(3)  # the same numbers in fp32 and float64
    ups = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    # u: unread by the paper head (its gradient zeros, as with any unused input)
    grads = torch.autograd.grad(
        outs, [*leaves, *update.parameters()], ups, allow_unused=True, materialize_grads=True
    )
    return outs, grads


@pytest.mark.parametrize("value_head", HEADS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(
    ("d", "dv", "compress"),
    [(96, 1, False), (200, 2, True), (96, 3, True), (200, 4, False), (96, 4, True), (40, 8, True)],
)
def test_training_update_is_one_kernel_each_way_equal_to_the_general_path(
    kernel_calls, monkeypatch, d, dv, compress, rule, value_head
):
    """With autograd a DeltaUpdate on CPU (gate and value projections, rewrite, read) is one
    kernel call each way, with the values and every gradient — state, branch output, both
    projections' inputs, every weight, the compressor — of the general path (`gate_and_value`,
    then the PyTorch epilogue Function) run in float64 (the fp32 general path is the further
    of the two from it: its weight gradients sum in fp32, the kernel's in double)."""
    update, operands = _update_and_operands(d, dv, rule, value_head)
    outs, grads = _update_outputs_and_grads(update, operands, compress)
    assert kernel_calls == ["update_forward_saved", "update_backward"]
    monkeypatch.setattr(backend, "BACKEND", "torch")
    update.double()
    ref_outs, ref_grads = _update_outputs_and_grads(
        update, [t.double() for t in operands], compress
    )
    for actual, expected in zip(outs + grads, ref_outs + ref_grads, strict=True):
        _close(actual.double(), expected, torch.float32)


@pytest.mark.parametrize("value_head", HEADS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("dv", "compress"), [(1, False), (3, True)])
def test_training_update_float64_gradcheck(kernel_calls, dv, compress, rule, value_head):
    update, operands = _update_and_operands(7, dv, rule, value_head, torch.float64)
    gate, value = update.gate.out, update.value.proj
    weights = [gate.weight, gate.bias, value.weight] + (
        [value.bias] if value.bias is not None else []
    )
    leaves = [t.detach().requires_grad_() for t in operands + weights]

    def fn(X, h, c, u, C, w_g, b_g, W_v, b_v=None):
        C = C if compress else None
        return native.update_native(X, h, c, u, w_g, b_g, W_v, b_v, C, rule, value_head, 3.0, 1e-5)

    assert torch.autograd.gradcheck(fn, leaves)
    assert "update_backward" in kernel_calls


@pytest.mark.parametrize(("dv", "compress"), [(1, False), (4, True), (3, False)])
def test_training_update_rebuilds_the_state_it_consumed_in_its_backward(
    kernel_calls, monkeypatch, dv, compress
):
    """Under a state tape, the delta update's backward kernel forms the state X it consumed from
    its output Y as it reads Y (no rebuild pass: `update_backward` only) and hands it to the tape:
    the state the rebuild pass would give, and the gradients of the update with X kept."""
    update, operands = _update_and_operands(40, dv, "delta", "official")
    leaves = [t.detach().requires_grad_() for t in operands[: 5 if compress else 4]]
    rebuilt = []
    real = state_tape.StateTape.rebuilt

    def spy(tape, index, X):
        rebuilt.append((X, tape._slots[index].link))
        return real(tape, index, X)

    monkeypatch.setattr(state_tape.StateTape, "rebuilt", spy)
    packed, real_pack = [], state_tape.StateTape.pack
    monkeypatch.setattr(
        state_tape.StateTape, "pack", lambda tape, t: packed.append(t) or real_pack(tape, t)
    )
    with state_tape.recording() as tape:
        X = leaves[0] * 1.0  # a state with a graph, as between sublayers
        tape.add(X)
        packed.clear()
        out = update(X, *leaves[1:])
    # Nothing the update saves is a state without the compressor read: no tensor goes through the
    # tape's hooks; with it, Y (a state) is saved for ∂C and must.
    assert bool(packed) == compress
    outs = out if isinstance(out, tuple) else (out,)
    ups = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, ups)
    assert kernel_calls == ["update_forward_saved", "update_backward"]
    ((X_rebuilt, (_, h, rho, beta, e)),) = rebuilt
    Y = outs[0].detach()
    torch.testing.assert_close(X_rebuilt, native.rebuild_state(Y, h, rho, beta, e))
    torch.testing.assert_close(X_rebuilt, X.detach(), rtol=1e-5, atol=1e-5)
    kept = torch.autograd.grad(update(*leaves), leaves, ups)  # no tape: X kept
    for a, b in zip(grads, kept, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_training_update_whose_value_head_reads_the_state(kernel_calls, monkeypatch):
    """The official head of a vector state reads u = X (a DeltaLM with d_v = 1): the delta backward
    reads u from the X it reads or rebuilds and adds u's gradient to X's — float64 gradcheck, the
    general path's gradients, and under a state tape no rebuild pass (`update_backward` only)."""
    update, (X, h, c, _, _) = _update_and_operands(7, 1, "delta", "official", torch.float64)
    gate, value = update.gate.out, update.value.proj
    leaves = [t.detach().requires_grad_() for t in (X, h, c, gate.weight, gate.bias, value.weight)]

    def fn(X, h, c, w_g, b_g, W_v):
        return native.update_native(X, h, c, X, w_g, b_g, W_v, value.bias, None, "delta",
                                    "official", 3.0, 1e-5)  # fmt: skip

    assert torch.autograd.gradcheck(fn, leaves)
    assert "update_backward" in kernel_calls
    update, (X, h, c, _, _) = _update_and_operands(40, 1, "delta", "official")
    state, h, c = (t.requires_grad_() for t in (X, h, c))
    ups = torch.randn(state.shape)
    kernel_calls.clear()
    with state_tape.recording() as tape:
        X = state * 1.0  # a state with a graph, as between sublayers
        tape.add(X)
        grads = torch.autograd.grad(update(X, h, c, X), [state, h, c, *update.parameters()], ups)
    assert kernel_calls == ["update_forward_saved", "update_backward"]
    monkeypatch.setattr(backend, "BACKEND", "torch")
    expected = torch.autograd.grad(
        update(state, h, c, state), [state, h, c, *update.parameters()], ups
    )
    for actual, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(actual, want, rtol=1e-4, atol=1e-5)


def test_update_kernel_switch(kernel_calls, monkeypatch):
    """DELTALEARN_UPDATE_KERNEL=off: the projections in PyTorch, then the epilogue's kernel, with
    the same numbers; inference stays one call; a bad value names the variable."""
    update, operands = _update_and_operands(48, 4, "delta", "official")
    on = _update_outputs_and_grads(update, operands, compress=True)
    monkeypatch.setenv("DELTALEARN_UPDATE_KERNEL", "off")
    off = _update_outputs_and_grads(update, operands, compress=True)
    assert kernel_calls == ["update_forward_saved", "update_backward"] + [
        "epilogue_forward",
        "epilogue_backward",
    ]
    for a, b in zip(on[0] + on[1], off[0] + off[1], strict=True):
        _close(a, b, torch.float32)
    monkeypatch.setattr(extension, "loaded", lambda: None)
    with torch.no_grad():
        update(*operands)
    assert kernel_calls[-1] == "update_forward_packed"
    monkeypatch.setenv("DELTALEARN_UPDATE_KERNEL", "maybe")
    with pytest.raises(ValueError, match="DELTALEARN_UPDATE_KERNEL.*'maybe'"):
        update(*(t.requires_grad_() for t in operands[:4]))


def test_the_update_kernels_record_gates_and_leave_mlp_gates_and_autocast(
    kernel_calls, monkeypatch
):
    """A gate record changes nothing in the graph (activation checkpointing recomputes a forward
    without the record: it must save the same tensors) and records what the general path does;
    an MLP gate has no kernel and autocast runs in bf16: both take the PyTorch projections."""
    update, (X, h, c, u, _) = _update_and_operands(32, 4, "delta", "paper")
    update.record = True
    update(X, h, c, u.requires_grad_()).sum().backward()
    assert kernel_calls == ["update_forward_saved", "update_backward"]
    record = update.last_record
    monkeypatch.setattr(backend, "BACKEND", "torch")
    update(X, h, c, u)
    for field in ("beta", "readout", "target", "discrepancy"):
        _close(getattr(record, field), getattr(update.last_record, field), torch.float32)
    monkeypatch.setattr(backend, "BACKEND", "native")
    kernel_calls.clear()
    mlp, _ = _update_and_operands(32, 4, "delta", "paper", gate="mlp")
    mlp(X, h, c, u).sum().backward()
    assert kernel_calls == ["epilogue_forward", "epilogue_backward"]
    update.record = False
    with torch.autocast("cpu", dtype=torch.bfloat16):
        update(X, h, c, u).float().sum().backward()
    assert "update_forward_saved" not in kernel_calls


@pytest.mark.parametrize("variant", ["ddl", "ddl-cc", "ddl-tc"])
def test_whole_model_inference_and_decoding_equal_the_pytorch_path(monkeypatch, variant):
    ids = random_ids(2, 12)
    model = tiny_model(variant)

    def logits_and_tokens(choice):
        monkeypatch.setattr(backend, "BACKEND", choice)
        with torch.no_grad():
            logits = model(ids).logits
        tokens = model.generate(ids[:1], max_new_tokens=6, do_sample=False)
        return logits, tokens

    logits, tokens = logits_and_tokens("native")
    logits_ref, tokens_ref = logits_and_tokens("torch")
    torch.testing.assert_close(logits, logits_ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(tokens, tokens_ref)


def test_cpu_fp32_takes_the_kernels_by_default(monkeypatch):
    """The default ("auto") path of a CPU user: fp32 and float64 run the kernels, bf16 the
    PyTorch Functions; DELTALEARN_EPILOGUE=torch switches them off."""
    monkeypatch.setattr(backend, "BACKEND", None)
    monkeypatch.delenv("DELTALEARN_EPILOGUE", raising=False)
    X, h, z, p, C = _epilogue_leaves((4,), 32, 4, torch.float32)
    assert backend.use_native([X, h, z, p, C])
    assert backend.use_native([X.double(), h.double()])
    assert not backend.use_native([X.bfloat16(), h.bfloat16()])
    assert not backend.use_native([X, h.bfloat16()])  # mixed dtypes: the PyTorch Function
    assert not backend.use_native([X.to("meta"), h.to("meta")])
    monkeypatch.setenv("DELTALEARN_EPILOGUE", "torch")
    assert not backend.use_native([X, h, z, p, C])


def test_a_value_axis_longer_than_the_kernels_take_uses_the_pytorch_path(kernel_calls):
    dv = native.MAX_VALUE_CHANNELS + 1
    X, h, z, p, C = _epilogue_leaves((2,), 8, dv, torch.float32)
    _assert_epilogue_matches((X, h, z, p, C), True, torch.float32)
    assert kernel_calls == []


@pytest.mark.parametrize("variant", ["ddl", "ddl-cc", "ddl-tc", "write-only-cc"])
def test_whole_models_equal_the_pytorch_path(monkeypatch, variant):
    """Loss and every parameter gradient of a DeltaLM with the kernels = with the PyTorch Functions."""
    ids = random_ids(2, 12)

    def loss_and_grads(choice):
        monkeypatch.setattr(backend, "BACKEND", choice)
        model = tiny_model(variant).train()
        loss = model(ids, labels=ids).loss
        loss.backward()
        return loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    loss, grads = loss_and_grads("native")
    loss_ref, grads_ref = loss_and_grads("torch")
    torch.testing.assert_close(loss, loss_ref, rtol=1e-5, atol=1e-6)
    assert grads.keys() == grads_ref.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_library_is_built_once_into_the_cache(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTALEARN_CACHE", str(tmp_path))
    native_build.load_library()
    (built,) = list((tmp_path / "native").glob(f"*/{native_build.LIBRARY_NAME}"))
    stamp = built.stat().st_mtime_ns
    native_build.load_library()  # found in the cache: not built again
    assert built.stat().st_mtime_ns == stamp
    assert [p.name for p in built.parent.iterdir()] == [native_build.LIBRARY_NAME]  # no temp left


def test_no_compiler_falls_back_with_one_warning_or_fails_when_forced(monkeypatch, tmp_path):
    monkeypatch.setenv("DELTALEARN_CACHE", str(tmp_path))
    monkeypatch.setattr(native_build, "compiler", lambda: None)
    native_build._loaded.cache_clear()
    native_build.library.cache_clear()
    try:
        assert_warns_once(native_build.library, "no C compiler")
        X = torch.randn(3, 8, 2)
        monkeypatch.setattr(backend, "BACKEND", "auto")
        assert not backend.use_native([X])
        torch.testing.assert_close(channel_mix(X, torch.ones(8, 2)), X.sum(-1))
        monkeypatch.setattr(backend, "BACKEND", "native")
        with pytest.raises(native_build.NativeBuildError, match="no C compiler"):
            backend.use_native([X])
    finally:
        native_build._loaded.cache_clear()
        native_build.library.cache_clear()


@pytest.mark.parametrize(
    ("builder", "find_compiler", "source"),
    [
        (native_build, native_build.compiler, "bad.c"),
        (extension, extension.cxx_compiler, "bad.cpp"),
    ],
)
def test_a_compiler_error_is_reported_with_its_message(
    monkeypatch, tmp_path, builder, find_compiler, source
):
    """The C kernels' build and the C++ extension's: the failing command named, nothing written."""
    compiler = find_compiler()
    if compiler is None:
        pytest.skip("no compiler for this source")
    bad = tmp_path / source
    bad.write_text("this is not C\n")
    monkeypatch.setattr(builder, "SOURCE", bad)
    with pytest.raises(native_build.NativeBuildError, match=f"{source} .*failed"):
        builder.build(compiler, tmp_path / "out" / "lib.so")
    assert not (tmp_path / "out" / "lib.so").exists()
