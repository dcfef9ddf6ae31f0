"""Checkpoints of the authors' code load into DeltaLM and reproduce their logits (fixtures: see
tests/fixtures/official/README.md); unsupported variants are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltalearn import DeltaLM
from deltalearn.compat.official import load_official

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "official"
NAMES = ["ddl-vdim1", "ddl-cc", "ddl-cc-ec"]


def _fixture(name: str) -> tuple[dict, dict, dict]:
    folder = FIXTURES / name
    config = json.loads((folder / "config.json").read_text())
    return (
        load_file(folder / "model.safetensors"),
        config,
        load_file(folder / "expected.safetensors"),
    )


@pytest.mark.parametrize("name", NAMES)
def test_official_checkpoint_reproduces_logits(name):
    state, config, expected = _fixture(name)
    model = load_official(state, config)
    assert isinstance(model, DeltaLM) and not model.training
    with torch.no_grad():
        logits = model(expected["input_ids"]).logits
    diff = (logits - expected["logits"]).abs().max().item()
    assert diff <= 1e-4, f"{name}: max abs diff {diff:.3g}"


@pytest.mark.parametrize(
    "name, fields",
    [
        ("ddl-vdim1", dict(value_channels=1, value_head="official", direction_form="rms")),
        ("ddl-cc", dict(value_channels=4, compressor="cc", expansion="repeat")),
        ("ddl-cc-ec", dict(value_channels=4, compressor="cc", expansion="ec")),
    ],
)
def test_official_config_mapping(name, fields):
    state, config, _ = _fixture(name)
    cfg = load_official(state, config).config
    assert {k: getattr(cfg, k) for k in fields} == fields
    assert (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.vocab_size) == (2, 2, 16, 256)


@pytest.mark.parametrize(
    "flag, value",
    [
        ("use_k_shift", True),
        ("use_v_shift", True),
        ("using_groupnorm", True),
        ("use_output_gate", True),
        ("ddl_v_constant", True),
        ("ddl_v_sigmoid", False),
        ("rope_ratio", 0.5),
    ],
)
def test_unsupported_config_flags_are_named(flag, value):
    state, config, _ = _fixture("ddl-cc")
    with pytest.raises(ValueError, match=f"config flag {flag}={value!r}"):
        load_official(state, {**config, flag: value})


def test_token_compressor_files_are_refused():
    state, config, _ = _fixture("ddl-cc-ec")
    state = dict(state)
    for key in list(state):
        if key.endswith("compress.weight") or key == "readout.weight":
            state[key] = torch.zeros(32, 4, 4)  # the TC layout (d, dv, K)
    with pytest.raises(ValueError, match=r"token-axis compressor \(TC"):
        load_official(state, config)


def test_unknown_parameters_are_refused():
    state, config, _ = _fixture("ddl-vdim1")
    with pytest.raises(ValueError, match="unknown parameter 'transformer.h.0.attn.g_proj.weight'"):
        load_official({**state, "transformer.h.0.attn.g_proj.weight": torch.zeros(32, 32)}, config)


def test_loaded_official_model_generates_with_cache():
    state, config, expected = _fixture("ddl-cc-ec")
    model = load_official(state, config)
    prompt = expected["input_ids"][:, :5]
    cached = model.generate(prompt, max_new_tokens=4, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_two_layer_gate_maps_onto_the_mlp_gate():
    state, config, _ = _fixture("ddl-vdim1")
    state, hidden = dict(state), 8
    g = torch.Generator().manual_seed(0)
    for sub in ("ddl_attn", "ddl_mlp"):
        for i in range(2):
            p = f"transformer.h.{i}.{sub}."
            del state[p + "beta.weight"], state[p + "beta.bias"]
            state[p + "beta_in.weight"] = torch.randn(hidden, 32, generator=g)  # no bias
            state[p + "beta_out.weight"] = torch.randn(1, hidden, generator=g)
            state[p + "beta_out.bias"] = torch.randn(1, generator=g)
    config = {**config, "ddl_beta_single_linear": False, "ddl_beta_hidden_size": hidden}
    model = load_official(state, config)
    assert model.config.gate == "mlp" and model.config.gate_hidden_size == hidden
    c = torch.randn(3, 32)
    p = "transformer.h.1.ddl_mlp."
    z = torch.tanh(c @ state[p + "beta_in.weight"].T) @ state[p + "beta_out.weight"].T
    want = 2 * torch.sigmoid(z + state[p + "beta_out.bias"]).squeeze(-1)
    torch.testing.assert_close(model.layers[1].mlp_update.gate(c), want)
