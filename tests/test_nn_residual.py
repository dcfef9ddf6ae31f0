"""DeltaResidual and its generators: the three rules, the generators' forms, β₀ init, recording."""

from __future__ import annotations

import math
import operator

import pytest
import torch
from torch import nn

from deltalearn.nn import (
    ChannelCompressor,
    DeltaResidual,
    GateHead,
    ValueHead,
    beta_init_bias,
    direction,
    direction_rms,
    repeat_expansion,
)
from deltalearn.nn.generators import gate_and_value
from deltalearn.ops import backend, normalize_direction


def _mlp(dim: int) -> nn.Module:
    return nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))


def test_additive_rule_is_exactly_plain_prenorm_residual():
    branch = _mlp(12)
    layer = DeltaResidual(12, branch, rule="additive")
    x = torch.randn(4, 5, 12)
    expected = x + branch(nn.functional.rms_norm(x, (12,), layer.norm.weight, eps=1e-6))
    assert torch.equal(layer(x), expected)
    names = {n for n, _ in layer.named_parameters()}
    assert names == {"norm.weight"} | {f"branch.{n}" for n, _ in branch.named_parameters()}
    assert layer.last_gates is None


@pytest.mark.parametrize("value_head", ["paper", "official"])
@pytest.mark.parametrize("gate", ["linear", "mlp"])
def test_delta_rule_matches_the_spec_written_out(value_head, gate):
    dim = 10
    torch.manual_seed(1)
    layer = DeltaResidual(dim, _mlp(dim), value_head=value_head, gate=gate, gate_hidden=6).double()
    x = torch.randn(3, dim, dtype=torch.float64)
    c = nn.functional.rms_norm(x, (dim,), layer.norm.weight, eps=1e-6)
    h = layer.branch(c)
    k = h / torch.sqrt(h.pow(2).sum(-1, keepdim=True) + 1e-10)
    upd = layer.update
    if value_head == "paper":
        v = c @ upd.value.proj.weight.T
    else:
        v = 4 * torch.sigmoid(x @ upd.value.proj.weight.T + upd.value.proj.bias)
    if gate == "linear":
        logit = c @ upd.gate.out.weight.T + upd.gate.out.bias
    else:
        hid = torch.tanh(c @ upd.gate.hidden.weight.T + upd.gate.hidden.bias)
        logit = hid @ upd.gate.out.weight.T + upd.gate.out.bias
    beta = 2 * torch.sigmoid(logit)[..., 0]
    v = v[..., 0]
    expected = x + (beta * (v - (k * x).sum(-1)))[..., None] * k
    torch.testing.assert_close(layer(x), expected)


def test_write_only_rule_has_no_erase_term():
    torch.manual_seed(2)
    dim = 8
    layer = DeltaResidual(dim, _mlp(dim), rule="write_only").double()
    x = torch.randn(6, dim, dtype=torch.float64)
    y = layer(x)
    rec = layer.last_gates
    k = normalize_direction(layer.branch(layer.norm(x)))
    torch.testing.assert_close(y, x + (rec.beta * rec.target)[..., None] * k)
    # Scaling the state along k changes nothing about the write: no read, no erase.
    y2 = layer.update(x * 3, layer.branch(layer.norm(x)), layer.norm(x), x)
    torch.testing.assert_close(y2 - 3 * x, y - x)


def test_fused_and_reference_paths_agree_with_gradients():
    torch.manual_seed(3)
    dim, dv = 9, 4
    fused = DeltaResidual(dim, _mlp(dim), dv, gate="mlp", gate_hidden=5).double()
    plain = DeltaResidual(dim, _mlp(dim), dv, gate="mlp", gate_hidden=5, fused=False).double()
    plain.load_state_dict(fused.state_dict())
    X = repeat_expansion(torch.randn(2, 7, dim, dtype=torch.float64), dv)
    X = X + 0.1 * torch.randn_like(X)
    up = torch.randn_like(X)
    out_f, out_p = fused(X), plain(X)
    torch.testing.assert_close(out_f, out_p)
    (out_f * up).sum().backward()
    (out_p * up).sum().backward()
    for (n, pf), (_, pp) in zip(fused.named_parameters(), plain.named_parameters(), strict=True):
        torch.testing.assert_close(pf.grad, pp.grad, msg=lambda m, n=n: f"{n}: {m}")


