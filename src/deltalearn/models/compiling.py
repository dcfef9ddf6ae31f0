"""The Inductor options a `DeltaLM` compiles with (`DeltaLM.compile`, which `deltalearn train
--compile` and `bench model --compile` call).

Inductor's mix-order reduction (`triton.mix_order_reduction`, on by default for GPUs since torch
2.10) fuses a reduction over a tensor's rows with one over its columns into one Triton kernel. A
DDL update's backward is made of such pairs — the direction's norm and the readout reduce over d,
the gate's and the value head's weight gradients over the rows — and with it on, compiled ddl-cc
training on an H200 (torch 2.11.0, `small`, 8 × 1024) stopped in its first backward: "returned an
invalid gradient ... got [768] but expected shape compatible with [1, 768]" (the gate weight).
That this fusion is the cause is inferred, not yet seen with it off on a GPU: Inductor's CPU code,
which has no such fusion, compiles the same step correctly on torch 2.11 and 2.13, and the error
is pytorch/pytorch#178080's (a fused reduction that loses a kept dimension). Later fixes of the
same fusion (pytorch/pytorch#193061: wrong gradients, silently, through torch 2.13) say it is not
yet safe to leave on for a training step, so a DeltaLM compiles with it off. On a CPU the option
changes nothing. `benchmarks/compiled_gradients.py --device cuda` compares both ways with eager.
"""

from __future__ import annotations

from typing import Any

# What a DeltaLM's compile turns off, where this torch has it (2.10 and later).
SAFE_OPTIONS = {"triton.mix_order_reduction": False}


def _has_mix_order_reduction() -> bool:
    import torch._inductor.config as inductor_config  # here: importing Inductor takes a second

    return hasattr(inductor_config.triton, "mix_order_reduction")


def compile_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """`torch.compile`'s keyword arguments with `SAFE_OPTIONS` added for the Inductor backend (the
    default). torch.compile takes a `mode` or `options`, not both: a mode becomes its options
    (`torch._inductor.list_mode_options`), then ours, then the caller's (who may turn one back on).
    Another backend (e.g. "aot_eager") gets the arguments unchanged."""
    backend = kwargs.get("backend", "inductor")
    if backend not in (None, "inductor"):
        return dict(kwargs)
    if not _has_mix_order_reduction():
        return dict(kwargs)
    from torch._inductor import list_mode_options

    out = dict(kwargs)
    mode = out.pop("mode", None)
    options = dict(list_mode_options(mode, out.get("dynamic"))) if mode else {}
    options.update(SAFE_OPTIONS)
    options.update(out.get("options") or {})
    out["options"] = options
    return out
