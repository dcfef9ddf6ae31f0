"""The analytic FLOP count (`deltalearn.models.flops`) against `torch.utils.flop_counter`.

Convention under test (the module's docstring): `flops_per_token` counts what FlopCounterMode
counts — matrix products, convolutions and attention products, 2 FLOPs per multiply-add, attention
over the whole window without a causal discount — per token. The elementwise DDL extras
(compressors, the rewrite's own arithmetic) are a separate estimate that neither side of the
comparison includes.

How the counter is run here, so that it counts that convention on a CPU:
* attention through SDPA's math backend, whose QKᵀ and PV are bmm's the counter sees (the CPU
  flash kernel is not in its registry);
* a corrected formula for `convolution_backward`: torch ≤ 2.13 forgets the groups in the weight
  gradient of a grouped conv and counts EC's depthwise conv d times over (pytorch/pytorch#183405).
"""

from __future__ import annotations

import dataclasses
import math
from unittest import mock

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, conv_backward_flop

from deltalearn.models import VARIANTS, DeltaLM, DeltaLMConfig
from deltalearn.models.flops import (
    ELEMENTWISE_COMPONENTS,
    MATMUL_COMPONENTS,
    FlopCount,
    elementwise_flops_per_token,
    flops_breakdown,
    flops_per_token,
)
from deltalearn.ops import _shapes, backend

aten = torch.ops.aten
SHAPE = dict(num_layers=2, hidden_size=64, num_heads=2, head_dim=32, vocab_size=300)
B, T = 2, 16


def _grouped_conv_backward(grad_out, x, w, bias, stride, padding, dilation, transposed,
                           output_padding, groups, output_mask, out_shape=None, **kwargs):  # fmt: skip
    """torch's formula, with the weight-gradient term divided by the groups it forgets."""
    args = (grad_out, x, w, bias, stride, padding, dilation, transposed, output_padding, groups)
    grad_in = conv_backward_flop(*args, [output_mask[0], False], out_val=out_shape)
    grad_w = conv_backward_flop(*args, [False, output_mask[1]], out_val=out_shape)
    return grad_in + grad_w // groups


def _counter() -> FlopCounterMode:
    return FlopCounterMode(
        display=False, custom_mapping={aten.convolution_backward: _grouped_conv_backward}
    )


def _per_token(counter: FlopCounterMode) -> dict[str, float]:
    return {k: sum(v.values()) / (B * T) for k, v in counter.get_flop_counts().items()}


def _backward_alone(module: torch.nn.Module, args: tuple, kwargs: dict) -> float:
    """Per-token FLOPs of the backward of `module` run alone on copies of its inputs, every
    floating-point input a leaf that needs a gradient (as inside the trained model)."""
    leaves = [a.detach().clone().requires_grad_(a.is_floating_point()) for a in args]
    out = module(*leaves, **kwargs)
    outs = out if isinstance(out, tuple) else (out,)  # a rewrite with the fused read returns two
    counter = _counter()
    with counter:
        sum(o.float().sum() for o in outs).backward()
    return counter.get_total_flops() / (B * T)


