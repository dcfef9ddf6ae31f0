"""DDL as a drop-in residual connection: a deep MLP ResNet, additive vs delta vs write-only.

Task: predict the state of a reflecting dynamical system after a few steps — each step flips the sign
of one coordinate (a Householder-like, non-monotonic map), the setting SPEC §6 motivates DDL with.

    python examples/drop_in_mlp.py            # ~1 minute on 2 CPU cores
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from deltalearn.nn import DeltaResidual


def make_task(n: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs x and targets y = R_3 R_2 R_1 x, each R_i a reflection across a random hyperplane
    chosen by the sign of one input coordinate (so the map is piecewise-orthogonal, non-monotonic)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    normals = nn.functional.normalize(torch.randn(3, dim, generator=g), dim=-1)
    y = x.clone()
    for i, u in enumerate(normals):
        flip = (x[:, i] > 0).float()[:, None]  # reflect only half of the samples at step i
        y = y - flip * 2 * (y @ u)[:, None] * u
    return x, y


def build(rule: str, dim: int, depth: int, width: int) -> nn.Module:
    def branch() -> nn.Module:
        return nn.Sequential(nn.Linear(dim, width), nn.GELU(), nn.Linear(width, dim))

    return nn.Sequential(*[DeltaResidual(dim, branch(), rule=rule) for _ in range(depth)])


def train(rule: str, steps: int, dim: int = 16, depth: int = 8, seed: int = 0) -> float:
    torch.manual_seed(seed)
    x, y = make_task(4096, dim, seed)
    x_val, y_val = make_task(1024, dim, seed + 1)
    model = build(rule, dim, depth, 4 * dim)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (256,))
        loss = (model(x[idx]) - y[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        return (model(x_val) - y_val).pow(2).mean().item()


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    results = {}
    for rule in ("additive", "delta", "write_only"):
        results[rule] = train(rule, args.steps, seed=args.seed)
        print(f"{rule:>10}: validation MSE {results[rule]:.4f}")
    return results


if __name__ == "__main__":
    main()