def test_matrix_state_recording_is_the_state_read_along_k():
    torch.manual_seed(4)
    layer = DeltaResidual(16, _mlp(16), value_channels=4)
    X = repeat_expansion(torch.randn(2, 3, 16), 4) + 0.3 * torch.randn(2, 3, 16, 4)
    Y = layer(X)
    assert Y.shape == X.shape
    rec = layer.last_gates
    assert rec.beta.shape == (2, 3)
    assert rec.readout.shape == rec.target.shape == rec.discrepancy.shape == (2, 3, 4)
    # Recomputed from the layer's parts: x_in = Compress(X), c = RMSNorm(x_in), k = F(c)/‖F(c)‖,
    # readout kᵀX of the state *before* the write, target W_v c (the paper head).
    with torch.no_grad():
        c = layer.norm(layer.compressor(X))
        h = layer.branch(c)
        k = h / torch.sqrt(h.pow(2).sum(-1, keepdim=True) + 1e-10)
        readout = (k[..., :, None] * X).sum(-2)
        target = c @ layer.update.value.proj.weight.T
    torch.testing.assert_close(rec.readout, readout)
    torch.testing.assert_close(rec.target, target)
    torch.testing.assert_close(rec.discrepancy, target - readout)
    assert torch.all((rec.beta > 0) & (rec.beta < 2))


def test_recording_can_be_switched_off():
    layer = DeltaResidual(8, _mlp(8), record_gates=False)
    layer(torch.randn(2, 8))
    assert layer.last_gates is None
    layer.record_gates = True
    layer(torch.randn(2, 8))
    assert layer.last_gates is not None


@pytest.mark.parametrize("beta0", [0.0, 0.5, 1.0, 1.7, 2.0])
def test_gate_starts_at_configured_beta(beta0):
    gate = GateHead(12, beta_init=beta0)
    nn.init.zeros_(gate.out.weight)
    beta = gate(torch.randn(5, 12))
    torch.testing.assert_close(beta, torch.full((5,), beta0), atol=3e-4, rtol=0)
    assert math.isfinite(beta_init_bias(beta0))


def test_gate_logits_are_fp32_under_bf16_input():
    gate = GateHead(8, kind="mlp", hidden=4).to(torch.bfloat16)
    beta = gate(torch.randn(3, 8, dtype=torch.bfloat16))
    assert beta.dtype == torch.float32


def test_linear_gate_float64_gradcheck():
    gate = GateHead(6).double()
    c = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: gate.logits(x), (c,))
    # and the weight and bias gradients against the plain linear
    z = gate.logits(c)
    G = torch.randn_like(z)
    got = torch.autograd.grad(z, (c, gate.out.weight, gate.out.bias), G)
    plain = nn.functional.linear(c, gate.out.weight, gate.out.bias).squeeze(-1)
    want = torch.autograd.grad(plain, (c, gate.out.weight, gate.out.bias), G)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def test_linear_gate_keeps_its_input_in_the_autocast_dtype():
    """Under bf16 autocast the logit is fp32 and exact, and so is ∂c; what autograd keeps of the
    fp32 context for ∂w is a bf16 copy (half the bytes), so ∂w is within bf16 rounding."""
    torch.manual_seed(0)
    gate = GateHead(64)
    c = torch.randn(4, 16, 64, requires_grad=True)
    kept = []

    def pack(t):
        kept.append((t.numel(), t.dtype))  # c's rows, in whatever shape the Function keeps them
        return t

    keep = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)
    with keep, torch.autocast("cpu", dtype=torch.bfloat16):
        z = gate.logits(c)
    assert z.dtype == torch.float32
    assert (c.numel(), torch.bfloat16) in kept and (c.numel(), torch.float32) not in kept
    plain = nn.functional.linear(c, gate.out.weight, gate.out.bias).squeeze(-1)
    torch.testing.assert_close(z, plain)
    G = torch.randn_like(z)
    gc, gw, gb = torch.autograd.grad(z, (c, gate.out.weight, gate.out.bias), G)
    wc, ww, wb = torch.autograd.grad(plain, (c, gate.out.weight, gate.out.bias), G)
    torch.testing.assert_close(gc, wc)
    torch.testing.assert_close(gb, wb)
    torch.testing.assert_close(gw, ww, rtol=2**-7, atol=2**-8 * ww.abs().max().item())


