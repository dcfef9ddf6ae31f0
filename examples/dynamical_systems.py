"""Dynamical systems whose maps need reflections or sign flips: additive vs DDL vs write-only.

Every task is generated in code (fresh training samples each step, a fixed test set):

    oscillator  the flow map of a damped harmonic oscillator T = 6 time units ahead, for a range of
                frequencies: (x₀, v₀, ω) ↦ (x_T, v_T/ω). Over 0.5–2.4 turns the map passes through
                rotations by π, i.e. x_T ≈ −x₀ (a sign flip) for some ω.
    billiard    a particle in the unit square with elastic walls, T = 1.5 ahead:
                (p₀, v₀) ↦ (p_T, v_T). Every wall hit reflects a velocity component (v ↦ −v).
    tent        three steps of the tent map x ↦ 1 − 2|x| on [−1, 1]: a 1-D map with 8 linear pieces
                of alternating slope ±8 (non-monotonic).
    monotone    the control: y = Qᵀ tanh(2Qx) for a fixed rotation Q, a monotone map (symmetric
                positive-definite Jacobian) that needs no sign flip.

For each task, rule and depth, a `DeltaResMLP` (width 32) is trained on the mean squared error; the
test error is reported relative to the variance of the targets. The third row of the figure shows
the training curves at the deepest setting. For the deepest DDL network the
gates β on the test set are compared with the initial gates and split by whether the dynamics flip
a sign for that sample (`flip`: cos ω_dT < 0 for the oscillator, an odd number of wall hits on some
axis for the billiard, a negative slope of the map at x for the tent map).

Writes `results.json` and `dynamical_systems.png` into --out.

    python examples/dynamical_systems.py               # 4 tasks × 4 depths × 3 rules × 3 seeds
    python examples/dynamical_systems.py --seeds 1 --steps 5 --depths 1 --out /tmp/dyn   # smoke
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

from deltalearn.nets import DeltaResMLP
from deltalearn.nets.results import (
    check_args,
    format_interval,
    int_list,
    mean_interval,
    name_list,
    pooled_betas,
    pyplot,
    save_figure,
    settings_of,
    write_json,
)

RULES = ("additive", "delta", "write_only")
BETA_BINS = torch.linspace(0.0, 2.0, 41)
TEST_SEED = 12345

# A task draws n samples: inputs x, targets y and a boolean "the dynamics flip a sign here".
Task = Callable[[int, torch.Generator], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def oscillator(n: int, g: torch.Generator, horizon: float = 6.0, zeta: float = 0.05):
    """x'' + 2ζωx' + ω²x = 0 from (x₀, v₀): the exact flow map exp(AT), A = [[0, 1], [−ω², −2ζω]]."""
    x0, v0 = (torch.rand(n, generator=g, dtype=torch.float64) * 2 - 1 for _ in range(2))
    omega = 0.5 + 2.0 * torch.rand(n, generator=g, dtype=torch.float64)
    A = torch.zeros(n, 2, 2, dtype=torch.float64)
    A[:, 0, 1] = 1.0
    A[:, 1, 0] = -(omega**2)
    A[:, 1, 1] = -2 * zeta * omega
    state = torch.linalg.matrix_exp(A * horizon) @ torch.stack([x0, v0], -1)[..., None]
    xT, vT = state[..., 0].unbind(-1)
    flip = torch.cos(omega * math.sqrt(1 - zeta**2) * horizon) < 0
    x = torch.stack([x0, v0, omega], -1)
    return x.float(), torch.stack([xT, vT / omega], -1).float(), flip


