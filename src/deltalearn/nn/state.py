"""Expanded residual state (d_v > 1): expansion at the input and compressors (SPEC §3).

Index legend: B batch, T tokens, d model width, dv value channels, K kernel size.

State layout `(..., d, dv)`. The expansion maps token embeddings `(B, T, d)` to `X_0` `(B, T, d, dv)`;
a compressor maps a state back to the width-d vector `x_in` a sublayer reads.

    repeat_expansion     X_0[t, i, j] = e[t, i]                                   ("w/o EC")
    EmbeddingConv (EC)   X_0[t, i, j] = Σ_τ w[i, j, τ] e[t − K + 1 + τ, i]        causal over tokens
    ChannelCompressor    x_in[t, i] = Σ_j c[i, j] X[t, i, j]                      (CC, this token only)
    TokenCompressor      x_in[t, i] = Σ_j r[j] Σ_τ w[i, j, τ] X[t − K + 1 + τ, i, j]   (TC)

The token-axis convolutions (EC, TC) are causal and zero-padded on the left; `forward_cached` runs
them on a chunk of new tokens given the last `K − 1` inputs and returns the updated history, so that
incremental decoding gives the same result as one pass over the whole sequence.

Precision: these modules read and write the residual state, so they keep its dtype. They run with
autocast switched off, in the promoted dtype of input and weights (fp32 for an fp32 model, under
bf16 autocast too). Under autocast `F.conv1d` and the einsum folding CC's weights would otherwise run
in bf16, and the EC variants would carry a bf16 state while every other variant carries fp32.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from deltalearn.ops import _shapes, backend, extension, native, prepared
from deltalearn.ops._shapes import no_autocast, promote_float
from deltalearn.ops.mixing import channel_mix
from deltalearn.ops.token_mixing import token_mix


def repeat_expansion(x: torch.Tensor, value_channels: int) -> torch.Tensor:
    """`X_0 = x 1ᵀ_{dv}`: (..., d) -> (..., d, dv) (the "w/o EC" expansion)."""
    if value_channels < 1:
        raise ValueError(f"value_channels must be >= 1, got {value_channels}")
    return x.unsqueeze(-1).expand(*x.shape, value_channels).contiguous()


def causal_conv(
    x: torch.Tensor, weight: torch.Tensor, history: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grouped causal convolution over the token axis, with an explicit history of past inputs.

    Args:
        x: new inputs `(B, T, C)`.
        weight: `(C * m, 1, K)` in `nn.Conv1d` layout with `groups = C` (each input channel feeds `m`
            consecutive output channels); tap `K − 1` multiplies the current token.
        history: the `K − 1` inputs before `x`, `(B, K − 1, C)`; zeros (the left padding of a fresh
            sequence) when None.

    Returns:
        `y` `(B, T, C * m)` and the new history `(B, K − 1, C)` (the last `K − 1` inputs seen), both
        in the promoted dtype of `x` and `weight`, computed with autocast off (module docstring).
    """
    B, T, C = x.shape
    K = weight.shape[-1]
    dtype = promote_float(x.dtype, weight.dtype)
    if history is None:
        history = x.new_zeros(B, K - 1, C, dtype=dtype)
    elif history.shape != (B, K - 1, C):
        raise ValueError(f"history must have shape {(B, K - 1, C)}, got {tuple(history.shape)}")
    with no_autocast(x):
        xs = torch.cat([history.to(dtype), x.to(dtype)], dim=1)  # (B, K-1+T, C)
    return causal_conv_window(xs, weight), xs[:, xs.shape[1] - (K - 1) :]


