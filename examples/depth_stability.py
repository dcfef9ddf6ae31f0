"""Depth stability: residual MLPs of 16 to 256 blocks under each rule — gradients and divergence.

For each rule (additive, DDL, write-only), depth and seed, a `DeltaResMLP` (width 32, branch hidden
64, default PyTorch initialisation, pre-norm) is measured at initialisation — the gradient norm of
every block's parameters on one batch and the RMS of the state after every block — and then
trained for a short budget with AdamW at a constant learning rate, no warm-up and no gradient
clipping. A run *diverged* when a loss is not finite; it *failed* when it diverged or the mean loss
of its last five steps is not below 1, the error of predicting zero (the targets have variance 1).

The task is a fixed random teacher, y = tanh(x W₁) W₂ (8 → 64 → 8, x ~ N(0, I)), normalised to
unit variance, so that "did it learn" is easy to read: the relative loss falls below 1.

Writes `results.json` and `depth_stability.png` into --out.

    python examples/depth_stability.py                 # depths 16..256 × 3 rules × 3 seeds
    python examples/depth_stability.py --depths 4,8 --seeds 1 --steps 3 --out /tmp/depth   # smoke
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch

from deltalearn.nets import DeltaResMLP
from deltalearn.nets.results import (
    check_args,
    format_interval,
    int_list,
    mean_interval,
    name_list,
    pyplot,
    save_figure,
    settings_of,
    write_json,
)

RULES = ("additive", "delta", "write_only")
IN, OUT = 8, 8


def _teacher_weights() -> tuple[torch.Tensor, torch.Tensor]:
    w = torch.Generator().manual_seed(99)
    W1 = torch.randn(IN, 64, generator=w) / math.sqrt(IN)
    W2 = torch.randn(64, OUT, generator=w) / math.sqrt(64)
    return W1, W2


def _teacher_scale() -> float:
    """The RMS of the raw teacher's outputs (over 2^16 fixed inputs), to make them unit-variance."""
    W1, W2 = _teacher_weights()
    x = torch.randn(2**16, IN, generator=torch.Generator().manual_seed(0))
    return (torch.tanh(x @ W1) @ W2).pow(2).mean().sqrt().item()


_SCALE = _teacher_scale()


