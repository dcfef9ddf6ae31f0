"""What a vector-state DDL update costs a CPU training step, phase by phase: the baseline, a DDL
variant, and the same DDL model with every update replaced by the additive `X + h` (its gate and
value parameters left idle), timed interleaved in one process with timers around the forward, the
backward and the clip + AdamW, as `deltalearn train` runs them (freed memory kept, the trainer's
AdamW). Where the third equals the baseline, everything the variant adds is its update path.

    python benchmarks/update_share.py [--size tiny] [--variant ddl] [--rounds 25]

Printed: the median milliseconds of each phase and of the whole step, and each step's ratio to the
baseline's. Vector states only (`ddl`, `write-only`): a matrix state's update also makes the next
sublayer's read, which `X + h` cannot stand in for.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from deltalearn.bench.model import GRAD_CLIP, ModelBench, build_variant
from deltalearn.nn import DeltaUpdate
from deltalearn.train.host_allocator import keep_freed_memory

PHASES = ("forward", "backward", "clip + AdamW", "step")


def additive_updates(model: torch.nn.Module) -> None:
    """Every `DeltaUpdate` of `model` adds h to the state instead of rewriting it."""

    def add(X, h, c, u, compress=None, *, c_norm=None):
        return X + h

    for module in model.modules():
        if isinstance(module, DeltaUpdate):
            module.forward = add


def timed_step(run) -> tuple[float, float, float]:
    model, optimizer = run.model, run.optimizer
    model.train()
    start = time.perf_counter()
    loss = model(run.ids, labels=run.ids).loss
    forward = time.perf_counter()
    loss.backward()
    backward = time.perf_counter()
    torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return forward - start, backward - forward, time.perf_counter() - backward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--variant", default="ddl", choices=("ddl", "write-only"))
    parser.add_argument("--rounds", type=int, default=25)
    args = parser.parse_args()
    keep_freed_memory(torch.device("cpu"))
    bench = ModelBench(size=args.size)
    runs = {name: build_variant(bench, name) for name in ("baseline", args.variant)}
    runs[f"{args.variant}, updates as X + h"] = build_variant(bench, args.variant)
    additive_updates(runs[f"{args.variant}, updates as X + h"].model)
    for run in runs.values():  # warm: AdamW state, the allocator, the kernels built
        for _ in range(3):
            timed_step(run)
    times: dict[str, list[tuple[float, ...]]] = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, run in runs.items():
            phases = timed_step(run)
            times[name].append((*phases, sum(phases)))
    base_step = statistics.median(t[3] for t in times["baseline"])
    print(f"{args.size}, batch {bench.batch} x seq {bench.seq}, fp32, {torch.get_num_threads()} "
          f"threads; median ms of {args.rounds} interleaved rounds")  # fmt: skip
    print("| model | " + " | ".join(PHASES) + " | baseline ÷ it |")
    print("|---" * (len(PHASES) + 2) + "|")
    for name, rows in times.items():
        medians = [statistics.median(t[i] for t in rows) for i in range(len(PHASES))]
        cells = " | ".join(f"{m * 1e3:.2f}" for m in medians)
        print(f"| {name} | {cells} | {base_step / medians[3]:.3f} |")


if __name__ == "__main__":
    main()
