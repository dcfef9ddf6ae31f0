"""Checkpoints of both versions of the authors' code load into DeltaLM and reproduce their logits
(fixtures: tests/fixtures/official/README.md for the older version, tests/fixtures/official-current/
README.md and NOTES.md for commit d1f76215); sizes come from the weights, a config that contradicts
them and unsupported variants are refused by name."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from deltalearn import DeltaLM
from deltalearn.compat.official import load_official

FIXTURES = Path(__file__).resolve().parent / "fixtures"
OLD, CURRENT = "official", "official-current"
CASES = [
    (OLD, "ddl-vdim1"),
    (OLD, "ddl-cc"),
    (OLD, "ddl-cc-ec"),
    (CURRENT, "ddl-vdim1"),
    (CURRENT, "ddl-tc"),
    (CURRENT, "ddl-tc-ec"),
    (CURRENT, "ddl-cc"),
    (CURRENT, "ddl-cc-ec"),
]
EXPANDED = [case for case in CASES if case[1] != "ddl-vdim1"]
TOL = 1e-4  # fixtures README: float32 round-off; measured ≈ 1e-6
D, DV, K = 32, 4, 4  # the fixtures' width, value channels and kernel sizes


def _ids(cases):
    return [f"{version}/{name}" for version, name in cases]


def _fixture(version: str, name: str) -> tuple[dict, dict, dict]:
    folder = FIXTURES / version / name
    return (
        load_file(folder / "model.safetensors"),
        json.loads((folder / "config.json").read_text()),
        load_file(folder / "expected.safetensors"),
    )


@torch.no_grad()
def _max_diff(model: DeltaLM, expected: dict, scale: float = 1.0) -> float:
    logits = model(expected["input_ids"]).logits
    return (logits - scale * expected["logits"]).abs().max().item()


def _old_layout(state: dict, config: dict) -> tuple[dict, dict]:
    """A current-version file written in the older version's names and layouts (NOTES.md)."""
    old = {}
    for key, value in state.items():
        key = key.replace(".o_proj.", ".c_proj.")
        if (key.endswith("compress.weight") or key == "readout.weight") and value.dim() == 3:
            d, dv, k = value.shape  # TC (d, dv, K) -> (d*dv, K)
            key, value = key.replace(".weight", ".shortconv.weight"), value.reshape(d * dv, k)
        elif key == "input_embed.weight":
            d, dv, k = value.shape  # EC (d, dv, K) -> (d*dv, 1, K)
            key, value = "input_embed.conv.weight", value.reshape(d * dv, 1, k)
        old[key] = value
    config = {**config, "model_type": "nanogpt-pro", "is_decoder": False}
    for key in ("ddl_sequence_reduction_version", "attention_dtype", "transformers_version"):
        config.pop(key, None)
    return old, config


@pytest.mark.parametrize("version, name", CASES, ids=_ids(CASES))
def test_official_checkpoint_reproduces_logits(version, name, record_property):
    state, config, expected = _fixture(version, name)
    model = load_official(state, config)
    assert isinstance(model, DeltaLM) and not model.training
    diff = _max_diff(model, expected)
    record_property("max_abs_diff", diff)
    assert diff <= TOL, f"{version}/{name}: max abs diff {diff:.3g}"


@pytest.mark.parametrize(
    "version, name, fields",
    [
        (OLD, "ddl-vdim1", dict(value_channels=1, value_head="official", direction_form="rms")),
        (OLD, "ddl-cc", dict(value_channels=4, compressor="cc", expansion="repeat")),
        (OLD, "ddl-cc-ec", dict(value_channels=4, compressor="cc", expansion="ec")),
        (CURRENT, "ddl-vdim1", dict(value_channels=1, value_head="official")),
        (CURRENT, "ddl-tc", dict(value_channels=4, compressor="tc", expansion="repeat")),
        (CURRENT, "ddl-tc-ec", dict(compressor="tc", expansion="ec", expansion_kernel_size=4)),
        (CURRENT, "ddl-cc", dict(value_channels=4, compressor="cc", compressor_kernel_size=4)),
        (CURRENT, "ddl-cc-ec", dict(value_channels=4, compressor="cc", expansion="ec")),
    ],
    ids=lambda x: x if isinstance(x, str) else "",
)
def test_official_config_mapping(version, name, fields):
    state, config, _ = _fixture(version, name)
    cfg = load_official(state, config).config
    assert {k: getattr(cfg, k) for k in fields} == fields
    assert (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.vocab_size) == (2, 2, 16, 256)