def _plain_heads(gate, value, c, u):
    """The gate and value projections as plain autograd composes them (the reference)."""
    with torch.autocast("cpu", enabled=False):
        z = nn.functional.linear(c.float(), gate.out.weight, gate.out.bias).squeeze(-1)
    return z, value.pre_activation(c, u)


@pytest.mark.parametrize("dv", [1, 4])  # 1: the value projection one column (elementwise on CPU)
@pytest.mark.parametrize("value_head", ["official", "paper"])
def test_gate_and_value_as_one_node_equal_the_plain_projections(value_head, dv):
    """fp32: the same values and every gradient; float64: gradcheck; under bf16 autocast: z and ∂c
    fp32-exact, the value projection's numbers those of autocast's linear, ∂w_g within bf16. On a
    CPU the one-column projections run as a product and a sum (`generators._project`)."""
    torch.manual_seed(0)
    gate, value = GateHead(24), ValueHead(24, dv, value_head)
    params = [p for p in (*gate.parameters(), *value.parameters())]
    c = torch.randn(3, 5, 24, requires_grad=True)
    u = torch.randn(3, 5, 24, requires_grad=True)
    for amp in (False, True):
        outs = []
        for fn in (gate_and_value, _plain_heads):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                z, p = fn(gate, value, c, u)
            torch.manual_seed(1)
            loss = (z * torch.randn_like(z)).sum() + (p.float() * torch.randn_like(p.float())).sum()
            outs.append((z, p, torch.autograd.grad(loss, [c, u, *params], allow_unused=True)))
        (z, p, grads), (z_ref, p_ref, grads_ref) = outs
        assert z.dtype == torch.float32 and p.dtype == p_ref.dtype
        torch.testing.assert_close(z, z_ref)
        torch.testing.assert_close(p, p_ref)
        for i, (got, want) in enumerate(zip(grads, grads_ref, strict=True)):
            if want is None:
                assert got is None or not got.any()
                continue
            loose = amp and i == 2  # ∂w_g from the bf16-kept c
            tol = dict(rtol=2**-7, atol=2**-8 * want.abs().max().item()) if loose else {}
            torch.testing.assert_close(got, want, **tol, msg=f"gradient {i}, autocast {amp}")
    with torch.no_grad():  # inference takes the plain linears without the autograd node
        fast, plain = gate_and_value(gate, value, c, u), _plain_heads(gate, value, c, u)
        for got, want in zip(fast, plain, strict=True):
            torch.testing.assert_close(got, want, rtol=0, atol=0)
    gate64, value64 = GateHead(6).double(), ValueHead(6, dv, value_head).double()
    c64 = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    u64 = torch.randn(2, 3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: gate_and_value(gate64, value64, a, b), (c64, u64))


def test_one_column_projections_skip_the_matrix_product_on_a_cpu(monkeypatch):
    """A gate logit and a dv = 1 value: an elementwise product and a sum, forward and backward
    (no matrix product a FLOP counter would see); the "torch" backend keeps the matrix products."""
    from torch.utils.flop_counter import FlopCounterMode

    gate, value = GateHead(24), ValueHead(24, 1)
    c = torch.randn(3, 5, 24, requires_grad=True)

    def matmul_flops():
        with FlopCounterMode(display=False) as counter:
            z, p = gate_and_value(gate, value, c, c)
            (z.sum() + p.sum()).backward()
        return counter.get_total_flops()

    monkeypatch.setattr(backend, "BACKEND", None)
    assert matmul_flops() == 0
    monkeypatch.setattr(backend, "BACKEND", "torch")
    assert matmul_flops() == 2 * 3 * 15 * 24 * 2  # three products, one column each, two heads


