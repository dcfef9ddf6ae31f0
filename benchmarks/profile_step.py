"""Where a training step's time goes: `torch.profiler` over a few steps of each variant, as
`deltalearn bench model` takes them (same model, optimizer, inputs and autocast; on a CPU, freed
memory kept for reuse, `train.host_allocator`). Variants run one after the other: big memory-bound
ops the variants share may run slower in whichever runs second (where its memory lands), so read
each table's totals with that in mind.

    python benchmarks/profile_step.py --size small --dtype bfloat16 --batch 8 --seq 1024 \
        --variants baseline,ddl-cc --device cuda [--impl reference] [--out DIR]

Prints, per variant, the operators (CPU) or kernels (CUDA) that take the most time, and the
step's total; with `--out`, writes the same tables as text (and with `--trace` a Chrome trace per
variant, tens of MB at `small`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from deltalearn.bench.model import ModelBench, build_variant
from deltalearn.bench.timing import sync
from deltalearn.train.host_allocator import keep_freed_memory


def profile_variant(bench: ModelBench, variant: str, steps: int) -> tuple[str, profile]:
    run = build_variant(bench, variant)
    device = torch.device(bench.device)
    for _ in range(3):  # kernels compiled, AdamW state created, allocator warm
        run.train_step()
    sync(device)
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        for _ in range(steps):
            run.train_step()
        sync(device)
    sort = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
    table = prof.key_averages().table(sort_by=sort, row_limit=30, max_name_column_width=70)
    return table, prof


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="baseline,ddl-cc")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--impl", default="default", choices=["default", "reference"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--compile", action="store_true", help="torch.compile each model first")
    parser.add_argument("--out", type=Path, help="folder for the tables (and traces, --trace)")
    parser.add_argument("--trace", action="store_true", help="also a Chrome trace per variant")
    args = parser.parse_args()
    variants = args.variants.split(",")
    bench = ModelBench(
        variants=variants,
        size=args.size,
        batch=args.batch,
        seq=args.seq,
        dtype=args.dtype,
        impl=args.impl,
        device=args.device,
        compile=args.compile,
    )
    bench.check()
    keep_freed_memory(args.device)  # as `deltalearn train` and `bench model` run on a CPU
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
    for variant in variants:
        table, prof = profile_variant(bench, variant, args.steps)
        head = f"== {variant} ({args.size}, {args.dtype}, {args.batch} x {args.seq}, "
        head += f"{args.impl}{', compiled' if args.compile else ''}, {args.steps} steps on {args.device})"
        print(head, table, sep="\n", flush=True)
        if args.out:
            stem = f"profile_{variant}_{args.impl}"
            (args.out / f"{stem}.txt").write_text(f"{head}\n{table}\n")
            if args.trace:
                prof.export_chrome_trace(str(args.out / f"{stem}.json"))


if __name__ == "__main__":
    main()