def measured(config: DeltaLMConfig, names: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """Per-token FLOPs that FlopCounterMode counts in a training forward (with the loss) and its
    backward: "Global" (the whole model) and each module of `names` — forward as attributed in
    the model's pass, backward from the module run alone on the inputs it saw there (the
    counter's attribution of backward ops to modules is not exact)."""
    torch.manual_seed(0)
    model = DeltaLM(config)
    ids = torch.randint(0, config.vocab_size, (B, T))
    inputs: dict[str, tuple[tuple, dict]] = {}
    modules = dict(model.named_modules())

    def keep(name: str):
        def hook(module, args, kwargs, out) -> None:  # None: the output stays as it is
            inputs.setdefault(name, (args, kwargs))

        return hook

    hooks = [modules[n].register_forward_hook(keep(n), with_kwargs=True) for n in names]
    # The readout kᵀX as training states take it (an einsum the counter sees as a matmul); this
    # test's states are small enough for the product-sum of a decoded token, which it does not.
    with sdpa_kernel(SDPBackend.MATH), mock.patch.object(_shapes, "SMALL_STATE", 0):
        forward = _counter()
        with forward:
            loss = model(ids, labels=ids).loss
        for hook in hooks:
            hook.remove()
        backward = _counter()
        with backward:
            loss.backward()
        fwd, bwd = _per_token(forward), _per_token(backward)
        for name in names:
            bwd[f"DeltaLM.{name}"] = _backward_alone(modules[name], *inputs[name])
    return fwd, bwd


CONFIGS = {
    **{variant: DeltaLMConfig.preset(variant, "tiny", **SHAPE) for variant in VARIANTS},
    "ddl-cc, mlp gate, paper value head": DeltaLMConfig.preset(
        "ddl-cc", "tiny", gate="mlp", gate_hidden_size=24, value_head="paper", **SHAPE
    ),
    "ddl-tc, dv=3, kernels 2 and 3": DeltaLMConfig.preset(
        "ddl-tc",
        "tiny",
        value_channels=3,
        compressor_kernel_size=2,
        expansion_kernel_size=3,
        **SHAPE,
    ),  # fmt: skip
}


def _modules(config: DeltaLMConfig) -> list[str]:
    """Modules whose FLOPs each component accounts for (one layer's worth of each)."""
    names = ["layers.0.attn", "layers.1.mlp", "lm_head"]
    if config.residual != "additive":
        names += ["layers.1.attn_update", "layers.0.mlp_update"]
    if config.expanded and config.expansion == "ec":
        names.append("expand")
    return names


@pytest.fixture(scope="module", params=list(CONFIGS))
def counted(request):
    config = CONFIGS[request.param]
    # The PyTorch ops, which the counter sees (a C kernel's matmul-like readout it cannot).
    before, backend.BACKEND = backend.BACKEND, "torch"
    try:
        return config, measured(config, _modules(config))
    finally:
        backend.BACKEND = before


def test_total_is_within_10_percent_of_flop_counter(counted):
    config, (fwd, bwd) = counted
    count = flops_per_token(config, T)
    assert count.forward == pytest.approx(fwd["Global"], rel=0.10)
    assert count.backward == pytest.approx(bwd["Global"], rel=0.10)
    assert count.train == pytest.approx(fwd["Global"] + bwd["Global"], rel=0.10)


def test_each_component_equals_what_the_counter_sees_in_its_module(counted):
    """Module by module the count is exact: a wrong factor anywhere shows up here, even where it
    hides inside the 10% of the total."""
    config, (fwd, bwd) = counted
    parts = flops_breakdown(config, T)
    L = config.num_layers
    modules = {
        "DeltaLM.layers.0.attn": parts["attention"] * (1 / L),
        "DeltaLM.layers.1.mlp": parts["mlp"] * (1 / L),
        "DeltaLM.lm_head": parts["logits"],
    }
    if config.residual != "additive":  # value and gate heads + readout of one rewrite
        # A vector state's readout (dv = 1) is a product-sum, element-wise work the counter does
        # not see; a matrix state's is an einsum (a bmm), which it counts as a matmul.
        readout = parts["ddl_readout"] if config.value_channels > 1 else FlopCount(0.0, 0.0)
        per_rewrite = (parts["ddl_heads"] + readout) * (1 / (2 * L))
        modules["DeltaLM.layers.1.attn_update"] = per_rewrite
        modules["DeltaLM.layers.0.mlp_update"] = per_rewrite
    if config.expanded and config.expansion == "ec":
        modules["DeltaLM.expand"] = parts["expansion"]
    for name, want in modules.items():
        assert want.forward > 0 and want.backward > 0, name
        assert fwd[name] == pytest.approx(want.forward, rel=1e-9), name
        assert bwd[name] == pytest.approx(want.backward, rel=1e-9), name
    if config.residual == "additive":
        assert parts["ddl_heads"] == parts["ddl_readout"] == FlopCount(0.0, 0.0)
        assert not any("update" in name for name in fwd)
    if not (config.expanded and config.expansion == "ec"):
        assert parts["expansion"] == FlopCount(0.0, 0.0) and "DeltaLM.expand" not in fwd


def test_baseline_matches_the_6n_plus_attention_rule():
    """PaLM's model FLOPs per training token: 6·N (N = weights of every matrix product: the 2-D
    parameters, the tied embedding counted once, as the LM head) + 12·L·T·I for attention,
    computed here from the model's own parameters."""
    T_small = 1024
    config = DeltaLMConfig.preset("baseline", "small")
    with torch.device("meta"):
        model = DeltaLM(config)
    n = sum(p.numel() for p in model.parameters() if p.dim() == 2)  # tied weights: once
    inner = config.num_heads * config.head_dim
    expected = 6 * n + 12 * config.num_layers * T_small * inner
    count = flops_per_token(config, T_small)
    assert count.train == pytest.approx(expected, rel=1e-12)
    assert count.backward == 2 * count.forward
    assert 0.8e9 < count.train < 1.2e9  # ≈ 1 GFLOP per token for the 124M model


def test_ddl_extras_are_small_next_to_the_backbone_at_the_paper_size():
    base = flops_per_token(DeltaLMConfig.preset("baseline", "small"), 1024)
    for variant in ("ddl", "ddl-cc", "ddl-tc", "write-only-cc"):
        config = DeltaLMConfig.preset(variant, "small")
        count = flops_per_token(config, 1024)
        assert 1.0 < count.train / base.train < 1.01, variant  # heads, readout, EC: < 1%
        extra = elementwise_flops_per_token(config, 1024)
        assert 0 < extra.train < 0.01 * count.train, variant


def test_flop_count_arithmetic_and_breakdown_sum():
    config = CONFIGS["ddl-tc"]
    parts = flops_breakdown(config, T)
    assert list(parts) == [*MATMUL_COMPONENTS, *ELEMENTWISE_COMPONENTS]
    total = flops_per_token(config, T)
    assert total.forward == pytest.approx(sum(parts[k].forward for k in MATMUL_COMPONENTS))
    assert total.backward == pytest.approx(sum(parts[k].backward for k in MATMUL_COMPONENTS))
    assert total.train == total.forward + total.backward
    extra = elementwise_flops_per_token(config, T)
    assert extra.forward == pytest.approx(sum(parts[k].forward for k in ELEMENTWISE_COMPONENTS))
    assert all(math.isfinite(p.train) and p.train >= 0 for p in parts.values())
    # Longer windows cost more attention per token, and nothing else.
    longer = flops_breakdown(config, 2 * T)
    assert longer["attention"].forward > parts["attention"].forward
    assert all(longer[k] == parts[k] for k in parts if k != "attention")
    with pytest.raises(dataclasses.FrozenInstanceError):
        total.forward = 0.0  # type: ignore[misc]


@pytest.mark.parametrize("seq_len", [0, -3, 2.5, True])
def test_bad_seq_len_is_a_value_error_naming_it(seq_len):
    with pytest.raises(ValueError, match="seq_len"):
        flops_per_token(CONFIGS["ddl"], seq_len)
