"""Load checkpoints of the authors' DDL code (`yifanzhang-pro/deep-delta-learning`) into `DeltaLM`.

Both versions of their code are read: the older one (`model/DDL-vdim1-gpt-mha-rope.py`,
`DDL-gpt-mha-rope.py` / `-EC.py` for TC, `DDL-gpt-mha-rope-CC.py` / `-CC-EC.py`) and the current
one (commit d1f76215: `DDL-vdim1-gpt-mha-rope-TC.py`, `DDL-gpt-mha-rope-TC.py` / `-TC-EC.py`,
`-CC.py` / `-CC-EC.py` and their `-accelerated` twins, which store the same keys). Every file
variant loads: scalar state (d_v = 1), token compressor (TC) and channel compressor (CC), each with
the embedding convolution (EC) or with the repeated embedding. Their conventions map onto
`DeltaLMConfig` as `residual="delta"`, `value_head="official"` (v = s·σ(W_v u + b)),
`direction_form="rms"`.

The model is read off the weight shapes, not the config: width and vocabulary from
`transformer.wte.weight`, depth from the `transformer.h.<i>` blocks, head size from `q_rms`, d_v
from `v_proj`, the gate form from `beta` / `beta_in`, and

    compressor  compress.weight (d, K)                  CC   (both versions)
                compress.weight (d, d_v, K)             TC   (current version)
                compress.shortconv.weight (d·d_v, K)    TC   (older version)
    expansion   input_embed.weight (d, d_v, K)          EC   (current version)
                input_embed.conv.weight (d·d_v, 1, K)   EC   (older version)
                neither                                 repeated embedding ("w/o EC")

with `readout.*` the final compressor in the same layout. The TC and EC layouts differ between the
versions by a plain reshape (channel `i·d_v + j` is entry `[i, j]`); `attn.c_proj` / `mlp.c_proj`
became `o_proj`. A config key that states one of these sizes must agree with the weights, else a
`ValueError` names the key, its value and what the weights say; a key that is absent (e.g.
`ddl_value_channels` in a config saved without it) is simply inferred.

Anything their config can switch on that DeltaLM does not compute (k/v shift, group norm, output
gate, constant values, partial RoPE, a causal CC conv, bf16 attention, a residual-branch
multiplier, ...) is refused with a `ValueError` naming it, rather than silently loading a different
model. The width-μP logit multiplier of `parameterization="widthmuP"` (and completeP / spectralP
when their depth multiplier is 1) is exact to fold into the final norm's weight, so it is loaded.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from deltalearn.models import DeltaLM, DeltaLMConfig

_ERR = "unsupported official checkpoint: "

# Their config flags that change the computation, with the only value DeltaLM reproduces.
_REQUIRED_FLAGS: dict[str, Any] = {
    "use_k_shift": False,
    "use_v_shift": False,
    "using_groupnorm": False,
    "use_output_gate": False,
    "use_qk_rmsnorm": True,
    "q_activation": None,
    "k_activation": None,
    "v_activation": None,
    "bias": False,
    "rope_ratio": 1.0,
    "mup": False,
    "ddl_v_sigmoid": True,
    "ddl_v_constant": False,
    "ddl_v_dim1_constant": False,
}
_MODEL_TYPES = ("nanogpt-pro", "nanogptpro")  # older, current
_ATTENTION_DTYPES = (None, "auto", "float32")  # "bfloat16" runs attention in bf16
# `parameterization` values of their current code (model/gpt_base.py) that scale the logits by
# hidden_size_base / d, and the subset that also scales every residual update by L_base / L.
_DEPTH_MULT = ("completeP", "completep", "spectralP", "SpectralP", "spectralp")
_WIDTHMUP_LOGITS = ("widthmuP", "widthmup", *_DEPTH_MULT)
_LEGACY_MUP = ("muP", "mup")  # their code raises for these

# Their parameter names -> ours (per block, after "transformer.h.<i>.").
_BLOCK_NAMES = {
    "ln_1.weight": "attn_norm.weight",
    "ln_2.weight": "mlp_norm.weight",
    "attn.c_q.weight": "attn.q_proj.weight",
    "attn.c_k.weight": "attn.k_proj.weight",
    "attn.c_v.weight": "attn.v_proj.weight",
    "attn.c_proj.weight": "attn.o_proj.weight",  # older version
    "attn.o_proj.weight": "attn.o_proj.weight",  # current version
    "attn.q_rms.weight": "attn.q_norm.weight",
    "attn.k_rms.weight": "attn.k_norm.weight",
    "mlp.c_fc1.weight": "mlp.gate_proj.weight",
    "mlp.c_fc2.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",  # older version
    "mlp.o_proj.weight": "mlp.down_proj.weight",  # current version
    "compress.weight": "compress.weight",  # CC (d, K) or current TC (d, dv, K)
    "compress.shortconv.weight": "compress.weight",  # older TC (d*dv, K)
    "compress.read": "compress.read",
}
_UPDATE_NAMES = {  # inside ddl_attn / ddl_mlp -> attn_update / mlp_update
    "beta.weight": "gate.out.weight",
    "beta.bias": "gate.out.bias",
    "beta_in.weight": "gate.hidden.weight",
    "beta_out.weight": "gate.out.weight",
    "beta_out.bias": "gate.out.bias",
    "v_proj.weight": "value.proj.weight",
    "v_proj.bias": "value.proj.bias",
}
_TOP_NAMES = {
    "transformer.wte.weight": "embed.weight",
    "ln_f.weight": "norm.weight",
    "input_embed.conv.weight": "expand.weight",  # older EC (d*dv, 1, K)
    "input_embed.weight": "expand.weight",  # current EC (d, dv, K)
    "readout.weight": "final_compress.weight",
    "readout.shortconv.weight": "final_compress.weight",
    "readout.read": "final_compress.read",
}
_BLOCK_KEY = re.compile(r"transformer\.h\.(\d+)\.(.+)")
_P0 = "transformer.h.0."  # the block whose shapes are read (all blocks share them)


@dataclass
class _Layout:
    """What the weight shapes say about the model (see module docstring)."""

    vocab_size: int
    hidden_size: int
    num_layers: int
    num_heads: int
    head_dim: int
    value_channels: int
    compressor: str | None  # "cc" | "tc" | None (scalar state)
    compressor_kernel_size: int | None
    expansion: str | None  # "ec" | "repeat" | None (scalar state)
    expansion_kernel_size: int | None
    gate: str  # "linear" | "mlp"
    gate_hidden_size: int | None
    # (config key, value the weights imply, how the weights say it), checked against the config
    evidence: list[tuple[str, Any, str]]


def _tensor(state: Mapping[str, torch.Tensor], key: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"{_ERR}missing parameter {key!r}")
    return state[key]


def _read_layout(state: Mapping[str, torch.Tensor], cfg: Mapping[str, Any]) -> _Layout:
    evidence: list[tuple[str, Any, str]] = []  # (config key, value the weights imply, why)
    wte = _tensor(state, "transformer.wte.weight")
    if wte.dim() != 2:
        raise ValueError(f"{_ERR}transformer.wte.weight has shape {tuple(wte.shape)}, not (V, d)")
    V, d = (int(n) for n in wte.shape)
    evidence.append(("vocab_size", V, f"transformer.wte.weight has shape {tuple(wte.shape)}"))
    evidence.append(("hidden_size", d, f"transformer.wte.weight has shape {tuple(wte.shape)}"))

    blocks = {int(m.group(1)) for k in state if (m := _BLOCK_KEY.fullmatch(k))}
    if not blocks:
        raise ValueError(f"{_ERR}no transformer.h.<i> blocks in the state dict")
    L = max(blocks) + 1
    if blocks != set(range(L)):
        gaps = sorted(set(range(L)) - blocks)
        raise ValueError(f"{_ERR}blocks {gaps} of transformer.h.0 to h.{L - 1} are missing")
    evidence.append(
        ("num_hidden_layers", L, f"the state dict has blocks transformer.h.0 to h.{L - 1}")
    )

    H, hd = _read_heads(state, cfg, evidence)
    v_key = _P0 + "ddl_attn.v_proj.weight"
    dv = int(_tensor(state, v_key).shape[0])
    evidence.append(("ddl_value_channels", dv, f"{v_key} has shape {tuple(state[v_key].shape)}"))
    gate, gate_hidden = _read_gate(state, evidence)
    compressor, kernel = _read_compressor(state, d, dv, evidence)
    expansion, ec_kernel = _read_expansion(state, d, dv, evidence) if dv > 1 else (None, None)
    return _Layout(
        V, d, L, H, hd, dv, compressor, kernel, expansion, ec_kernel, gate, gate_hidden, evidence
    )


def _read_heads(
    state: Mapping[str, torch.Tensor], cfg: Mapping[str, Any], evidence: list
) -> tuple[int, int]:
    """(heads, head_dim) from the QK-norm weight (head_dim) and the query projection."""
    q_norm = state.get(_P0 + "attn.q_rms.weight")
    if q_norm is not None:
        hd = int(q_norm.shape[0])
        evidence.append(("head_dim", hd, f"{_P0}attn.q_rms.weight has shape {tuple(q_norm.shape)}"))
    elif cfg.get("head_dim") is not None:
        hd = int(cfg["head_dim"])
    else:
        raise ValueError(f"{_ERR}no {_P0}attn.q_rms.weight and no head_dim in the config")
    key = _P0 + "attn.c_q.weight"
    c_q = _tensor(state, key)
    if c_q.dim() != 2 or c_q.shape[0] % hd:
        raise ValueError(f"{_ERR}{key} of shape {tuple(c_q.shape)} is not (heads * {hd}, d)")
    H = int(c_q.shape[0]) // hd
    evidence.append(
        ("num_attention_heads", H, f"{key} has shape {tuple(c_q.shape)}, head_dim {hd}")
    )
    return H, hd


def _read_gate(state: Mapping[str, torch.Tensor], evidence: list) -> tuple[str, int | None]:
    """("linear", None) for `beta`, ("mlp", hidden) for `beta_in` / `beta_out`."""
    p = _P0 + "ddl_attn."
    if p + "beta.weight" in state:
        evidence.append(("ddl_beta_single_linear", True, f"the gate is one linear ({p}beta)"))
        return "linear", None
    key = p + "beta_in.weight"
    if key not in state:
        raise ValueError(f"{_ERR}missing parameter {p + 'beta.weight'!r} (or {key!r})")
    hidden = int(state[key].shape[0])
    evidence.append(("ddl_beta_single_linear", False, f"the gate has two layers ({key})"))
    evidence.append(("ddl_beta_hidden_size", hidden, f"{key} has shape {tuple(state[key].shape)}"))
    return "mlp", hidden


def _read_compressor(
    state: Mapping[str, torch.Tensor], d: int, dv: int, evidence: list
) -> tuple[str | None, int | None]:
    """("cc" | "tc", K) from the first block's compressor; (None, None) for the scalar state."""
    old, new = _P0 + "compress.shortconv.weight", _P0 + "compress.weight"
    if old in state:  # older TC: (d*dv, K)
        key, w = old, state[old]
        if w.dim() != 2 or w.shape[0] != d * dv:
            raise ValueError(
                f"{_ERR}{key} has shape {tuple(w.shape)}, not (d * d_v, K) with d = {d}, d_v = {dv}"
            )
        kind, kernel = "tc", int(w.shape[1])
    elif new in state:  # CC (d, K) or current TC (d, dv, K)
        key, w = new, state[new]
        if w.dim() == 2 and w.shape[0] == d:
            kind, kernel = "cc", int(w.shape[1])
        elif w.dim() == 3 and tuple(w.shape[:2]) == (d, dv):
            kind, kernel = "tc", int(w.shape[2])
        else:
            raise ValueError(
                f"{_ERR}{key} has shape {tuple(w.shape)}: neither the channel compressor's (d, K) "
                f"nor the token compressor's (d, d_v, K) with d = {d}, d_v = {dv}"
            )
    else:
        if dv > 1:
            raise ValueError(
                f"{_ERR}{_P0}ddl_attn.v_proj.weight says d_v = {dv}, but the blocks have no "
                f"compressor ({new})"
            )
        return None, None
    if dv == 1:
        raise ValueError(f"{_ERR}{key} is a compressor, but {_P0}ddl_attn.v_proj says d_v = 1")
    if kind == "cc" and kernel > dv:
        raise ValueError(
            f"{_ERR}{key} has shape {tuple(w.shape)}: a channel-compressor kernel of {kernel} "
            f"taps is longer than d_v = {dv}"
        )
    evidence.append(
        ("ddl_state_shortconv_kernel_size", kernel, f"{key} has shape {tuple(w.shape)}")
    )
    return kind, kernel


