"""Whether a module's call would be its bare `forward`: what lets a caller skip the call."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.modules import module as _module


def plain_call(module: nn.Module, cls: type[nn.Module]) -> bool:
    """Whether `module(...)` would run `cls.forward` and nothing else: not a subclass's own
    forward, no hooks of its own nor global ones, no `torch.jit.trace` recording (the condition of
    `nn.Module`'s own shortcut). A caller that decodes one token at a time may then call `cls`'s
    fast path directly: the module call and the checks that pick a path cost more than the kernel."""
    return type(module).forward is cls.forward and not (
        module._forward_hooks
        or module._forward_pre_hooks
        or module._backward_hooks
        or module._backward_pre_hooks
        or _module._global_forward_hooks
        or _module._global_forward_pre_hooks
        or _module._global_backward_hooks
        or _module._global_backward_pre_hooks
        or torch._C._get_tracing_state()
    )
