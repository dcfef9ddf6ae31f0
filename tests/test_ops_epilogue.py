"""The fused rewrite epilogue: the Triton kernels (run by Triton's interpreter on CPU tensors) and the
PyTorch fallback against the plain composition `rewrite_epilogue_reference`.

The kernel tests (those using the `interpreted` fixture) run under Triton's interpreter in a
subprocess: `tests/triton_interpreter.py` says why.

Tolerances (scale-aware: `atol` is relative to the largest magnitude of the expected tensor, because
the elements near zero come out of cancelling fp32 sums whose rounding scales with that magnitude):
* fp32: rtol = atol = 1e-5. Both sides compute the same fp32 expressions with sums in a different
  order; the longest sums here (d·dv ≤ 1600 terms) carry errors of a few 1e-7 relative to their
  terms. The d = 8192 case sums 32768 terms for ∂z and gets 1e-4.
* bf16: inputs are bf16 on both sides, both compute in fp32 and round once to bf16, so results
  differ by at most one rounding step: rtol = 2 ulps (2⁻⁶), atol = one ulp of the largest magnitude
  (2⁻⁷·max|expected|). The same bf16 tolerance applies to every result of the compressor path on a
  bf16 state, fp32 ones included: x_next is read off the bf16-rounded Y, and the reference's
  autograd rounds ∂L/∂Y = G + g_next ⊗ C to bf16 where the kernel keeps it in fp32.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

pytest.importorskip("triton")

from triton_interpreter import (  # noqa: E402
    IN_INTERPRETER,
    require_interpreter,
    run_kernel_tests_in_child,
    skip_in_child_unless_interpreted,
)

from deltalearn.nn import DeltaUpdate  # noqa: E402
from deltalearn.nn.generators import GateHead, ValueHead, direction  # noqa: E402
from deltalearn.ops import backend, delta_rewrite, no_graph, write_only  # noqa: E402
from deltalearn.ops import epilogue as ep  # noqa: E402
from deltalearn.ops import triton_epilogue as te  # noqa: E402

BF16_ULP = 2.0**-7


@pytest.fixture
def interpreted(monkeypatch):
    """Route `rewrite_epilogue` to the Triton kernels, run by the interpreter on CPU tensors."""
    require_interpreter()
    monkeypatch.setattr(backend, "BACKEND", "triton")


@pytest.fixture(autouse=True)
def _child_runs_kernel_tests_only(request):
    skip_in_child_unless_interpreted(request)


def test_kernels_under_the_interpreter():
    run_kernel_tests_in_child(__file__, min_passed=70)


def _close(actual, expected, tol=1e-5, coarse=False):
    """Tolerance by the expected tensor's dtype (module docstring); `coarse`: bf16's whatever the
    dtype (results that pass through a bf16 rounding on one side only)."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    scale = expected.detach().abs().max().item() if expected.numel() else 0.0
    if coarse or expected.dtype == torch.bfloat16:
        rtol, atol = 2 * BF16_ULP, BF16_ULP * scale
    else:
        rtol, atol = tol, tol * scale
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=atol)


def _inputs(lead, d, dv, dtype=torch.float32, matrix=None, compress=False):
    """Leaves X, h, z, p (and C): a vector state for dv = 1 unless `matrix`."""
    matrix = dv > 1 if matrix is None else matrix
    X = torch.randn(*lead, d, dv) if matrix else torch.randn(*lead, d)
    h = torch.randn(*lead, d) * 3  # an unnormalised proposal, norm far from 1
    z = torch.randn(*lead) * 2  # fp32 gate logits, as GateHead.logits gives them
    p = torch.randn(*lead, dv) if matrix else torch.randn(*lead)
    leaves = [X.to(dtype), h.to(dtype), z, p.to(dtype)]
    if compress:
        leaves.append(torch.randn(d, dv) / dv)  # fp32 mixing matrix
    return [t.requires_grad_() for t in leaves]


def _run(fn, leaves, rule, value_head, ups=None):
    """Outputs and gradients of all leaves for upstream gradients `ups` (random when None)."""
    C = leaves[4] if len(leaves) == 5 else None
    out = fn(*leaves[:4], rule=rule, value_head=value_head, compress=C)
    outs = out if isinstance(out, tuple) else (out,)
    if ups is None:
        ups = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, leaves, ups)
    return outs, grads, ups


def _check_against_reference(leaves, rule, value_head, tol=1e-5):
    outs, grads, ups = _run(ep.rewrite_epilogue, leaves, rule, value_head)
    ref_outs, ref_grads, _ = _run(ep.rewrite_epilogue_reference, leaves, rule, value_head, ups)
    # With a bf16 state, x_next is read off Y after its rounding to bf16, and the reference
    # rounds ∂L/∂Y = G + g_next ⊗ C to bf16 where the kernel keeps it in fp32: every result of
    # the compressor path is then one bf16 step apart at most.
    coarse = leaves[0].dtype == torch.bfloat16 and len(leaves) == 5
    for a, b in zip(outs, ref_outs, strict=True):
        _close(a, b, tol, coarse)
    for leaf, a, b in zip(leaves, grads, ref_grads, strict=True):
        assert a.shape == leaf.shape and a.dtype == leaf.dtype
        _close(a, b, tol, coarse)


RULES = ["delta", "write_only"]
HEADS = ["paper", "official"]


def _rows_in_tiles(monkeypatch, tile):
    """Rows cut into `tile`-wide chunks (None: the kernels' own tiles), and the leading axes to
    test them on. A row wider than a tile is a program of its own, so 2 × 3 rows test what 3 × 5
    do, at a third of the interpreter's time."""
    if tile is None:
        return (3, 5)
    monkeypatch.setattr(te, "MAX_TILE", tile)
    monkeypatch.setattr(te, "MAX_TILE_BWD", tile)
    return (2, 3)


