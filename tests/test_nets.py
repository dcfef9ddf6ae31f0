"""The ready networks: every builder, every rule, forward and backward; gates on request."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

import deltalearn.nn
from deltalearn.nets import DeltaResMLP, DeltaResNet
from deltalearn.nets.results import format_interval, mean_interval, pyplot, save_figure, write_json
from deltalearn.nn import ConvDeltaResidual, DeltaResidual

RULES = ["additive", "delta", "write_only"]


def _build(kind: str, rule: str, dv: int = 1) -> tuple[nn.Module, torch.Tensor, tuple[int, ...]]:
    if kind == "mlp":
        net = DeltaResMLP(3, 2, width=8, depth=3, rule=rule, value_channels=dv)
        return net, torch.randn(5, 3), (5, 2)
    net = DeltaResNet(1, 10, rule=rule, widths=(4, 8), blocks_per_stage=2, value_channels=dv)
    return net, torch.randn(2, 1, 8, 8), (2, 10)


@pytest.mark.parametrize("kind", ["mlp", "resnet"])
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("dv", [1, 2])
def test_every_builder_runs_forward_and_backward_for_every_rule(kind, rule, dv):
    torch.manual_seed(0)
    net, x, out_shape = _build(kind, rule, dv)
    assert net.rule == rule
    assert all(b.rule == rule for b in net.residuals())
    y, gates = net(x, output_gates=True)
    assert y.shape == out_shape and torch.isfinite(y).all()
    y.square().sum().backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    blocks = list(net.residuals())
    assert len(blocks) == (3 if kind == "mlp" else 4)
    if rule == "additive":
        assert gates == []  # no gates to return
    else:
        assert len(gates) == len(blocks)
        lead = [(5,)] * 3 if kind == "mlp" else [(2, 8, 8)] * 2 + [(2, 4, 4)] * 2
        assert [tuple(g.beta.shape) for g in gates] == lead
        assert all(((g.beta > 0) & (g.beta < 2)).all() for g in gates)
    # recording is off again after the call, and the plain call returns only the output
    assert not any(b.record_gates for b in blocks)
    assert isinstance(net(x), torch.Tensor)


def test_rule_is_the_only_difference_between_the_networks():
    """additive, delta, write_only: the same backbone; DDL adds only its value and gate heads."""
    names = {}
    for rule in RULES:
        names[rule] = {
            n for n, _ in DeltaResNet(1, 10, rule=rule, widths=(4, 8)).named_parameters()
        }
    extra = names["delta"] - names["additive"]
    assert names["additive"] < names["delta"] and names["delta"] == names["write_only"]
    assert extra and all(".update.value." in n or ".update.gate." in n for n in extra)


def test_additive_resnet_is_a_plain_prenorm_resnet():
    torch.manual_seed(1)
    net = DeltaResNet(1, 3, rule="additive", widths=(4,), blocks_per_stage=1).double()
    x = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    block = net.blocks[0]
    X = net.stem(x)
    c = X * torch.rsqrt(X.pow(2).mean(1, keepdim=True) + 1e-6) * block.norm.weight[:, None, None]
    X = X + block.branch(c)
    pooled = (X * torch.rsqrt(X.pow(2).mean(1, keepdim=True) + 1e-6)).mean((2, 3))
    want = net.head(pooled * net.norm.weight)
    torch.testing.assert_close(net(x), want)


def test_blocks_are_the_residual_modules():
    assert isinstance(DeltaResMLP(2, 2, 4, 2).blocks[0], DeltaResidual)
    assert isinstance(DeltaResNet(1, 2, widths=(4,)).blocks[0], ConvDeltaResidual)
    # the API lists the builders under deltalearn.nn as well
    assert deltalearn.nn.DeltaResMLP is DeltaResMLP and deltalearn.nn.DeltaResNet is DeltaResNet


def test_residual_options_reach_every_block():
    net = DeltaResMLP(2, 2, 4, 3, rule="delta", beta_init=1.8, gate="mlp", gate_hidden=3)
    for block in net.residuals():
        assert block.update.gate.kind == "mlp"
        assert block.update.gate.beta_init == 1.8


class TestBadInput:
    def test_unknown_rule(self):
        with pytest.raises(ValueError, match=r"rule must be one of .*'residual'"):
            DeltaResMLP(2, 2, 4, 2, rule="residual")
        with pytest.raises(ValueError, match=r"rule must be one of .*'plain'"):
            DeltaResNet(1, 2, rule="plain")

    def test_bad_sizes(self):
        with pytest.raises(ValueError, match="depth must be a positive integer, got 0"):
            DeltaResMLP(2, 2, 4, 0)
        with pytest.raises(ValueError, match=r"widths\[1\] must be a positive integer, got 0"):
            DeltaResNet(1, 2, widths=(4, 0))
        with pytest.raises(ValueError, match="widths must name at least one stage"):
            DeltaResNet(1, 2, widths=())

    def test_images_without_channel_axis(self):
        with pytest.raises(ValueError, match=r"\(B, C, H, W\), got \(2, 8, 8\)"):
            DeltaResNet(1, 2, widths=(4,))(torch.randn(2, 8, 8))


def test_mean_interval_is_the_student_t_interval():
    s = mean_interval([1.0, 2.0, 3.0, 4.0, 5.0])
    # sd = sqrt(2.5), t_{0.975, 4} = 2.7764451
    assert s["mean"] == 3.0 and s["n"] == 5
    assert s["half_width"] == pytest.approx(2.7764451 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    assert s["low"] == pytest.approx(3.0 - s["half_width"])
    assert math.isnan(mean_interval([0.5])["half_width"])
    assert math.isnan(mean_interval([1.0, float("nan")])["half_width"])
    assert format_interval(mean_interval([0.97, 0.99]), 2, scale=100).startswith("98.00 ± ")
    with pytest.raises(ValueError, match="at least one value"):
        mean_interval([])
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\), got 95"):
        mean_interval([1.0, 2.0], level=95)


def test_result_files_are_written_whole(tmp_path):
    path = write_json(tmp_path / "a" / "r.json", {"x": [1, 2], "nan": float("nan")})
    assert json.loads(path.read_text())["x"] == [1, 2]
    plt = pyplot()
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    png = save_figure(fig, tmp_path / "b" / "f.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in png.parent.iterdir()) == ["f.png"]  # no temp file left