def _traced_calls(fn, *args):
    """`fn(*args)` traced by `torch.compile` for inference: its output and the callables of the
    graph dynamo captured (the `eager` backend: no code generation)."""
    graphs = []

    def capture(gm, _inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(fn, backend=capture, fullgraph=True)(*args)
    return out, {node.target for gm in graphs for node in gm.graph.nodes}


MATRIX_PRODUCTS = {nn.functional.linear, torch.matmul, torch.mm, torch.addmm, operator.matmul}


@pytest.mark.parametrize("dv", [1, 4])
def test_compiled_inference_takes_no_matrix_product_for_the_heads_and_the_fold(dv):
    """Traced for inference in fp32, the gate and value projections and the channel compressor's
    fold are elementwise products and sums, which Inductor fuses into the kernels around them (a
    matrix product is a library call of its own a sublayer and token in a compiled decode step);
    the values are eager's."""
    torch.manual_seed(0)
    gate, value = GateHead(24), ValueHead(24, dv, "official")
    c, u = torch.randn(3, 5, 24), torch.randn(3, 5, 24)
    (z, p), calls = _traced_calls(lambda a, b: gate_and_value(gate, value, a, b), c, u)
    assert not calls & MATRIX_PRODUCTS, calls & MATRIX_PRODUCTS
    with torch.no_grad():
        z_ref, p_ref = _plain_heads(gate, value, c, u)
    torch.testing.assert_close(z, z_ref)
    torch.testing.assert_close(p, p_ref)
    if dv > 1:
        cc = ChannelCompressor(24, dv)
        with torch.no_grad():
            cc.weight.normal_()
            cc.read.normal_()
        folded, calls = _traced_calls(cc.mixing_matrix)
        assert not calls & MATRIX_PRODUCTS, calls & MATRIX_PRODUCTS
        with torch.no_grad():
            torch.testing.assert_close(folded, cc.mixing_matrix())


ATEN_MATRIX_PRODUCTS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
}


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16-autocast"])
@pytest.mark.parametrize("dv", [1, 4])
def test_compiled_training_takes_no_matrix_product_for_the_heads(dv, autocast):
    """`deltalearn train --compile`: traced for training, the gate and value projections and each
    product of their backward are elementwise products and sums, which Inductor fuses with the
    rewrite's reductions over d (a matrix product is a library call that reads its operands
    again); the values and every gradient are eager's."""
    from functorch.compile import make_boxed_func
    from torch._dynamo.backends.common import aot_autograd

    graphs = []

    def keep(gm, _inputs):
        graphs.append(gm)
        return make_boxed_func(gm.forward)

    torch.manual_seed(0)
    gate, value = GateHead(24), ValueHead(24, dv, "official")
    c, u = torch.randn(3, 5, 24), torch.randn(3, 5, 24)

    def step(fn):
        ci, ui = c.clone().requires_grad_(), u.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            z, p = fn(ci, ui)
        (z.float().square().sum() + p.float().sum()).backward()
        params = [*gate.parameters(), *value.parameters()]
        grads = [ci.grad, ui.grad, *(t.grad for t in params)]
        for t in params:
            t.grad = None
        return [z, p, *grads]

    torch._dynamo.reset()
    heads = lambda a, b: gate_and_value(gate, value, a, b)  # noqa: E731
    backend_ = aot_autograd(fw_compiler=keep, bw_compiler=keep)
    compiled = step(torch.compile(heads, backend=backend_, fullgraph=True))
    eager = step(heads)
    assert len(graphs) == 2  # the forward and the backward
    calls = {node.target for gm in graphs for node in gm.graph.nodes}
    assert not calls & ATEN_MATRIX_PRODUCTS, calls & ATEN_MATRIX_PRODUCTS
    tol = {"rtol": 2e-2, "atol": 2e-2} if autocast else {}
    for got, want in zip(compiled, eager, strict=True):
        assert got.dtype == want.dtype
        torch.testing.assert_close(got, want, **tol)