@pytest.mark.parametrize("value_head", HEADS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dv", [1, 2, 4, 8])
@pytest.mark.parametrize("d", [96, 200, 128])
def test_kernel_matches_reference_fp32(interpreted, d, dv, rule, value_head):
    _check_against_reference(_inputs((5,), d, dv), rule, value_head)


@pytest.mark.parametrize("value_head", HEADS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(("d", "dv"), [(200, 1), (96, 2), (128, 4), (200, 8)])
def test_kernel_matches_reference_bf16(interpreted, d, dv, rule, value_head):
    leaves = _inputs((3,), d, dv, torch.bfloat16)
    _check_against_reference(leaves, rule, value_head)


def test_mixed_dtypes_as_under_autocast(interpreted):
    # An fp32 state with the branch output and value projection in bf16 (bf16 autocast), fp32
    # logits and mixing matrix: Y and x_next fp32, each gradient in its input's dtype.
    X, h, z, p, C = _inputs((4,), 96, 4, compress=True)
    leaves = [X, h.detach().bfloat16().requires_grad_(), z, p.detach().bfloat16().requires_grad_()]
    _check_against_reference([*leaves, C], "delta", "official")


def test_matrix_state_with_one_value_channel(interpreted):
    _check_against_reference(_inputs((4,), 96, 1, matrix=True), "delta", "paper")


def test_value_channels_not_a_power_of_two(interpreted):
    _check_against_reference(_inputs((4,), 96, 3), "delta", "official")


@pytest.mark.parametrize("rule", RULES)
def test_chunked_rows(interpreted, monkeypatch, rule):
    # A 128-element tile forces 7 chunks of 32 columns at d = 200: the path of wide rows.
    monkeypatch.setattr(te, "MAX_TILE", 128)
    monkeypatch.setattr(te, "MAX_TILE_BWD", 128)
    assert te.launch_config(200, 4)[1:3] == (32, 7)
    _check_against_reference(_inputs((3,), 200, 4), rule, "official")


@pytest.mark.parametrize("rule", RULES)
def test_several_rows_per_program(interpreted, rule):
    # Narrow rows: 16 rows a program, the second program with 13 masked rows.
    assert te.launch_config(24, 2, te.MAX_TILE)[0] == te.launch_config(24, 2, te.MAX_TILE_BWD)[0]
    assert te.launch_config(24, 2)[0] == 16
    _check_against_reference(_inputs((19,), 24, 2), rule, "paper")


def _update_results(update, leaves, compress, autocast=False):
    """Outputs of a `DeltaUpdate` on `leaves` `[X, h, c, u, C]` and the gradients of a fixed
    random loss with respect to each leaf and each parameter (u unread by the paper head: zeros)."""
    args = leaves if compress else leaves[:4]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = update(*args)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(2)
    ups = [torch.randn(o.shape, generator=gen).to(o.dtype) for o in outs]
    grads = torch.autograd.grad(
        outs, [*args, *update.parameters()], ups, allow_unused=True, materialize_grads=True
    )
    return outs, grads


def _check_update(
    monkeypatch,
    d,
    dv,
    rule,
    value_head,
    compress,
    autocast=False,
    u_is_x=False,
    c_is_x=False,
    lead=(3, 5),
):
    """The whole update on the kernels (projections computed by the forward kernel) against the
    general path (`gate_and_value`, then the reference epilogue): values, every gradient. With
    `u_is_x` the value head reads the state itself, as a DeltaLM's vector state gives it; with
    `c_is_x` the gate (and the paper head) do."""
    from deltalearn.nn import DeltaUpdate

    torch.manual_seed(1)
    update = DeltaUpdate(d, dv, rule=rule, value_head=value_head)
    update.record = False
    with torch.no_grad():  # gates away from 0 and 2, value targets of order one
        for param in update.parameters():
            param.copy_(torch.randn(param.shape) / d**0.5)
    X = torch.randn(*lead, d, dv) if dv > 1 else torch.randn(*lead, d)
    h, c, u = (torch.randn(*lead, d) for _ in range(3))
    leaves = [t.requires_grad_() for t in (X, h * 3, c, u, torch.randn(d, dv) / dv)]
    if u_is_x:
        leaves[3] = leaves[0]
    if c_is_x:
        leaves[2] = leaves[0]
    calls = []
    real = te.update_triton
    monkeypatch.setattr(te, "update_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    outs, grads = _update_results(update, leaves, compress, autocast)
    assert calls == [1]
    monkeypatch.setattr(backend, "BACKEND", "reference")
    ref_outs, ref_grads = _update_results(update, leaves, compress, autocast)
    for a, b in zip(outs + grads, ref_outs + ref_grads, strict=True):
        # Under autocast the kernel's p is fp32 where the reference's is autocast's bf16 product.
        _close(a, b, tol=2e-5, coarse=autocast)


@pytest.mark.parametrize("value_head", HEADS)
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize(
    ("d", "dv", "compress"), [(96, 1, False), (200, 2, True), (96, 4, True), (200, 8, False)]
)
def test_whole_update_matches_the_general_path(
    interpreted, monkeypatch, d, dv, compress, rule, value_head
):
    _check_update(monkeypatch, d, dv, rule, value_head, compress)


def _backward_kernel_flag(monkeypatch, flag: str) -> list:
    """The value of the update backward kernel's option `flag` at each launch, as launched."""
    real, seen = te._bwd_kernel, []

    class Spy:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                seen.append(kwargs[flag])
                return real[grid](*args, **kwargs)

            return launch

    monkeypatch.setattr(te, "_bwd_kernel", Spy())
    return seen


@pytest.mark.parametrize(("dv", "value_head"), [(4, "official"), (1, "official"), (4, "paper")])
def test_whole_update_with_its_sums_carried_gives_the_same_bits(
    interpreted, monkeypatch, dv, value_head
):
    """With CARRY_SUMS (a row in one tile) the backward holds its partial sums (∂C, ∂w_g, ∂W_v,
    the biases) in registers over a program's row blocks: bitwise the gradients of the sums added
    in global memory at every row block, two programs walking 15 rows."""
    from deltalearn.nn import DeltaUpdate

    d = 96
    assert te.backward_launch_config(d, dv)[2] == 1  # one chunk a row: the flag applies
    monkeypatch.setattr(te, "COMPRESS_PROGRAMS", 2)
    torch.manual_seed(1)
    update = DeltaUpdate(d, dv, value_head=value_head)
    update.record = False
    X = torch.randn(3, 5, d, dv).squeeze(-1)
    h, c, u = (torch.randn(3, 5, d) for _ in range(3))
    compress = dv > 1
    leaves = [t.requires_grad_() for t in (X, h, c, u, torch.randn(d, dv) / dv)]
    flags = _backward_kernel_flag(monkeypatch, "CARRY_SUMS")
    results = []
    for carry in (False, True):
        monkeypatch.setattr(te, "CARRY_SUMS", carry)
        results.append(_update_results(update, leaves, compress))
    assert flags == [False, True]
    (outs, grads), (carried_outs, carried_grads) = results
    for a, b in zip(outs + grads, carried_outs + carried_grads, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value_head", HEADS)
def test_whole_update_in_chunks_and_under_autocast(interpreted, monkeypatch, value_head):
    """Rows wider than a tile (the projections summed over chunks), and bf16 autocast (c kept in
    bf16 for ∂w_g, the value product's backward in bf16, as `_LinearProjections` takes them)."""
    with monkeypatch.context() as m:
        _check_update(m, 200, 4, "delta", value_head, True, lead=_rows_in_tiles(m, 128))
    _check_update(monkeypatch, 96, 4, "delta", value_head, True, autocast=True)


@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("rule", RULES)
def test_whole_update_whose_value_head_reads_the_state(interpreted, monkeypatch, rule, autocast):
    """A vector state read by the official value head (u = X, as in a DeltaLM with d_v = 1): the
    delta backward forms ∂W_v from the X it reads, keeping no copy of u; values and every
    gradient as the general path's, in chunks too."""
    with monkeypatch.context() as m:
        lead = _rows_in_tiles(m, 128)
        _check_update(m, 200, 1, rule, "official", False, autocast=autocast, u_is_x=True, lead=lead)
    _check_update(monkeypatch, 96, 1, rule, "official", False, autocast=autocast, u_is_x=True)


def test_whole_update_whose_paper_head_reads_the_state(interpreted, monkeypatch):
    """The paper head's input is c; where a caller passes the state as c, ∂c holds the value
    head's gradient, and nothing adds it to ∂X a second time."""
    _check_update(monkeypatch, 96, 1, "delta", "paper", False, c_is_x=True)


@pytest.mark.parametrize(
    ("d", "dv", "compress", "tile"),
    [(96, 4, True, None), (200, 3, False, 128), (96, 1, False, 128)],
)
def test_whole_update_rebuilds_the_state_it_consumed_in_its_backward(
    interpreted, monkeypatch, d, dv, compress, tile
):
    """Under a state tape the delta update's backward kernel forms the state X it consumed from
    its output Y and the saved row scalars (no rebuild kernel): the state the rebuild kernel
    gives, and the gradients of the update with X kept (rows in chunks too). A vector state is
    the official value head's u as well (as in a DeltaLM), whose ∂W_v the kernel forms from it."""
    from deltalearn.nn import DeltaUpdate
    from deltalearn.ops import state_tape

    lead = _rows_in_tiles(monkeypatch, tile)
    torch.manual_seed(4)
    update = DeltaUpdate(d, dv, value_head="official")
    update.record = False
    X0 = torch.randn(*lead, d, dv).squeeze(-1).requires_grad_()
    rest = [torch.randn(*lead, d).requires_grad_() for _ in range(2 if dv == 1 else 3)]
    rest += [torch.randn(d, dv).requires_grad_()] if compress else []

    def call(X):  # (X, h, c, u[, C]); u = X for a vector state
        return update(X, *rest, X) if dv == 1 else update(X, *rest)

    rebuilt, own_pass = [], []
    handed, kernel = state_tape.StateTape.rebuilt, te.rebuild_state_triton
    monkeypatch.setattr(
        state_tape.StateTape, "rebuilt", lambda t, i, X: rebuilt.append((X, t._slots[i].link))
        or handed(t, i, X),
    )  # fmt: skip
    monkeypatch.setattr(
        te, "rebuild_state_triton", lambda *a, **k: own_pass.append(1) or kernel(*a, **k)
    )
    with state_tape.recording() as tape:
        X = X0 * 1.0  # a state with a graph, as between sublayers
        tape.add(X)
        out = call(X)
    outs = out if isinstance(out, tuple) else (out,)
    ups = [torch.randn_like(o) for o in outs]
    grads = torch.autograd.grad(outs, [X0, *rest], ups)
    assert own_pass == [] and len(rebuilt) == 1
    ((X_rebuilt, (_, h, rho, beta, e)),) = rebuilt
    torch.testing.assert_close(X_rebuilt, kernel(outs[0].detach(), h, rho, beta, e))
    torch.testing.assert_close(X_rebuilt, X.detach(), rtol=1e-5, atol=1e-5)
    kept = torch.autograd.grad(call(X0), [X0, *rest], ups)  # no tape: X kept
    for a, b in zip(grads, kept, strict=True):
        _close(a, b, tol=2e-5)


@pytest.mark.parametrize("dv", [1, 4])
def test_whole_update_on_strided_and_empty_inputs(interpreted, monkeypatch, dv):
    """Transposed (non-contiguous) X, h, c, u: the general path's values and gradients; an empty
    batch: empty outputs and zero weight gradients."""
    from deltalearn.nn import DeltaUpdate

    torch.manual_seed(3)
    update = DeltaUpdate(24, dv, value_head="official")
    update.record = False
    state = (24, dv) if dv > 1 else (24,)
    leaves = [torch.randn(3, 5, *state).transpose(0, 1).requires_grad_()]
    leaves += [torch.randn(3, 5, 24).transpose(0, 1).requires_grad_() for _ in range(3)]
    results = []
    for choice in ("triton", "reference"):
        monkeypatch.setattr(backend, "BACKEND", choice)
        out = update(*leaves)
        grads = torch.autograd.grad(out.square().sum(), [*leaves, *update.parameters()])
        results.append((out, *grads))
    for a, b in zip(*results, strict=True):
        _close(a, b, tol=2e-5)
    monkeypatch.setattr(backend, "BACKEND", "triton")
    empty = [torch.randn(0, 3, *state, requires_grad=True)]
    empty += [torch.randn(0, 3, 24, requires_grad=True) for _ in range(3)]
    out = update(*empty)
    out.sum().backward()
    assert out.shape == empty[0].shape
    assert all(p.grad is not None and not p.grad.any() for p in update.parameters())


def _normed_update_run(d, dv, lead, autocast, c_norm):
    """An official-head update whose c is an RMSNorm of u (u = X for a vector state, as in a
    DeltaLM): outputs, the gradients of a fixed loss with respect to every leaf and parameter (the
    norm's weight included), and the (shape, dtype) of every tensor saved for backward."""
    from deltalearn.models.layers import RMSNorm

    torch.manual_seed(1)
    update = DeltaUpdate(d, dv, value_head="official")
    update.record = False
    norm = RMSNorm(d, 1e-6)
    with torch.no_grad():
        for param in update.parameters():
            param.copy_(torch.randn(param.shape) / d**0.5)
        norm.weight.copy_(1 + 0.3 * torch.randn(d))
    X = (torch.randn(*lead, d, dv) if dv > 1 else torch.randn(*lead, d)).requires_grad_()
    h = (3 * torch.randn(*lead, d)).requires_grad_()
    u = X if dv == 1 else torch.randn(*lead, d).requires_grad_()
    rest = [(torch.randn(d, dv) / dv).requires_grad_()] if dv > 1 else []
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with hooks, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        out = update(X, h, norm(u), u, *rest, c_norm=norm if c_norm else None)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(2)
    ups = [torch.randn(o.shape, generator=gen) for o in outs]
    leaves = [X, h, *([u] if dv > 1 else []), *rest, *update.parameters(), norm.weight]
    return outs, torch.autograd.grad(outs, leaves, ups), saved


@pytest.mark.parametrize(("d", "dv", "tile"), [(96, 4, None), (200, 1, 128), (200, 4, 128)])
def test_whole_update_recomputes_the_norm_of_its_input_under_autocast(
    interpreted, monkeypatch, d, dv, tile
):
    """Given the RMSNorm that made c from u (`c_norm`), the update keeps no low-precision copy of
    c or u under bf16 autocast: its backward recomputes c from u (in chunks too). The outputs are
    those of the update that keeps the copies, bit for bit, and every gradient is the fp32 run's
    (no autocast, nothing rounded) to round-off, where the kept bf16 copies miss it by ~1e-3."""
    lead = _rows_in_tiles(monkeypatch, tile)
    calls = []
    real = te.update_triton
    monkeypatch.setattr(
        te, "update_triton", lambda *a, **k: calls.append(k["norm"]) or real(*a, **k)
    )
    outs, grads, saved = _normed_update_run(d, dv, lead, autocast=True, c_norm=True)
    kept_outs, kept_grads, kept_saved = _normed_update_run(d, dv, lead, autocast=True, c_norm=False)
    _, fp32_grads, _ = _normed_update_run(d, dv, lead, autocast=False, c_norm=False)
    assert calls[0] is not None and calls[1] is None
    assert [s for s in saved if s[1] == torch.bfloat16] == []
    assert (*lead, d) in [s[0] for s in kept_saved if s[1] == torch.bfloat16]
    for a, b in zip(outs, kept_outs, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, b in zip(grads, fp32_grads, strict=True):
        _close(a, b, tol=1e-5)
    worst = max(
        (a - b).abs().max() / b.abs().max() for a, b in zip(kept_grads, fp32_grads, strict=True)
    )
    assert worst > 1e-4  # what the copies cost, and what the comparison above can see


@pytest.mark.parametrize(("dv", "switch"), [(1, "on"), (4, "on"), (4, "off")])
def test_inference_launches_the_forward_kernel_without_an_autograd_function(
    interpreted, monkeypatch, dv, switch
):
    """Under no_grad (inference, decoding: host-bound on a GPU) the whole update, and with the
    update kernel off the rewrite with its compressor read, launch their forward kernel without an
    autograd Function's `apply` and keep no copies for a backward (none under bf16 autocast);
    the outputs are grad mode's, bit for bit."""
    monkeypatch.setattr(ep, "UPDATE_KERNEL", switch)
    torch.manual_seed(4)
    update = DeltaUpdate(24, dv, value_head="official")
    update.record = False
    leaves = [torch.randn(2, 3, 24, *((dv,) if dv > 1 else ())).requires_grad_()]
    leaves += [torch.randn(2, 3, 24).requires_grad_() for _ in range(3)]
    leaves += [torch.randn(24, dv)] if dv > 1 else []  # the next sublayer's compressor read
    applied, kept = [], []
    real_apply = no_graph.apply_direct  # how the Triton path applies its Functions
    monkeypatch.setattr(
        no_graph, "apply_direct", lambda fn, *a: applied.append(fn) or real_apply(fn, *a)
    )
    real_kept = te.kept_inputs
    monkeypatch.setattr(te, "kept_inputs", lambda *a: kept.append(1) or real_kept(*a))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        recorded = update(*leaves)
        assert applied and kept == ([1] if switch == "on" else [])
        applied.clear(), kept.clear()
        with torch.no_grad():
            inferred = update(*leaves)
    assert applied == [] and kept == []
    recorded = recorded if isinstance(recorded, tuple) else (recorded,)
    inferred = inferred if isinstance(inferred, tuple) else (inferred,)
    assert len(inferred) == len(recorded) == (2 if dv > 1 else 1)
    for a, b in zip(inferred, recorded, strict=True):
        assert a.grad_fn is None
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)


def test_update_kernel_switch_off_takes_the_projections_apart(interpreted, monkeypatch):
    from deltalearn.nn import DeltaUpdate

    update = DeltaUpdate(24, 4, value_head="official")  # reads u: every leaf has a gradient
    update.record = False
    leaves = [torch.randn(2, 3, 24, 4, requires_grad=True)]
    leaves += [torch.randn(2, 3, 24, requires_grad=True) for _ in range(3)]
    calls = []
    for name in ("update_triton", "rewrite_epilogue_triton"):
        real = getattr(te, name)
        monkeypatch.setattr(
            te, name, lambda *a, real=real, name=name, **k: calls.append(name) or real(*a, **k)
        )
    results = []
    for switch in ("on", "off"):
        monkeypatch.setattr(ep, "UPDATE_KERNEL", switch)
        out = update(*leaves)
        results.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
    assert calls == ["update_triton", "rewrite_epilogue_triton"]
    for a, b in zip(*results, strict=True):
        _close(a, b, tol=2e-5)


def test_launch_arithmetic_equals_tritons():
    """The host-side `next_pow2` and `cdiv` the launches use instead of triton's (~2 µs a call
    through its constexpr wrapper) give triton's numbers."""
    import triton

    from deltalearn.ops._shapes import cdiv, next_pow2

    for n in [*range(1, 300), 767, 768, 769, 1023, 1024, 1025, 4097]:
        assert next_pow2(n) == triton.next_power_of_2(n), n
        for b in (1, 2, 3, 16, 64, 100):
            assert cdiv(n, b) == triton.cdiv(n, b), (n, b)
    assert cdiv(0, 7) == triton.cdiv(0, 7) == 0


def test_backward_tiles_are_at_most_512_columns():
    """At d = 768 the one-chunk backward tile ran 4x slower on an H200 (benchmarks/README.md)."""
    assert te.backward_launch_config(768, 1) == (1, 512, 2, 1)
    assert te.backward_launch_config(768, 4) == (1, 256, 3, 4)  # unchanged by the column cap
    assert te.backward_launch_config(96, 1)[:3] == (4, 128, 1)  # narrow rows: several a program


@pytest.mark.parametrize("rule", RULES)
def test_width_768_vector_state_backward_in_two_chunks(interpreted, rule):
    """The `small` models' shape at dv = 1 takes the two-chunk backward by default."""
    assert te.backward_launch_config(768, 1)[2] == 2
    _check_against_reference(_inputs((3,), 768, 1), rule, "official")


def test_wide_rows_d8192(interpreted):
    assert te.launch_config(8192, 4)[2] > 1  # chunked
    leaves = _inputs((2,), 8192, 4)
    _check_against_reference(leaves, "delta", "official", tol=1e-4)


def test_non_contiguous_inputs_and_two_leading_axes(interpreted):
    d, dv = 96, 4
    # Every operand a strided view: X with the value axis outermost, h every other column, z and
    # p transposed out of larger tensors.
    X = torch.randn(dv, 2, 3, d).permute(1, 2, 3, 0)
    h = torch.randn(2, 3, 2 * d)[..., ::2]
    z = torch.randn(3, 2).t()
    p = torch.randn(dv, 3, 2).permute(2, 1, 0)
    leaves = [t.detach().requires_grad_() for t in (X, h, z, p)]
    assert not any(t.is_contiguous() for t in leaves)
    _check_against_reference(leaves, "delta", "official")


def test_dense_rows_apart_and_strided_rows_take_their_own_kernels(interpreted):
    """Rows that are contiguous `(d, dv)` blocks, however far apart, get constant in-row strides
    (vector loads on a GPU); rows that are not keep the runtime strides; value pre-activations
    p whose rows lie apart keep theirs. All match the reference."""
    d, dv = 40, 4
    X = torch.randn(2, 3, d + 5, dv)[:, :, :d]  # dense rows, (d + 5)·dv apart
    p = torch.randn(6, dv + 2)[:, :dv].reshape(2, 3, dv)
    leaves = [t.detach().requires_grad_() for t in (X, torch.randn(2, 3, d), torch.randn(2, 3), p)]
    assert te._dense_rows(X.reshape(6, d, dv)) and not X.is_contiguous()
    assert not p.reshape(6, dv).is_contiguous()
    _check_against_reference(leaves, "delta", "official")
    strided = torch.randn(2, 3, dv, d).transpose(-1, -2)  # channels d apart
    assert not te._dense_rows(strided.reshape(6, d, dv))
    leaves[0] = strided.detach().requires_grad_()
    _check_against_reference(leaves, "delta", "paper")


def test_upstream_gradient_with_zero_strides(interpreted):
    # Y.sum() hands backward an expanded (stride 0) gradient; the kernel reads it in place.
    leaves = _inputs((3,), 96, 2)
    Y = ep.rewrite_epilogue(*leaves)
    grads = torch.autograd.grad(Y.sum(), leaves)
    ref = torch.autograd.grad(ep.rewrite_epilogue_reference(*leaves).sum(), leaves)
    for a, b in zip(grads, ref, strict=True):
        _close(a, b)


def test_empty_batch(interpreted):
    leaves = _inputs((0,), 96, 4)
    Y = ep.rewrite_epilogue(*leaves)
    assert Y.shape == (0, 96, 4)
    grads = torch.autograd.grad(Y, leaves, torch.ones_like(Y))
    assert [g.shape for g in grads] == [t.shape for t in leaves]


@pytest.mark.parametrize("rule", ["delta", "write_only"])
def test_compressor_read_and_its_gradient(interpreted, monkeypatch, rule):
    # Chunked rows, one row per program and two programs for 5 rows: the ∂C partial sums are
    # accumulated over several row blocks per program and over chunks.
    monkeypatch.setattr(te, "MAX_TILE", 128)
    monkeypatch.setattr(te, "MAX_TILE_BWD", 128)
    monkeypatch.setattr(te, "COMPRESS_PROGRAMS", 2)
    leaves = _inputs((5,), 96, 4, compress=True)
    _check_against_reference(leaves, rule, "official")


def _loss_and_grads_off_and_on(monkeypatch, model, ids, switch: str) -> list:
    """A training step's loss and parameter gradients with `ops.epilogue.<switch>` off, then on."""
    results = []
    for setting in ("off", "on"):
        monkeypatch.setattr(ep, switch, setting)
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), [p.grad.clone() for p in model.parameters()]))
    return results


def test_deltalm_with_the_read_fused_into_the_kernel(interpreted, monkeypatch):
    """A ddl-cc DeltaLM on the kernels, with each read fused into the rewrite before it (the MLP's
    into the attention rewrite, the next block's and the final one into the MLP rewrite;
    DELTALEARN_FUSED_READ=on) and without: the same loss and parameter gradients."""
    from deltalearn import DeltaLM, DeltaLMConfig

    shape = dict(num_layers=2, hidden_size=40, num_heads=2, head_dim=20, vocab_size=50)
    torch.manual_seed(0)
    model = DeltaLM(DeltaLMConfig.preset("ddl-cc", "tiny", **shape))
    ids = torch.randint(0, 50, (2, 6))
    compressed = []
    real = te.update_triton  # the whole update: projections and rewrite in the kernel

    def spy(*args, **kwargs):
        compressed.append(args[8] is not None)
        return real(*args, **kwargs)

    monkeypatch.setattr(te, "update_triton", spy)
    results = _loss_and_grads_off_and_on(monkeypatch, model, ids, "FUSED_READ")
    assert compressed == [False] * 4 + [True] * 4  # two blocks, two rewrites each
    (loss_off, grads_off), (loss_on, grads_on) = results
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_on, grads_off, strict=True):
        _close(a, b, tol=1e-4)


