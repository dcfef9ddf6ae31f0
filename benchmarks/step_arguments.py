"""The command-line options the step-counting scripts share (`gpu_path_memory.py`,
`compiled_graph.py`): which variants, at which size and shape, as `deltalearn bench model` takes
them."""

from __future__ import annotations

import argparse

from deltalearn.bench.model import ModelBench, parse_overrides


def add_step_arguments(parser: argparse.ArgumentParser) -> None:
    """`--variants`, `--size`, `--batch`, `--seq` and `--set KEY=VALUE` (a config override)."""
    parser.add_argument("--variants", default="baseline,ddl,ddl-cc,ddl-tc")
    parser.add_argument("--size", default="small")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")


def step_bench(
    args: argparse.Namespace, dtype: str, compile: bool = False, device: str = "cpu"
) -> ModelBench:
    """The checked `ModelBench` of those options: training steps only, on `device`."""
    bench = ModelBench(
        variants=args.variants.split(","),
        size=args.size,
        overrides=parse_overrides(args.set),
        batch=args.batch,
        seq=args.seq,
        dtype=dtype,
        compile=compile,
        measures=["train"],
        device=device,
    )
    bench.check()
    return bench
