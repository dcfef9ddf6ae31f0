"""Instructions a decoded token takes, per variant: host work counted instead of timed.

On a small CPU a decoded `tiny` token takes ~2 ms, and where the weights happen to lie moves that
by more than DDL's own cost, so timings cannot tell a 2% change apart. Valgrind's callgrind counts
the instructions the decode loop executes, the same from run to run:

    python benchmarks/decode_instructions.py [--variants baseline,ddl,ddl-cc,ddl-tc] \
        [--size tiny] [--set hidden_size=256 --set num_heads=8] [--tokens 64] [--jobs 2]

Each variant runs in its own process under callgrind, on one thread: a warm-up decode, then a
prefill-only greedy decode and a `--tokens` one, with a `getppid()` call before each and after the
last, where callgrind writes out its counts (`--dump-before=getppid`); a token's instructions are
the difference of the two decodes over `--tokens`. The C kernels are built for x86-64-v3 in a
cache of their own (valgrind runs no AVX-512). Needs valgrind (Debian: `apt install valgrind`);
about three minutes a variant. To see where they go, `callgrind_annotate` the files kept with
`--keep DIR` (`cg.VARIANT.out.2`: prefill only, `.3`: prefill and decode).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from callgrind_marks import count_between_marks, mark, require_valgrind, use_portable_kernels


def child(variant: str, size: str, overrides: dict, tokens: int) -> None:
    """The process callgrind watches: marks around a prefill-only and a `tokens` decode."""
    use_portable_kernels()
    import torch

    from deltalearn import DeltaLM, DeltaLMConfig
    from deltalearn.bench.model import greedy_decode

    torch.manual_seed(0)
    model = DeltaLM(DeltaLMConfig.preset(variant, size, **overrides)).eval()
    prompt = torch.randint(0, model.config.vocab_size, (1, 64))
    greedy_decode(model, prompt, 4)  # kernels built and loaded, caches allocated
    mark()
    greedy_decode(model, prompt, 0)
    mark()
    greedy_decode(model, prompt, tokens)
    mark()


def child_command(variant: str, args: argparse.Namespace, tokens: int) -> list[str]:
    sets = [a for s in args.set for a in ("--set", s)]
    return [sys.executable, __file__, "--child", variant, "--size", args.size, "--tokens",
            str(tokens), *sets]  # fmt: skip


def count(variant: str, args: argparse.Namespace, out: Path, env: dict) -> int:
    """Instructions a decoded token of `variant` takes (one callgrind run)."""
    command = child_command(variant, args, args.tokens)
    prefill, decode = count_between_marks(command, env, out / f"cg.{variant}.out")[:2]
    return round((decode - prefill) / args.tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variants", default="baseline,ddl,ddl-cc,ddl-tc")
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--jobs", type=int, default=2, help="callgrind runs at once")
    parser.add_argument("--keep", type=Path, help="keep callgrind's files in this folder")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from deltalearn.bench.model import parse_overrides

    overrides = parse_overrides(args.set)  # a bad --set named before any run
    if args.child:
        child(args.child, args.size, overrides, args.tokens)
        return
    require_valgrind()
    if args.tokens < 1:
        raise SystemExit(f"--tokens must be >= 1, got {args.tokens}")
    variants = args.variants.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        out = args.keep or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DELTALEARN_CACHE": str(Path(tmp) / "cache")}
        # The portable kernels built once, natively (seconds), before the runs that share them.
        subprocess.run(child_command(variants[0], args, 1), env=env, check=True)
        with ThreadPoolExecutor(max(args.jobs, 1)) as pool:
            counted = pool.map(lambda v: count(v, args, out, env), variants)
            counts = dict(zip(variants, counted, strict=True))
    base = counts[variants[0]]
    print(f"instructions a decoded token: {' '.join([args.size, *args.set])}, {args.tokens} tokens")
    print("| variant | instructions | × " + variants[0] + " |\n|---|---|---|")
    for variant, n in counts.items():
        print(f"| {variant} | {n:,} | {n / base:.3f} |")


if __name__ == "__main__":
    main()