def _token_read_update(d, dv, K, value_head, rule="delta"):
    """An update with random weights, and leaves `[X (2, 7, d, dv), h, c, u, taps (d, dv, K)]`."""
    from deltalearn.nn import DeltaUpdate

    torch.manual_seed(5)
    update = DeltaUpdate(d, dv, rule=rule, value_head=value_head)
    update.record = False
    with torch.no_grad():
        for param in update.parameters():
            param.copy_(torch.randn(param.shape) / d**0.5)
    X = torch.randn(2, 7, d, dv)
    h, c, u = (torch.randn(2, 7, d) for _ in range(3))
    taps = torch.randn(d, dv, K) / dv
    return update, [t.requires_grad_() for t in (X, h * 3, c, u, taps)]


@pytest.mark.parametrize("value_head", HEADS)
@pytest.mark.parametrize(
    ("d", "dv", "K", "tile", "rule"),
    [(40, 4, 4, None, "delta"), (96, 3, 3, 128, "delta"), (40, 4, 2, None, "write_only")],
)
def test_whole_update_with_the_next_token_read(
    interpreted, monkeypatch, d, dv, K, tile, rule, value_head
):
    """`DeltaUpdate(..., compress=taps)` with a token compressor's taps `(d, dv, K)`: the Triton
    update runs the next sublayer's token read of Y inside its Function and takes the read's
    gradient into its backward kernel (K shifted rows of ∂x_next, none across a sequence's end);
    ∂taps from the read's own kernel. Values and every gradient as the rewrite, then the read, on
    the reference path (rows in chunks too)."""
    if tile is not None:
        monkeypatch.setattr(te, "MAX_TILE", tile)
        monkeypatch.setattr(te, "MAX_TILE_BWD", tile)
    update, leaves = _token_read_update(d, dv, K, value_head, rule)
    token_k = _backward_kernel_flag(monkeypatch, "TOKEN_K")
    outs, grads = _update_results(update, leaves, True)
    assert token_k == [K]
    monkeypatch.setattr(backend, "BACKEND", "reference")
    ref_outs, ref_grads = _update_results(update, leaves, True)
    for a, b in zip(outs + grads, ref_outs + ref_grads, strict=True):
        _close(a, b, tol=2e-5)


