"""Prepared C-kernel calls for inference on CPU: one-token decoding repeats the same update, read
and expansion at every token, and is bound by host work, not arithmetic. The fallback of the C++
inference extension (`ops/extension.py`, which checks and calls in C++ at a quarter of the host
time), where no C++ compiler can build it.

A prepared call is made once per module and input shape, after the general path has found that the
kernel applies (operands on CPU, of one dtype in `backend.NATIVE_DTYPES`, shapes that fit), and is
reused while `holds`:

- the inputs keep the shape, dtype and layout it was made for (plain contiguous CPU tensors);
- the module's weights are the very storages it saw, unchanged: their `data_ptr` (of a storage the
  call keeps alive, so no other tensor can take its address) and `_version` (which every in-place
  update bumps);
- inference holds: no autograd, no CPU autocast, no `torch.compile` or functorch transform, the
  backend "auto" or "native" (`inference_kernels_now`).

What stays the same from token to token (sizes, flags, weight addresses) is packed into two small
arrays the kernel's `_packed` entry point reads, so a call converts a few ctypes arguments, not
twenty. A prepared call holds a kernel handle, which does not pickle: pickling or deep-copying one
gives None (the module prepares a new one on its next call).
"""

from __future__ import annotations

import ctypes

import torch

from deltalearn.ops import backend
from deltalearn.ops._shapes import autocast_on
from deltalearn.ops.native import _as_read, _kernel, _read_shape, expansion_taps, fits


def inference_kernels_now() -> bool:
    """What `backend.use_native` checks beyond the (CPU) operands (`backend.native_allowed`), and no
    CPU autocast: for a call made while no autograd runs."""
    return backend.native_allowed() and not autocast_on("cpu")


def _stamps(tensors) -> tuple:
    return tuple(None if t is None else (t.data_ptr(), t._version) for t in tensors)


def _plain(t: torch.Tensor, dtype: torch.dtype) -> bool:
    return type(t) is torch.Tensor and t.dtype == dtype and t.is_cpu and t.is_contiguous()


def _dropped() -> None:
    return None


class _Prepared:
    """What both kinds share: the kept storages and their stamps, the packed arrays, the handle."""

    __slots__ = ("dtype", "kept", "stamps", "arrays", "ints", "reals", "name", "kernel")

    def __init__(self, dtype, params, operands, ints, reals, kernel: str) -> None:
        self.dtype = dtype
        self.stamps = _stamps(params)
        # The parameters' storages and the operands the packed addresses point at, kept alive.
        self.kept = (tuple(None if p is None else p.detach() for p in params), operands)
        self.arrays = ((ctypes.c_int64 * len(ints))(*ints), (ctypes.c_double * len(reals))(*reals))
        self.ints, self.reals = (ctypes.addressof(a) for a in self.arrays)
        self.name, self.kernel = kernel, _kernel(kernel, dtype)

    def __reduce__(self):
        return _dropped, ()

    def _run(self, *args) -> None:
        code = self.kernel(*args, torch.get_num_threads())
        if code != 0:
            raise RuntimeError(f"deltalearn CPU kernel {self.name} failed (code {code})")