@pytest.mark.parametrize("name", ["ddl-tc", "ddl-tc-ec"])
def test_old_layout_token_compressor_files_load(name):
    """The older TC files (`compress.shortconv.weight` (d·dv, K), `c_proj`, EC as
    `input_embed.conv.weight`) give the same model as the current layout."""
    state, config, expected = _fixture(CURRENT, name)
    old_state, old_config = _old_layout(state, config)
    assert "transformer.h.0.compress.shortconv.weight" in old_state
    assert old_state["readout.shortconv.weight"].shape == (D * DV, K)
    model = load_official(old_state, old_config)
    assert model.config.compressor == "tc"
    assert _max_diff(model, expected) <= TOL
    reference = load_official(state, config)
    with torch.no_grad():
        ids = expected["input_ids"]
        assert torch.equal(model(ids).logits, reference(ids).logits)


@pytest.mark.parametrize("version, name", EXPANDED, ids=_ids(EXPANDED))
def test_sizes_missing_from_the_config_come_from_the_weights(version, name):
    state, config, expected = _fixture(version, name)
    for key in (
        "ddl_value_channels",  # their default is 4; ours would be 1
        "ddl_state_shortconv_kernel_size",
        "input_embed_shortconv_kernel_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "head_dim",
        "vocab_size",
    ):
        config.pop(key, None)
    model = load_official(state, config)
    assert model.config.value_channels == DV
    assert _max_diff(model, expected) <= TOL


@pytest.mark.parametrize("version, name", [(CURRENT, "ddl-tc-ec"), (OLD, "ddl-vdim1")])
def test_an_empty_config_loads(version, name):
    state, _, expected = _fixture(version, name)
    assert _max_diff(load_official(state, {}), expected) <= TOL


def test_kernel_sizes_come_from_the_weights():
    """A TC file with K = 3 taps loads as K = 3 and equals the K = 4 file whose first tap is 0."""
    state, config, expected = _fixture(CURRENT, "ddl-tc-ec")
    for key in ("ddl_state_shortconv_kernel_size", "input_embed_shortconv_kernel_size"):
        del config[key]
    short, padded = dict(state), dict(state)
    for key, value in state.items():
        if key.endswith("compress.weight") or key in ("readout.weight", "input_embed.weight"):
            short[key] = value[..., 1:].contiguous()
            padded[key] = torch.cat([torch.zeros_like(value[..., :1]), value[..., 1:]], dim=-1)
    model = load_official(short, config)
    assert (model.config.compressor_kernel_size, model.config.expansion_kernel_size) == (3, 3)
    with torch.no_grad():
        ids = expected["input_ids"]
        want = load_official(padded, config)(ids).logits
        torch.testing.assert_close(model(ids).logits, want, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"config ddl_state_shortconv_kernel_size=4 contradicts"):
        load_official(short, {**config, "ddl_state_shortconv_kernel_size": 4})


@pytest.mark.parametrize(
    "version, name, key, value, implied",
    [
        (CURRENT, "ddl-tc-ec", "ddl_value_channels", 2, 4),
        (CURRENT, "ddl-tc-ec", "ddl_state_shortconv_kernel_size", 3, 4),
        (CURRENT, "ddl-tc-ec", "input_embed_shortconv_kernel_size", 2, 4),
        (CURRENT, "ddl-tc", "hidden_size", 64, 32),
        (CURRENT, "ddl-tc", "num_hidden_layers", 3, 2),
        (CURRENT, "ddl-tc", "num_attention_heads", 4, 2),
        (CURRENT, "ddl-tc", "head_dim", 8, 16),
        (CURRENT, "ddl-tc", "vocab_size", 300, 256),
        (CURRENT, "ddl-cc", "ddl_state_shortconv_kernel_size", 2, 4),
        (CURRENT, "ddl-vdim1", "ddl_value_channels", 4, 1),
        (OLD, "ddl-cc-ec", "ddl_beta_single_linear", False, True),
    ],
)
def test_a_config_that_contradicts_the_weights_is_named(version, name, key, value, implied):
    state, config, _ = _fixture(version, name)
    with pytest.raises(ValueError, match=rf"config {key}={value!r} contradicts the weights") as e:
        load_official(state, {**config, key: value})
    assert f"{key}={implied!r}" in str(e.value)  # and says what the weights say


@pytest.mark.parametrize(
    "name, flag, value",
    [
        ("ddl-cc", "use_k_shift", True),
        ("ddl-cc", "use_v_shift", True),
        ("ddl-cc", "using_groupnorm", True),
        ("ddl-cc", "use_output_gate", True),
        ("ddl-cc", "ddl_v_constant", True),
        ("ddl-cc", "ddl_v_sigmoid", False),
        ("ddl-cc", "rope_ratio", 0.5),
        ("ddl-cc", "ddl_state_dv_shortconv_causal", True),
        ("ddl-tc", "ddl_sequence_reduction_version", 2),
        ("ddl-tc", "attention_dtype", "bfloat16"),
        ("ddl-tc", "residual_branch_mult", 0.5),
        ("ddl-tc", "parameterization", "muP"),
        ("ddl-tc", "model_type", "llama"),
        ("ddl-vdim1", "ddl_v_dim1_constant", True),
    ],
)
def test_unsupported_config_flags_are_named(name, flag, value):
    state, config, _ = _fixture(CURRENT, name)
    with pytest.raises(ValueError, match=f"config flag {flag}={value!r}"):
        load_official(state, {**config, flag: value})


