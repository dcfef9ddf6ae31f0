"""`DeltaLMConfig`: every knob of the DeltaLM family, its default and its validation, in one place.

One decoder-only Transformer (SPEC §4); the DDL variants (SPEC §2–§3) differ only by these fields:

    residual        "additive" (the baseline) | "delta" (DDL) | "write_only" (the control)
    value_channels  dv: 1 = vector state; > 1 = matrix state (B, T, d, dv), read by a compressor
    compressor      "cc" (channel axis) | "tc" (token axis, causal)          used when dv > 1
    expansion       "ec" (causal conv over tokens) | "repeat" (X_0 = e 1ᵀ)   used when dv > 1
    value_head      "official" (v = s·σ(W_v u + b), the authors' code; default) | "paper" (v = W_v c)
    gate            "linear" | "mlp"
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, ClassVar

from transformers import PretrainedConfig

from deltalearn.models.presets import preset_fields
from deltalearn.nn.choices import DIRECTION_FORMS, GATES, RULES, VALUE_HEADS, check_choice

# The residual rule and the generators share their choices with `deltalearn.nn`.
RESIDUALS = RULES
COMPRESSORS = ("cc", "tc")
EXPANSIONS = ("ec", "repeat")

# The token-axis compressor's default kernel (the channel compressor defaults to K = dv).
_TC_KERNEL = 4


class DeltaLMConfig(PretrainedConfig):
    """Configuration of `DeltaLM`. Invalid values raise `ValueError` naming the field.

    `num_hidden_layers`, `num_attention_heads` and `max_position_embeddings` are aliases of
    `num_layers`, `num_heads` and `max_seq_len` (the names `transformers` looks for).
    Build named configurations with `DeltaLMConfig.preset(variant, size, **overrides)`.
    """

    model_type: ClassVar[str] = "deltalm"
    attribute_map: ClassVar[dict[str, str]] = {
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "max_position_embeddings": "max_seq_len",
    }

    # --- backbone (SPEC §4) ---
    vocab_size: int = 50304
    hidden_size: int = 768  # d; must equal num_heads * head_dim
    num_layers: int = 12
    num_heads: int = 6
    head_dim: int = 128
    max_seq_len: int = 1024  # training context (RoPE itself has no hard limit)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5  # every RMSNorm: pre-norms, QK norms, final norm
    embedding_init_std: float = 0.02
    init_std_factor: float = 0.5  # ≥2-D weights ~ N(0, (f/√d)²), output projections also / √L
    tie_word_embeddings: bool = True
    # --- the residual interface (SPEC §1–§3) ---
    residual: str = "delta"
    value_channels: int = 1
    compressor: str = "cc"
    expansion: str = "ec"
    compressor_kernel_size: int | None = None  # None: dv for "cc", 4 for "tc"
    expansion_kernel_size: int = 4
    # "official" by default: the authors' code, which produced the paper's numbers, uses it, and on
    # tiny Shakespeare runs "paper" with β₀ = 1 trained markedly worse (README, Results).
    value_head: str = "official"
    value_sigmoid_scale: float = 4.0  # s of the "official" value head
    gate: str = "linear"
    gate_hidden_size: int = 128  # width of the "mlp" gate
    beta_init: float = 1.0  # β₀: the gate's output bias starts at logit(β₀/2)
    k_eps: float = 1e-5
    direction_form: str = "l2"  # "rms": the precision-friendly form of §3.1 (the authors' code)
    # --- generation ---
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        super().__post_init__(**kwargs)
        if self.compressor_kernel_size is None:
            self.compressor_kernel_size = (
                self.value_channels
                if self.compressor == "cc" and isinstance(self.value_channels, int)
                else _TC_KERNEL
            )
        self.validate()

    # ------------------------------------------------------------------------------------------
    def validate(self) -> None:
        """Check every field; raise `ValueError` naming the first bad one and what it allows."""
        for name in ("vocab_size", "hidden_size", "num_layers", "num_heads", "head_dim"):
            _positive_int(name, getattr(self, name))
        for name in ("max_seq_len", "value_channels", "expansion_kernel_size", "gate_hidden_size"):
            _positive_int(name, getattr(self, name))
        _positive_int("compressor_kernel_size", self.compressor_kernel_size)
        if self.hidden_size != self.num_heads * self.head_dim:
            raise ValueError(
                f"hidden_size must equal num_heads * head_dim = {self.num_heads} * "
                f"{self.head_dim} = {self.num_heads * self.head_dim}, got {self.hidden_size}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (RoPE rotates pairs), got {self.head_dim}")
        check_choice("residual", self.residual, RESIDUALS)
        check_choice("compressor", self.compressor, COMPRESSORS)
        check_choice("expansion", self.expansion, EXPANSIONS)
        check_choice("value_head", self.value_head, VALUE_HEADS)
        check_choice("gate", self.gate, GATES)
        check_choice("direction_form", self.direction_form, DIRECTION_FORMS)
        if self.compressor == "cc" and self.compressor_kernel_size > self.value_channels:
            raise ValueError(
                f"compressor_kernel_size must lie in [1, value_channels={self.value_channels}] "
                f"for compressor='cc' (the conv runs along the value axis), got "
                f"{self.compressor_kernel_size}"
            )
        if not (_is_number(self.beta_init) and 0.0 <= self.beta_init <= 2.0):
            raise ValueError(f"beta_init must be a number in [0, 2], got {self.beta_init!r}")
        for name in ("k_eps", "embedding_init_std", "init_std_factor"):
            if not (_is_number(getattr(self, name)) and getattr(self, name) >= 0):
                raise ValueError(f"{name} must be a number >= 0, got {getattr(self, name)!r}")
        for name in ("norm_eps", "rope_theta", "value_sigmoid_scale"):
            if not (_is_number(getattr(self, name)) and getattr(self, name) > 0):
                raise ValueError(f"{name} must be a number > 0, got {getattr(self, name)!r}")

    # ------------------------------------------------------------------------------------------
    @classmethod
    def preset(cls, variant: str, size: str = "tiny", **overrides: Any) -> DeltaLMConfig:
        """A named configuration: `variant` ∈ baseline, ddl, ddl-tc, ddl-cc, ddl-tc-noec,
        ddl-cc-noec, write-only-cc, write-only; `size` ∈ tiny, small, medium (see `presets.py`).
        `overrides` are any config fields (e.g. `num_layers=2`); an unknown name raises."""
        known = {f.name for f in dataclasses.fields(cls)} | set(cls.attribute_map)
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(f"unknown DeltaLMConfig field(s) {unknown} in preset overrides")
        return cls(**preset_fields(variant, size, **overrides))

    @property
    def mlp_hidden_size(self) -> int:
        """SwiGLU width ⌊8d/3⌋ (computed as the authors' code does, so checkpoint shapes agree)."""
        return math.floor(8 / 3 * self.hidden_size)

    @property
    def expanded(self) -> bool:
        """Whether the residual state is a matrix `(d, dv)` (dv > 1)."""
        return self.value_channels > 1


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _positive_int(name: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