def _address(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.data_ptr()


class InferenceUpdate(_Prepared):
    """A DDL sublayer's whole update without autograd as one kernel call, from its inputs: the
    linear gate's logit `c·w_g + b_g`, the value head's pre-activation `W_v x (+ b_v)` (x = c for
    the paper head, u for the official one) and `rewrite_epilogue` — the same numbers as
    `gate_and_value` then `rewrite_epilogue` up to summation order. Y, or `(Y, x_next)` with a
    compressor matrix."""

    __slots__ = ("shape", "h_shape", "read")

    def __init__(self, X, h, weights, compress, rule, value_head, value_scale, k_eps) -> None:
        """`weights` `(w_gate, b_gate, W_value, b_value)` (`b_value` may be None); `compress` the
        `(d, dv)` compressor matrix whose read of Y comes back too, or None."""
        params = (*weights, compress)
        operands = tuple(None if t is None else t.detach().contiguous() for t in params)
        d = h.shape[-1]
        ints = (
            h.numel() // d, d, weights[2].shape[0], *(_address(t) for t in operands),
            int(rule == "delta"), int(value_head == "official"),
        )  # fmt: skip
        super().__init__(
            X.dtype, params, operands, ints, (value_scale, k_eps), "update_forward_packed"
        )
        self.shape, self.h_shape, self.read = X.shape, h.shape, compress is not None

    def holds(self, update, X, h, c, u, compress) -> bool:
        """Whether this call applies now to these inputs and `compress`, and to the `DeltaUpdate`
        `update` as it is now (fused, not recording, the weights it had)."""
        dtype, shape = self.dtype, self.h_shape
        return (
            not torch.is_grad_enabled()
            and update.fused
            and not update.record
            and X.shape == self.shape
            and h.shape == shape
            and c.shape == shape
            and u.shape == shape
            and _plain(X, dtype)
            and _plain(h, dtype)
            and _plain(c, dtype)
            and _plain(u, dtype)
            and _stamps((*update._linear_gate_weights(), compress)) == self.stamps
            and inference_kernels_now()
        )

    def __call__(self, X, h, c, u):
        """Y, or `(Y, x_next)`; contiguous inputs as `holds` checks them."""
        Y = torch.empty_like(X)
        x_next = torch.empty_like(h) if self.read else None
        self._run(
            self.ints, self.reals, X.data_ptr(), h.data_ptr(), c.data_ptr(), u.data_ptr(),
            Y.data_ptr(), _address(x_next),
        )  # fmt: skip
        return Y if x_next is None else (Y, x_next)


class PreparedConv(_Prepared):
    """A compressor's read (`native.value_read_native`) or the EC expansion
    (`native.expand_native`) of one input shape, without autograd, as one kernel call."""

    __slots__ = ("shape", "past", "out_shape", "weights")

    def __init__(self, kernel, xs, taps, B, S, past, params, out_shape, weights) -> None:
        K, d, dv = (1, *taps.shape) if taps.dim() == 2 else taps.shape
        super().__init__(
            xs.dtype, params, taps, (B, S, past, d, dv, K, taps.data_ptr()), (), kernel
        )
        self.shape, self.past, self.out_shape, self.weights = xs.shape, past, out_shape, weights

    def holds(self, xs: torch.Tensor, params, past: int) -> bool:
        """Whether this call applies now to `xs` and the module's current `params`."""
        return (
            not torch.is_grad_enabled()
            and xs.shape == self.shape
            and past == self.past
            and _plain(xs, self.dtype)
            and _stamps(params) == self.stamps
            and inference_kernels_now()
        )

    def __call__(self, xs: torch.Tensor) -> torch.Tensor:
        """The output for `xs` (contiguous, as `holds` checks it)."""
        out = torch.empty(*self.out_shape, dtype=self.dtype)
        self._run(self.ints, xs.data_ptr(), out.data_ptr())
        return out


def _applies(xs: torch.Tensor, W: torch.Tensor) -> bool:
    return (
        not torch.is_grad_enabled()
        and xs.is_contiguous()
        and fits(xs)
        and backend.use_native([xs, W])
    )


def prepare_read(xs: torch.Tensor, W: torch.Tensor, past: int, params) -> PreparedConv | None:
    """The read of `xs` with the folded `W` (shapes as `value_read_native` takes them, already
    checked) as a prepared call, where one applies now, else None. `params`: the compressor's
    parameters `W` was folded from; `weights` of the call is `W` (a fused rewrite reuses it)."""
    if not _applies(xs, W):
        return None
    _, taps, B, S = _as_read(xs, W)
    shape = _read_shape(xs, W, past)
    return PreparedConv("read_forward_packed", xs, taps, B, S, past, params, shape, W)


def prepare_expansion(es: torch.Tensor, weight: torch.Tensor, past: int) -> PreparedConv | None:
    """The EC expansion of `es` `(B, past + T, d)` with the conv `weight` `(d·dv, 1, K)` (as
    `expand_native` takes them) as a prepared call giving `(B, T, d, dv)`, else None."""
    if es.dim() != 3 or not _applies(es, weight):
        return None
    B, S, d = es.shape
    taps = expansion_taps(weight.detach(), d)  # (K, d, dv)
    shape = (B, S - past, d, taps.shape[-1])
    return PreparedConv("expand_forward_packed", es, taps, B, S, past, (weight,), shape, None)
