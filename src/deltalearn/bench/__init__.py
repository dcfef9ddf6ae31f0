"""`deltalearn bench`: speed and memory benchmarks.

    deltalearn bench operator   one Delta rewrite, fused vs reference vs additive (the default)
    deltalearn bench model      DeltaLM variants vs the additive baseline: training, full-sequence
                                inference, cached generation and the training step's peak memory
    deltalearn bench decode     cached generation: dynamic vs static cache, eager vs compiled
    deltalearn bench kernels    the Triton kernels the variants launch, compiled for a CUDA GPU
                                here (no GPU needed): registers, spills, shared memory

Every figure comes with its ratio to the reference measured in the same run (interleaved repeats,
median), and every report names the machine, the torch version and the date (`kernels` measures
no time: it compiles).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path

import torch

from deltalearn.bench.decode import DEFAULT_MODES as DECODE_DEFAULT_MODES
from deltalearn.bench.decode import MODES as DECODE_MODES
from deltalearn.bench.decode import (
    DecodeBench,
    decode_benchmark,
    decode_report,
    format_decode_report,
)
from deltalearn.bench.decode import __doc__ as DECODE_DOC
from deltalearn.bench.kernels import MODES as KERNEL_MODES
from deltalearn.bench.kernels import (
    KernelBench,
    format_kernels_report,
    kernels_benchmark,
    kernels_report,
)
from deltalearn.bench.kernels import __doc__ as KERNELS_DOC
from deltalearn.bench.model import (
    DEFAULT_VARIANTS,
    DTYPES,
    IMPLS,
    MEASURES,
    ModelBench,
    format_model_report,
    model_benchmark,
    model_report,
    parse_overrides,
)
from deltalearn.bench.model import __doc__ as MODEL_DOC
from deltalearn.bench.operator import operator_benchmark
from deltalearn.bench.timing import format_table, run_header, write_json
from deltalearn.errors import ConfigError

__all__ = [
    "DecodeBench",
    "ModelBench",
    "decode_benchmark",
    "main",
    "model_benchmark",
    "operator_benchmark",
]

_SUBCOMMANDS = ("operator", "model", "decode", "kernels")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deltalearn bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="what", required=True)
    default_device = "cuda" if torch.cuda.is_available() else "cpu"

    op = sub.add_parser("operator", help="one rewrite of a (B, T, d, dv) state, fwd + bwd")
    op.add_argument("--device", default=default_device)
    op.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    op.add_argument("--batch", type=int, default=8)
    op.add_argument("--seq", type=int, default=256)
    op.add_argument("--dim", type=int, default=256)
    op.add_argument("--value-channels", type=int, default=4)
    op.add_argument("--repeats", type=int, default=10)
    op.add_argument("--json", type=Path, help="also write the report as JSON here")

    m = sub.add_parser(
        "model",
        help="DeltaLM variants vs the baseline: train, infer, generate, memory",
        description=MODEL_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    m.add_argument("--device", default=default_device)
    m.add_argument("--size", default="tiny", help="preset size: tiny, small, medium")
    m.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a DeltaLMConfig field for every variant (repeatable), "
        "e.g. --set hidden_size=256 --set num_heads=8",
    )
    m.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help="comma-separated presets; the first is the reference of every ratio",
    )
    m.add_argument("--batch", type=int, default=8, help="rows of the train/infer batch")
    m.add_argument("--seq", type=int, default=256, help="tokens per row of the train/infer batch")
    m.add_argument("--dtype", default="float32", help=f"one of {', '.join(DTYPES)} (autocast)")
    m.add_argument(
        "--impl", default="default", help=f"{' | '.join(IMPLS)}: reference = unfused DeltaUpdate"
    )
    m.add_argument("--compile", action="store_true", help="torch.compile every model (in place)")
    m.add_argument(
        "--activation-checkpointing",
        action="store_true",
        help="checkpoint every block in training (as `deltalearn train --activation-checkpointing`)",
    )
    m.add_argument(
        "--cuda-graphs",
        action="store_true",
        help="train and infer: the step recorded as a CUDA graph and replayed (train as "
        "`deltalearn train --cuda-graphs`; memory stays the eager step's)",
    )
    m.add_argument("--measure", default=",".join(MEASURES), help="comma-separated subset")
    m.add_argument("--gen-prompt", type=int, default=64, help="prompt tokens (prefill)")
    m.add_argument("--gen-tokens", type=int, default=64, help="decoded tokens (timed)")
    m.add_argument("--gen-batch", type=int, default=1, help="rows decoded together")
    m.add_argument(
        "--gen-instances",
        type=int,
        default=3,
        help="copies of each model decoding takes turns on (where weights lie moves CPU decoding)",
    )
    m.add_argument("--repeats", type=int, default=5)
    m.add_argument(
        "--peak-tflops",
        type=float,
        help="peak TFLOP/s of the device for MFU (default: NVIDIA's dense figure for a known GPU "
        "at --dtype; none on a CPU)",
    )
    m.add_argument("--json", type=Path, help="also write the report as JSON here")

    d = sub.add_parser(
        "decode",
        help="cached generation: dynamic vs static cache, eager vs compiled decode step",
        description=DECODE_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d.add_argument("--device", default=default_device)
    d.add_argument("--size", default="tiny", help="preset size: tiny, small, medium")
    d.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    d.add_argument("--variants", default=",".join(DecodeBench().variants))
    d.add_argument(
        "--modes",
        default=",".join(DECODE_DEFAULT_MODES),
        help=f"the first is the reference; of {', '.join(DECODE_MODES)}",
    )
    d.add_argument("--batch", type=int, default=1, help="rows decoded together")
    d.add_argument("--prompt", type=int, default=64, help="prompt tokens (prefill, not timed)")
    d.add_argument("--tokens", type=int, default=64, help="decoded tokens (timed)")
    d.add_argument("--dtype", default="float32", help="float32 or bfloat16 (autocast)")
    d.add_argument(
        "--compile-mode",
        default="reduce-overhead" if default_device == "cuda" else "default",
        help="torch.compile mode of the decode step (reduce-overhead: CUDA graphs)",
    )
    d.add_argument("--repeats", type=int, default=5)
    d.add_argument("--json", type=Path, help="also write the report as JSON here")

    k = sub.add_parser(
        "kernels",
        help="the Triton kernels the variants launch, compiled for a CUDA GPU (no GPU needed)",
        description=KERNELS_DOC,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    k.add_argument("--size", default="small", help="preset size: tiny, small, medium")
    k.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    k.add_argument("--variants", default=",".join(KernelBench().variants))
    k.add_argument("--dtypes", default="bfloat16,float32", help="autocast dtypes (float32: none)")
    k.add_argument("--modes", default=",".join(KERNEL_MODES))
    k.add_argument("--batch", type=int, default=2)
    k.add_argument("--seq", type=int, default=16)
    k.add_argument(
        "--arch", type=int, default=90, help="compute capability: 90 = sm_90 (H100/H200)"
    )
    k.add_argument("--json", type=Path, help="also write the report as JSON here")
    return parser


def _kernels(args: argparse.Namespace) -> dict:
    """`bench kernels`, which needs triton (the optional `gpu` extra)."""
    from deltalearn.ops.backend import triton_available

    if not triton_available():
        raise ConfigError("bench kernels compiles Triton kernels: pip install 'deltalearn[gpu]'")
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise ConfigError(
            "bench kernels compiles the kernels for a GPU; unset TRITON_INTERPRET (the "
            "interpreter replaces them with NumPy code)"
        )
    bench = settings_from_options(KernelBench, args)
    report = kernels_report(bench, kernels_benchmark(bench))
    print(format_kernels_report(report))
    return report


def settings_from_options(cls, args: argparse.Namespace):
    """A benchmark's settings (dataclass `cls`) from its options of the same names: `--set` parsed
    into `overrides`, the comma-separated lists split."""
    values, defaults = {}, cls()
    for f in dataclasses.fields(cls):
        if f.name == "overrides":
            values[f.name] = parse_overrides(args.set)
        elif isinstance(getattr(defaults, f.name), list):
            values[f.name] = _split(getattr(args, f.name))
        else:
            values[f.name] = getattr(args, f.name)
    return cls(**values)


def _split(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def main(argv: list[str] | None = None) -> int:
    import sys

    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] not in (*_SUBCOMMANDS, "-h", "--help"):
        argv = ["operator", *argv]  # `deltalearn bench [options]` is the operator benchmark
    args = build_parser().parse_args(argv)
    if args.what == "operator":
        device, dtype = torch.device(args.device), getattr(torch, args.dtype)
        rows = operator_benchmark(
            args.batch, args.seq, args.dim, args.value_channels, device, dtype, args.repeats
        )
        report = {"benchmark": "operator", **run_header(device), "rows": rows}
        print(
            f"operator benchmark on {report['machine']}, torch {report['torch']}, {report['date']}"
        )
        print(format_table(rows))
    elif args.what == "decode":
        decode = settings_from_options(DecodeBench, args)
        report = decode_report(decode, decode_benchmark(decode))
        print(format_decode_report(report))
    elif args.what == "kernels":
        report = _kernels(args)
    else:
        bench = ModelBench(
            variants=_split(args.variants),
            size=args.size,
            overrides=parse_overrides(args.set),
            batch=args.batch,
            seq=args.seq,
            dtype=args.dtype,
            impl=args.impl,
            compile=args.compile,
            checkpointing=args.activation_checkpointing,
            cuda_graphs=args.cuda_graphs,
            measures=_split(args.measure),
            gen_prompt=args.gen_prompt,
            gen_tokens=args.gen_tokens,
            gen_batch=args.gen_batch,
            gen_instances=args.gen_instances,
            repeats=args.repeats,
            device=args.device,
            peak_tflops=args.peak_tflops,
        )
        report = model_report(bench, model_benchmark(bench))
        print(format_model_report(report))
    if args.json:
        write_json(args.json, report)
    return 1 if any("error" in row for row in report.get("rows", [])) else 0


if __name__ == "__main__":
    raise SystemExit(main())