def _read_expansion(
    state: Mapping[str, torch.Tensor], d: int, dv: int, evidence: list
) -> tuple[str, int | None]:
    """("ec", K) from the embedding convolution, or ("repeat", None) without one."""
    layouts = {  # their key -> (leading dims, how to say them)
        "input_embed.weight": ((d, dv), "(d, d_v, K)"),  # current version
        "input_embed.conv.weight": ((d * dv, 1), "(d * d_v, 1, K)"),  # older version
    }
    for key, (lead, want) in layouts.items():
        if key in state:
            e = state[key]
            if e.dim() != 3 or tuple(e.shape[:2]) != lead:
                raise ValueError(
                    f"{_ERR}{key} has shape {tuple(e.shape)}, not {want} with d = {d}, d_v = {dv}"
                )
            kernel = int(e.shape[-1])
            evidence.append(
                ("input_embed_shortconv_kernel_size", kernel, f"{key} has shape {tuple(e.shape)}")
            )
            return "ec", kernel
    return "repeat", None


def _check_agrees(cfg: Mapping[str, Any], layout: _Layout) -> None:
    """A config key that states a size must say what the weights say."""
    for key, implied, why in layout.evidence:
        value = cfg.get(key)
        if value is None:
            continue  # not stated: the weights decide
        if isinstance(implied, bool):
            agrees = isinstance(value, bool) and value == implied
        else:
            agrees = (
                isinstance(value, int | float) and not isinstance(value, bool) and value == implied
            )
        if not agrees:
            raise ValueError(
                f"{_ERR}config {key}={value!r} contradicts the weights, which say "
                f"{key}={implied!r} ({why})"
            )


