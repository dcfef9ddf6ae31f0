"""Tile settings of the Triton kernels on DDL's state (the update and the compressor reads), tried on
the launches one training step makes (`deltalearn.bench.kernel_tiles`): each candidate compiled
for sm_<arch> (registers, spills, programs resident a multiprocessor); on a GPU also checked
against the default setting's results and timed alone as a replayed CUDA graph, against the bytes
its tensors hold.

    python benchmarks/kernel_tiles.py [--size small --batch 8 --seq 1024 --dtype bfloat16] \\
        [--variants ddl,ddl-cc,ddl-tc] [--json FILE] \\
        [--kernels _fwd_kernel,_bwd_kernel,_read_fwd_kernel,_read_bwd_kernel]

Without a GPU it compiles only (TRITON_INTERPRET=1: runs and checks on CPU tensors instead). Each
row is printed as it is made, so a sweep cut short by a time limit leaves what it measured.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
from step_arguments import add_step_arguments

from deltalearn.bench import settings_from_options
from deltalearn.bench.kernel_tiles import H200_MULTIPROCESSORS, SWEPT, TileSweep, sweep
from deltalearn.bench.timing import format_table, settings_report
from deltalearn.ops import backend

COLUMNS = {
    "kernel": "kernel",
    "flags": "launch",
    "launched_by": "by",
    "launches": "a step",
    "floor_mb": "MB touched",
    "setting": "rows×cols, warps, grid",
    "registers": "regs",
    "spilled_bytes": "spilled B",
    "resident": "programs/SM",
    "check": "results",
    "us": "µs",
    "gb_per_s": "GB/s (floor bytes)",
    "x_default": "× default",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_step_arguments(parser)
    parser.set_defaults(variants="ddl,ddl-cc,ddl-tc", batch=8)
    parser.add_argument("--kernels", default=",".join(SWEPT))
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--rep-ms", type=int, default=20)
    parser.add_argument("--json")
    args = parser.parse_args()
    args.device = device = "cuda" if torch.cuda.is_available() else "cpu"
    args.multiprocessors = (
        backend.multiprocessors(torch.device("cuda")) if device == "cuda" else H200_MULTIPROCESSORS
    )
    bench = settings_from_options(TileSweep, args)

    made: list[dict] = []

    def save(rows: list[dict]) -> dict:
        report = settings_report("kernel_tiles", torch.device(device), bench, rows)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
        return report

    def emit(row: dict) -> None:  # printed and saved as made: a sweep cut short keeps its rows
        made.append(row)
        shown = [row[k] for k in COLUMNS if k in row and k != "x_default"]
        print(" | ".join(f"{v:.1f}" if isinstance(v, float) else str(v) for v in shown))
        sys.stdout.flush()
        save(made)

    report = save(sweep(bench, emit))
    print(f"\n{report['machine']}, torch {report['torch']}, {report['date']}")
    print(format_table(report["rows"], COLUMNS))


if __name__ == "__main__":
    main()
