"""Analytic FLOPs per token of a DeltaLM forward and backward pass, for every variant.

Index legend: d width, I = heads · head_dim (attention inner width, = d), h MLP hidden ⌊8d/3⌋,
V vocabulary, L layers, T seq_len, dv value channels, K kernel size, g the MLP gate's hidden width.

Convention (the one `torch.utils.flop_counter.FlopCounterMode` uses, and PaLM's "model FLOPs"):

* a multiply-add is 2 FLOPs; only matrix products, convolutions and attention products count;
* the backward of a product with a weight is 2× its forward (gradients of the input and of the
  weight); every product's input needs a gradient here, since the embedding is trained;
* attention: `QKᵀ` and `PV` over the whole window of `seq_len` keys, 4·T·I per token and layer,
  without halving for the causal mask (as the counter's formulas for the attention kernels do);
  its backward is 2× (the four products behind dP, dV, dQ and dK);
* activation checkpointing's recomputed forward is not counted (model FLOPs, not hardware FLOPs),
  nor is the optimizer.

`flops_per_token(config, seq_len)` is the sum of the *matmul* components of `flops_breakdown`:

    attention    L · [2·4·d·I (q, k, v, o projections) + 4·T·I (scores and values)]
    mlp          L · 2·3·d·h (gate, up and down projections of SwiGLU)
    logits       2·d·V (the LM head; the embedding lookup is free)
    ddl_heads    per rewrite (2L of them): value head 2·d·dv + gate 2·d ("linear") or
                 2·(d·g + g) ("mlp"); none for the additive baseline
    ddl_readout  per rewrite: the readout kᵀX, 2·d·dv forward ("delta"; "write_only" reads
                 nothing), and kᵀG, 2·d·dv in the backward (both rules): the contractions the
                 PyTorch path runs as batched matmuls (the fused Triton kernel does the same work
                 in registers)
    expansion    EC, a depthwise causal conv: 2·K·d·dv (dv > 1 with expansion "ec")

The DDL extras that are elementwise work or per-feature contractions over dv, which the counter
does not see, are estimated separately and *not* included in the total:

    compressors            one read before every sublayer and one before the final norm
                           (2L + 1 when dv > 1): CC 2·d·dv, TC 2·K·d·dv forward, about 1.5×
                           (CC) and 2× (TC) that backward
    residual_elementwise   per sublayer: the additive update (d·dv adds), or the rewrite's
                           direction normalisation, gate and value squashes, discrepancy and the
                           rank-1 write (about 4·d + 2·d·dv + 6·dv forward, 9·d + 6·d·dv backward
                           for "delta"); estimates good to a few tens of percent

Backbone elementwise work (RMSNorms, RoPE, softmax, SiLU, the loss) is counted by neither.
Everything is per token of a `seq_len`-token training row; multiply by tokens for a step.
"""

from __future__ import annotations

from dataclasses import dataclass

from deltalearn.models.configuration_deltalm import DeltaLMConfig

__all__ = [
    "ELEMENTWISE_COMPONENTS",
    "MATMUL_COMPONENTS",
    "FlopCount",
    "elementwise_flops_per_token",
    "flops_breakdown",
    "flops_per_token",
]

# The components whose sum is `flops_per_token`, and those estimated apart (see the module doc).
MATMUL_COMPONENTS = ("attention", "mlp", "logits", "ddl_heads", "ddl_readout", "expansion")
ELEMENTWISE_COMPONENTS = ("compressors", "residual_elementwise")


@dataclass(frozen=True)
class FlopCount:
    """FLOPs per token of one forward and one backward pass (2 FLOPs per multiply-add)."""

    forward: float
    backward: float

    @property
    def train(self) -> float:
        """Forward + backward: the model FLOPs of one training token."""
        return self.forward + self.backward

    def __add__(self, other: FlopCount) -> FlopCount:
        return FlopCount(self.forward + other.forward, self.backward + other.backward)

    def __mul__(self, k: float) -> FlopCount:
        return FlopCount(self.forward * k, self.backward * k)

    __rmul__ = __mul__


_ZERO = FlopCount(0.0, 0.0)


