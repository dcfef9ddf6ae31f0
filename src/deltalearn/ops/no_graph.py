"""Running a custom autograd Function's forward where no graph is recorded.

`Function.apply` costs host time even under `torch.no_grad` (its context, the checks of every
input, the output wrapping: ~7 µs a call with 17 arguments on a 2-core EPYC, more on a GPU
machine's host, where eager inference and decoding are bound by host work: `benchmarks/README.md`).
Where neither a backward nor a forward-mode derivative can be asked for, the Functions of the GPU
path call their forward directly with a `NoGraph` for the context.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.autograd import forward_ad


class NoGraph:
    """An autograd context that records nothing: what a forward keeps on it for a backward is
    never read."""

    def set_materialize_grads(self, value: bool) -> None:
        pass

    def save_for_backward(self, *tensors: torch.Tensor | None) -> None:
        pass

    def mark_non_differentiable(self, *tensors: torch.Tensor) -> None:
        pass


def records_graph() -> bool:
    """Whether an op run now could be differentiated: grad mode on, or a forward-mode AD level
    open (a Function without a `jvp` must then refuse, as `apply` makes it)."""
    # (a private counter of torch.autograd.forward_ad, read defensively: -1 where none is open)
    return torch.is_grad_enabled() or getattr(forward_ad, "_current_level", -1) >= 0


def apply(function: type[torch.autograd.Function], *args: Any) -> Any:
    """`function.apply(*args)`, with the forward called directly where no graph is recorded."""
    if records_graph():
        return apply_direct(function, *args)
    return function.forward(NoGraph(), *args)


# autograd's C entry point of every Function (`Function.apply` is a Python wrapper around it).
_C_APPLY = torch._C._FunctionBase.__dict__.get("apply")
_BOUND: dict[type, Any] = {}


def apply_direct(function: type[torch.autograd.Function], *args: Any) -> Any:
    """`function.apply(*args)` through autograd's C entry point, without the Python wrapper of
    `Function.apply`, which passes every argument through a generator to unwrap functorch
    wrappers whose transform has ended (~3.7 µs of host time a call with 17 arguments on a 2-core
    EPYC; eager training on a GPU is bound by such host work). Only outside functorch transforms
    and torch.compile, for a Function without `setup_context` (deltalearn's): there the wrapper
    adds nothing for tensors that were never inside a transform, which deltalearn's callers pass.
    Elsewhere `function.apply` itself."""
    bound = _BOUND.get(function)
    if bound is None:
        plain = function.setup_context is torch.autograd.Function.setup_context
        bound = _C_APPLY.__get__(None, function) if _C_APPLY is not None and plain else False
        _BOUND[function] = bound
    if (
        bound is False
        or torch._C._are_functorch_transforms_active()
        or torch.compiler.is_compiling()
    ):
        return function.apply(*args)
    return bound(*args)