@pytest.mark.parametrize("other_reader", [False, True])
def test_whole_update_with_the_next_token_read_rebuilds_its_state(
    interpreted, monkeypatch, other_reader
):
    """Under a state tape the update with a token read rebuilds its input state in its backward
    and sums ∂taps from the Y the tape hands it (or, where another reader had X rebuilt first,
    from the state after it): the gradients of the same update with X kept."""
    from deltalearn.ops import state_tape

    update, (X0, h, c, u, taps) = _token_read_update(40, 4, 4, "official")
    w = torch.randn(2, 7, 40, 4, requires_grad=True)

    def loss_of(X, ups):
        Y, x_next = update(X, h, c, u, taps)
        loss = (Y * ups[0]).sum() + (x_next * ups[1]).sum()
        return loss + (X * w).sum() if other_reader else loss  # X saved by `mul` too

    gen = torch.Generator().manual_seed(3)
    ups = [torch.randn(2, 7, 40, 4, generator=gen), torch.randn(2, 7, 40, generator=gen)]
    claimed, after = [], []
    real_claim, real_after = state_tape.StateTape.claim, state_tape.StateTape.state_after
    monkeypatch.setattr(
        state_tape.StateTape, "claim", lambda t, i: claimed.append(1) or real_claim(t, i)
    )
    monkeypatch.setattr(
        state_tape.StateTape, "state_after", lambda t, i: after.append(1) or real_after(t, i)
    )
    with state_tape.recording() as tape:
        X = X0 * 1.0  # a state with a graph, as between sublayers
        tape.add(X)
        loss = loss_of(X, ups)
    inputs = [X0, h, c, u, taps, *update.parameters(), *([w] if other_reader else [])]
    grads = torch.autograd.grad(loss, inputs)
    assert claimed == [1] and after == ([1] if other_reader else [])
    kept = torch.autograd.grad(loss_of(X0 * 1.0, ups), inputs)
    for a, b in zip(grads, kept, strict=True):
        _close(a, b, tol=2e-5)


