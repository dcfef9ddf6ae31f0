"""AdamW with decoupled decay on weight matrices only, and the warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch
from torch import nn

from deltalearn.train.config import OptimConfig, ScheduleConfig

__all__ = ["build_optimizer", "lr_at", "param_groups", "stepped_parameters"]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters: ≥2-D matrices decay; norms, biases, gate biases and embeddings do not.

    Embeddings are 2-D but are looked up, not multiplied; decaying them (and with tied weights,
    the LM head) hurts small models, so any parameter whose name contains ``embed`` is excluded.
    Each shared (tied) parameter appears once.
    """
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() >= 2 and "embed" not in name and "wte" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW (SPEC §4: β = 0.9, 0.95, decay 0.1). The lr is set every step by :func:`lr_at`.

    Fused (one kernel for all parameters) when every parameter is a plain CUDA or CPU tensor:
    faster (on a 2-core CPU ~1 ms a `tiny` step against 4-6 ms for the default per-parameter loop),
    and it skips a non-finite step on the device, without a host sync (the trainer hands it
    ``found_inf``). Elsewhere — FSDP2's sharded DTensors, other devices — the default
    implementation.
    """
    groups = param_groups(model, cfg.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(
        p.device.type in ("cuda", "cpu") and not hasattr(p, "device_mesh") for p in params
    )
    return torch.optim.AdamW(
        groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps, fused=fused or None
    )


def stepped_parameters(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters `optimizer` steps, in order: what the gradient-norm clip reads. Listed once,
    not by `model.parameters()` at every step, whose walk over every submodule is host time a
    GPU step waits for (`small`: 170 µs for the baseline's 173 modules, 300 µs for ddl's 293, on
    a 2-core EPYC)."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def lr_at(step: int, peak_lr: float, total_steps: int, sched: ScheduleConfig) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warm-up over ``warmup_steps`` (step 0 already gets ``peak/warmup``, never 0), then a
    cosine from the peak down to ``min_lr_ratio · peak`` at the last step. A pure function of the
    step, so resuming needs no scheduler state.
    """
    warmup = min(sched.warmup_steps, max(total_steps - 1, 0))
    if step < warmup:
        return peak_lr * (step + 1) / warmup
    span = max(total_steps - 1 - warmup, 1)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    floor = sched.min_lr_ratio * peak_lr
    return floor + (peak_lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
