"""Named model shapes and DDL variants: two small tables read by `DeltaLMConfig.preset`.

A preset is `SIZES[size] | VARIANTS[variant] | overrides`; anything not named here keeps the
`DeltaLMConfig` default.
"""

from __future__ import annotations

from typing import Any


def _shape(vocab: int, d: int, layers: int, heads: int, head_dim: int, ctx: int) -> dict[str, int]:
    return dict(
        vocab_size=vocab,
        hidden_size=d,
        num_layers=layers,
        num_heads=heads,
        head_dim=head_dim,
        max_seq_len=ctx,
    )


# The paper's shapes (SPEC §4) plus a CPU-sized one (≈1.8M parameters; trains in minutes on 2 cores).
SIZES: dict[str, dict[str, Any]] = {
    #                vocab     d  layers heads head_dim ctx
    "tiny": _shape(8192, 128, 4, 4, 32, 256),
    "small": _shape(50304, 768, 12, 6, 128, 1024),  # 124M
    "medium": _shape(50304, 1024, 24, 8, 128, 1024),  # 353M
}

# The paper's variants (SPEC §3; d_v = 4 for the expanded ones), the write-only controls and the
# expanded additive control.
_CC, _TC = dict(compressor="cc"), dict(compressor="tc")
_EC, _NOEC = dict(expansion="ec"), dict(expansion="repeat")
VARIANTS: dict[str, dict[str, Any]] = {
    "baseline": dict(residual="additive", value_channels=1),
    "ddl": dict(residual="delta", value_channels=1),
    "ddl-tc": dict(residual="delta", value_channels=4, **_TC, **_EC),
    "ddl-cc": dict(residual="delta", value_channels=4, **_CC, **_EC),
    "ddl-tc-noec": dict(residual="delta", value_channels=4, **_TC, **_NOEC),
    "ddl-cc-noec": dict(residual="delta", value_channels=4, **_CC, **_NOEC),
    "write-only-cc": dict(residual="write_only", value_channels=4, **_CC, **_EC),
    "write-only": dict(residual="write_only", value_channels=1),
    # The expanded additive control: DDL-CC's expanded state (dv = 4, EC, the CC compressor) with
    # the plain residual `X + h` (h added to every value channel). Against ddl-cc it isolates the
    # delta rewrite; against baseline, the expansion.
    "additive-cc": dict(residual="additive", value_channels=4, **_CC, **_EC),
}


def preset_fields(variant: str, size: str = "tiny", **overrides: Any) -> dict[str, Any]:
    """The config fields of one preset; unknown names raise `ValueError` listing the allowed ones."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {list(VARIANTS)}, got {variant!r}")
    if size not in SIZES:
        raise ValueError(f"size must be one of {list(SIZES)}, got {size!r}")
    return {**SIZES[size], **VARIANTS[variant], **overrides}