def _weight_product(macs: float) -> FlopCount:
    """A product with a weight: 2 FLOPs per multiply-add forward, gradients of input and weight
    (2× the forward) backward."""
    return FlopCount(2.0 * macs, 4.0 * macs)


def _check(config: DeltaLMConfig, seq_len: int) -> None:
    if not isinstance(config, DeltaLMConfig):
        raise TypeError(f"config must be a DeltaLMConfig, got {type(config).__name__}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        raise ValueError(f"seq_len must be an integer >= 1, got {seq_len!r}")


def flops_breakdown(config: DeltaLMConfig, seq_len: int) -> dict[str, FlopCount]:
    """FLOPs per token of each component, in the order `MATMUL_COMPONENTS` then
    `ELEMENTWISE_COMPONENTS` (module docstring); components a variant lacks are zero."""
    _check(config, seq_len)
    d, L, T = config.hidden_size, config.num_layers, seq_len
    inner = config.num_heads * config.head_dim
    dv = config.value_channels
    rewrites = 0 if config.residual == "additive" else 2 * L  # one per sublayer

    attention = L * (_weight_product(4 * d * inner) + FlopCount(4.0 * T * inner, 8.0 * T * inner))
    mlp = L * _weight_product(3 * d * config.mlp_hidden_size)
    logits = _weight_product(d * config.vocab_size)

    g = config.gate_hidden_size
    gate_macs = d if config.gate == "linear" else d * g + g
    heads = rewrites * _weight_product(d * dv + gate_macs)
    read_forward = 2.0 * d * dv if config.residual == "delta" else 0.0
    readout = rewrites * FlopCount(read_forward, 2.0 * d * dv)
    expansion = (
        _weight_product(config.expansion_kernel_size * d * dv)
        if config.expanded and config.expansion == "ec"
        else _ZERO
    )

    compressors = _ZERO
    if config.expanded:
        reads = 2 * L + 1
        if config.compressor == "cc":
            compressors = reads * FlopCount(2.0 * d * dv, 3.0 * d * dv)
        else:
            K = config.compressor_kernel_size
            compressors = reads * FlopCount(2.0 * K * d * dv, 4.0 * K * d * dv)
    if config.residual == "additive":  # X + h, broadcast over dv; its backward sums over dv
        per_update = FlopCount(float(d * dv), float(d * (dv - 1)))
    else:
        # direction norm ~3d, βk d, squashes ~5 per value and gate, write (addcmul) 2·d·dv;
        # backward: gX 2·d·dv + d, gk (Ge, Xs) 4·d·dv + 2d, the norm's backward ~5d
        erase = config.residual == "delta"
        per_update = FlopCount(
            4.0 * d + 2.0 * d * dv + 5.0 * (dv + 1) + (dv if erase else 0),
            (9.0 * d + 6.0 * d * dv) if erase else (7.0 * d + 2.0 * d * dv),
        )
    residual = (2 * L) * per_update

    return {
        "attention": attention,
        "mlp": mlp,
        "logits": logits,
        "ddl_heads": heads,
        "ddl_readout": readout,
        "expansion": expansion,
        "compressors": compressors,
        "residual_elementwise": residual,
    }


def flops_per_token(config: DeltaLMConfig, seq_len: int) -> FlopCount:
    """Model FLOPs per token of a `seq_len`-token row: the matrix products, convolutions and
    attention products of one forward and one backward (the module docstring's convention, the
    one `FlopCounterMode` counts). Train FLOPs of a step: `flops_per_token(...).train × tokens`."""
    parts = flops_breakdown(config, seq_len)
    total = _ZERO
    for name in MATMUL_COMPONENTS:
        total = total + parts[name]
    return total


def elementwise_flops_per_token(config: DeltaLMConfig, seq_len: int) -> FlopCount:
    """The estimated elementwise DDL extras (compressors, the residual update's own arithmetic),
    which `flops_per_token` leaves out (module docstring)."""
    parts = flops_breakdown(config, seq_len)
    total = _ZERO
    for name in ELEMENTWISE_COMPONENTS:
        total = total + parts[name]
    return total