def test_direction_forms_agree():
    k_raw = torch.randn(7, 33, dtype=torch.float64) * 3
    for eps in (0.0, 1e-5, 0.5):
        torch.testing.assert_close(direction_rms(k_raw, eps), normalize_direction(k_raw, eps))
        torch.testing.assert_close(direction(k_raw, eps, "rms"), direction(k_raw, eps, "l2"))


def test_value_head_forms():
    paper = ValueHead(6, 3, "paper")
    official = ValueHead(6, 3, "official")
    assert paper.proj.bias is None and official.proj.bias is not None
    c, u = torch.randn(4, 6), torch.randn(4, 6)
    v = official(c, u)
    assert torch.all((v > 0) & (v < 4))
    # the official head reads the un-normalised input u, the paper head the context c
    assert not torch.allclose(official(c, 2 * u), v)
    torch.testing.assert_close(official(2 * c, u), v)
    torch.testing.assert_close(paper(2 * c, u), 2 * paper(c, u))


def test_drop_in_resnet_trains():
    torch.manual_seed(0)
    dim = 16
    net = nn.Sequential(*[DeltaResidual(dim, _mlp(dim)) for _ in range(4)])
    x = torch.randn(64, dim)
    target = torch.sin(x)
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    first = None
    for _ in range(60):
        loss = (net(x) - target).pow(2).mean()
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first


class TestBadInput:
    def test_unknown_rule(self):
        with pytest.raises(ValueError, match=r"rule must be one of .*'multiply'"):
            DeltaResidual(8, _mlp(8), rule="multiply")

    def test_unknown_value_head_and_gate(self):
        with pytest.raises(ValueError, match="value_head"):
            DeltaResidual(8, _mlp(8), value_head="nope")
        with pytest.raises(ValueError, match="gate"):
            DeltaResidual(8, _mlp(8), gate="nope")

    def test_bad_beta_init(self):
        with pytest.raises(ValueError, match=r"beta_init must lie in \[0, 2\], got 3"):
            DeltaResidual(8, _mlp(8), beta_init=3)

    def test_state_of_wrong_width(self):
        with pytest.raises(ValueError, match=r"ending in \(8,\), got \(2, 9\)"):
            DeltaResidual(8, _mlp(8))(torch.randn(2, 9))

    def test_vector_state_given_to_matrix_layer(self):
        with pytest.raises(ValueError, match=r"\(8, 4\), got \(2, 8\)"):
            DeltaResidual(8, _mlp(8), value_channels=4)(torch.randn(2, 8))

    def test_branch_that_changes_width(self):
        with pytest.raises(ValueError, match="same shape"):
            DeltaResidual(8, nn.Linear(8, 4))(torch.randn(2, 8))

    def test_bad_value_channels(self):
        with pytest.raises(ValueError, match="value_channels must be >= 1, got 0"):
            DeltaResidual(8, _mlp(8), value_channels=0)

    def test_compressor_shape_mismatch(self):
        with pytest.raises(ValueError, match="does not end in"):
            ChannelCompressor(8, 4)(torch.randn(2, 8, 3))


@pytest.mark.parametrize("fused", [True, False])
def test_recorded_readout_is_fp32_under_bf16_autocast(fused):
    """The audit reads `last_gates.readout`: under bf16 autocast it must still be kᵀX in fp32."""
    torch.manual_seed(0)
    d, dv = 64, 4
    layer = DeltaResidual(d, nn.Linear(d, d), value_channels=dv, fused=fused)
    X = torch.randn(3, 5, d, dv) * 10
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(X)
    rec = layer.last_gates
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        h = layer.branch(layer.norm(layer.compressor(X)))  # the same bf16 branch output
    k = normalize_direction(h.double())
    want = torch.einsum("btd,btdv->btv", k, X.double())
    # Only the readout's own rounding is left: fp32 gives ~1e-7 relative, bf16 ~4e-3.
    assert (rec.readout.double() - want).abs().max() < 1e-4 * want.abs().max()