def billiard(n: int, g: torch.Generator, horizon: float = 1.5):
    """Free flight in [0, 1]² with elastic walls: the position folds, the velocity flips per hit."""
    p0 = torch.rand(n, 2, generator=g)
    v0 = torch.rand(n, 2, generator=g) * 2 - 1
    q = p0 + v0 * horizon
    hits = torch.floor(q).abs()  # wall hits per axis
    r = torch.remainder(q, 2.0)
    pT = torch.where(r <= 1, r, 2 - r)
    vT = v0 * (1 - 2 * torch.remainder(hits, 2))
    flip = (torch.remainder(hits, 2) == 1).any(-1)
    return torch.cat([p0, v0], -1), torch.cat([pT, vT], -1), flip


def tent(n: int, g: torch.Generator, steps: int = 3):
    """`steps` iterations of x ↦ 1 − 2|x|; the slope of the iterate is ±2^steps."""
    x = torch.rand(n, 1, generator=g) * 2 - 1
    y, sign = x, torch.ones(n, 1)
    for _ in range(steps):
        sign = sign * torch.where(y > 0, -1.0, 1.0)
        y = 1 - 2 * y.abs()
    return x, y, (sign < 0)[:, 0]


_Q = torch.linalg.qr(torch.randn(4, 4, generator=torch.Generator().manual_seed(7)))[0]


def monotone(n: int, g: torch.Generator):
    """The control: y = Qᵀ tanh(2Qx), a monotone map (no sign flip anywhere)."""
    x = torch.randn(n, 4, generator=g)
    return x, torch.tanh(2 * x @ _Q.T) @ _Q, torch.zeros(n, dtype=torch.bool)


TASKS: dict[str, Task] = {
    "oscillator": oscillator,
    "billiard": billiard,
    "tent": tent,
    "monotone": monotone,
}


def beta_summary(beta: torch.Tensor, flip: torch.Tensor) -> dict:
    """β over blocks × test samples: histogram, fraction above 1, split by the flip groups."""
    out = {
        "mean": beta.mean().item(),
        "fraction_above_1": (beta > 1).float().mean().item(),
        "histogram": torch.histogram(beta.reshape(-1), BETA_BINS).hist.tolist(),
    }
    for name, mask in (("flip", flip), ("no_flip", ~flip)):
        if mask.any():
            b = beta[:, mask]
            out[name] = {"mean": b.mean().item(), "fraction_above_1": (b > 1).float().mean().item()}
    return out


def gates_on(net: DeltaResMLP, x: torch.Tensor) -> torch.Tensor:
    """β `(blocks, samples)` of `net` on `x`."""
    with torch.no_grad():
        _, gates = net(x, output_gates=True)
    return pooled_betas(gates).reshape(len(gates), -1)