@pytest.mark.parametrize("rebuild", ["on", "off"])
def test_deltalm_with_the_token_reads_fused_into_the_update(interpreted, monkeypatch, rebuild):
    """A ddl-tc DeltaLM on the kernels with each token read made by the rewrite before it
    (DELTALEARN_FUSED_TOKEN_READ=on) and without: the same loss and gradients, states rebuilt or
    kept; of the five reads of two blocks one keeps its own Function (the first block's), whose
    backward alone writes a state-sized gradient."""
    from deltalearn import DeltaLM, DeltaLMConfig
    from deltalearn.ops import state_tape
    from deltalearn.ops import triton_mixing as tm

    monkeypatch.setattr(state_tape, "REBUILD", rebuild)
    monkeypatch.setattr("deltalearn.ops._shapes.SMALL_STATE", 0)  # every read on the kernels
    shape = dict(num_layers=2, hidden_size=40, num_heads=2, head_dim=20, vocab_size=50)
    torch.manual_seed(0)
    model = DeltaLM(DeltaLMConfig.preset("ddl-tc", "tiny", **shape))
    ids = torch.randint(0, 50, (2, 6))
    with_taps, state_grads = [], []
    real_update, real_read = te.update_triton, tm.read_backward

    def update_spy(*args, **kwargs):
        with_taps.append(args[8] is not None and args[8].dim() == 3)
        return real_update(*args, **kwargs)

    def read_spy(saved, G, past, shapes, need_xs, need_W):
        state_grads.append(need_xs)
        return real_read(saved, G, past, shapes, need_xs, need_W)

    monkeypatch.setattr(te, "update_triton", update_spy)
    monkeypatch.setattr(tm, "read_backward", read_spy)
    results = _loss_and_grads_off_and_on(monkeypatch, model, ids, "FUSED_TOKEN_READ")
    assert with_taps == [False] * 4 + [True] * 4
    assert state_grads[:5] == [True] * 5
    assert sorted(state_grads[5:]) == [False] * 4 + [True]
    (loss_off, grads_off), (loss_on, grads_on) = results
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-5, atol=1e-5)
    for a, b in zip(grads_on, grads_off, strict=True):
        _close(a, b, tol=1e-4)