def test_rms_norm_parameters_name_only_a_plain_rms_norm():
    """What lets a rewrite recompute c = norm(u): torch's RMSNorm with a weight and an ε, or a
    module that says how it normalises (DeltaLM's), each called plainly and as wide as u."""
    from deltalearn.models.layers import RMSNorm
    from deltalearn.nn.residual import rms_norm_parameters

    u = torch.randn(2, 12)
    torch_norm, own = nn.RMSNorm(12, eps=1e-5), RMSNorm(12, 1e-6)
    assert rms_norm_parameters(torch_norm, u) == (torch_norm.weight, 1e-5)
    assert rms_norm_parameters(own, u) == (own.weight, 1e-6)
    assert rms_norm_parameters(own, torch.randn(2, 16)) is None  # not u's width
    assert rms_norm_parameters(nn.RMSNorm(12), u) is None  # ε from the input's dtype
    assert rms_norm_parameters(nn.RMSNorm(12, 1e-5, elementwise_affine=False), u) is None
    assert rms_norm_parameters(nn.LayerNorm(12), u) is None
    hooked = nn.RMSNorm(12, eps=1e-5)
    hooked.register_forward_hook(lambda module, args, out: out * 2)
    assert rms_norm_parameters(hooked, u) is None

    class Scaled(RMSNorm):  # says how it normalises, but its own forward runs
        def forward(self, x):
            return 2 * super().forward(x)

    assert rms_norm_parameters(Scaled(12, 1e-6), u) is None


def test_training_hands_the_update_the_norm_that_made_c(monkeypatch):
    """In training `DeltaResidual` passes its norm to the update (`c_norm`), not in inference; an
    update subclass with its own forward gets the call it always had."""
    from deltalearn.nn import DeltaUpdate

    layer = DeltaResidual(12, _mlp(12), value_head="official")
    seen = []
    real = DeltaUpdate.forward
    monkeypatch.setattr(
        DeltaUpdate, "forward", lambda self, *a, **k: seen.append(k) or real(self, *a, **k)
    )
    x = torch.randn(2, 3, 12)
    layer(x).sum().backward()
    with torch.no_grad():
        layer(x)
    assert seen == [{"c_norm": layer.norm}, {}]

    class OwnForward(DeltaUpdate):
        def forward(self, X, h, c, u):
            return real(self, X, h, c, u)

    layer.update.__class__ = OwnForward
    layer(x).sum().backward()


def test_inference_on_another_device_does_not_ask_for_the_cpu_extension(monkeypatch):
    """Without autograd, an update and a channel read of tensors on another device (meta here, as
    CUDA in use) go straight to their own path: the CPU inference extension, whose calls would only
    decline them, is not asked for (host time, which bounds decoding on a GPU). On the CPU it is."""
    from deltalearn.nn import DeltaUpdate
    from deltalearn.ops import extension

    calls = []
    real = extension.loaded
    monkeypatch.setattr(extension, "loaded", lambda: calls.append(1) or real())
    for device, asked in (("meta", False), ("cpu", True)):
        calls.clear()
        update = DeltaUpdate(16, 4, value_head="official").to(device)
        update.record = False
        compressor = ChannelCompressor(16, 4).to(device)
        X = torch.randn(2, 3, 16, 4, device=device)
        h = torch.randn(2, 3, 16, device=device)
        with torch.no_grad():
            Y, _ = update(X, h, h, h, torch.randn(16, 4, device=device))
            x_in, _ = compressor.read_with_matrix(X)
        assert Y.device.type == x_in.device.type == device
        assert (len(calls) == 2) if asked else calls == [], (device, calls)