def train_one(task: str, rule: str, depth: int, seed: int, test, args) -> dict:
    x_te, y_te, flip_te = test
    make = TASKS[task]
    torch.manual_seed(seed)
    net = DeltaResMLP(
        x_te.shape[1], y_te.shape[1], args.width, depth, rule=rule, hidden=args.hidden
    )
    record_beta = rule == "delta" and depth == max(args.depths)
    beta_init = gates_on(net, x_te) if record_beta else None
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=args.lr, total_steps=args.steps, pct_start=0.1
    )
    data = torch.Generator().manual_seed(seed)  # the same training samples for every rule
    every, running, curve = max(args.steps // 40, 1), 0.0, []
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        x, y, _ = make(args.batch_size, data)
        loss = (net(x) - y).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        running += loss.item()
        if step % every == 0:  # the mean training loss of the last `every` steps
            curve.append([step, running / every])
            running = 0.0
    with torch.no_grad():
        mse = (net(x_te) - y_te).pow(2).mean().item()
    result = {
        "task": task,
        "rule": rule,
        "depth": depth,
        "seed": seed,
        "test_mse": mse,
        "relative_mse": mse / y_te.var(0).mean().item(),
        "train_seconds": time.perf_counter() - start,
        "train_curve": curve,
    }
    if record_beta:
        result["beta_init"] = beta_summary(beta_init, flip_te)
        result["beta"] = beta_summary(gates_on(net, x_te), flip_te)
    return result


def _seeds(runs: list[dict], task: str, rule: str, depth: int) -> list[dict]:
    """The runs of one setting, ordered by seed."""
    rs = [r for r in runs if (r["task"], r["rule"], r["depth"]) == (task, rule, depth)]
    return sorted(rs, key=lambda r: r["seed"])


def summarise(runs: list[dict], args) -> dict:
    """Per task, rule and depth over seeds: the relative MSE (mean ± t-interval), its log10 (the
    errors span decades, so the figure shows the geometric mean and the interval of the log), and
    per seed — same training samples, same test set — how often each rule beats additive."""
    table: dict = {"relative_mse": {}, "log10_relative_mse": {}, "seeds_better_than_additive": {}}
    for task in args.tasks:
        for key in table:
            table[key][task] = {rule: {} for rule in args.rules}
        for rule in args.rules:
            for depth in args.depths:
                vals = [r["relative_mse"] for r in _seeds(runs, task, rule, depth)]
                logs = [math.log10(v) if v > 0 else -math.inf for v in vals]
                table["relative_mse"][task][rule][str(depth)] = mean_interval(vals)
                table["log10_relative_mse"][task][rule][str(depth)] = mean_interval(logs)
                base = [r["relative_mse"] for r in _seeds(runs, task, "additive", depth)]
                if rule != "additive" and len(base) == len(vals):
                    wins = sum(a < b for a, b in zip(vals, base, strict=True))
                    table["seeds_better_than_additive"][task][rule][str(depth)] = [wins, len(vals)]
    return table


def plot(runs: list[dict], summary: dict, args, path: Path) -> Path:
    plt = pyplot()
    tasks = list(args.tasks)
    fig, axes = plt.subplots(3, len(tasks), figsize=(4 * len(tasks), 10.5), squeeze=False)
    deepest = max(args.depths)
    centres = (0.5 * (BETA_BINS[1:] + BETA_BINS[:-1])).tolist()
    for j, task in enumerate(tasks):
        ax = axes[0, j]
        for rule in args.rules:
            stats = [summary["log10_relative_mse"][task][rule][str(d)] for d in args.depths]
            geo = [10 ** s["mean"] for s in stats]  # geometric mean over seeds
            half = [s["half_width"] if s["n"] > 1 and math.isfinite(s["half_width"]) else 0.0
                    for s in stats]  # fmt: skip
            lo = [g - g / 10**h for g, h in zip(geo, half, strict=True)]
            hi = [g * 10**h - g for g, h in zip(geo, half, strict=True)]
            ax.errorbar(args.depths, geo, yerr=[lo, hi], marker="o", capsize=3, label=rule)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("residual blocks")
        ax.set_title(task)
        ax.grid(alpha=0.3, which="both")
        if j == 0:
            ax.set_ylabel("test MSE / Var(y): geometric mean, 95% CI")
            ax.legend()
        bx = axes[1, j]
        recs = [r for r in runs if r["task"] == task and "beta" in r]
        for key, style, label in (("beta_init", ":", "init"), ("beta", "-", "trained")):
            if recs:
                total = torch.tensor([r[key]["histogram"] for r in recs]).sum(0)
                bx.step(centres, (total / total.sum()).tolist(), where="mid", ls=style, label=label)
        bx.axvline(1.0, color="k", lw=0.8, ls="--")
        bx.set_xlabel(f"β, DDL depth {deepest} (all blocks, test set)")
        if recs:
            above = mean_interval([r["beta"]["fraction_above_1"] for r in recs])["mean"]
            text = f"β>1: {100 * above:.0f}%"
            if "flip" in recs[0]["beta"] and "no_flip" in recs[0]["beta"]:
                f = mean_interval([r["beta"]["flip"]["fraction_above_1"] for r in recs])["mean"]
                nf = mean_interval([r["beta"]["no_flip"]["fraction_above_1"] for r in recs])["mean"]
                text += f"\nflip {100 * f:.0f}% / no flip {100 * nf:.0f}%"
            bx.text(0.03, 0.95, text, transform=bx.transAxes, va="top", fontsize=9)
        if j == 0:
            bx.set_ylabel("fraction")
            bx.legend(loc="upper right")
        cx = axes[2, j]
        for rule in args.rules:
            curves = [r["train_curve"] for r in _seeds(runs, task, rule, deepest)]
            if curves and curves[0]:
                mean = torch.tensor([[v for _, v in c] for c in curves]).mean(0)
                cx.plot([s for s, _ in curves[0]], mean.tolist(), label=rule)
        cx.set_yscale("log")
        cx.set_xlabel(f"training step (depth {deepest}, mean over seeds)")
        cx.grid(alpha=0.3, which="both")
        if j == 0:
            cx.set_ylabel("training MSE")
            cx.legend()
    fig.tight_layout()
    return save_figure(fig, path)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--depths", type=int_list, default=(1, 2, 4, 8), help="comma-separated")
    p.add_argument("--tasks", type=name_list, default=tuple(TASKS), help="comma-separated")
    p.add_argument("--rules", type=name_list, default=RULES, help="comma-separated")
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--test-size", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--out", type=Path, default=Path("runs/examples/dynamical_systems"))
    args = p.parse_args(argv)
    unknown = [t for t in args.tasks if t not in TASKS]
    if unknown:
        p.error(f"--tasks: unknown {unknown}; expected some of {list(TASKS)}")
    check_args(
        p, args, positive=("seeds", "steps", "depths", "width", "hidden", "batch_size", "test_size")
    )
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    runs = []
    for task in args.tasks:
        test = TASKS[task](args.test_size, torch.Generator().manual_seed(TEST_SEED))
        for depth in args.depths:
            for rule in args.rules:
                for seed in range(args.seeds):
                    runs.append(train_one(task, rule, depth, seed, test, args))
                rel = mean_interval([r["relative_mse"] for r in runs[-args.seeds :]])
                each = ", ".join(f"{v:.4f}" for v in rel["values"])
                print(f"{task:>10} depth {depth:>3} {rule:>10}: relative test MSE "
                      f"{format_interval(rel, 4)} (seeds: {each})", flush=True)  # fmt: skip
    summary = summarise(runs, args)
    results = {"settings": settings_of(args), "summary": summary, "runs": runs}
    write_json(args.out / "results.json", results)
    figure = plot(runs, summary, args, args.out / "dynamical_systems.png")
    deepest = max(args.depths)
    print(
        f"β of DDL at depth {deepest}, fraction above 1 (init -> trained; flip / no-flip samples):"
    )
    for task in args.tasks:
        recs = [r for r in runs if r["task"] == task and "beta" in r]
        if not recs:
            continue
        init = mean_interval([r["beta_init"]["fraction_above_1"] for r in recs])
        done = mean_interval([r["beta"]["fraction_above_1"] for r in recs])
        line = f"  {task:>10}: {format_interval(init, 3)} -> {format_interval(done, 3)}"
        if "flip" in recs[0]["beta"] and "no_flip" in recs[0]["beta"]:
            f = mean_interval([r["beta"]["flip"]["fraction_above_1"] for r in recs])
            nf = mean_interval([r["beta"]["no_flip"]["fraction_above_1"] for r in recs])
            line += f"; flip {format_interval(f, 3)} / no flip {format_interval(nf, 3)}"
        print(line)
    wins = summary["seeds_better_than_additive"]
    for task in args.tasks:
        for rule in wins[task]:
            if wins[task][rule]:
                cells = ", ".join(f"depth {d}: {w}/{n}" for d, (w, n) in wins[task][rule].items())
                print(f"  {task:>10} {rule} beats additive in {cells} seeds")
    print(f"wrote {args.out / 'results.json'} and {figure}")
    return results


if __name__ == "__main__":
    main()