def _refuse_flag(flag: str, value: Any, supported: str) -> ValueError:
    return ValueError(f"{_ERR}config flag {flag}={value!r} ({supported})")


def _number(key: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{_ERR}config {key}={value!r} is not a number") from None


def _check_flags(cfg: Mapping[str, Any]) -> None:
    """Refuse every config value DeltaLM does not compute that the config alone decides."""
    for flag, wanted in _REQUIRED_FLAGS.items():
        value = cfg.get(flag, wanted)
        if value is None and wanted is None:
            continue
        if value != wanted:
            raise _refuse_flag(flag, value, f"only {flag}={wanted!r} is supported")
    model_type = cfg.get("model_type")
    if model_type is not None and model_type not in _MODEL_TYPES:
        raise _refuse_flag("model_type", model_type, f"only {list(_MODEL_TYPES)} are read")
    version = cfg.get("ddl_sequence_reduction_version", 1)
    if type(version) is not int or version != 1:
        raise _refuse_flag("ddl_sequence_reduction_version", version, "only version 1 is supported")
    attention_dtype = cfg.get("attention_dtype")
    if attention_dtype not in _ATTENTION_DTYPES:
        raise _refuse_flag("attention_dtype", attention_dtype, "only 'auto' or 'float32'")
    parameterization = cfg.get("parameterization")
    if parameterization in _LEGACY_MUP:
        raise _refuse_flag(
            "parameterization", parameterization, "their code refuses it too; use widthmuP"
        )
    mult = cfg.get("residual_branch_mult")
    if mult is not None and _number("residual_branch_mult", mult) != 1.0:
        raise _refuse_flag(
            "residual_branch_mult",
            mult,
            "it scales every residual update; only residual_branch_mult=1 is supported",
        )


def _check_layout_flags(cfg: Mapping[str, Any], layout: _Layout) -> float:
    """The flags whose effect depends on the model's shape; returns the logit multiplier.

    Mirrors their `gpt_base.resolve_residual_branch_mult` and `logits_scale_for_config`.
    """
    if layout.compressor == "cc" and cfg.get("ddl_state_dv_shortconv_causal", False):
        value = cfg["ddl_state_dv_shortconv_causal"]
        raise _refuse_flag(
            "ddl_state_dv_shortconv_causal", value, "only the centred CC conv (False) is supported"
        )
    parameterization = cfg.get("parameterization")
    if cfg.get("residual_branch_mult") is None and parameterization in _DEPTH_MULT:
        base = cfg.get("num_hidden_layers_base")
        base = layout.num_layers if base is None else base
        if _number("num_hidden_layers_base", base) != layout.num_layers:
            raise _refuse_flag(
                "parameterization",
                parameterization,
                f"with num_hidden_layers_base={base} it scales every residual update by "
                f"{base}/{layout.num_layers}; DeltaLM has no residual multiplier",
            )
    if parameterization in _WIDTHMUP_LOGITS:
        base = cfg.get("hidden_size_base")
        base = 1024.0 if base is None else _number("hidden_size_base", base)
        return base / layout.hidden_size
    return 1.0


def official_config(
    config_dict: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
) -> DeltaLMConfig:
    """The `DeltaLMConfig` equivalent to one of their checkpoints (see module docstring)."""
    return _official_config(dict(config_dict), state_dict)[0]


def _official_config(
    cfg: dict[str, Any], state_dict: Mapping[str, torch.Tensor]
) -> tuple[DeltaLMConfig, _Layout, float]:
    _check_flags(cfg)
    layout = _read_layout(state_dict, cfg)
    _check_agrees(cfg, layout)
    logit_scale = _check_layout_flags(cfg, layout)
    fields: dict[str, Any] = dict(
        vocab_size=layout.vocab_size,
        hidden_size=layout.hidden_size,
        num_layers=layout.num_layers,
        num_heads=layout.num_heads,
        head_dim=layout.head_dim,
        max_seq_len=int(cfg.get("block_size") or 1024),
        rope_theta=float(cfg.get("rope_base") or 10000.0),
        norm_eps=1e-5,
        embedding_init_std=float(cfg.get("embedding_init_std", 0.02)),
        init_std_factor=float(cfg.get("hidden_init_std_factor", 0.5)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        residual="delta",
        value_channels=layout.value_channels,
        value_head="official",
        value_sigmoid_scale=float(cfg.get("ddl_v_sigmoid_scale", 4.0)),
        gate=layout.gate,
        gate_hidden_size=layout.gate_hidden_size or int(cfg.get("ddl_beta_hidden_size") or 128),
        beta_init=min(max(float(cfg.get("ddl_beta_init", 1.0)), 0.0), 2.0),
        k_eps=float(cfg.get("ddl_k_eps", 1e-5)),
        direction_form="rms",
    )
    if layout.value_channels > 1:
        fields.update(
            compressor=layout.compressor,
            compressor_kernel_size=layout.compressor_kernel_size,
            expansion=layout.expansion,
        )
        if layout.expansion_kernel_size is not None:
            fields["expansion_kernel_size"] = layout.expansion_kernel_size
    return DeltaLMConfig(**fields), layout, logit_scale


def _rename(key: str) -> str:
    if key in _TOP_NAMES:
        return _TOP_NAMES[key]
    m = _BLOCK_KEY.fullmatch(key)
    if m:
        i, rest = m.groups()
        if rest in _BLOCK_NAMES:
            return f"layers.{i}.{_BLOCK_NAMES[rest]}"
        sub, _, name = rest.partition(".")
        if sub in ("ddl_attn", "ddl_mlp") and name in _UPDATE_NAMES:
            ours = "attn_update" if sub == "ddl_attn" else "mlp_update"
            return f"layers.{i}.{ours}.{_UPDATE_NAMES[name]}"
    raise ValueError(f"{_ERR}unknown parameter {key!r}")


def _to_our_layout(key: str, value: torch.Tensor, dv: int) -> torch.Tensor:
    """Plain reshapes between their conv layouts and ours (channel i*dv + j is entry [i, j])."""
    if key.endswith("shortconv.weight") and value.dim() == 2 and value.shape[0] % dv == 0:
        return value.reshape(value.shape[0] // dv, dv, value.shape[1])  # TC -> (d, dv, K)
    if key == "input_embed.weight" and value.dim() == 3:
        return value.reshape(value.shape[0] * value.shape[1], 1, value.shape[2])  # EC
    return value


def load_official(
    state_dict: Mapping[str, torch.Tensor], config_dict: Mapping[str, Any]
) -> DeltaLM:
    """Build a `DeltaLM` (fp32, eval mode) that computes the same logits as the authors' `GPT`.

    Args:
        state_dict: their `GPT.state_dict()` (parameter names as in `model/DDL-*.py`, either
            version of their code).
        config_dict: their `GPTConfig` as a plain dict; the sizes the weights determine may be
            left out.

    Raises:
        ValueError: for a file variant or config flag DeltaLM does not reproduce, an unknown
            parameter, or a config key that contradicts the weights, naming it.
    """
    config, layout, logit_scale = _official_config(dict(config_dict), state_dict)
    ours: dict[str, torch.Tensor] = {}
    source: dict[str, str] = {}  # our name -> theirs, for messages
    for key, value in state_dict.items():
        if key == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        name = _rename(key)
        if name in ours:
            raise ValueError(f"{_ERR}parameters {source[name]!r} and {key!r} are the same weight")
        ours[name] = _to_our_layout(key, value.detach().float(), layout.value_channels)
        source[name] = key
    head = state_dict.get("lm_head.weight")
    if config.tie_word_embeddings and head is not None:
        if not torch.equal(head.float(), ours["embed.weight"]):
            raise ValueError(
                f"{_ERR}lm_head.weight differs from transformer.wte.weight although "
                "tie_word_embeddings is set"
            )
    elif head is not None:
        ours["lm_head.weight"] = head.detach().float()
        source["lm_head.weight"] = "lm_head.weight"
    if logit_scale != 1.0 and "norm.weight" in ours:
        # logits = s · lm_head(ln_f(x)); ln_f is linear in its weight, so fold s into it.
        ours["norm.weight"] = ours["norm.weight"] * logit_scale
    model = DeltaLM(config)
    params = dict(model.named_parameters())
    for name, value in ours.items():
        if name in params and value.shape != params[name].shape:
            raise ValueError(
                f"{_ERR}parameter {source[name]!r} has shape {tuple(value.shape)}; the model the "
                f"other weights describe needs {tuple(params[name].shape)}"
            )
    # Their two-layer gate has no hidden bias; ours does, and must then be zero.
    for name, param in params.items():
        if name.endswith("gate.hidden.bias"):
            ours.setdefault(name, torch.zeros_like(param))
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        theirs = [source.get(k, k) for k in unexpected]
        raise ValueError(f"{_ERR}missing parameters {missing}, unexpected {theirs}")
    return model.eval()