@pytest.mark.parametrize("variant", ["ddl", "ddl-cc", "write-only-cc"])
def test_deltalm_states_rebuilt_from_the_kernel_rows(interpreted, monkeypatch, variant):
    """The forward kernel writes e, 1/n and β for `ops.state_tape`: a DeltaLM on the kernels keeps
    only its last state and gets the gradients of keeping them all (odd width 40, fp32). Each
    state is rebuilt once: by the backward kernel of the delta update that consumed it (a vector
    state too, which the official value head reads as u), else by the rebuild kernel — for
    write-only, whose backward reads no state."""
    import weakref

    from deltalearn import DeltaLM, DeltaLMConfig
    from deltalearn.ops import state_tape

    shape = dict(num_layers=2, hidden_size=40, num_heads=2, head_dim=20, vocab_size=50)
    torch.manual_seed(0)
    model = DeltaLM(DeltaLMConfig.preset(variant, "tiny", **shape))
    rebuilt, own_pass = [], []
    kernel = te.rebuild_state_triton
    monkeypatch.setattr(
        te, "rebuild_state_triton", lambda *a, **k: own_pass.append(1) or kernel(*a, **k)
    )
    handed = state_tape.StateTape.rebuilt
    monkeypatch.setattr(state_tape.StateTape, "rebuilt", lambda *a: rebuilt.append(1) or handed(*a))
    ids = torch.randint(0, 50, (2, 6))
    results = []
    for rebuild in ("off", "on"):
        monkeypatch.setattr(state_tape, "REBUILD", rebuild)
        outputs: list = []
        hook = model.layers[0].register_forward_hook(
            lambda m, a, out, outputs=outputs: outputs.append(weakref.ref(out))
        )
        model.zero_grad()
        loss = model(ids, labels=ids).loss
        hook.remove()
        results.append(outputs[0]() is None)  # the first block's output freed after forward
        loss.backward()
        results.append([p.grad.clone() for p in model.parameters()])
    kept_off, grads_off, freed_on, grads_on = results
    assert not kept_off and freed_on
    assert len(rebuilt) == 2 * 2  # the input state of every rewrite
    assert len(own_pass) == (len(rebuilt) if variant == "write-only-cc" else 0)
    for a, b in zip(grads_on, grads_off, strict=True):
        _close(a, b, tol=1e-5)


