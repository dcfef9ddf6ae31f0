"""DeltaLMConfig: presets, validation with clear errors, HF aliases, parameter counts of the paper sizes."""

from __future__ import annotations

import pytest
import torch
from model_helpers import ALL_VARIANTS

from deltalearn import DeltaLM, DeltaLMConfig


@pytest.mark.parametrize("variant", ALL_VARIANTS)
@pytest.mark.parametrize("size", ["tiny", "small", "medium"])
def test_every_preset_builds_a_valid_config(variant, size):
    cfg = DeltaLMConfig.preset(variant, size)
    assert cfg.hidden_size == cfg.num_heads * cfg.head_dim
    assert cfg.num_hidden_layers == cfg.num_layers  # the name `generate` needs
    assert cfg.num_attention_heads == cfg.num_heads
    expanded = variant not in ("baseline", "ddl", "write-only")
    assert cfg.expanded == expanded


def test_preset_fields_of_the_variants():
    cc = DeltaLMConfig.preset("ddl-cc")
    assert (cc.residual, cc.value_channels, cc.compressor, cc.expansion) == ("delta", 4, "cc", "ec")
    assert cc.compressor_kernel_size == 4  # CC consumes the whole value axis by default
    tc = DeltaLMConfig.preset("ddl-tc-noec")
    assert (tc.compressor, tc.expansion, tc.compressor_kernel_size) == ("tc", "repeat", 4)
    assert DeltaLMConfig.preset("write-only").residual == "write_only"
    assert DeltaLMConfig.preset("write-only").value_channels == 1
    assert DeltaLMConfig.preset("baseline").residual == "additive"
    # CC's default kernel follows value_channels
    assert DeltaLMConfig.preset("ddl-cc", value_channels=2).compressor_kernel_size == 2


def test_preset_overrides_and_hf_aliases():
    cfg = DeltaLMConfig.preset("ddl", "small", num_layers=3, beta_init=0.5)
    assert (cfg.num_layers, cfg.beta_init, cfg.hidden_size) == (3, 0.5, 768)
    assert DeltaLMConfig(num_hidden_layers=5).num_layers == 5


@pytest.mark.parametrize(
    "args, match",
    [
        (("nope",), r"variant must be one of \['baseline', 'ddl', .*'additive-cc'\], got 'nope'"),
        (("ddl", "huge"), r"size must be one of \['tiny', 'small', 'medium'\], got 'huge'"),
    ],
    ids=["variant", "size"],
)
def test_unknown_preset_names(args, match):
    with pytest.raises(ValueError, match=match):
        DeltaLMConfig.preset(*args)


def test_unknown_override_field():
    with pytest.raises(ValueError, match=r"unknown DeltaLMConfig field\(s\) \['num_layer'\]"):
        DeltaLMConfig.preset("ddl", num_layer=2)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(residual="mult"), r"residual must be one of \['additive', 'delta', 'write_only'\]"),
        (dict(compressor="xc"), r"compressor must be one of \['cc', 'tc'\]"),
        (dict(expansion="tile"), r"expansion must be one of \['ec', 'repeat'\]"),
        (dict(value_head="x"), r"value_head must be one of \['paper', 'official'\]"),
        (dict(gate="deep"), r"gate must be one of \['linear', 'mlp'\]"),
        (dict(value_channels=0), r"value_channels must be an integer >= 1, got 0"),
        (dict(hidden_size=100), r"hidden_size must equal num_heads \* head_dim = 4 \* 32 = 128"),
        (dict(value_channels=4, compressor_kernel_size=5), r"compressor_kernel_size must lie in"),
        (dict(compressor_kernel_size=0), r"compressor_kernel_size must be an integer >= 1"),
        (dict(expansion_kernel_size=0), r"expansion_kernel_size must be an integer >= 1"),
        (dict(beta_init=2.5), r"beta_init must be a number in \[0, 2\], got 2.5"),
        (dict(beta_init="x"), r"beta_init must be a number in \[0, 2\], got 'x'"),
        (dict(k_eps=-1.0), r"k_eps must be a number >= 0"),
        (dict(num_layers=0), r"num_layers must be an integer >= 1"),
        (dict(head_dim=31, num_heads=4, hidden_size=124), r"head_dim must be even"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else "",
)
def test_bad_fields_raise_naming_the_field(fields, match):
    base = dict(hidden_size=128, num_heads=4, head_dim=32, value_channels=4)
    with pytest.raises(ValueError, match=match):
        DeltaLMConfig(**{**base, **fields})


def test_config_round_trip(tmp_path):
    cfg = DeltaLMConfig.preset("ddl-tc", gate="mlp", value_head="official")
    cfg.save_pretrained(tmp_path)
    again = DeltaLMConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict()


def _count(cfg: DeltaLMConfig) -> int:
    with torch.device("meta"):
        model = DeltaLM(cfg)
    assert model.lm_head.weight is model.embed.weight  # tied: counted once below
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("size, expected", [("small", 124e6), ("medium", 353e6)])
def test_paper_sizes_have_the_paper_parameter_counts(size, expected):
    n = _count(DeltaLMConfig.preset("baseline", size))
    assert abs(n - expected) / expected < 0.02, n


def test_ddl_adds_few_parameters():
    base = _count(DeltaLMConfig.preset("baseline", "small"))
    for variant in ALL_VARIANTS:
        assert 0 <= _count(DeltaLMConfig.preset(variant, "small")) - base < 0.005 * base