def test_depth_parameterization_with_a_residual_multiplier_is_refused():
    state, config, _ = _fixture(CURRENT, "ddl-tc")
    config = {**config, "parameterization": "completeP", "num_hidden_layers_base": 4}
    with pytest.raises(ValueError, match="config flag parameterization='completeP'"):
        load_official(state, config)


def test_width_mup_logit_multiplier_is_folded_in():
    """parameterization="widthmuP" multiplies their logits by hidden_size_base / d."""
    state, config, expected = _fixture(CURRENT, "ddl-cc-ec")
    model = load_official(state, {**config, "parameterization": "widthmuP", "hidden_size_base": 64})
    assert _max_diff(model, expected, scale=64 / D) <= 2 * TOL


@pytest.mark.parametrize("version", [OLD, CURRENT])
def test_unknown_parameters_are_refused(version):
    state, config, _ = _fixture(version, "ddl-vdim1")
    with pytest.raises(ValueError, match="unknown parameter 'transformer.h.0.attn.g_proj.weight'"):
        load_official({**state, "transformer.h.0.attn.g_proj.weight": torch.zeros(32, 32)}, config)


def test_a_parameter_of_the_wrong_shape_is_named():
    state, config, _ = _fixture(CURRENT, "ddl-tc")
    state["readout.weight"] = state["readout.weight"][..., 0]  # a CC readout in a TC file
    with pytest.raises(ValueError, match=r"parameter 'readout.weight' has shape \(32, 4\)"):
        load_official(state, config)


def test_both_names_of_one_weight_are_refused():
    state, config, _ = _fixture(CURRENT, "ddl-tc")
    state["transformer.h.0.attn.c_proj.weight"] = state["transformer.h.0.attn.o_proj.weight"]
    with pytest.raises(ValueError, match="are the same weight"):
        load_official(state, config)


@torch.no_grad()
def _stepwise_logits(model: DeltaLM, ids: torch.Tensor, prompt_len: int) -> torch.Tensor:
    """Logits of a prefill, then one token at a time through the cache."""
    out = model(ids[:, :prompt_len], use_cache=True)
    logits = [out.logits]
    for t in range(prompt_len, ids.shape[1]):
        out = model(ids[:, t : t + 1], past_key_values=out.cache, use_cache=True)
        logits.append(out.logits)
    return torch.cat(logits, dim=1)


@pytest.mark.parametrize("layout", ["current", "old"])
@pytest.mark.parametrize("name", ["ddl-tc", "ddl-tc-ec"])
@pytest.mark.parametrize("prompt_len", [1, 5], ids=lambda n: f"prompt{n}")
@torch.no_grad()
def test_loaded_token_compressor_model_decodes_with_cache(name, layout, prompt_len):
    # prompt 1 is shorter than the conv history (K - 1 = 3)
    state, config, expected = _fixture(CURRENT, name)
    if layout == "old":
        state, config = _old_layout(state, config)
    model = load_official(state, config)
    ids = expected["input_ids"][:, :10]
    stepwise = _stepwise_logits(model, ids, prompt_len)
    for t in range(prompt_len, ids.shape[1] + 1):  # each step equals a full forward of ids[:, :t]
        full = model(ids[:, :t]).logits
        torch.testing.assert_close(stepwise[:, t - 1], full[:, -1], rtol=0, atol=2e-5)
    torch.testing.assert_close(stepwise, model(ids).logits, rtol=0, atol=2e-5)


@pytest.mark.parametrize("version, name", [(OLD, "ddl-cc-ec"), (CURRENT, "ddl-tc-ec")])
def test_loaded_official_model_generates_with_cache(version, name):
    state, config, expected = _fixture(version, name)
    model = load_official(state, config)
    prompt = expected["input_ids"][:, :5]
    cached = model.generate(prompt, max_new_tokens=4, do_sample=False)
    uncached = model.generate(prompt, max_new_tokens=4, do_sample=False, use_cache=False)
    assert torch.equal(cached, uncached)


def test_two_layer_gate_maps_onto_the_mlp_gate():
    state, config, _ = _fixture(OLD, "ddl-vdim1")
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