def causal_conv_window(xs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """`causal_conv` of the last `T` inputs of `xs` `(B, K − 1 + T, C)`, which holds the `K − 1`
    inputs before them first: `y` `(B, T, C * m)` (possibly a token-minor view) in the promoted
    dtype, autocast off."""
    B, S, C = xs.shape
    K = weight.shape[-1]
    T = S - (K - 1)
    dtype = promote_float(xs.dtype, weight.dtype)
    with no_autocast(xs):
        xs, w = xs.to(dtype), weight.to(dtype)
        if backend.use_native([xs, w]):
            # CPU: the C kernel writes the expanded state token-major, in one pass per token.
            return native.expand_native(xs, w, K - 1).flatten(-2)
        if B * T * w.shape[0] <= _shapes.SMALL_STATE:
            # E.g. one decoded token: oneDNN's grouped conv costs ~170 µs on a (1, 512, 4) input
            # here; the same sums as a product over the K-token window cost a few µs.
            taps = w.view(C, -1, K)  # (C, m, K)
            if torch.compiler.is_compiling():
                # Traced: one shifted slice a tap. The unfold below, compiled with its backward by
                # Inductor's CPU code on torch 2.11.0, corrupted the heap (an additive-cc step).
                y = xs[:, :T, :, None] * taps[..., 0]
                for k in range(1, K):
                    y = y + xs[:, k : k + T, :, None] * taps[..., k]
                return y.flatten(-2)
            windows = xs.unfold(1, K, 1)  # (B, T, C, K)
            return (windows.unsqueeze(-2) * taps).sum(-1).flatten(-2)  # (B, T, C*m)
        y = F.conv1d(xs.transpose(1, 2), w, groups=C)  # (B, C*m, T)
    # A token-minor view: callers that keep y as state must make it token-major (EC does).
    return y.transpose(1, 2)


class _TokenConv(nn.Module):
    """Shared shape of the token-axis convolutions (EC, TC): sizes, validation, history length."""

    def __init__(self, dim: int, value_channels: int, kernel_size: int) -> None:
        super().__init__()
        if value_channels < 1 or kernel_size < 1:
            raise ValueError(
                f"value_channels and kernel_size must be >= 1, got {value_channels}, {kernel_size}"
            )
        self.dim, self.value_channels, self.kernel_size = dim, value_channels, kernel_size

    @property
    def history_len(self) -> int:
        """Past inputs a cached call needs: `K − 1`."""
        return self.kernel_size - 1


class EmbeddingConv(_TokenConv):
    """EC: depthwise causal conv over tokens from `d` features to `d·dv` channels (no bias).

    `weight` `(d·dv, 1, K)` in `nn.Conv1d` layout (output channel `i·dv + j` reads feature `i`).
    Initialised to the identity (weight 1 on the current token), so it starts as repetition.
    """

    def __init__(self, dim: int, value_channels: int, kernel_size: int = 4) -> None:
        super().__init__(dim, value_channels, kernel_size)
        self.weight = nn.Parameter(torch.empty(dim * value_channels, 1, kernel_size))
        self._expand_plan: prepared.PreparedConv | None = None  # _keep_plan
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, 0, -1] = 1.0

    def forward_cached(
        self, e: torch.Tensor, history: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`e` `(B, T, d)`, history `(B, K−1, d)` -> `X_0` `(B, T, d, dv)`, new history."""
        y, history = causal_conv(e, self.weight, history)  # (B, T, d*dv), token-minor
        return self._state(y), history

    def expand_inputs(self, es: torch.Tensor) -> torch.Tensor:
        """`X_0` `(B, T, d, dv)` of the last T of `es` `(B, K − 1 + T, d)`, which holds the
        `K − 1` embeddings before them first (zeros before the first token)."""
        weight, past = self._parameters["weight"], self.kernel_size - 1
        plan = self._expand_plan
        if (
            plan is not None
            and not torch.compiler.is_compiling()
            and plan.holds(es, (weight,), past)
        ):
            return plan(es)  # one decoded token: a prepared kernel call (ops.prepared)
        X = self._state(causal_conv_window(es, weight))
        _keep_plan(self, "_expand_plan", lambda: prepared.prepare_expansion(es, weight, past))
        return X

    def _state(self, y: torch.Tensor) -> torch.Tensor:
        # Token-major: left as the conv's view, the whole residual stream would keep a token-minor
        # layout, and every per-token reduction (readout kᵀX, compressors) would stride.
        return y.contiguous().unflatten(-1, (self.dim, self.value_channels))

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.forward_cached(e)[0]


def _fold_traced(w: torch.Tensor, read: torch.Tensor, p: int) -> torch.Tensor:
    """`ChannelCompressor.mixing_matrix`'s fold as `torch.compile` traces it: column j is
    `Σ_t w[:, t] · read[j − t + p]` over the taps that exist, written out — elementwise products
    of a weight column and a scalar, which Inductor fuses into one kernel each way (and into the
    reads it feeds), where the pad, unfold and flip of the eager fold and their backward made
    seven small kernels a sublayer in a compiled training step."""
    K, dv = w.shape[1], read.shape[0]
    columns = []
    for j in range(dv):
        taps = [t for t in range(K) if 0 <= j - t + p < dv]
        column = w[:, taps[0]] * read[j - taps[0] + p]
        for t in taps[1:]:
            column = column + w[:, t] * read[j - t + p]
        columns.append(column)
    return torch.stack(columns, -1)


def _fold_once_in_inference(
    module: nn.Module, params: tuple[torch.Tensor, ...], fold: Callable[[], torch.Tensor]
) -> torch.Tensor:
    """`fold()` (a compressor's folded weights); in inference the last fold again while none of
    `params` changed — an in-place update bumps `_version`, a move changes `data_ptr`. Decoding
    folds once per block and token otherwise."""
    if torch.compiler.is_compiling():  # a compiled graph folds inside its own kernels
        return fold()
    if torch.is_grad_enabled():
        if module._fold_cache is not None:
            module._fold_cache = None  # training moves the weights: no stale fold kept alive
        return fold()
    key = tuple((t.data_ptr(), t._version) for t in params)
    cached = module._fold_cache
    if cached is not None and cached[0] == key:
        return cached[1]
    folded = fold()
    module._fold_cache = (key, folded)
    return folded


def _keep_plan(module: nn.Module, name: str, prepare: Callable[[], object]) -> None:
    """Keep `prepare()` (a prepared kernel call of `ops.prepared`, or None where none applies) as
    `module.<name>`, in inference only: decoding repeats the same read or expansion at every token,
    and the checks and the fold lookup cost more host time than the kernel."""
    if torch.is_grad_enabled() or torch.compiler.is_compiling():
        return
    plan = prepare()
    if plan is not None:
        setattr(module, name, plan)


class ChannelCompressor(nn.Module):
    """CC: per-feature mixing of the current token's dv values, `x_in_i = Σ_j c_ij X_ij`.

    Parameterised as the authors' code does: a "same"-padded depthwise conv along the value axis
    (taps `weight` `(d, K)`, `K ≤ dv`, default `K = dv`) followed by a read vector `read` `(dv)`
    that pools the conv output; `mixing_matrix()` folds both into the `(d, dv)` matrix `c`.
    Initialised to an identity conv and `read = 1/dv`, i.e. the uniform average `c_ij = 1/dv`.
    """

    history_len = 0  # no token history

    def __init__(self, dim: int, value_channels: int, kernel_size: int | None = None) -> None:
        super().__init__()
        if value_channels < 1:
            raise ValueError(f"value_channels must be >= 1, got {value_channels}")
        kernel_size = value_channels if kernel_size is None else kernel_size
        if not 1 <= kernel_size <= value_channels:
            raise ValueError(
                f"kernel_size of the channel compressor must lie in [1, value_channels="
                f"{value_channels}], got {kernel_size}"
            )
        self.dim, self.value_channels, self.kernel_size = dim, value_channels, kernel_size
        self.weight = nn.Parameter(torch.empty(dim, kernel_size))
        self.read = nn.Parameter(torch.empty(value_channels))
        self._fold_cache: tuple[tuple[tuple[int, int], ...], torch.Tensor] | None = None
        self._read_plan: prepared.PreparedConv | None = None  # _keep_plan
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            self.weight[:, (self.kernel_size - 1) // 2] = 1.0  # the centre tap of a "same" conv
            self.read.fill_(1.0 / self.value_channels)

    def mixing_matrix(self) -> torch.Tensor:
        """The folded per-feature weights `c` `(d, dv)`: `c[i, j] = Σ_o read[o] · w[i, j − o + p]`.

        The conv output at value position `o` is `Σ_t w[i, t] X[i, o + t − p]` (`p = (K − 1) // 2`
        left padding), so input channel `j` meets tap `t = j − o + p` when that tap exists.
        """
        dv, K, p = self.value_channels, self.kernel_size, (self.kernel_size - 1) // 2
        # Substituting o = j − t + p: c[i, j] = Σ_t w[i, t] · read[j − t + p], i.e. c = w @ R with
        # R[t, j] = read[j − t + p] (0 outside [0, dv)): the rows of R are windows of the zero-padded
        # read vector. Four small ops, not the twenty of an index-and-einsum fold, which counts in
        # one-token decoding (the fold runs at every sublayer).
        w = self.weight

        def fold() -> torch.Tensor:
            read = self.read.to(w.dtype)
            if torch.compiler.is_compiling():  # compiled: products of columns and scalars only
                return _fold_traced(w, read, p)
            padded = F.pad(read, (K - 1 - p, p))  # (dv + K − 1,)
            R = padded.unfold(0, dv, 1).flip(0)  # (K, dv): row t is read shifted by t − p
            with no_autocast(w):  # autocast would fold the weights in bf16
                return w @ R

        return _fold_once_in_inference(self, (w, self.read), fold)

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.read_with_matrix(X)[0]

    def decode_read(self, fast, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """`read_with_matrix(X)` as one call of the inference extension `fast` (the fold and the
        read), for a caller that checked once that it may run (no autograd, the fast paths
        allowed: `DeltaLM.forward`); None, nothing computed, where the extension declines X."""
        return fast.channel_read(X, self._parameters["weight"], self._parameters["read"])

    def read_with_matrix(self, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The read of X `(..., d, dv)` -> `(..., d)`, and the folded matrix `c` it took (a fused
        rewrite reads its output with the same matrix)."""
        params = (self._parameters["weight"], self._parameters["read"])
        # Without autograd on CPU: the fold and the read in one call whose checks run in C++
        # (ops/extension.py), else the prepared ctypes call. native_allowed first: it checks
        # torch.compile before anything untraceable.
        if not torch.is_grad_enabled() and backend.native_allowed() and X.is_cpu:
            fast = extension.loaded()
            out = None if fast is None else self.decode_read(fast, X)
            if out is not None:
                return out
            plan = self._read_plan
            if plan is not None and plan.holds(X, params, 0):
                return plan(X), plan.weights
        if X.shape[-2:] != (self.dim, self.value_channels):
            raise ValueError(
                f"state of shape {tuple(X.shape)} does not end in (dim, value_channels) = "
                f"{(self.dim, self.value_channels)}"
            )
        C = self.mixing_matrix()
        x = channel_mix(X, C)  # one channel at a time: see ops/mixing.py
        _keep_plan(self, "_read_plan", lambda: prepared.prepare_read(X, C, 0, params))
        return x, C


class TokenCompressor(_TokenConv):
    """TC: causal depthwise conv over tokens on the `d·dv` channels, then a read vector over dv.

    `weight` `(d, dv, K)` (tap `K − 1` is the current token), `read` `(dv)`. Initialised to the
    identity conv and `read = 1/dv`, i.e. the uniform average of the current token's channels.
    Generation keeps the last `K − 1` states it read (`forward_cached`).
    """

    def __init__(self, dim: int, value_channels: int, kernel_size: int = 4) -> None:
        super().__init__(dim, value_channels, kernel_size)
        self.weight = nn.Parameter(torch.empty(dim, value_channels, kernel_size))
        self.read = nn.Parameter(torch.empty(value_channels))
        self._fold_cache: tuple[tuple[tuple[int, int], ...], torch.Tensor] | None = None
        self._read_plan: prepared.PreparedConv | None = None  # _keep_plan
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.weight.zero_()
            self.weight[..., -1] = 1.0
            self.read.fill_(1.0 / self.value_channels)

    def forward_cached(
        self, X: torch.Tensor, history: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """`X` `(B, T, d, dv)`, history `(B, K−1, d, dv)` -> `x_in` `(B, T, d)`, new history."""
        B, T, d, dv = X.shape
        if (d, dv) != (self.dim, self.value_channels):
            raise ValueError(
                f"state of shape {tuple(X.shape)} does not end in (dim, value_channels) = "
                f"{(self.dim, self.value_channels)}"
            )
        K = self.kernel_size
        if history is not None and history.shape != (B, K - 1, d, dv):
            raise ValueError(
                f"history must have shape {(B, K - 1, d, dv)}, got {tuple(history.shape)}"
            )
        # Past inputs before X: the cached history, or the zero left padding of a fresh sequence
        # (then simply not read).
        xs = X if history is None else torch.cat([history.to(X.dtype), X], dim=1)
        x_in = self.read_inputs(xs, 0 if history is None else K - 1)
        new_history = xs[:, max(xs.shape[1] - (K - 1), 0) :]
        if new_history.shape[1] < K - 1:  # fewer inputs than K − 1 so far: pad with zeros
            new_history = F.pad(new_history, (0, 0, 0, 0, K - 1 - new_history.shape[1], 0))
        return x_in, new_history

    def read_inputs(self, xs: torch.Tensor, past: int) -> torch.Tensor:
        """The read of `xs` `(B, past + T, d, dv)` — `past` earlier inputs (zeros before the first
        token), then the T new states — as `(B, T, d)`."""
        params = (self._parameters["weight"], self._parameters["read"])
        plan = self._read_plan
        if plan is not None and not torch.compiler.is_compiling() and plan.holds(xs, params, past):
            return plan(xs)
        with no_autocast(xs):
            w = self.taps()
            # Each tap read in place on the state as it lies (token-major): no d·dv-wide conv
            # output, no transposes, no zero-filled gradient per tap (ops/token_mixing.py).
            x_in = token_mix(xs, w, past)
        _keep_plan(self, "_read_plan", lambda: prepared.prepare_read(xs, w, past, params))
        return x_in

    def taps(self) -> torch.Tensor:
        """The read vector folded into the taps, `(d, dv, K)`: Σ_j r_j Σ_τ w_ijτ X_ij =
        Σ_τ Σ_j (r_j w_ijτ) X_ij (in inference, the last fold while the parameters hold)."""
        params = (self._parameters["weight"], self._parameters["read"])
        return _fold_once_in_inference(self, params, self._fold)

    def _fold(self) -> torch.Tensor:
        w = self.weight * self.read[:, None]  # (d, dv, K)
        if w.is_cpu:  # tap-major in memory, the layout the C kernels read: no copy per call
            return w.permute(2, 0, 1).contiguous().permute(1, 2, 0)
        return w

    def forward(self, X: torch.Tensor) -> torch.Tensor:
        return self.forward_cached(X)[0]