@pytest.mark.parametrize("d, dv", [(40, 1), (96, 4), (200, 3), (8192, 4)])
def test_the_rebuild_kernel_inverts_the_forward(interpreted, d, dv):
    """`rebuild_state_triton` gives back the state before a rewrite from the one after it and the
    row scalars the forward kernel wrote (chunked rows at d = 8192; a strided Y; into `out`)."""
    from deltalearn.ops import state_tape

    leaves = [t.detach() for t in _inputs((2, 3), d, dv)]
    X = leaves[0]
    with state_tape.recording() as tape:
        tape.add(X)
        Y = ep.rewrite_epilogue(*leaves, rule="delta", value_head="official")
    _, h, rho, beta, e = tape._slots[0].link
    rebuilt = te.rebuild_state_triton(Y, h, rho, beta, e)
    _close(rebuilt, X, tol=1e-5)
    strided = Y.transpose(0, 1).contiguous().transpose(0, 1)  # rows apart, each still dense
    h_strided = torch.randn(2, 3, 2 * d)[..., ::2].copy_(h)  # every other column
    out = torch.empty_like(Y)
    assert te.rebuild_state_triton(strided, h_strided, rho, beta, e, out=out) is out
    _close(out, X, tol=1e-5)


def test_compressor_read_bf16(interpreted):
    leaves = _inputs((3,), 96, 4, torch.bfloat16, compress=True)
    _check_against_reference(leaves, "delta", "paper")


def test_compressor_gradient_is_deterministic_and_partial_outputs(interpreted, monkeypatch):
    monkeypatch.setattr(te, "COMPRESS_PROGRAMS", 2)
    monkeypatch.setattr(te, "MAX_TILE", 128)
    monkeypatch.setattr(te, "MAX_TILE_BWD", 128)
    leaves = _inputs((6,), 40, 4, compress=True)
    ref = ep.rewrite_epilogue_reference(*leaves[:4], compress=leaves[4])
    # Only x_next used: ∂L/∂Y arrives as None and is read as zeros.
    Y, xn = ep.rewrite_epilogue(*leaves[:4], compress=leaves[4])
    up = torch.randn_like(xn)
    g1 = torch.autograd.grad(xn, leaves, up)
    g_ref = torch.autograd.grad(ref[1], leaves, up, retain_graph=True)
    for a, b in zip(g1, g_ref, strict=True):
        _close(a, b)
    Y, xn = ep.rewrite_epilogue(*leaves[:4], compress=leaves[4])
    g2 = torch.autograd.grad(xn, leaves, up)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2, strict=True))
    # Only Y used: the compressor gets a zero gradient.
    Y, xn = ep.rewrite_epilogue(*leaves[:4], compress=leaves[4])
    up = torch.randn_like(Y)
    g3 = torch.autograd.grad(Y, leaves, up)
    g_ref = torch.autograd.grad(ref[0], leaves, up, allow_unused=True)
    for a, b in zip(g3[:4], g_ref[:4], strict=True):
        _close(a, b)
    assert torch.equal(g3[4], torch.zeros_like(leaves[4]))


@pytest.mark.parametrize("rule", ["delta", "write_only"])
@pytest.mark.parametrize("value_head", ["paper", "official"])
def test_reference_and_fallback_gradcheck_float64(rule, value_head):
    for matrix, lead, dv in ((False, (3,), 1), (True, (2, 2), 3)):
        leaves = [t.detach().double().requires_grad_() for t in _inputs(lead, 7, dv, matrix=matrix)]
        C = torch.randn(7, dv, dtype=torch.float64, requires_grad=True) if matrix else None
        for fn in (ep.rewrite_epilogue_reference, ep.rewrite_epilogue):

            def f(X, h, z, p, C, fn=fn):
                return fn(X, h, z, p, rule=rule, value_head=value_head, value_scale=3.0, compress=C)

            assert torch.autograd.gradcheck(f, (*leaves, C))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fallback_matches_reference(dtype):
    leaves = _inputs((2, 3), 40, 4, dtype, compress=True)
    assert not backend.use_triton(leaves)  # CPU tensors, auto backend
    _check_against_reference(leaves, "delta", "official")


