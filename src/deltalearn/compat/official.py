"""Load checkpoints of the authors' DDL code (`yifanzhang-pro/deep-delta-learning`) into `DeltaLM`.

Supported files: `model/DDL-vdim1-gpt-mha-rope.py` (scalar state) and the channel-compressed
`model/DDL-gpt-mha-rope-CC.py` / `-CC-EC.py` (d_v > 1). Their conventions map onto `DeltaLMConfig`
as `residual="delta"`, `value_head="official"` (v = s·σ(W_v u + b)), `direction_form="rms"`,
`compressor="cc"`, `expansion="ec"` when the checkpoint has `input_embed.conv.weight` else
`"repeat"`. Anything their config can switch on that DeltaLM does not compute (k/v shift, group
norm, output gate, constant values, partial RoPE, the token-axis TC compressor, ...) is refused
with a `ValueError` naming it, rather than silently loading a different model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch

from deltalearn.models import DeltaLM, DeltaLMConfig

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
    "ddl_state_dv_shortconv_causal": False,
    "residual_branch_mult": 1.0,
}

# Their parameter names -> ours (per block, after "transformer.h.<i>.").
_BLOCK_NAMES = {
    "ln_1.weight": "attn_norm.weight",
    "ln_2.weight": "mlp_norm.weight",
    "attn.c_q.weight": "attn.q_proj.weight",
    "attn.c_k.weight": "attn.k_proj.weight",
    "attn.c_v.weight": "attn.v_proj.weight",
    "attn.c_proj.weight": "attn.o_proj.weight",
    "attn.q_rms.weight": "attn.q_norm.weight",
    "attn.k_rms.weight": "attn.k_norm.weight",
    "mlp.c_fc1.weight": "mlp.gate_proj.weight",
    "mlp.c_fc2.weight": "mlp.up_proj.weight",
    "mlp.c_proj.weight": "mlp.down_proj.weight",
    "compress.weight": "compress.weight",
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
    "input_embed.conv.weight": "expand.weight",
    "readout.weight": "final_compress.weight",
    "readout.read": "final_compress.read",
}
_BLOCK_KEY = re.compile(r"transformer\.h\.(\d+)\.(.+)")


def official_config(
    config_dict: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor]
) -> DeltaLMConfig:
    """The `DeltaLMConfig` equivalent to one of their `GPTConfig` dicts (see module docstring)."""
    cfg = dict(config_dict)
    for flag, wanted in _REQUIRED_FLAGS.items():
        value = cfg.get(flag, wanted)
        if value is None and wanted is None:
            continue
        if value != wanted:
            raise ValueError(
                f"unsupported official checkpoint: config flag {flag}={value!r} "
                f"(only {flag}={wanted!r} is supported)"
            )
    compress = state_dict.get("transformer.h.0.compress.weight")
    if compress is not None and compress.dim() != 2:
        raise ValueError(
            "unsupported official checkpoint: the token-axis compressor (TC, model/DDL-*-TC*.py; "
            f"compress.weight of shape {tuple(compress.shape)}) is not supported, only CC files"
        )
    dv = int(cfg.get("ddl_value_channels", 1)) if compress is not None else 1
    if compress is None and "ddl_value_channels" in cfg and int(cfg["ddl_value_channels"]) > 1:
        raise ValueError(
            "unsupported official checkpoint: ddl_value_channels > 1 but no "
            "transformer.h.0.compress.weight in the state dict"
        )
    fields: dict[str, Any] = dict(
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=int(cfg["hidden_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=int(cfg["num_attention_heads"]),
        head_dim=int(cfg["head_dim"]),
        max_seq_len=int(cfg.get("block_size", 1024)),
        rope_theta=float(cfg.get("rope_base", 10000.0)),
        norm_eps=1e-5,
        embedding_init_std=float(cfg.get("embedding_init_std", 0.02)),
        init_std_factor=float(cfg.get("hidden_init_std_factor", 0.5)),
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
        residual="delta",
        value_channels=dv,
        value_head="official",
        value_sigmoid_scale=float(cfg.get("ddl_v_sigmoid_scale", 4.0)),
        gate="linear" if cfg.get("ddl_beta_single_linear", True) else "mlp",
        gate_hidden_size=int(cfg.get("ddl_beta_hidden_size", 128)),
        beta_init=min(max(float(cfg.get("ddl_beta_init", 1.0)), 0.0), 2.0),
        k_eps=float(cfg.get("ddl_k_eps", 1e-5)),
        direction_form="rms",
    )
    if dv > 1:
        fields.update(
            compressor="cc",
            compressor_kernel_size=int(compress.shape[1]),
            expansion="ec" if "input_embed.conv.weight" in state_dict else "repeat",
            expansion_kernel_size=int(cfg.get("input_embed_shortconv_kernel_size", 4)),
        )
    return DeltaLMConfig(**fields)


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
    raise ValueError(f"unsupported official checkpoint: unknown parameter {key!r}")


def load_official(
    state_dict: Mapping[str, torch.Tensor], config_dict: Mapping[str, Any]
) -> DeltaLM:
    """Build a `DeltaLM` (fp32, eval mode) that computes the same logits as the authors' `GPT`.

    Args:
        state_dict: their `GPT.state_dict()` (parameter names as in `model/DDL-*.py`).
        config_dict: their `GPTConfig` as a plain dict.

    Raises:
        ValueError: for a file variant or config flag DeltaLM does not reproduce, naming it.
    """
    config = official_config(config_dict, state_dict)
    ours: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key == "lm_head.weight":
            continue  # tied to transformer.wte.weight
        ours[_rename(key)] = value.detach().float()
    head = state_dict.get("lm_head.weight")
    if config.tie_word_embeddings and head is not None:
        if not torch.equal(head.float(), ours["embed.weight"]):
            raise ValueError(
                "unsupported official checkpoint: lm_head.weight differs from "
                "transformer.wte.weight although tie_word_embeddings is set"
            )
    elif head is not None:
        ours["lm_head.weight"] = head.detach().float()
    model = DeltaLM(config)
    # Their two-layer gate has no hidden bias; ours does, and must then be zero.
    for name, param in model.named_parameters():
        if name.endswith("gate.hidden.bias"):
            ours.setdefault(name, torch.zeros_like(param))
    missing, unexpected = model.load_state_dict(ours, strict=False)
    missing = [k for k in missing if not (config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"unsupported official checkpoint: missing parameters {missing}, unexpected {unexpected}"
        )
    return model.eval()
