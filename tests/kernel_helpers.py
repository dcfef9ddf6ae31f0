"""Recording which CPU kernels run (tests of `ops/native.py`, `ops/prepared.py` and
`ops/extension.py`), and a DeltaUpdate's numbers on the PyTorch path to hold them to."""

from __future__ import annotations

import warnings

import pytest
import torch

from deltalearn.ops import backend, native, prepared


def assert_warns_once(call, match: str) -> None:
    """`call()` gives None with a RuntimeWarning matching `match`, and again None without one."""
    with pytest.warns(RuntimeWarning, match=match):
        assert call() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert call() is None  # said once


def on_pytorch_path(update, args):
    """`update(*args)` without autograd on the PyTorch path (no C kernel, no C++ call)."""
    saved = backend.BACKEND
    backend.BACKEND = "torch"
    try:
        with torch.no_grad():
            return update(*args)
    finally:
        backend.BACKEND = saved


def assert_outputs_close(actual, expected) -> None:
    """A tensor or a tuple of them, each within the round-off of its dtype (fp32 or float64)."""
    pairs = zip(
        actual if isinstance(actual, tuple) else (actual,),
        expected if isinstance(expected, tuple) else (expected,),
        strict=True,
    )
    for a, e in pairs:
        tol = 2e-5 if e.dtype == torch.float32 else 1e-12
        torch.testing.assert_close(a, e, rtol=tol, atol=tol)


def record_kernel_calls(monkeypatch, calls: list[str], general: bool = True) -> None:
    """Append the name of every prepared kernel call that runs to `calls`, and with `general` also
    every kernel the general path (`native._call`) runs."""
    real_run = prepared._Prepared._run

    def counted_run(self, *args):
        calls.append(self.name)
        return real_run(self, *args)

    monkeypatch.setattr(prepared._Prepared, "_run", counted_run)
    if general:
        real_call = native._call

        def counted_call(name, dtype, *args):
            calls.append(name)
            return real_call(name, dtype, *args)

        monkeypatch.setattr(native, "_call", counted_call)
