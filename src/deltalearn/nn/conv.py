"""DDL for convolutional networks: the residual state is the channel vector at each position.

Index legend: B batch, C channels (the state width d), dv value channels, S the spatial axes
(none, `L`, `H, W`, `D, H, W`, ...).

State layout, channels first as `nn.Conv*d` expects:

    dv = 1    X  (B, C, *S)          the channel vector x_p ∈ R^C at each position p
    dv > 1    X  (B, C, dv, *S)      a C × dv matrix X_p at each position

At every position p the update is the vector (matrix) form of `DeltaResidual`, with the branch free
to mix positions (3×3 convs, ...):

    x_in = X_p or Compress(X_p)   c = RMSNorm over channels   h = F(c)   (F sees all positions)
    k_p  = h_p / ‖h_p‖  (over channels)   v_p = W_v c_p,  β_p = 2σ(W_β c_p + b)   (1×1 projections)
    X_p' = X_p + β_p k_p (v_pᵀ − k_pᵀ X_p)

`ConvDeltaResidual` moves the channel axes last and runs the same `residual_step` / `DeltaUpdate`
(and so the same fused epilogue) as `DeltaResidual` and the language model; a 1×1 projection is a
linear map of the channel vector, which is what `ValueHead` and `GateHead` apply channels-last.
"""

from __future__ import annotations

import torch
from torch import nn

from deltalearn.nn.residual import DeltaResidual, residual_step


def _channel_axes(value_channels: int) -> tuple[int, ...]:
    return (1,) if value_channels == 1 else (1, 2)


def to_channels_last(X: torch.Tensor, value_channels: int = 1) -> torch.Tensor:
    """`(B, C, *S)` -> `(B, *S, C)`, or `(B, C, dv, *S)` -> `(B, *S, C, dv)` (a view)."""
    axes = _channel_axes(value_channels)
    return X.movedim(axes, tuple(range(-len(axes), 0)))


def to_channels_first(X: torch.Tensor, value_channels: int = 1) -> torch.Tensor:
    """The inverse of `to_channels_last` (a view)."""
    axes = _channel_axes(value_channels)
    return X.movedim(tuple(range(-len(axes), 0)), axes)


def conv_repeat_expansion(x: torch.Tensor, value_channels: int) -> torch.Tensor:
    """`X_0 = x 1ᵀ_{dv}` at every position: `(B, C, *S)` -> `(B, C, dv, *S)`."""
    if value_channels < 1:
        raise ValueError(f"value_channels must be >= 1, got {value_channels}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (B, C, *spatial), got {tuple(x.shape)}")
    return x.unsqueeze(2).expand(x.shape[0], x.shape[1], value_channels, *x.shape[2:]).contiguous()


class ConvDeltaResidual(DeltaResidual):
    """Wrap a convolutional residual branch `F: (B, C, *S) -> (B, C, *S)` as a DDL residual.

    Arguments as `DeltaResidual` (with `channels` for `dim`); the state is `(B, C, *S)` for
    `value_channels=1` and `(B, C, dv, *S)` otherwise (see `conv_repeat_expansion`). The norm, the
    direction normalisation, the value and gate heads act on the channel vector at each position;
    `F` gets the normalised context channels-first and may mix positions. `last_gates` holds β
    `(B, *S)` and readout/target/discrepancy `(B, *S)` (dv = 1) or `(B, *S, dv)`.

    With a 1×1-conv branch it is exactly `DeltaResidual` applied to each position's channel vector
    (tests/test_nn_conv.py); `rule="additive"` is `X + F(RMSNorm_C(X))`.

    Example:
        >>> branch = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.GELU(),
        ...                        nn.Conv2d(16, 16, 3, padding=1))
        >>> layer = ConvDeltaResidual(16, branch)
        >>> y = layer(torch.randn(8, 16, 10, 10))     # same shape; β per pixel in layer.last_gates
    """

    def __init__(self, channels: int, branch: nn.Module, value_channels: int = 1, **kwargs) -> None:
        super().__init__(channels, branch, value_channels, **kwargs)

    def _check_state(self, X: torch.Tensor) -> None:
        dv = self.value_channels
        want = (self.dim,) if dv == 1 else (self.dim, dv)
        if X.dim() < 1 + len(want) or tuple(X.shape[1 : 1 + len(want)]) != want:
            shape = (
                "(B, channels, *spatial)" if dv == 1 else "(B, channels, value_channels, *spatial)"
            )
            raise ValueError(
                f"state must have shape {shape} with {want} after B, got {tuple(X.shape)}"
            )

    def _branch_channels_last(self, c: torch.Tensor) -> torch.Tensor:
        return to_channels_last(self.branch(to_channels_first(c)))

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        self._check_state(X)
        Xl = to_channels_last(X, self.value_channels)
        x_in = Xl if self.compressor is None else self.compressor(Xl)
        Y = residual_step(Xl, x_in, self.norm, self._branch_channels_last, self.update)
        return to_channels_first(Y, self.value_channels)