@pytest.mark.parametrize("value_channels", [1, 4])
@pytest.mark.parametrize("rule", ["delta", "write_only"])
@pytest.mark.parametrize("value_head", ["paper", "official"])
@pytest.mark.parametrize("form", ["l2", "rms"])
def test_equals_the_deltaupdate_composition(value_channels, rule, value_head, form):
    """k = direction(h), β = GateHead(c), v = ValueHead(c, u), then the fused rewrite (CPU)."""
    d = 32
    gate = GateHead(d, "mlp", hidden=16)
    value = ValueHead(d, value_channels, value_head, sigmoid_scale=3.0)
    c, u, h = torch.randn(3, 2, 5, d).unbind(0)
    X = torch.randn(2, 5, d, value_channels) if value_channels > 1 else torch.randn(2, 5, d)
    v = value(c, u)
    if value_channels == 1:
        v = v.squeeze(-1)
    op = delta_rewrite if rule == "delta" else write_only
    want = op(X, direction(h, 1e-5, form), gate(c), v)
    pre = value.pre_activation(c, u)
    if value_channels == 1:
        pre = pre.squeeze(-1)
    got = ep.rewrite_epilogue(
        X, h, gate.logits(c), pre, rule=rule, value_head=value_head, value_scale=3.0, k_eps=1e-5
    )
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("value_channels", [1, 4])
def test_deltaupdate_fused_path_and_its_record(value_channels):
    """DeltaUpdate(fused=True) goes through the epilogue; output, gradients and GateRecord agree
    with the step-by-step reference path (fused=False)."""
    d = 24
    kw = dict(value_head="official", gate="mlp", gate_hidden=8, direction_form="rms")
    fused = DeltaUpdate(d, value_channels, **kw)
    plain = DeltaUpdate(d, value_channels, fused=False, **kw)
    plain.load_state_dict(fused.state_dict())
    fused.record = plain.record = True
    shape = (2, 3, d, value_channels) if value_channels > 1 else (2, 3, d)
    X, (h, c, u) = torch.randn(shape), torch.randn(3, 2, 3, d).unbind(0)
    up = torch.randn(shape)
    outs = []
    for m in (fused, plain):
        m.zero_grad()
        leaves = [t.detach().requires_grad_() for t in (X, h, c, u)]
        Y = m(*leaves)
        grads = torch.autograd.grad(Y, [*leaves, *m.parameters()], up)
        outs.append((Y, grads, m.last_record))
    (Yf, gf, rf), (Yp, gp, rp) = outs
    torch.testing.assert_close(Yf, Yp, rtol=1e-5, atol=1e-5)
    for a, b in zip(gf, gp, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    for field in ("beta", "readout", "target", "discrepancy"):
        torch.testing.assert_close(getattr(rf, field), getattr(rp, field), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(
    not torch.cuda.is_available() or IN_INTERPRETER, reason="compiled kernels need a CUDA device"
)
@pytest.mark.parametrize(("d", "dv"), [(768, 4), (768, 1), (8192, 4), (200, 3)])
def test_compiled_kernels_on_cuda(d, dv):
    """The compiled kernels on the device, as bf16 autocast feeds them: fp32 state and logits,
    bf16 branch output and value pre-activation; auto backend, no forcing."""
    dev = torch.device("cuda")
    for compress in (False, True) if dv > 1 else (False,):
        X, h, z, p, *C = (t.detach().to(dev) for t in _inputs((4, 64), d, dv, compress=compress))
        leaves = [X, h.bfloat16(), z, p.bfloat16(), *C]
        leaves = [t.requires_grad_() for t in leaves]
        assert backend.use_triton(leaves)
        _check_against_reference(leaves, "delta", "official", tol=1e-4)
        if compress:  # ∂C twice: bitwise equal
            gC = [
                torch.autograd.grad(
                    ep.rewrite_epilogue(*leaves[:4], compress=leaves[4])[1].sum(), C
                )
                for _ in range(2)
            ]
            assert torch.equal(gC[0][0], gC[1][0])


def test_shape_errors_name_both_shapes():
    X, h, z, p = torch.randn(2, 8, 4), torch.randn(2, 8), torch.randn(2), torch.randn(2, 4)
    with pytest.raises(ValueError, match=r"X \(2, 9, 4\).*h \(2, 8\)"):
        ep.rewrite_epilogue(torch.randn(2, 9, 4), h, z, p)
    with pytest.raises(ValueError, match=r"z \(3,\).*h \(2, 8\)"):
        ep.rewrite_epilogue(X, h, torch.randn(3), p)
    with pytest.raises(ValueError, match=r"X \(2, 8, 4\).*p of shape \(2, 4\).*p \(2, 3\)"):
        ep.rewrite_epilogue(X, h, z, torch.randn(2, 3))
    with pytest.raises(ValueError, match=r"\(d, dv\) = \(8, 4\).*compress \(4, 8\)"):
        ep.rewrite_epilogue(X, h, z, p, compress=torch.randn(4, 8))
    with pytest.raises(ValueError, match="vector state"):
        ep.rewrite_epilogue(torch.randn(2, 8), h, z, torch.randn(2), compress=torch.randn(8, 1))
    with pytest.raises(ValueError, match="rule"):
        ep.rewrite_epilogue(X, h, z, p, rule="additive")
    with pytest.raises(ValueError, match="value_head"):
        ep.rewrite_epilogue(X, h, z, p, value_head="other")


def test_backend_switch(monkeypatch):
    monkeypatch.setattr(backend, "BACKEND", None)
    monkeypatch.setenv("DELTALEARN_EPILOGUE", "torch")
    assert not backend.use_triton([torch.randn(2)])
    monkeypatch.setenv("DELTALEARN_EPILOGUE", "triton")
    assert backend.use_triton([torch.randn(2)])
    monkeypatch.setenv("DELTALEARN_EPILOGUE", "nope")
    with pytest.raises(ValueError, match="DELTALEARN_EPILOGUE"):
        backend.use_triton([torch.randn(2)])


def test_works_without_triton():
    """With `import triton` failing, deltalearn imports and the rewrite and the compressor reads take
    the PyTorch path."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["triton"] = None  # makes `import triton` raise ImportError
        import torch
        from deltalearn.ops import backend, channel_mix, token_mix
        from deltalearn.ops import epilogue as ep
        assert not backend.triton_available()
        X, h = torch.randn(3, 16, 2), torch.randn(3, 16)
        Y = ep.rewrite_epilogue(X, h, torch.zeros(3), torch.randn(3, 2))
        assert Y.shape == X.shape
        assert channel_mix(torch.randn(3, 40, 16, 2), torch.randn(16, 2)).shape == (3, 40, 16)
        assert token_mix(torch.randn(3, 40, 16, 2), torch.randn(16, 2, 4)).shape == (3, 40, 16)
        """
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_reference_backend_switches_the_fast_rewrite_off(monkeypatch):
    """DELTALEARN_EPILOGUE=reference must route around the custom-autograd rewrite entirely."""
    import deltalearn.ops.epilogue as epilogue

    def fail(*args, **kwargs):
        raise AssertionError("the fast rewrite ran")

    monkeypatch.setattr(epilogue, "rewrite_epilogue_torch", fail)
    X, h = torch.randn(3, 16, 4), torch.randn(3, 16)
    z, p = torch.randn(3), torch.randn(3, 4)
    monkeypatch.setenv("DELTALEARN_EPILOGUE", "reference")
    torch.testing.assert_close(
        epilogue.rewrite_epilogue(X, h, z, p), epilogue.rewrite_epilogue_reference(X, h, z, p)
    )
    monkeypatch.setenv("DELTALEARN_EPILOGUE", "torch")
    with pytest.raises(AssertionError, match="fast rewrite ran"):
        epilogue.rewrite_epilogue(X, h, z, p)
