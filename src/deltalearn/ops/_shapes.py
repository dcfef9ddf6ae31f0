"""Shape checks shared by every implementation of the operator.

Index legend used across `deltalearn.ops`:
    ...  any leading batch shape (tokens, batch, heads, ...)
    d    state width (the direction k lives in R^d)
    dv   value channels of a matrix state; a vector state has no dv axis
"""

from __future__ import annotations

import contextlib
import functools

import torch


def has_autocast(device_type: str) -> bool:
    """Whether autocast exists on this device type."""
    # cpu and cuda always have autocast; asking broke the graph under torch.compile on torch 2.11
    return device_type in ("cpu", "cuda") or torch.amp.is_autocast_available(device_type)


def autocast_on(device_type: str) -> bool:
    """Whether autocast is switched on for this device type now."""
    return has_autocast(device_type) and torch.is_autocast_enabled(device_type)


def no_autocast(t: torch.Tensor) -> contextlib.AbstractContextManager:
    """A context that switches autocast off on `t`'s device (a no-op where autocast does not exist).

    Autocast would run the operator's matmuls (`kᵀX` is an einsum, i.e. a bmm) in bf16/fp16 even on
    fp32 operands; the rewrite's reductions must accumulate in fp32 under autocast too.
    """
    device_type = t.device.type
    if autocast_on(device_type):  # off already: no context object (~4 µs, per decoded token)
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def cast_grads(grads, dtypes) -> tuple[torch.Tensor | None, ...]:
    """Each gradient in its input's dtype (None stays None): the end of a hand-written backward."""
    return tuple(g if g is None else g.to(dtype=t) for g, t in zip(grads, dtypes, strict=True))


def new_empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`torch.empty(shape, dtype=..., device=...)` with the sizes passed one by one: given as one
    sequence, torch's argument parser first tries it as the first of several sizes, fails with a
    TypeError it formats and drops, and takes it as the list only then — ~1 µs of a ~2 µs call.
    A kernel Function allocates up to seven outputs a call, and eager training on a GPU (and
    decoding on a CPU) is bound by such host work."""
    if shape:
        return torch.empty(*shape, dtype=dtype, device=device)
    return torch.empty((), dtype=dtype, device=device)


# States of at most this many elements (e.g. one decoded token) take the few-op form of a reduction
# over them (`is_small_state`): decoding one token at a time is bound by the ops dispatched, not by
# memory traffic, and the temporary of a product-sum is small.
SMALL_STATE = 1 << 16


def is_small_state(X: torch.Tensor) -> bool:
    return X.numel() <= SMALL_STATE


@functools.lru_cache(maxsize=1024)  # a few calls a kernel launch, the same few layouts: host time
def dense_past_first(shape: tuple[int, ...], strides: tuple[int, ...]) -> bool:
    """Whether every element past the first axis of a tensor of `shape` and `strides` lies in one
    contiguous block (size-1 axes aside), whatever the stride of the first axis: a row of the
    rewrite's `(N, d, dv)`, a token of the reads' `(S, d, dv)`. The Triton kernels then take the
    strides inside it as constants and load channel vectors whole."""
    inner = 1
    for size, stride in zip(reversed(shape[1:]), reversed(strides[1:]), strict=True):
        if size != 1 and stride != inner:
            return False
        inner *= size
    return True


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (n >= 1): `triton.next_power_of_2`, which costs ~2 µs a
    call through triton's constexpr-function wrapper — host time, a dozen calls a launch."""
    return 1 << (n - 1).bit_length()


def cdiv(a: int, b: int) -> int:
    """`ceil(a / b)` for a >= 0, b >= 1: `triton.cdiv` without its wrapper (see `next_pow2`)."""
    return -(-a // b)


def accumulation_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 for half-precision inputs, float64 when any input is float64."""
    # Plain Python: torch.promote_types goes through the dispatcher, once per tensor and call.
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def promote_float(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    """`torch.promote_types(a, b)` for floating dtypes, in Python (the torch call is a dispatched op:
    one of the few dozen a decoded token's sublayer pays for)."""
    if a == b:
        return a
    if not (a.is_floating_point and b.is_floating_point):
        return torch.promote_types(a, b)
    # Mixed floats: float64 wins; any other mix (fp32, bf16, fp16) promotes to fp32.
    return torch.float64 if torch.float64 in (a, b) else torch.float32


def _fmt(t: torch.Tensor) -> str:
    return str(tuple(t.shape))


def check_rewrite_inputs(
    X: torch.Tensor, k: torch.Tensor, beta: torch.Tensor, v: torch.Tensor
) -> bool:
    """Validate the four operands of a rewrite; return True for a matrix state `(..., d, dv)`.

    The state is a matrix state exactly when `v` has one more axis than `beta` (a `dv` axis);
    otherwise it is a vector state `(..., d)` and `v` has the shape of `beta`.
    """
    for name, t in (("X", X), ("k", k), ("beta", beta), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if k.dim() == 0 or X.dim() == 0:
        raise ValueError(f"X and k need at least one axis (d); got X {_fmt(X)} and k {_fmt(k)}")
    lead = k.shape[:-1]
    d = k.shape[-1]
    if beta.shape != lead:
        raise ValueError(
            f"beta must have the leading shape of k {tuple(lead)}, got beta {_fmt(beta)} "
            f"(k {_fmt(k)})"
        )
    if X.shape == k.shape:
        if v.shape != lead:
            raise ValueError(
                f"vector state X {_fmt(X)} needs a scalar target per row, v of shape "
                f"{tuple(lead)}; got v {_fmt(v)}"
            )
        return False
    if X.dim() == k.dim() + 1 and X.shape[:-1] == k.shape:
        dv = X.shape[-1]
        if v.shape != (*lead, dv):
            raise ValueError(
                f"matrix state X {_fmt(X)} needs v of shape {(*tuple(lead), dv)}; got v {_fmt(v)}"
            )
        return True
    raise ValueError(
        f"X {_fmt(X)} does not match k {_fmt(k)}: expected X of shape {_fmt(k)} (vector state) "
        f"or {(*tuple(lead), d, 'dv')} (matrix state)"
    )


def check_direction_and_gate(k: torch.Tensor, beta: torch.Tensor) -> None:
    if k.dim() == 0:
        raise ValueError(f"k needs at least one axis (d); got k {_fmt(k)}")
    if beta.shape != k.shape[:-1]:
        raise ValueError(
            f"beta must have the leading shape of k {tuple(k.shape[:-1])}, got beta {_fmt(beta)}"
        )