def teacher(n: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of the fixed random teacher (its weights do not depend on `g`); the
    targets have mean ≈ 0 and variance ≈ 1, so predicting zero has loss ≈ 1."""
    W1, W2 = _teacher_weights()
    x = torch.randn(n, IN, generator=g)
    return x, torch.tanh(x @ W1) @ W2 / _SCALE


def block_grad_norms(net: DeltaResMLP) -> list[float]:
    norms = []
    for block in net.residuals():
        grads = [p.grad.reshape(-1) for p in block.parameters() if p.grad is not None]
        norms.append(torch.linalg.vector_norm(torch.cat(grads)).item())
    return norms


def at_init(net: DeltaResMLP, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Gradient norms per block and in total, and the state RMS after every block, on one batch."""
    rms: list[float] = []
    hooks = [
        b.register_forward_hook(lambda _m, _i, out: rms.append(out.pow(2).mean().sqrt().item()))
        for b in net.residuals()
    ]
    try:
        loss = (net(x) - y).pow(2).mean()
    finally:
        for h in hooks:
            h.remove()
    net.zero_grad(set_to_none=True)
    loss.backward()
    grads = [p.grad for p in net.parameters() if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads).item()
    per_block = block_grad_norms(net)
    net.zero_grad(set_to_none=True)
    return {
        "loss": loss.item(),
        "grad_norm": total,
        "block_grad_norms": per_block,
        "first_over_last_block": per_block[0] / per_block[-1],
        "state_rms": rms,
    }


def train(net: DeltaResMLP, seed: int, args) -> dict:
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    data = torch.Generator().manual_seed(seed)
    losses, grad_norms = [], []
    for _ in range(args.steps):
        x, y = teacher(args.batch_size, data)
        loss = (net(x) - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad for p in net.parameters() if p.grad is not None]
        grad_norms.append(torch.nn.utils.get_total_norm(grads).item())
        losses.append(loss.item())
        if not math.isfinite(losses[-1]):
            break
        opt.step()
    tail = losses[-5:]
    final = sum(tail) / len(tail)
    diverged = not all(math.isfinite(v) for v in losses)
    return {
        "losses": losses,
        "grad_norms": grad_norms,
        "final_loss": final,
        "max_grad_norm": max(grad_norms),
        "diverged": diverged,
        "failed": diverged or not final < 1.0,
    }


def run_one(rule: str, depth: int, seed: int, args) -> dict:
    torch.manual_seed(seed)
    net = DeltaResMLP(
        IN, OUT, args.width, depth, rule=rule, hidden=args.hidden, beta_init=args.beta_init
    )
    x, y = teacher(args.batch_size, torch.Generator().manual_seed(10_000 + seed))
    start = time.perf_counter()
    result = {"rule": rule, "depth": depth, "seed": seed, "init": at_init(net, x, y)}
    result["train"] = train(net, seed, args)
    result["seconds"] = time.perf_counter() - start
    return result


def summarise(runs: list[dict], args) -> dict:
    out: dict = {}
    for rule in args.rules:
        out[rule] = {}
        for depth in args.depths:
            rs = [r for r in runs if (r["rule"], r["depth"]) == (rule, depth)]
            out[rule][str(depth)] = {
                "grad_norm_at_init": mean_interval([r["init"]["grad_norm"] for r in rs]),
                "first_over_last_block": mean_interval(
                    [r["init"]["first_over_last_block"] for r in rs]
                ),
                "final_state_rms": mean_interval([r["init"]["state_rms"][-1] for r in rs]),
                "final_loss": mean_interval([r["train"]["final_loss"] for r in rs]),
                "max_grad_norm": mean_interval([r["train"]["max_grad_norm"] for r in rs]),
                "diverged": sum(r["train"]["diverged"] for r in rs),
                "failed": sum(r["train"]["failed"] for r in rs),
                "runs": len(rs),
            }
    return out


def _errorbar(ax, xs, stats: list[dict], **kw) -> None:
    mean = [s["mean"] for s in stats]
    lo = [min(s["mean"] - s["low"], 0.999 * s["mean"]) if s["n"] > 1 else 0.0 for s in stats]
    hi = [s["high"] - s["mean"] if s["n"] > 1 else 0.0 for s in stats]
    ax.errorbar(xs, mean, yerr=[lo, hi], marker="o", capsize=3, **kw)


def plot(runs: list[dict], summary: dict, args, path: Path) -> Path:
    plt = pyplot()
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    (a, b), (c, d) = axes
    deepest = max(args.depths)
    for i, rule in enumerate(args.rules):
        s = summary[rule]
        color = f"C{i}"
        _errorbar(a, args.depths, [s[str(k)]["grad_norm_at_init"] for k in args.depths],
                  label=rule, color=color)  # fmt: skip
        profiles = [r["init"]["block_grad_norms"] for r in runs
                    if (r["rule"], r["depth"]) == (rule, deepest)]  # fmt: skip
        mean = torch.tensor(profiles).mean(0)
        b.plot(range(1, len(mean) + 1), mean.tolist(), color=color, label=rule)
        _errorbar(c, args.depths, [s[str(k)]["final_loss"] for k in args.depths],
                  label=rule, color=color)  # fmt: skip
        for k in args.depths:
            bad = s[str(k)]["failed"]
            if bad:
                where = (k, s[str(k)]["final_loss"]["mean"])
                c.annotate(f"{bad}/{s[str(k)]['runs']}", where, xytext=(4, -12),
                           textcoords="offset points", color=color, fontsize=8)  # fmt: skip
        _errorbar(d, args.depths, [s[str(k)]["final_state_rms"] for k in args.depths],
                  label=rule, color=color)  # fmt: skip
    n = len({r["seed"] for r in runs})
    a.set_title(f"gradient norm at init (one batch), mean ± 95% CI, {n} seeds")
    a.set_ylabel("‖∇θ L‖")
    b.set_title(f"per-block gradient norm at init, depth {deepest}")
    b.set_xlabel("block (input → output), mean over seeds")
    b.set_ylabel("‖∇ block params‖")
    c.set_title(
        f"loss after {args.steps} steps (lr {args.lr:g}, β₀ {args.beta_init:g}); k/n failed"
    )
    c.set_ylabel("mean loss of the last 5 steps (targets: variance 1)")
    c.axhline(1.0, color="k", lw=0.8, ls="--")
    d.set_title("state RMS after the last block, at init")
    d.set_ylabel("RMS of the residual state")
    for ax in (a, b, c, d):
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    for ax in (a, c, d):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("residual blocks")
    fig.tight_layout()
    return save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--depths", type=int_list, default=(16, 32, 64, 128, 256), help="comma-separated"
    )
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--rules", type=name_list, default=RULES, help="comma-separated")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--beta-init", type=float, default=1.0, help="β₀ of the DDL/write-only gates")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("runs/examples/depth_stability"))
    args = p.parse_args(argv)
    check_args(p, args, positive=("seeds", "steps", "depths", "width", "hidden", "batch_size"))
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = []
    for depth in args.depths:
        for rule in args.rules:
            for seed in range(args.seeds):
                runs.append(run_one(rule, depth, seed, args))
            rs = runs[-args.seeds :]
            grad = mean_interval([r["init"]["grad_norm"] for r in rs])
            loss = mean_interval([r["train"]["final_loss"] for r in rs])
            bad = sum(r["train"]["diverged"] for r in rs)
            failed = sum(r["train"]["failed"] for r in rs)
            print(f"depth {depth:>4} {rule:>10}: grad norm at init {format_interval(grad, 3)}, "
                  f"loss after {args.steps} steps {format_interval(loss, 3)}, "
                  f"diverged {bad}/{len(rs)}, failed {failed}/{len(rs)}", flush=True)  # fmt: skip
    summary = summarise(runs, args)
    results = {"settings": settings_of(args), "summary": summary, "runs": runs}
    write_json(args.out / "results.json", results)
    figure = plot(runs, summary, args, args.out / "depth_stability.png")
    print(f"wrote {args.out / 'results.json'} and {figure}")
    return results


if __name__ == "__main__":
    main()
